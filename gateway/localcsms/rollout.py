"""M4 at the site: the staged rollout of one multi-board `UpdateFirmware`.

Rule: a board is never told twice, and a first wave that fails stops the rollout before
any other board is told. The first `first_wave` targets get the update; the others only
once every first-wave board reported Installed or Activated; a refusal, a failure status or
no final status within `firmware.wave_timeout_s` stops it, and the other boards are never
told. Who was told is on disk before the update is sent, so a restart (kill -9 included)
resumes the rollout without telling anyone again.

`Rollout` is the state machine of one rollout, sans I/O: the driver asks `to_tell` (and
persists before sending), feeds `answered`, `status` and the clock (`expire`), and calls
`advance`. `Rollouts` drives them (each board told through `deliver`, the fan-out of the
command path, `gateway.boards.Boards.deliver`) and keeps each one in SQLite
(`data_dir/fwrollout.sqlite`, WAL, synchronous=FULL, one row per rollout written in one
statement) on the outbox's writer thread, so that a board's FirmwareStatus is recorded
before the commit that acks it. After a restart, boards that finished are not told again,
first-wave boards already told are watched again, a stop stays a stop. A rollout is known
by the SHA-256 of the Command's signed inner frame, so the CSMS sending the same Command
again (after a reconnect) is answered by the same rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import _core
from gateway.protocol.text import clip_reason
from gateway.schema import FirmwareStatus, Key, Status

log = logging.getLogger("gateway.firmware")

SUCCESS = frozenset({FirmwareStatus.INSTALLED, FirmwareStatus.ACTIVATED})
FAILURE = frozenset(
    {
        FirmwareStatus.DOWNLOAD_FAILED,
        FirmwareStatus.VERIFICATION_FAILED,
        FirmwareStatus.SIGNATURE_INVALID,
        FirmwareStatus.INSTALL_FAILED,
        FirmwareStatus.ROLLED_BACK,
    }
)
"""FirmwareStatus values that end a board's update: success or failure (the rest are steps)."""

ROLLOUT_KEEP_S = 7 * 86400
"""A finished rollout is kept this long, to answer the same Command sent again."""
SETTLE_S = 10.0
"""At most this long, the later wave waits for the cache's writes to settle."""

Result = dict[int, Any]
Deliver = Callable[[str, int, dict[int, Any], int, float], Awaitable[Result]]
"""(device, action, body, prio, timeout) → the target's result (`gateway.boards.Boards.deliver`)."""
Submit = Callable[[Callable[[], object]], "asyncio.Future[object]"]
"""Runs a blocking function on a worker thread, in submission order."""


def _name(st: int) -> str:
    try:
        return FirmwareStatus(st).name
    except ValueError:
        return f"status {st}"


FIRST, LATER, DONE = "first", "later", "done"
"""Phases of a rollout."""
WAIT, TELLING, WATCH, RECHECK, FINAL = "wait", "telling", "watch", "recheck", "final"
"""States of a target: not told; told, answer awaited; first wave, accepted, final status
awaited; later wave, told before a restart and its answer lost, any status awaited; result known."""


@dataclass
class Rollout:
    """One staged UpdateFirmware. The driver asks `to_tell` (and persists before sending),
    feeds `answered`, `status` and the clock (`expire`), and calls `advance`."""

    key: str
    inner: bytes
    image_id: int
    targets: list[str]
    first: int
    wave_timeout_s: float
    later_timeout_s: float
    deliver_until: float
    """Wall clock: the first wave's deliveries end here (the Command's expiry bounds them)."""
    phase: str = FIRST
    stop: str = ""
    wave_deadline: float = 0.0
    """Wall clock: the first wave's final statuses are due here (0 until its answers are in)."""
    recheck_until: float = 0.0
    done_at: float = 0.0
    state: dict[str, str] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)

    @classmethod
    def new(
        cls, inner: bytes, image_id: int, targets: list[str], first: int, deliver_s: float,
        wave_timeout_s: float, later_timeout_s: float, now: float,
    ) -> Rollout:  # fmt: skip
        targets = list(dict.fromkeys(targets))  # a target named twice is told once
        r = cls(hashlib.sha256(inner).hexdigest(), inner, image_id, targets, first, wave_timeout_s,
                later_timeout_s, now + deliver_s)  # fmt: skip
        r.state = dict.fromkeys(targets, WAIT)
        return r

    @property
    def wave(self) -> list[str]:
        return self.targets[: self.first]

    @property
    def rest(self) -> list[str]:
        return self.targets[self.first :]

    @property
    def done(self) -> bool:
        return self.phase == DONE

    def watched(self) -> list[str]:
        """Targets whose FirmwareStatus of the image matters now."""
        if self.done:
            return []
        return [d for d, s in self.state.items() if s in (TELLING, WATCH, RECHECK)]

    def to_tell(self) -> list[str]:
        """The boards to send the update now, marked TELLING: persist before sending."""
        group = self.wave if self.phase == FIRST else self.rest if self.phase == LATER else []
        out = [d for d in group if self.state[d] == WAIT]
        for d in out:
            self.state[d] = TELLING
        return out

    def answered(self, device: str, result: Result) -> None:
        """The board's answer to the UpdateFirmware (or why there is none)."""
        if self.done or self.state.get(device) != TELLING:
            return
        self.results[device] = result
        if device in self.wave and result.get(Key.STATUS) == Status.ACCEPTED:
            self.state[device] = WATCH
            return
        self.state[device] = FINAL
        if device in self.wave:
            self.stop = self.stop or f"{device} refused the update"

    def status(self, device: str, st: int, why: str) -> bool:
        """A FirmwareStatus of the image from a target; True when it changed the rollout."""
        s = self.state.get(device)
        if self.done or s not in (TELLING, WATCH, RECHECK):
            return False
        if s == RECHECK:  # the board got the update before the restart: that was its answer
            name = _name(st)
            self.results[device] = {Key.DEVICE_ID: device, Key.STATUS: Status.ACCEPTED,
                                    Key.REASON: f"answer lost in a gateway restart; reported {name}"}  # fmt: skip
            self.state[device] = FINAL
            return True
        if device not in self.wave or (st not in SUCCESS and st not in FAILURE):
            return False
        r: Result = dict(self.results.get(device) or {Key.DEVICE_ID: device, Key.STATUS: Status.ACCEPTED})
        if st in FAILURE:
            name = _name(st)
            r[Key.STATUS], r[Key.REASON] = Status.FAILED, clip_reason(f"FirmwareStatus {name} {why}".strip())
            self.stop = self.stop or f"{device} reported {name}"
        self.results[device] = r
        self.state[device] = FINAL
        return True

    def expire(self, now: float) -> None:
        if self.phase == FIRST and self.wave_deadline and now >= self.wave_deadline:
            for d in self.wave:
                if self.state[d] == WATCH:
                    r: Result = dict(self.results.get(d) or {Key.DEVICE_ID: d})
                    r[Key.STATUS], r[Key.REASON] = Status.FAILED, "no final FirmwareStatus in time"
                    self.results[d], self.state[d] = r, FINAL
                    self.stop = self.stop or f"{d} reported no final status in time"
        if self.recheck_until and now >= self.recheck_until:
            for d in self.rest:
                if self.state[d] == RECHECK:
                    why = "told before a gateway restart; no answer nor FirmwareStatus since"
                    self.results[d] = {Key.DEVICE_ID: d, Key.STATUS: Status.FAILED, Key.REASON: why}
                    self.state[d] = FINAL

    def advance(self, now: float) -> None:
        if self.phase == FIRST:
            wave = [self.state[d] for d in self.wave]
            if not self.wave_deadline and WAIT not in wave and TELLING not in wave:
                self.wave_deadline = now + self.wave_timeout_s
            if self.stop and TELLING not in wave:
                reason = clip_reason(f"rollout stopped: {self.stop}")
                for d in self.targets:
                    if self.state[d] != FINAL:
                        res = self.results.get(d)  # a first-wave board still installing keeps its answer
                        self.results[d] = res or {Key.DEVICE_ID: d, Key.STATUS: Status.REJECTED, Key.REASON: reason}
                        self.state[d] = FINAL
            elif all(s == FINAL for s in wave):
                self.phase = LATER
        if self.phase == LATER and all(self.state[d] == FINAL for d in self.rest):
            self.phase = DONE
        if self.phase == FIRST and all(s == FINAL for s in self.state.values()):
            self.phase = DONE
        if self.done and not self.done_at:
            self.done_at = now

    def next_deadline(self) -> float | None:
        ds = [self.wave_deadline if self.phase == FIRST and self.wave_deadline else 0.0, self.recheck_until]
        ds = [d for d in ds if d]
        return min(ds) if ds else None

    def resume(self, now: float) -> None:
        """After a restart: a board told whose answer was not recorded is never told again.
        In the first wave it is watched for its final status as if it had accepted; in the
        later wave any FirmwareStatus of the image from it within its timeout is its answer."""
        if self.done:
            return
        for d in self.wave:
            if self.state[d] == TELLING:
                self.state[d] = WATCH
                why = "told before a gateway restart; its answer was lost"
                self.results.setdefault(d, {Key.DEVICE_ID: d, Key.STATUS: Status.ACCEPTED, Key.REASON: why})
        if any(self.state[d] == TELLING for d in self.rest):
            for d in self.rest:
                if self.state[d] == TELLING:
                    self.state[d] = RECHECK
            self.recheck_until = now + self.later_timeout_s

    def result_list(self) -> list[Result]:
        return [self.results[d] for d in self.targets]

    # ---------------------------------------------------------- persistence

    def to_doc(self) -> str:
        return json.dumps(
            {
                "inner": self.inner.hex(), "image": self.image_id, "targets": self.targets, "first": self.first,
                "wave_timeout_s": self.wave_timeout_s, "later_timeout_s": self.later_timeout_s,
                "deliver_until": self.deliver_until, "phase": self.phase, "stop": self.stop,
                "wave_deadline": self.wave_deadline, "recheck_until": self.recheck_until, "done_at": self.done_at,
                "state": [self.state[d] for d in self.targets],
                "results": {d: _core.pack(r).hex() for d, r in self.results.items()},
            }
        )  # fmt: skip

    @classmethod
    def from_doc(cls, doc: str) -> Rollout:
        j = json.loads(doc)
        inner = bytes.fromhex(j["inner"])
        r = cls(hashlib.sha256(inner).hexdigest(), inner, int(j["image"]), list(j["targets"]), int(j["first"]),
                float(j["wave_timeout_s"]), float(j["later_timeout_s"]), float(j["deliver_until"]), str(j["phase"]),
                str(j["stop"]), float(j["wave_deadline"]), float(j["recheck_until"]), float(j["done_at"]))  # fmt: skip
        r.state = dict(zip(r.targets, j["state"], strict=True))
        r.results = {d: dict(_core.unpack(bytes.fromhex(v))) for d, v in j["results"].items()}
        return r


class RolloutStore:
    """One row per rollout, the whole state in one statement (atomic). Used on one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rollout (key TEXT PRIMARY KEY, done_at REAL NOT NULL, doc TEXT NOT NULL)"
        )

    def save(self, key: str, done_at: float, doc: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO rollout(key, done_at, doc) VALUES (?,?,?)", (key, done_at, doc))

    def load(self, now: float) -> list[str]:
        self._db.execute("DELETE FROM rollout WHERE done_at > 0 AND done_at < ?", (now - ROLLOUT_KEEP_S,))
        return [d for (d,) in self._db.execute("SELECT doc FROM rollout")]

    def close(self) -> None:
        self._db.close()


class Rollouts:
    """The staged rollouts of the site: persisted, driven, resumed after a restart."""

    def __init__(self, path: Path, submit: Submit, settle: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = RolloutStore(path)
        self.submit = submit
        """Where the store is written: the outbox's writer thread once bound (`bind`), so that a
        board's FirmwareStatus is recorded before the commit that acks it to the board."""
        self.settle = settle
        """Awaited before the later wave is told: the cache has written and verified what the
        first wave downloaded, so the later boards are served from it."""
        self.deliver: Deliver | None = None
        self.by_key: dict[str, Rollout] = {}
        self.watchers: dict[tuple[str, int], set[str]] = {}
        """(device, image id) → keys of the rollouts waiting for its FirmwareStatus."""
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[list[Result]]] = {}
        now = time.time()
        for doc in self.store.load(now):
            try:
                r = Rollout.from_doc(doc)
            except (ValueError, KeyError, TypeError, _core.CoreError) as e:
                log.warning("firmware rollout record unreadable, dropped: %s", e)
                continue
            r.resume(now)
            self.by_key[r.key] = r
            self._index(r)

    def bind(self, submit: Submit, deliver: Deliver) -> None:
        self.submit = submit
        self.deliver = deliver

    def needed_images(self) -> set[int]:
        """Images an unfinished rollout still needs (never evicted)."""
        return {r.image_id for r in self.by_key.values() if not r.done}

    @property
    def active(self) -> int:
        return sum(1 for r in self.by_key.values() if not r.done)

    def resume(self) -> list[asyncio.Task[list[Result]]]:
        """Drives the unfinished rollouts found at start-up."""
        return [self._drive_task(r) for r in self.by_key.values() if not r.done]

    async def run(
        self, inner: bytes, targets: list[str], first: int, deliver_s: float, wave_timeout_s: float,
        later_timeout_s: float, deliver: Deliver,
    ) -> list[Result]:  # fmt: skip
        """The results of the rollout of this Command (started now, or the one already known)."""
        if self.deliver is None:
            self.deliver = deliver
        key = hashlib.sha256(inner).hexdigest()
        r = self.by_key.get(key)
        if r is None:
            old = time.time() - ROLLOUT_KEEP_S
            for k in [k for k, x in self.by_key.items() if x.done and x.done_at < old]:
                del self.by_key[k]  # its row goes at the next start
            f = _core.decode(inner)
            r = Rollout.new(inner, int(f.body[Key.IMAGE_ID]), targets, first, deliver_s, wave_timeout_s,
                            later_timeout_s, time.time())  # fmt: skip
            self.by_key[key] = r
        if r.done:
            return r.result_list()
        return await asyncio.shield(self._drive_task(r))

    def status(self, device: str, image_id: int, st: int, why: str) -> None:
        """A FirmwareStatus event (on dispatch, before the commit that acks it): recorded on the
        writer thread ahead of that commit."""
        for key in list(self.watchers.get((device, image_id), ())):
            r = self.by_key[key]
            if r.status(device, st, why):
                self._save_soon(r)
                ev = self._events.get(key)
                if ev is not None:
                    ev.set()

    # ---------------------------------------------------------- driving

    def _index(self, r: Rollout) -> None:
        for d in r.targets:
            keys = self.watchers.get((d, r.image_id))
            if keys is not None:
                keys.discard(r.key)
                if not keys:
                    del self.watchers[d, r.image_id]
        for d in r.watched():
            self.watchers.setdefault((d, r.image_id), set()).add(r.key)

    def _save_soon(self, r: Rollout) -> asyncio.Future[object]:
        fut = self.submit(functools.partial(self.store.save, r.key, r.done_at, r.to_doc()))
        fut.add_done_callback(_log_failure)
        return fut

    def _drive_task(self, r: Rollout) -> asyncio.Task[list[Result]]:
        t = self._tasks.get(r.key)
        if t is None:
            t = asyncio.get_running_loop().create_task(self._drive(r))
            self._tasks[r.key] = t
            t.add_done_callback(lambda _t: self._tasks.pop(r.key, None))
        return t

    async def _drive(self, r: Rollout) -> list[Result]:
        assert self.deliver is not None, "Rollouts.bind first"
        ev = self._events.setdefault(r.key, asyncio.Event())
        f = _core.decode(r.inner)
        telling: set[asyncio.Task[None]] = set()
        try:
            while True:
                ev.clear()
                now = time.time()
                r.expire(now)
                r.advance(now)
                tell = r.to_tell()
                self._index(r)
                await self._save_soon(r)  # write-ahead: who is told is on disk before it is sent
                if r.done:
                    break
                if self.settle is not None and any(d not in r.wave for d in tell):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.settle(), SETTLE_S)
                for d in tell:
                    timeout = r.deliver_until - time.time() if d in r.wave else r.later_timeout_s
                    t = asyncio.get_running_loop().create_task(self._tell(r, d, f, max(0.0, timeout), ev))
                    telling.add(t)
                    t.add_done_callback(telling.discard)
                deadline = r.next_deadline()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), None if deadline is None else max(0.0, deadline - time.time()))
        finally:
            self._events.pop(r.key, None)
            for t in telling:
                t.cancel()
        if r.stop:
            log.warning("firmware rollout of image %d stopped: %s", r.image_id, r.stop)
        return r.result_list()

    async def _tell(self, r: Rollout, device: str, f: _core.Frame, timeout: float, ev: asyncio.Event) -> None:
        assert self.deliver is not None
        try:
            result = await self.deliver(device, f.action, f.body, f.prio, timeout)
        except Exception as e:  # a bug of the path must not leave the rollout waiting forever
            log.exception("firmware rollout: delivery to %s failed", device)
            result = {
                Key.DEVICE_ID: device,
                Key.STATUS: Status.FAILED,
                Key.REASON: clip_reason(f"delivery failed: {e!r}"),
            }
        r.answered(device, result)
        ev.set()

    def cancel(self) -> None:
        """Stops driving (the gateway stops): the records stay, a restart resumes them."""
        for t in self._tasks.values():
            t.cancel()

    def close(self) -> None:
        self.store.close()


def _log_failure(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("firmware rollout not persisted: %r", fut.exception())

"""M4 at the site: the firmware image cache and the staged rollout.

**Cache.** The chunks of an image the CSMS sent to a board (the answers to forwarded
`FirmwareChunk` requests) are kept under `data_dir/fwcache/<image_id>/`, one file per
offset. Only chunks of an image whose manifest is held are taken: the `UpdateFirmware`
command the gateway verified (Ed25519 signature by a known signer) names its size and
SHA-256. Once the chunks cover the whole image it is hashed: a match writes `image.bin` and
the image is *verified*; a mismatch drops the chunks. Only a verified image is served to the
boards, with the chunk length the CSMS used, so later boards download it without an upstream
round trip.

Every write, hash and deletion runs on one worker thread (in submission order), never on the
event loop; every file is written atomically (temporary file, fsync, rename, fsync of the
folder), and `image.bin` exists only once its SHA-256 matched, so a crash never leaves a half
image that is served. A chunk is served with one `pread` of at most one chunk (bounded by the
LAN frame size) from an open file: that stays on the event loop. The cache is bounded
(`firmware.cache_max_bytes`): the least recently used images go first, never one that an
unfinished rollout still needs.

**Staged rollout.** `Rollout` is the state machine of one multi-board `UpdateFirmware`
(sans I/O): the first wave is told, then the others once every first-wave board reported
Installed or Activated; a refusal, a failure status or the wave timeout stops it. `Rollouts`
drives them (deliveries through the command path's `deliver`) and keeps each one in SQLite
(`data_dir/fwrollout.sqlite`, WAL, synchronous=FULL, one row per rollout written in one
statement) before anything it decided is sent, so a restarted gateway resumes it: boards that
finished are not told again, first-wave boards already told are watched again, a stop stays a
stop. A rollout is known by the SHA-256 of the Command's signed inner frame, so the CSMS
sending the same Command again (after a reconnect) is answered by the same rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import _core
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

DEFAULT_CACHE_MAX_BYTES = 256 << 20
ROLLOUT_KEEP_S = 7 * 86400
"""A finished rollout is kept this long, to answer the same Command sent again."""
SETTLE_S = 10.0
"""At most this long, the later wave waits for the cache's writes to settle."""
TOUCH_EVERY_S = 60.0
"""A served image's mtime (its last use across restarts) is refreshed at most this often."""

Result = dict[int, Any]
Deliver = Callable[[str, int, dict[int, Any], int, float], Awaitable[Result]]
"""(device, action, body, prio, timeout) → the target's result (the command path's `_deliver`)."""
Submit = Callable[[Callable[[], object]], "asyncio.Future[object]"]
"""Runs a blocking function on a worker thread, in submission order."""


def _name(st: int) -> str:
    try:
        return FirmwareStatus(st).name
    except ValueError:
        return f"status {st}"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _part(d: Path, offset: int) -> Path:
    return d / f"part-{offset:010d}"


def _assemble(d: Path, offsets: list[int], size: int, sha256: bytes, manifest: bytes) -> bool:
    """Worker: hashes the parts in order into `image.bin.tmp`, renamed to `image.bin` only when
    the SHA-256 matches, then the manifest saying so; the parts are removed last (a crash in
    between leaves either the parts, or a verified image.bin that `_load` checks again)."""
    h = hashlib.sha256()
    tmp = d / "image.bin.tmp"
    n = 0
    with open(tmp, "wb") as out:
        for offset in offsets:
            data = _part(d, offset).read_bytes()
            h.update(data)
            out.write(data)
            n += len(data)
        out.flush()
        os.fsync(out.fileno())
    ok = n == size and h.digest() == sha256
    if ok:
        os.replace(tmp, d / "image.bin")
        _fsync_dir(d)
        _write_atomic(d / "manifest.json", manifest)
    else:
        tmp.unlink(missing_ok=True)
    for offset in offsets:
        _part(d, offset).unlink(missing_ok=True)
    return ok


def _hash_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            h.update(block)
    return h.digest()


@dataclass
class Image:
    image_id: int
    size: int
    sha256: bytes
    version: str
    chunk: int = 0
    """Length of the CSMS's chunks (that of the chunk at offset 0); 0 until verified."""
    verified: bool = False
    parts: dict[int, int] = field(default_factory=dict)
    """offset → length of the chunks held (not yet verified)."""
    assembling: bool = False
    used: float = 0.0
    """Last use (stored, verified or served), wall clock: the LRU order of eviction."""
    touched: float = 0.0

    @property
    def held(self) -> int:
        """Bytes on disk (manifests aside)."""
        return self.size if self.verified else sum(self.parts.values())


# ============================================================== the staged rollout (sans I/O)

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
            r[Key.STATUS], r[Key.REASON] = Status.FAILED, f"FirmwareStatus {name} {why}".strip()[:120]
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
                reason = f"rollout stopped: {self.stop}"[:120]
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
            result = {Key.DEVICE_ID: device, Key.STATUS: Status.FAILED, Key.REASON: f"delivery failed: {e!r}"[:120]}
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


# ============================================================== the image cache


class FirmwareCache:
    def __init__(
        self, folder: Path, enabled: bool = True, max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        rollout_db: Path | None = None,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.images: dict[int, Image] = {}
        self.hits = 0
        """Chunks served from the cache."""
        self.stored = 0
        """Chunks taken from the CSMS's answers."""
        self.rejected = 0
        """Complete images whose SHA-256 did not match their manifest (dropped)."""
        self.evictions = 0
        """Images removed to keep the cache under `max_bytes`."""
        self.skipped = 0
        """Chunks not kept: the image does not fit, or every other image is needed."""
        self._io = ThreadPoolExecutor(1, thread_name_prefix="fwcache")
        self._pending: set[asyncio.Future[Any]] = set()
        self._fds: dict[int, int] = {}
        self.rollouts = Rollouts(rollout_db or folder.parent / "fwrollout.sqlite", self._run_io, self.flush)
        self.watchers = self.rollouts.watchers
        """Non-empty while a rollout waits for a board's FirmwareStatus (checked on dispatch)."""
        if enabled:
            self._load()
            self._make_room(0, None, at_start=True)

    # ---------------------------------------------------------- worker

    def _run_io(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().run_in_executor(self._io, fn)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    def _io_soon(self, fn: Callable[[], Any]) -> None:
        self._run_io(fn).add_done_callback(_log_io_failure)

    async def flush(self) -> None:
        """Waits until the writes submitted so far are done (and their results applied)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            await asyncio.sleep(0)

    def close(self) -> None:
        self.rollouts.cancel()
        self._io.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.rollouts.close()

    # ---------------------------------------------------------- disk

    def _dir(self, image_id: int) -> Path:
        return self.folder / str(image_id)

    def _manifest_io(self, img: Image) -> Callable[[], None]:
        d, doc = self._dir(img.image_id), _manifest_doc(img)

        def write() -> None:
            d.mkdir(parents=True, exist_ok=True)
            _write_atomic(d / "manifest.json", doc)

        return write

    def _load(self) -> None:
        """At start-up (blocking, once)."""
        if not self.folder.is_dir():
            return
        for d in self.folder.iterdir():
            try:
                doc = json.loads((d / "manifest.json").read_text())
                img = Image(int(d.name), int(doc["size"]), bytes.fromhex(doc["sha256"]), str(doc["version"]),
                            int(doc["chunk"]), bool(doc["verified"]))  # fmt: skip
            except (OSError, ValueError, KeyError):
                continue
            binf = d / "image.bin"
            (d / "image.bin.tmp").unlink(missing_ok=True)
            parts = {int(p.name[5:]): p.stat().st_size for p in d.glob("part-*") if not p.name.endswith(".tmp")}
            if not img.verified and binf.is_file() and parts.get(0) and _hash_file(binf) == img.sha256:
                img.verified, img.chunk = True, parts[0]  # assembled; stopped before its manifest was saved
                _write_atomic(d / "manifest.json", _manifest_doc(img))
            if img.verified and not binf.is_file():
                img.verified, img.chunk = False, 0
            if img.verified:
                for offset in parts:  # left over when stopped between the manifest and their removal
                    _part(d, offset).unlink(missing_ok=True)
            else:
                binf.unlink(missing_ok=True)
                img.parts = parts
            with contextlib.suppress(OSError):
                img.used = img.touched = (binf if img.verified else d / "manifest.json").stat().st_mtime
            self.images[img.image_id] = img

    # ---------------------------------------------------------- bound

    @property
    def used_bytes(self) -> int:
        return sum(i.held for i in self.images.values())

    def _make_room(self, need: int, keep: int | None, at_start: bool = False) -> bool:
        """Evicts least recently used images (never `keep` nor one an unfinished rollout needs)
        until `need` more bytes fit; False when they cannot."""
        used = self.used_bytes
        if used + need <= self.max_bytes:
            return True
        needed = self.rollouts.needed_images()
        victims = [
            i for i in self.images.values()
            if i.held and not i.assembling and i.image_id != keep and i.image_id not in needed
        ]  # fmt: skip
        if used - sum(i.held for i in victims) + need > self.max_bytes:
            return False  # evicting would not be enough: keep what is held
        for img in sorted(victims, key=lambda i: i.used):
            if used + need <= self.max_bytes:
                break
            used -= img.held
            self._drop(img.image_id, at_start)
            self.evictions += 1
            log.info("firmware image %d (%d bytes) evicted from the cache", img.image_id, img.size)
        return used + need <= self.max_bytes

    def _drop(self, image_id: int, now: bool = False) -> None:
        self.images.pop(image_id, None)
        fd = self._fds.pop(image_id, None)
        if fd is not None:
            os.close(fd)
        remove = functools.partial(shutil.rmtree, self._dir(image_id), True)
        if now:  # at start-up, before the event loop serves anything
            remove()
        else:
            self._io_soon(remove)

    # ---------------------------------------------------------- manifest and chunks

    def manifest(self, body: dict[int, Any]) -> None:
        """A verified UpdateFirmware: the image its chunks must add up to."""
        if not self.enabled:
            return
        image_id, size, sha = int(body[Key.IMAGE_ID]), int(body[Key.SIZE]), bytes(body[Key.SHA256])
        old = self.images.get(image_id)
        if old is not None and old.size == size and old.sha256 == sha:
            old.used = time.time()
            return
        if old is not None:  # the same id for another image: what was held is stale
            self._drop(image_id)
        img = Image(image_id, size, sha, str(body.get(Key.VERSION, "")), used=time.time())
        self.images[image_id] = img
        self._io_soon(self._manifest_io(img))

    def put(self, body: dict[int, Any]) -> None:
        """A chunk the CSMS sent to a board (the FirmwareChunk response body): written by the
        worker; the image is assembled and verified there once its chunks cover it."""
        if not self.enabled:
            return
        img = self.images.get(int(body.get(Key.IMAGE_ID, -1)))
        data = body.get(Key.DATA)
        if img is None or img.verified or img.assembling or not isinstance(data, bytes) or not data:
            return
        offset = int(body[Key.OFFSET])
        if offset + len(data) > img.size or img.parts.get(offset) == len(data):
            return
        if not self._make_room(img.size - img.held, img.image_id):
            self.skipped += 1
            return
        d = self._dir(img.image_id)
        self._io_soon(functools.partial(_write_atomic, _part(d, offset), bytes(data)))
        img.parts[offset] = len(data)
        img.used = time.time()
        self.stored += 1
        if sum(img.parts.values()) >= img.size:
            self._complete(img)

    def _complete(self, img: Image) -> None:
        pos = 0
        for offset in sorted(img.parts):
            if offset != pos:
                return  # overlapping chunks of different lengths: wait for the rest
            pos += img.parts[offset]
        if pos != img.size:
            return
        offsets, first = sorted(img.parts), img.parts[0]
        img.assembling = True
        d = self._dir(img.image_id)

        verified = Image(img.image_id, img.size, img.sha256, img.version, first, True)
        job = functools.partial(_assemble, d, offsets, img.size, img.sha256, _manifest_doc(verified))

        def done(fut: asyncio.Future[bool]) -> None:
            img.assembling = False
            img.parts.clear()
            if fut.cancelled() or fut.exception() is not None:
                exc = None if fut.cancelled() else fut.exception()
                log.error("firmware image %d not assembled, dropped: %r", img.image_id, exc)
                if self.images.get(img.image_id) is img:
                    self._drop(img.image_id)
                return
            if self.images.get(img.image_id) is not img:
                return  # replaced or evicted meanwhile
            if not fut.result():
                self.rejected += 1
                log.warning("firmware image %d: SHA-256 does not match its manifest; chunks dropped", img.image_id)
                return
            img.verified, img.chunk, img.used = True, first, time.time()
            log.info("firmware image %d (%s, %d bytes) verified and cached", img.image_id, img.version, img.size)

        self._run_io(job).add_done_callback(done)

    def has(self, image_id: int) -> bool:
        img = self.images.get(image_id)
        return self.enabled and img is not None and img.verified

    def chunk(self, image_id: int, offset: int) -> dict[int, Any] | None:
        """The FirmwareChunk response body from a verified image; None when not held. One
        pread of at most one chunk (bounded by the frame size) from an open file."""
        img = self.images.get(image_id)
        if not self.enabled or img is None or not img.verified or offset >= img.size:
            return None
        fd = self._fds.get(image_id)
        try:
            if fd is None:
                fd = self._fds[image_id] = os.open(self._dir(image_id) / "image.bin", os.O_RDONLY)
            data = os.pread(fd, img.chunk, offset)
        except OSError as e:
            log.error("firmware image %d unreadable, dropped: %s", image_id, e)
            self._drop(image_id)
            return None
        self.hits += 1
        now = time.time()
        img.used = now
        if now - img.touched > TOUCH_EVERY_S:  # the LRU order across restarts
            img.touched = now
            self._io_soon(functools.partial(_touch, self._dir(image_id) / "image.bin"))
        return {Key.IMAGE_ID: image_id, Key.OFFSET: offset, Key.DATA: data, Key.LAST: offset + len(data) >= img.size}

    # ---------------------------------------------------------- statuses

    def status(self, device_id: str, body: dict[int, Any]) -> None:
        """A FirmwareStatus event of a board (called on dispatch, only while someone watches)."""
        st = int(body.get(Key.FW_STATUS, -1))
        if st < 0:
            return
        self.rollouts.status(device_id, int(body.get(Key.IMAGE_ID, -1)), st, str(body.get(Key.REASON, "")))

    def snapshot(self) -> dict[str, int]:
        return {
            "images": sum(1 for i in self.images.values() if i.verified),
            "bytes": self.used_bytes,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
            "chunks_stored": self.stored,
            "chunks_served": self.hits,
            "chunks_skipped": self.skipped,
            "images_rejected": self.rejected,
            "rollouts_active": self.rollouts.active,
        }


def _manifest_doc(img: Image) -> bytes:
    return json.dumps({"size": img.size, "sha256": img.sha256.hex(), "version": img.version, "chunk": img.chunk,
                       "verified": img.verified}).encode()  # fmt: skip


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _log_io_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("firmware cache write failed: %r", fut.exception())

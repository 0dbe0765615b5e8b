"""Commands for the whole site (a `Command` with empty targets) that the gateway hands on to
its boards (docs/gateway.md, "Site-wide commands"): what "site-wide" means for each, and
what stays in force for a board that is not online when it arrives.

- SetTariff (S5): every board online gets it now; the gateway keeps the newest (persisted)
  and gives it to each board that comes online later, so that the price a driver sees
  before the card is the one in force.
- DemandResponse (E2): a limit (`limit_w`) is the site's, or one zone's (`zone`): shared
  equally among the boards online under it; a signal without a limit reaches them as it is.
  Kept until its `valid_to` or a `normal` event for that scope; when a board comes online
  under it, the limit is shared again among all of them.
- DeletePersonalData (M10): the gateway forgets the token (its local list and cache), every
  board online is told now; each active board the site knows but is offline is told when it
  is back. For that only the token is kept (persisted) until the last of them confirmed.

`SiteWideStore` is the state on disk (SQLite, written on the site's writer thread, read
once at start); `SiteWide` the asyncio glue on `Boards.deliver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from gateway import _core
from gateway.link import proto_ts
from gateway.localcsms.auth import Authorizer
from gateway.protocol.text import clip_reason
from gateway.schema import MESSAGES, Action, GridEvent, Key, Status

log = logging.getLogger("gateway.sitewide")

FANNED_OUT = frozenset({Action.SET_TARIFF, Action.DEMAND_RESPONSE, Action.DELETE_PERSONAL_DATA})
"""Site-wide commands the gateway hands on to its boards (the others it carries out itself)."""
TARIFF = "tariff"

Result = dict[int, Any]


class SiteLinks(Protocol):
    """What the fan-out needs of the boards (gateway.boards.Boards is one)."""

    @property
    def online(self) -> dict[str, Any]: ...

    async def deliver(self, device_id: str, action: int, body: dict[int, Any], prio: int,
                      timeout: float) -> Result: ...  # fmt: skip


def dr_key(zone: int | None) -> str:
    return "dr" if zone is None else f"dr:{zone}"


def dr_shares(body: dict[int, Any], boards: list[str]) -> dict[str, dict[int, Any]]:
    """The DemandResponse each of `boards` (those under its scope, online) gets: a limit is
    shared equally (their sum never above it), the zone is the gateway's business."""
    one = {k: v for k, v in body.items() if k != Key.ZONE}
    if Key.LIMIT_W not in body or not boards:
        return {d: one for d in boards}
    share = max(0, int(body[Key.LIMIT_W])) // len(boards)
    return {d: {**one, Key.LIMIT_W: share} for d in boards}


def in_force(body: dict[int, Any], now_ts: int) -> bool:
    valid_to = body.get(Key.VALID_TO)
    return valid_to is None or int(valid_to) > now_ts


class SiteWideStore:
    """What is in force (by key: "tariff", "dr", "dr:<zone>": the command's body, msgpack)
    and the deletions still owed to boards (token, device)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kept (k TEXT PRIMARY KEY, body BLOB NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS deletions (token TEXT NOT NULL, device_id TEXT NOT NULL,"
            " PRIMARY KEY (token, device_id))"
        )
        self.kept: dict[str, dict[int, Any]] = {
            k: dict(_core.unpack(body)) for k, body in self._db.execute("SELECT k, body FROM kept")
        }
        self.owed: set[tuple[str, str]] = set(self._db.execute("SELECT token, device_id FROM deletions"))

    def close(self) -> None:
        self._db.close()

    # writes: on the site's writer thread; the in-memory view is updated by the caller, on the loop
    def keep(self, k: str, body: dict[int, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO kept(k, body) VALUES (?, ?)", (k, _core.pack(body)))

    def drop(self, keys: Iterable[str]) -> None:
        self._db.executemany("DELETE FROM kept WHERE k = ?", [(k,) for k in keys])

    def owe(self, token: str, devices: Iterable[str]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO deletions(token, device_id) VALUES (?, ?)",
                             [(token, d) for d in devices])  # fmt: skip

    def paid(self, token: str, device_id: str) -> None:
        self._db.execute("DELETE FROM deletions WHERE token = ? AND device_id = ?", (token, device_id))


class SiteWide:
    def __init__(self, store: SiteWideStore, links: SiteLinks, auth: Authorizer, zone_of: Callable[[str], int | None],
                 devices: Callable[[], Iterable[str]], now: Callable[[], float],
                 run_sync: Callable[[Callable[[], object]], asyncio.Future[object]]) -> None:  # fmt: skip
        self.store = store
        self.links = links
        self.auth = auth
        self.zone_of = zone_of
        self.devices = devices
        """The active devices of the site (online or not)."""
        self.now = now
        self.run_sync = run_sync
        self._tasks: set[asyncio.Task[None]] = set()

    def pending_deletions(self) -> list[tuple[str, str]]:
        """(token, device) of deletions not yet confirmed by that board."""
        return sorted(self.store.owed)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.run_sync(self.store.close)  # after the writes queued before, on their thread

    # ------------------------------------------------------------ commands

    async def command(self, inner: _core.Frame, timeout: float) -> list[Result]:
        """A site-wide command of `FANNED_OUT`: the site's own result (device "") first, then
        each board's."""
        a, b = inner.action, inner.body
        if a == Action.SET_TARIFF:
            return await self._tariff(b, inner.prio, timeout)
        if a == Action.DEMAND_RESPONSE:
            return await self._demand_response(b, inner.prio, timeout)
        return await self._delete(b, inner.prio, timeout)

    async def _tariff(self, b: dict[int, Any], prio: int, timeout: float) -> list[Result]:
        body = dict(b)
        await self.run_sync(lambda: self.store.keep(TARIFF, body))
        self.store.kept[TARIFF] = body
        targets = sorted(self.links.online)
        results = await self._fan_out({d: body for d in targets}, Action.SET_TARIFF, prio, timeout)
        return [_summary(results, "boards online; the others when they come online"), *results]

    def _under(self, zone: int | None, boards: Iterable[str]) -> list[str]:
        return sorted(d for d in boards if zone is None or self.zone_of(d) == zone)

    async def _demand_response(self, b: dict[int, Any], prio: int, timeout: float) -> list[Result]:
        zone = b.get(Key.ZONE)
        zone = None if zone is None else int(zone)
        if int(b[Key.GRID_EVENT]) == GridEvent.NORMAL:
            # the end of the event for its scope: a site-wide `normal` ends every zone's too
            gone = [k for k in self.store.kept if k.startswith("dr") and (zone is None or k == dr_key(zone))]
            await self.run_sync(lambda: self.store.drop(gone))
            for k in gone:
                self.store.kept.pop(k, None)
        else:
            body = dict(b)
            await self.run_sync(lambda: self.store.keep(dr_key(zone), body))
            self.store.kept[dr_key(zone)] = body
        shares = dr_shares(b, self._under(zone, self.links.online))
        results = await self._fan_out(shares, Action.DEMAND_RESPONSE, prio, timeout)
        return [_summary(results, "boards online under it; shared again as boards come online"), *results]

    async def _delete(self, b: dict[int, Any], prio: int, timeout: float) -> list[Result]:
        raw = b[Key.ID_TOKEN]
        token = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else str(raw)
        owed = sorted(set(self.devices()) | set(self.links.online))
        auth, store = self.auth, self.store

        def forget() -> object:
            store.owe(token, owed)
            return auth.forget(token)

        removed = await self.run_sync(forget)
        store.owed.update((token, d) for d in owed)
        online = sorted(d for d in owed if d in self.links.online)
        results = await self._fan_out({d: dict(b) for d in online}, Action.DELETE_PERSONAL_DATA, prio, timeout)
        await self._paid(token, results)
        failed = [str(r[Key.DEVICE_ID]) for r in results if r[Key.STATUS] != Status.ACCEPTED]
        reason = f"{removed} entries removed at the gateway; {len(online) - len(failed)} boards confirmed"
        if len(owed) > len(online) - len(failed):  # still owed: told when they come online (again)
            reason += f", {len(owed) - len(online) + len(failed)} told when they come online"
        return [{Key.DEVICE_ID: "", Key.STATUS: Status.ACCEPTED, Key.REASON: clip_reason(reason)}, *results]

    async def _paid(self, token: str, results: list[Result]) -> None:
        done = [str(r[Key.DEVICE_ID]) for r in results if r[Key.STATUS] == Status.ACCEPTED]
        if not done:
            return
        store = self.store

        def paid() -> object:
            for d in done:
                store.paid(token, d)
            return None

        await self.run_sync(paid)
        store.owed.difference_update((token, d) for d in done)

    async def _fan_out(self, bodies: dict[str, dict[int, Any]], action: int, prio: int,
                       timeout: float) -> list[Result]:  # fmt: skip
        deliver = self.links.deliver
        return list(await asyncio.gather(*(deliver(d, action, body, prio, timeout) for d, body in bodies.items())))

    # ------------------------------------------------------------ a board comes online

    def board_online(self, device_id: str) -> None:
        """What is in force and what is owed reaches the board (in the background)."""
        t = asyncio.get_running_loop().create_task(self._catch_up(device_id))
        self._tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("site-wide catch-up failed: %r", t.exception())

    async def _catch_up(self, device_id: str) -> None:
        now_ts = proto_ts(self.now())
        kept = self.store.kept
        timeout = MESSAGES[Action.SET_TARIFF].timeout_ms / 1000
        for token, d in sorted(self.store.owed):
            if d == device_id:
                owed: dict[int, Any] = {Key.ID_TOKEN: token.encode()}
                prio = MESSAGES[Action.DELETE_PERSONAL_DATA].priority
                res = await self.links.deliver(device_id, Action.DELETE_PERSONAL_DATA, owed, prio, timeout)
                await self._paid(token, [res])
        tariff = kept.get(TARIFF)
        if tariff is not None:
            await self.links.deliver(device_id, Action.SET_TARIFF, tariff, MESSAGES[Action.SET_TARIFF].priority,
                                     timeout)  # fmt: skip
        for k, body in sorted(kept.items()):
            if not k.startswith("dr") or not in_force(body, now_ts):
                continue
            zone = body.get(Key.ZONE)
            if zone is not None and self.zone_of(device_id) != int(zone):
                continue
            shares = dr_shares(body, self._under(None if zone is None else int(zone), self.links.online))
            await self._fan_out(shares, Action.DEMAND_RESPONSE, MESSAGES[Action.DEMAND_RESPONSE].priority, timeout)


def _summary(results: list[Result], what: str) -> Result:
    """The site's result of a fan-out: accepted when every board online accepted."""
    failed = [str(r[Key.DEVICE_ID]) for r in results if r[Key.STATUS] != Status.ACCEPTED]
    if failed:
        reason = f"not accepted by {','.join(failed)}"
        return {Key.DEVICE_ID: "", Key.STATUS: Status.REJECTED, Key.REASON: clip_reason(reason)}
    return {Key.DEVICE_ID: "", Key.STATUS: Status.ACCEPTED, Key.REASON: clip_reason(f"{len(results)} {what}")}

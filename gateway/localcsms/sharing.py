"""The site's power shares on the boards (E1, E4, E5): the asyncio glue of
`gateway/localcsms/power.py`, and what keeps the shares true across restarts.

Rule: every board holds a share at every instant, and the shares held add up to no more than
any cap in force. So:

- the shares are recomputed and sent when a board comes online (before anything else is sent
  to it: its share may have changed while it was away, and a board that rebooted keeps only
  what is on its flash), when a transaction starts or ends, when a DSO or resource-manager
  limit arrives and when one expires;
- lowered shares are sent first and confirmed, raised ones only then; a board that did not
  confirm a lowered share is counted at its old one, so the others get less;
- the share reaches the board as a charging profile of purpose `resource_manager`
  (`SHARE_PROFILE_ID`, kept on the board's flash and not removed by a ClearChargingProfile that
  does not name that purpose) and, while a DSO limit covers the board, also as its DSO limit
  (urgent, checked by the board at its deadline, kept on its flash too); when the DSO lifts
  the limit the board's DSO limit is lifted (sent with a `valid_to` in the past);
- the limits in force, the boards drawing and the shares sent live in `data_dir/power.sqlite`,
  so that a restarted gateway knows what every board may still draw before it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gateway import _core
from gateway.link import FrameTooLarge, proto_ts
from gateway.localcsms.power import SITE, Cap, PowerManager
from gateway.schema import MESSAGES, Action, Key, Kind, ProfilePurpose, Status, TxEvent

log = logging.getLogger("gateway.power")

SHARE_PROFILE_ID = 1_000_000_000
"""The id of the charging profile that carries the site's share to a board (a small int on the
board's 32-bit port); the CSMS's own profiles use other ids."""
LIFTED = 1
"""`valid_to` (protocol seconds) of a DSO limit that no longer holds: long past."""


class ShareLinks(Protocol):
    """What the sharing needs of the boards online (gateway.boards.Boards is one)."""

    @property
    def online(self) -> dict[str, Any]: ...

    async def request(self, conn: Any, action: int, body: dict[int, Any], timeout: float,
                      prio: int | None = None) -> bytes: ...  # fmt: skip


class PowerStore:
    """The power state on disk: one JSON value per key."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS power (k TEXT PRIMARY KEY, v TEXT NOT NULL)")

    def load(self, pm: PowerManager) -> None:
        rows = dict(self._db.execute("SELECT k, v FROM power").fetchall())
        if "dso" in rows:
            pm.dso = {int(k): Cap(w, t) for k, (w, t) in json.loads(rows["dso"]).items()}
        if "available" in rows:
            pm.available = {int(k): Cap(w, t) for k, (w, t) in json.loads(rows["available"]).items()}
        if "drawing" in rows:
            pm.drawing = set(json.loads(rows["drawing"]))
        if "dso_told" in rows:
            pm.dso_told = set(json.loads(rows["dso_told"]))
        if "shares" in rows:
            pm.shares = {str(k): int(v) for k, v in json.loads(rows["shares"]).items()}

    @staticmethod
    def snapshot(pm: PowerManager) -> dict[str, str]:
        """What `save` writes, taken on the loop (the writer thread must not read a changing state)."""
        return {
            "dso": json.dumps({k: [c.watts, c.valid_to] for k, c in pm.dso.items()}),
            "available": json.dumps({k: [c.watts, c.valid_to] for k, c in pm.available.items()}),
            "drawing": json.dumps(sorted(pm.drawing)),
            "dso_told": json.dumps(sorted(pm.dso_told)),
            "shares": json.dumps(pm.shares),
        }

    def save(self, snap: dict[str, str]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO power(k, v) VALUES (?, ?)", list(snap.items()))
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class PowerControl:
    """Keeps the boards' shares (see the module's rule); one rebalance at a time."""

    def __init__(self, pm: PowerManager, store: PowerStore, links: ShareLinks, now: Callable[[], float],
                 run_sync: Callable[[Callable[[], object]], asyncio.Future[object]]) -> None:  # fmt: skip
        self.pm = pm
        self.store = store
        self.links = links
        self.now = now
        self.run_sync = run_sync
        store.load(pm)
        self.fresh: set[str] = set()
        """Boards (re)connected whose flash state is not known: sent their share whatever it is."""
        self.tx_evses: dict[str, set[int]] = {}
        """The EVSEs of each board with a transaction (a twin-socket board draws while either
        has one; not kept on disk: after a restart, a board's next TransactionEvent says)."""
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[list[str]]] = set()

    # ------------------------------------------------------------ events

    def board_online(self, device_id: str) -> None:
        """A board (re)connected: its share, and its DSO limit while one holds, are sent at once."""
        self.fresh.add(device_id)
        self.kick()

    def board_offline(self, device_id: str) -> None:
        """Its share stays set aside (it may still draw it); nothing to send."""

    def tx_event(self, device_id: str, frame: bytes) -> None:
        """A board's TransactionEvent (seen at the dispatcher): started or ended moves it
        between the idle and the drawing boards; a board with several EVSEs is drawing while a
        transaction runs on any of them (its one share, which the board splits among them)."""
        body = _core.decode(frame).body
        ev = body.get(Key.EVENT)
        busy = self.tx_evses.setdefault(device_id, set())
        if ev == TxEvent.ENDED:
            busy.discard(int(body.get(Key.EVSE) or 1))
        elif ev in (TxEvent.STARTED, TxEvent.UPDATED):
            busy.add(int(body.get(Key.EVSE) or 1))
        drawing = self.pm.drawing
        was = device_id in drawing
        if busy:
            drawing.add(device_id)
        else:
            drawing.discard(device_id)
        if was != (device_id in drawing):
            self.kick()

    def kick(self) -> None:
        """A rebalance in the background (its late boards are logged)."""
        t = asyncio.get_running_loop().create_task(self.rebalance())
        self._tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[list[str]]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("power rebalance failed: %r", t.exception())

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        # on the writer thread, after the writes queued before (a cancelled task's save may still
        # be running there: closing the database under it crashes the interpreter)
        await self.run_sync(self.store.close)

    # ------------------------------------------------------------ commands

    async def dso_limit(self, body: dict[int, Any]) -> tuple[int, str]:
        """E5: the new limit reaches every affected board, which confirms, within the deadline."""
        zone = body.get(Key.ZONE)
        key = SITE if zone is None else int(zone)
        self.pm.dso[key] = Cap(int(body[Key.LIMIT_W]), _valid_to(body))
        affected = self.pm.affected(zone, self.links.online)
        self.pm.dso_told.update(affected)
        self.fresh.update(affected)  # each confirms the new limit, its share changed or not
        late = await self.rebalance(int(body[Key.DEADLINE_MS]) / 1000)
        late = [d for d in late if d in affected]
        if late:
            return Status.REJECTED, "not confirmed in time: " + ",".join(late)
        return Status.ACCEPTED, ""

    async def available_power(self, body: dict[int, Any]) -> tuple[int, str]:
        """E4: the resource manager's available power for the site or a zone."""
        zone = body.get(Key.ZONE)
        self.pm.available[SITE if zone is None else int(zone)] = Cap(int(body[Key.AVAILABLE_W]), _valid_to(body))
        late = await self.rebalance()
        return (Status.REJECTED, "late: " + ",".join(late)) if late else (Status.ACCEPTED, "")

    # ------------------------------------------------------------ the shares

    async def rebalance(self, deadline_s: float | None = None) -> list[str]:
        """Sends every board whose share changed (or that just came online) its share, lowered
        ones first; returns the boards that did not confirm within `deadline_s` (by default
        the messages' own timeouts)."""
        async with self._lock:
            pm = self.pm
            pm.expire(proto_ts(self.now()))
            self._arm()
            online = dict(self.links.online)
            plan = pm.allocate(online)
            fresh = {d for d in self.fresh if d in plan}
            self.fresh -= fresh
            # A board that (re)connected is sent its share whatever it holds, but never more than
            # the share it was known to hold in this first phase: a raise waits, as every raise
            # does, until the lowered boards confirmed (after a gateway restart every board is
            # fresh; raising one while another has not yet come down broke the site limit).
            down = {d: min(w, pm.shares.get(d, w)) if d in fresh else w for d, w in plan.items()
                    if d in fresh or w < pm.shares.get(d, w + 1)}  # fmt: skip
            up = {d: w for d, w in plan.items() if w > down.get(d, pm.shares.get(d, w))}
            late = await self._send(online, down, deadline_s)
            if late:  # counted at their old share: the others get what is left
                plan = pm.allocate(d for d in online if d not in late)
                up = {d: w for d, w in plan.items() if d in up and w > pm.shares.get(d, w)}
            for d, w in up.items():  # higher, until confirmed: what the board may draw
                pm.shares[d] = max(w, pm.shares.get(d, 0))
            if up:
                await self._save()
            late += await self._send(online, up, deadline_s)
            await self._save()
            return late

    async def _save(self) -> None:
        snap = self.store.snapshot(self.pm)  # taken here: the writer thread sees no state changing
        await self.run_sync(lambda: self.store.save(snap))

    async def _send(self, online: dict[str, Any], shares: dict[str, int], deadline_s: float | None) -> list[str]:
        pm = self.pm

        async def one(did: str, w: int) -> str | None:
            conn = online[did]
            asks = [self._ask(conn, Action.SET_CHARGING_PROFILE, _profile(w), deadline_s)]
            if pm.dso_covers(did) or did in pm.dso_told:
                lifted = not pm.dso_covers(did)
                timeout = deadline_s if deadline_s is not None else MESSAGES[Action.DSO_LIMIT].timeout_ms / 1000
                body: dict[int, Any] = {Key.LIMIT_W: w, Key.DEADLINE_MS: int(timeout * 1000), Key.EVSE: 0}
                if lifted:
                    body[Key.VALID_TO] = LIFTED
                asks.append(self._ask(conn, Action.DSO_LIMIT, body, deadline_s))
            ok = all(await asyncio.gather(*asks))
            if not ok:
                self.fresh.add(did)  # sent again with the next rebalance, whatever its share
                return did
            pm.shares[did] = w
            if not pm.dso_covers(did):
                self.pm.dso_told.discard(did)
            return None

        res = await asyncio.gather(*(one(d, w) for d, w in shares.items()))
        return [d for d in res if d is not None]

    async def _ask(self, conn: Any, action: int, body: dict[int, Any], deadline_s: float | None) -> bool:
        timeout = deadline_s if deadline_s is not None else MESSAGES[action].timeout_ms / 1000
        try:
            ans = _core.decode(await self.links.request(conn, action, body, timeout))
        except (TimeoutError, ConnectionError, FrameTooLarge):  # (a limit is far below any rx_max)
            return False
        return ans.kind == Kind.RESPONSE and ans.body.get(Key.STATUS, 0) == Status.ACCEPTED

    def _arm(self) -> None:
        """A rebalance when the next limit from outside ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        end = self.pm.next_expiry()
        if end is not None:
            delay = max(0.0, end - proto_ts(self.now()) + 0.1)
            self._timer = asyncio.get_running_loop().call_later(delay, self.kick)


def _valid_to(body: dict[int, Any]) -> int | None:
    v = body.get(Key.VALID_TO)
    return None if v is None else int(v)


def _profile(w: int) -> dict[int, Any]:
    return {
        Key.EVSE: 0,
        Key.PROFILE_ID: SHARE_PROFILE_ID,
        Key.STACK_LEVEL: 0,
        Key.PURPOSE: int(ProfilePurpose.RESOURCE_MANAGER),
        Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: w}],
    }

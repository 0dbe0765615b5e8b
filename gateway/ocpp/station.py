"""One board's OCPP face: a charging station on its own WebSocket to the CSMS.

Rule (OCPP 2.0.1 B01–B04, E, offline behaviour): the station says BootNotification first and
sends nothing else until the CSMS accepted it (Pending and Rejected: BootNotification again
after the interval the CSMS gave); then it hands over the board's events in the order the
gateway accepted them, one CALL at a time, each retired (`StationSite.delivered`) only once
the CSMS answered it. While the WebSocket is down the events wait in the outbox; an event the
gateway accepted while the station was cut off travels with `offline` set (and so does every
row still owed at a restart: the gateway was away from the CSMS then too). A CALLERROR or a
payload the schema refuses is not retried: the row is retired and counted, so one bad event
never holds the station's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

from gateway import _core
from gateway.ocpp.link import CallFailed, OcppLink, Refused, Socket
from gateway.ocpp.up import REGISTRATION, BoardInfo, Payload, boot_request, event
from gateway.outbox import Row
from gateway.schema import Registration

log = logging.getLogger("gateway.ocpp")

BACKOFF_MIN_S = 0.1
STATUS_CALLS = ("FirmwareStatusNotification", "LogStatusNotification")
"""The notifications a TriggerMessage repeats (`Station.last`)."""
RETRY_INTERVAL_S = 10
"""Pending or Rejected with an interval of 0: BootNotification again after this."""


class StationSite(Protocol):
    """What a station needs of the OCPP face (gateway.ocpp.bridge.OcppBridge is one)."""

    timeout_s: float
    max_frame: int
    backoff_max_s: float

    def open_socket(self, station_id: str) -> Awaitable[Socket]: ...

    async def handle(self, device: str, action: str, payload: Payload) -> Payload: ...

    async def token_of(self, row: Row) -> str | None: ...

    def delivered(self, device: str, seq: int) -> None:
        """The CSMS answered the row (or refused it): the next may go; the cursor is the site's
        to make durable."""

    async def registered(self, device: str, info: BoardInfo, registration: int | None) -> None: ...

    def rewrite(self, device: str, action: int, body: dict[int, Any],
                msg: tuple[str, Payload] | None) -> tuple[str, Payload] | None:  # fmt: skip
        """What the station sends for a board's row (`msg`: its translation; None: nothing)."""


class Station:
    def __init__(self, site: StationSite, device: str, info: BoardInfo, registration: int | None) -> None:
        self.site = site
        self.device = device
        self.info = info
        self.registration = registration
        """The CSMS's last answer to this station's BootNotification (kept in the ledger)."""
        self.rows: deque[Row] = deque()
        self.offline: set[int] = set()
        """Seqs of rows accepted while the station was cut off from the CSMS."""
        self.link: OcppLink | None = None
        self.accepted = False
        """Connected, and accepted by the CSMS: events flow."""
        self.interval_s = 0
        self.sent = 0
        self.dropped = 0
        """Rows the CSMS answered with a CALLERROR, or whose payload the schema refused."""
        self.state = "down"
        self._wake = asyncio.Event()
        self._boot_asked = False
        self._boot_waiters: list[asyncio.Future[tuple[int, int]]] = []
        self._task: asyncio.Task[None] | None = None
        self.last: dict[str, Payload] = {}
        """The last FirmwareStatusNotification and LogStatusNotification sent: what a
        TriggerMessage of them repeats while the update or upload is under way."""
        self.calls: deque[tuple[str, Payload]] = deque()
        """The station's own CALLs that follow an answer to the CSMS (NotifyDisplayMessages after
        GetDisplayMessages): sent next, not kept across a restart (the CSMS asks again)."""

    # ------------------------------------------------------------ the gateway's side

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"ocpp {self.device}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def add(self, rows: list[Row], offline: bool) -> None:
        """Rows of this board the outbox committed, in acceptance order."""
        self.rows.extend(rows)
        if offline or not self.accepted:
            self.offline.update(r.seq for r in rows)
        self._wake.set()

    def notify(self, action: str, payload: Payload) -> None:
        self.calls.append((action, payload))
        self._wake.set()

    def boot(self, info: BoardInfo) -> asyncio.Future[tuple[int, int]]:
        """The board booted: the station says BootNotification (again); the future gets the
        CSMS's (registration, interval)."""
        self.info = info
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._boot_waiters.append(fut)
        self._boot_asked = True
        self._wake.set()
        return fut

    # ------------------------------------------------------------ the connection

    async def _run(self) -> None:
        site = self.site
        backoff = BACKOFF_MIN_S
        while True:
            self.state = "connecting"
            ws: Socket | None = None
            reader: asyncio.Task[None] | None = None
            try:
                ws = await site.open_socket(self.device)
                link = self.link = OcppLink(self.device, ws, self._handle, site.timeout_s, site.max_frame)
                reader = asyncio.get_running_loop().create_task(link.run())
                self.state = "booting"
                backoff = BACKOFF_MIN_S
                await self._session(link, reader)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of one connection: connect again
                log.info("ocpp %s: %s: %s", self.device, type(e).__name__, e)
            finally:
                self.link = None
                self.accepted = False
                self.state = "down"
                if reader is not None:
                    reader.cancel()
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 1.0)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, site.backoff_max_s)

    async def _handle(self, action: str, payload: Payload) -> Payload:
        return await self.site.handle(self.device, action, payload)

    async def _session(self, link: OcppLink, reader: asyncio.Task[None]) -> None:
        while not reader.done():
            if not self.accepted or self._boot_asked:
                await self._boot(link, reader)
                continue
            if self.calls:
                action, payload = self.calls[0]
                with contextlib.suppress(CallFailed, Refused):
                    await link.call(action, payload)
                self.calls.popleft()
                if action in STATUS_CALLS:
                    self.last[action] = payload
                continue
            if self.rows:
                await self._deliver(link, self.rows[0])
                continue
            await self._idle(reader, self.interval_s or RETRY_INTERVAL_S, heartbeat=True, link=link)
        reader.result()  # the reason it ended
        raise ConnectionError("the CSMS closed the connection")

    async def _idle(self, reader: asyncio.Task[None], seconds: float, heartbeat: bool, link: OcppLink) -> None:
        """Waits for rows, a boot, the end of the connection, or `seconds` (then a Heartbeat)."""
        self._wake.clear()
        waker = asyncio.get_running_loop().create_task(self._wake.wait())
        try:
            done, _ = await asyncio.wait({waker, reader}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        if not done and heartbeat:
            await link.call("Heartbeat", {})

    async def _boot(self, link: OcppLink, reader: asyncio.Task[None]) -> None:
        self._boot_asked = False
        res = await link.call("BootNotification", boot_request(self.info))
        reg = int(REGISTRATION.get(str(res["status"]), Registration.PENDING))
        self.interval_s = int(res.get("interval", 0))
        self.registration = reg
        self.accepted = reg == Registration.ACCEPTED
        self.state = "accepted" if self.accepted else str(res["status"]).lower()
        await self.site.registered(self.device, self.info, reg)
        waiters, self._boot_waiters = self._boot_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result((reg, self.interval_s))
        if not self.accepted:
            # B02/B03: nothing but BootNotification until accepted, again after the interval
            self._wake.clear()
            await self._idle(reader, self.interval_s or RETRY_INTERVAL_S, heartbeat=False, link=link)
            self._boot_asked = True

    async def _deliver(self, link: OcppLink, row: Row) -> None:
        f = _core.decode(row.frame)
        body: dict[int, Any] = f.body if isinstance(f.body, dict) else {}
        token = await self.site.token_of(row)
        msg = self.site.rewrite(
            self.device, f.action, body, event(f.action, body, f.ts, row.seq in self.offline, token)
        )
        if msg is not None:
            try:
                await link.call(*msg, uid=f"row-{row.seq}")  # sent again after a kill -9: the same id
                if msg[0] in STATUS_CALLS:
                    self.last[msg[0]] = msg[1]
                self.sent += 1
            except (CallFailed, Refused) as e:
                self.dropped += 1
                log.warning("ocpp %s: %s of row %d not delivered: %s", self.device, msg[0], row.seq, e)
        self.site.delivered(self.device, row.seq)
        if self.rows and self.rows[0] is row:
            self.rows.popleft()
        self.offline.discard(row.seq)

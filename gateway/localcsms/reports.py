"""What the site tells the CSMS of itself (E3 SiteForecast, M1 BoardsReport): the asyncio glue
of `gateway/localcsms/forecast.py` and `gateway/localcsms/inventory.py`.

Rule: the CSMS holds the site's present, not its history. Both reports are site events sent
outside the outbox (`UplinkRunner.send_event`): a newer one supersedes an older one, so one
lost with a connection is not owed; instead, every connection starts with the present
(the inventory, then the forecasts), sent as soon as SiteHello is answered.

Between connections each report is sent when it changed materially — a forecast when a
session starts or ends or an EV tells new needs, the inventory when a board boots, is
discovered, goes online or offline, changes status or is registered, deregistered or
migrated — and at most once per `[upstream] reports_interval_s` (a change within the interval
waits for its end: the changes in between are coalesced into one report). The forecast is
sent for the site and, with zones configured, for each zone (`zone` set).

After a board's BootNotification the site asks it the `inventory.DISCOVER` variables
(GetVariables), in the background: its number of EVSEs and their rating come from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gateway import _core
from gateway.config import PowerConfig
from gateway.link import FrameTooLarge, proto_ts
from gateway.localcsms.forecast import Demand, Throttle, forecast, steps
from gateway.localcsms.inventory import DISCOVER, Inventory
from gateway.schema import MESSAGES, Action, Key, Kind, TxEvent

log = logging.getLogger("gateway.reports")

SendEvent = Callable[[int, dict[int, Any]], bool]
"""Sends a site event upstream now; False when the uplink is not up."""


class ReportLinks(Protocol):
    """What the reports need of the boards online (gateway.boards.Boards is one)."""

    @property
    def online(self) -> dict[str, Any]: ...

    async def request(self, conn: Any, action: int, body: dict[int, Any], timeout: float,
                      prio: int | None = None) -> bytes: ...  # fmt: skip


class SiteReports:
    """Keeps the site's forecast and inventory, and sends them upstream (see the module's rule)."""

    def __init__(self, site_id: str, power: PowerConfig, interval_s: float, links: ReportLinks,
                 shares: Callable[[], Mapping[str, int]], active: Callable[[], list[str]],
                 now: Callable[[], float]) -> None:  # fmt: skip
        self.site_id = site_id
        self.power = power
        self.links = links
        self.shares = shares
        """The boards' shares of the site's power (what a session without a metered draw may take)."""
        self.active = active
        """The site's active devices (the device table)."""
        self.now = now
        self.send: SendEvent = lambda _action, _body: False
        """Set once the uplink exists (`Gateway.start`)."""
        self.inventory = Inventory(site_id)
        self.demands: dict[str, Demand] = {}
        self.forecast_due = Throttle(interval_s)
        self.boards_due = Throttle(interval_s)
        self.sent_forecasts = 0
        self.sent_reports = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ what the site sees

    def frame(self, device_id: str, action: int, frame: bytes) -> None:
        """A board's event on its way upstream (the dispatcher hands over the few that matter)."""
        body = _core.decode(frame).body
        if action == Action.TRANSACTION_EVENT:
            ev = body.get(Key.EVENT)
            d = self.demands.setdefault(device_id, Demand())
            started, ended = ev == TxEvent.STARTED, ev == TxEvent.ENDED
            if d.transaction(started, ended, body.get(Key.ENERGY_WH), body.get(Key.POWER_W)):
                self._changed(forecast=True)
        elif action == Action.NOTIFY_EV_NEEDS:
            departure = body.get(Key.DEPARTURE)
            self.demands.setdefault(device_id, Demand()).needs(int(body[Key.ENERGY_NEEDED_WH]), departure)
            self._changed(forecast=True)
        elif action == Action.STATUS_NOTIFICATION:
            evse, state = int(body.get(Key.EVSE, 0)), int(body[Key.STATE])
            if self.inventory.connector(device_id, evse, state):
                self._changed(boards=True)

    def booted(self, device_id: str, body: Mapping[int, Any]) -> None:
        """A board's BootNotification: what it is, then what it has (asked in the background)."""
        if self.inventory.booted(device_id, body):
            self._changed(boards=True)
        t = asyncio.get_running_loop().create_task(self._discover(device_id))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def link(self, device_id: str, online: bool) -> None:
        if self.inventory.link(device_id, online):
            self._changed(boards=True)

    def registration(self, device_id: str, registration: int) -> None:
        if self.inventory.registration(device_id, registration):
            self._changed(boards=True)

    def devices_changed(self) -> None:
        """A device was deregistered or migrated (or the device table changed elsewhere)."""
        self._changed(boards=True)

    def uplink_up(self) -> None:
        """A new connection: it starts with the present, whatever was sent on the last one."""
        self.boards_due.mark(force=True)
        self.forecast_due.mark(force=True)
        self._flush()

    async def _discover(self, device_id: str) -> None:
        conn = self.links.online.get(device_id)
        if conn is None:
            return
        body: dict[int, Any] = {Key.VARS: [{Key.COMPONENT: c, Key.VARIABLE: v} for c, v, _ in DISCOVER]}
        try:
            raw = await self.links.request(
                conn, Action.GET_VARIABLES, body, MESSAGES[Action.GET_VARIABLES].timeout_ms / 1000
            )
            ans = _core.decode(raw)
        except (TimeoutError, ConnectionError, _core.CoreError, FrameTooLarge) as e:
            log.info("%s: configuration not discovered (%s)", device_id, type(e).__name__)
            return
        if ans.kind == Kind.RESPONSE and self.inventory.discovered(device_id, ans.body.get(Key.VARS, [])):
            self._changed(boards=True)

    # ------------------------------------------------------------ what is sent

    def forecasts(self) -> list[dict[int, Any]]:
        """The SiteForecast bodies of the present: the site's, then each zone's."""
        now = proto_ts(self.now())
        shares = self.shares()
        inv = self.inventory.boards
        parts: dict[str, tuple[int, int | None]] = {}
        for did, d in self.demands.items():
            part = steps(d, now, inv[did].max_power_w if did in inv else 0, shares.get(did, 0))
            if part is not None:
                parts[did] = part
        out = [self._body(forecast(parts.values(), self.power.site_limit_w))]
        for z in self.power.zones:
            mine = [p for did, p in parts.items() if did in z.devices]
            out.append(self._body(forecast(mine, z.limit_w), z.zone))
        return out

    def _body(self, periods: list[tuple[int, int]], zone: int | None = None) -> dict[int, Any]:
        body: dict[int, Any] = {
            Key.SITE_ID: self.site_id,
            Key.FORECAST: [{Key.START_S: s, Key.LIMIT_W: w} for s, w in periods],
        }
        if zone is not None:
            body[Key.ZONE] = zone
        return body

    def _changed(self, forecast: bool = False, boards: bool = False) -> None:
        if forecast:
            self.forecast_due.mark()
        if boards:
            self.boards_due.mark()
        self._flush()

    def _flush(self) -> None:
        """Sends what is due now; arms a timer for what is due later."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.now()
        if self.boards_due.due(now) and self._send_all(Action.BOARDS_REPORT, self.inventory.reports(self.active())):
            self.boards_due.sent(now)
            self.sent_reports += 1
        if self.forecast_due.due(now) and self._send_all(Action.SITE_FORECAST, self.forecasts()):
            self.forecast_due.sent(now)
            self.sent_forecasts += 1
        # Not sent because the uplink is down: the next connection sends the present anyway.
        later = [t for t in (self.boards_due.when(now), self.forecast_due.when(now)) if t is not None and t > now]
        if later:
            self._timer = asyncio.get_running_loop().call_later(min(later) - now, self._flush)

    def _send_all(self, action: int, bodies: list[dict[int, Any]]) -> bool:
        """True once every body is on its way (or refused by the encoder: logged, not retried,
        as a report that cannot be encoded now could not be later)."""
        try:
            return all(self.send(action, b) for b in bodies)
        except _core.CoreError as e:
            log.error("%s not sent: %s %s", MESSAGES[action].name, e.name, e.reason)
            return True

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

"""M13: the answer a board gets to its BootNotification when the CSMS cannot give it.

Rule: registration is the CSMS's. While the uplink is up, a board's BootNotification goes to
the CSMS (gateway/forward.py) and the CSMS's Accepted, Pending or Rejected is what the board
obeys; the site keeps that decision per device (`Devices.decided`). The site answers alone
only when the CSMS cannot: with the decision it kept for the device, else with the operator's
offline policy (`[devices] offline_registration`, default pending: a board nobody upstream
has accepted charges nothing, and asks again after `interval_s`).

At the gateway's start the uplink is still connecting: a board never decided on then waits
(up to `BOOT_HOLD_S`, well within the BootNotification's own timeout) for the CSMS instead
of being given the offline policy's answer for the first minutes of its life.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from gateway.boards import BoardRequest
from gateway.link import proto_ts
from gateway.schema import Key, Registration

BOOT_HOLD_S = 10.0
"""How long a BootNotification of a device never decided on waits for an uplink that has not
been up yet since the gateway started (the board waits 30 s for its answer)."""
RETRY_S = 0.2
"""The pace at which a held BootNotification is handed down the chain again."""


class RegistrationBook(Protocol):
    """Where the CSMS's decisions are kept (gateway.devices.Devices is one)."""

    def registration_of(self, device_id: str) -> int | None: ...


Chain = Callable[[BoardRequest, float], None]
"""The board-request chain (`Gateway._upstream_or_local`): a held request is handed to it again."""


class BootAnswers:
    def __init__(self, book: RegistrationBook, offline: str, heartbeat_s: int,
                 uplink_starting: Callable[[], bool], now: Callable[[], float]) -> None:  # fmt: skip
        self.book = book
        self.offline = int(Registration[offline.upper()])
        self.heartbeat_s = heartbeat_s
        """The interval the boards are given: heartbeats once accepted, the next BootNotification otherwise."""
        self.uplink_starting = uplink_starting
        self.now = now
        self.chain: Chain | None = None
        """Set by the gateway once its chain exists; None: nothing is held."""
        self._held: dict[tuple[str, int], float] = {}
        """(device, request id) of a held BootNotification → when it came."""

    def body(self, req: BoardRequest, now: float) -> dict[int, Any] | None:
        """The site's answer, or None when the request is held (handed to the chain again)."""
        key = (req.device, req.frame.msg_id)
        reg = self.book.registration_of(req.device)
        if reg is None:
            if self.chain is not None and self.uplink_starting():
                since = self._held.setdefault(key, now)
                if now - since < BOOT_HOLD_S:
                    asyncio.get_running_loop().call_later(RETRY_S, self._again, req)
                    return None
            elif self._held:
                self._held.clear()  # the start is over (those held then went upstream)
            reg = self.offline
        self._held.pop(key, None)
        return {Key.REGISTRATION: reg, Key.INTERVAL_S: self.heartbeat_s, Key.TIME: proto_ts(now)}

    def _again(self, req: BoardRequest) -> None:
        if req.conn.closed or self.chain is None:
            self._held.pop((req.device, req.frame.msg_id), None)
            return
        self.chain(req, self.now())

"""Board requests the site cannot answer, relayed to the CSMS (docs/upstream.md, `Relay`).

Rule: a board always gets an answer within its request's timeout (B1), from the CSMS when
it can, else from the local CSMS (B18). While the uplink is up, a request the local CSMS
cannot answer (FirmwareChunk of an image not in the site's cache, SignCertificate,
Get15118EVCertificate, BootNotification (M13: registration is the CSMS's), Authorize of a
token not in the local list, cached or not: the cache is for offline use, S2) goes
upstream in a Relay of its own, outside the outbox. If the CSMS has not answered after
`LOCAL_FALLBACK_SHARE` of the message's timeout (uplink cut but not yet noticed, slow CSMS),
the local CSMS answers instead; a later answer of the CSMS then only fills the site's
caches.

The CSMS answers with a `Command` to that board whose inner frame is a response or error
with the board's request id (gateway/commands.py hands it to `answered`): re-sealed as the
board's response, an Authorize answer remembered in the site's cache (S2), a FirmwareChunk
kept in the image cache (M4).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway import _core
from gateway.boards import BoardRequest, Boards, Result, sealed_body
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.clock import Clock
from gateway.localcsms.fwcache import FirmwareCache
from gateway.schema import MESSAGES, Action, Key, Kind, Status
from gateway.uplink.runner import UplinkRunner

FORWARDED = frozenset(
    {Action.FIRMWARE_CHUNK, Action.SIGN_CERTIFICATE, Action.GET15118_EV_CERTIFICATE, Action.BOOT_NOTIFICATION}
)
"""Board requests the site cannot answer: relayed to the CSMS, answered by a Command."""
MEMORY = 100_000
"""Forwarded requests remembered (the oldest are forgotten first)."""
FORWARD_RELAY_BASE = 1 << 52
"""Relay ids of forwarded board requests, far above the outbox's row numbers."""
LOCAL_FALLBACK_SHARE = 0.6
"""Share of a forwarded request's timeout after which the local CSMS answers instead."""

LocalAnswer = Callable[[BoardRequest, float], None]


class ForwardSite(Protocol):
    """What forwarding needs of the site (gateway.service.Gateway is one)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def boards(self) -> Boards[Any]: ...

    @property
    def auth(self) -> Authorizer: ...

    @property
    def firmware(self) -> FirmwareCache: ...

    @property
    def runner(self) -> UplinkRunner | None: ...

    def registration_decided(self, device_id: str, registration: int) -> None:
        """Keeps the CSMS's registration decision for the device (M13)."""


class Forwarder:
    def __init__(self, site: ForwardSite, site_id: str, local: LocalAnswer) -> None:
        self.site = site
        self.site_id = site_id
        self.local = local
        """The local CSMS's answer, when the CSMS is too slow."""
        self.forwarded: dict[tuple[str, int], str | None] = {}
        """(device, request id) of board requests waiting for the CSMS → Authorize token."""
        self.late: dict[tuple[str, int], str | None] = {}
        """The same, for requests the local CSMS answered because the CSMS was too slow."""
        self._next_relay = FORWARD_RELAY_BASE + (int(time.time()) << 16)

    def forward(self, req: BoardRequest, now: float) -> bool:
        """Relays a board request the site cannot answer to the CSMS; False to answer locally."""
        site = self.site
        runner = site.runner
        if runner is None or not runner.ready:
            return False
        f = req.frame
        if f.action == Action.AUTHORIZE:
            if req.token is None or req.known_here:
                return False  # known here: the local CSMS answers at once
        elif f.action not in FORWARDED:
            return False
        elif f.action == Action.FIRMWARE_CHUNK and site.firmware.has(int(f.body[Key.IMAGE_ID])):
            return False  # a verified image in the site's cache: the local CSMS serves it
        item: dict[int, Any] = {Key.DEVICE_ID: req.device, Key.FRAME: req.raw}
        if req.token is not None:
            item[Key.TOKEN_UID] = req.token
        self._next_relay += 1
        if not runner.send_relay(self._next_relay, f.prio, {Key.SITE_ID: self.site_id, Key.FRAMES: [item]}):
            return False
        self.forwarded[req.device, f.msg_id] = req.token
        while len(self.forwarded) > MEMORY:
            del self.forwarded[next(iter(self.forwarded))]
        delay = MESSAGES[f.action].timeout_ms / 1000 * LOCAL_FALLBACK_SHARE
        asyncio.get_running_loop().call_later(delay, self._fall_back, req)
        return True

    def _fall_back(self, req: BoardRequest) -> None:
        key = (req.device, req.frame.msg_id)
        if key not in self.forwarded:
            return  # the CSMS answered in time
        self.late[key] = self.forwarded.pop(key)
        while len(self.late) > MEMORY:
            del self.late[next(iter(self.late))]
        if self.site.boards.online.get(req.device) is req.conn:
            self.local(req, self.site.clock.now())

    def answered(self, device_id: str, inner: _core.Frame, now: float) -> Result:
        """The CSMS answers a board request that went upstream: re-sealed as its response."""
        site = self.site
        key = (device_id, inner.msg_id)
        asked = key in self.forwarded
        late = not asked and key in self.late
        token = self.late.pop(key) if late else self.forwarded.pop(key, None)
        if inner.kind == Kind.RESPONSE and inner.action == Action.BOOT_NOTIFICATION:
            site.registration_decided(device_id, int(inner.body[Key.REGISTRATION]))
            if not asked and not late:  # M11, M13: a decision the CSMS sent on its own
                return {Key.DEVICE_ID: device_id, Key.STATUS: Status.ACCEPTED, Key.REASON: "kept by the site"}
        if inner.kind == Kind.RESPONSE and inner.action == Action.AUTHORIZE and token is not None:
            b = inner.body
            site.auth.remember(token, int(b[Key.AUTH_STATUS]), b.get(Key.EXPIRY))
        if inner.kind == Kind.RESPONSE and inner.action == Action.FIRMWARE_CHUNK:
            site.firmware.put(inner.body)  # M4: later boards of the site are served from the cache
        if late:  # the board already has the local answer; the CSMS's only fills the cache
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "answered locally after timeout"}
        conn = site.boards.online.get(device_id)
        if conn is None:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "board offline"}
        link = conn.link
        if inner.kind == Kind.ERROR:
            b = inner.body
            frame = link.error(
                int(b[Key.ERROR_CODE]), str(b.get(Key.REASON, "")), inner.msg_id, inner.prio, inner.action, now
            )
        else:
            frame = link.respond(inner.msg_id, inner.prio, inner.action, sealed_body(link, inner.body), now)
        conn.send_one(frame)
        return {Key.DEVICE_ID: device_id, Key.STATUS: Status.ACCEPTED}

"""The local CSMS's answers to board requests: what the site answers itself.

Rule: every board request gets an answer from the site when nothing better comes in time:
Heartbeat and TimeSync always (the site is the boards' time source, B13), BootNotification
with the CSMS's last decision or the offline policy (M13, gateway/localcsms/registration.py),
Authorize from the site's list and cache or its offline policy (S2), FirmwareChunk of a
verified image in the site's cache (M4); anything else is refused as NOT_SUPPORTED, naming
the message. The gateway asks here last, after the roaming endpoint and the CSMS
(gateway.service, `Gateway._board_request`), or when the CSMS was too slow
(gateway/forward.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.boards import BoardRequest
from gateway.link import proto_ts
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.fwcache import FirmwareCache
from gateway.localcsms.registration import BootAnswers
from gateway.schema import MESSAGES, Action, AuthStatus, ErrorCode, Key


class LocalCsms:
    def __init__(self, auth: Authorizer, firmware: FirmwareCache, boot: BootAnswers,
                 count_name: Callable[[str], None]) -> None:  # fmt: skip
        self.auth = auth
        self.firmware = firmware
        self.boot = boot
        self.count_name = count_name

    def answer(self, req: BoardRequest, now: float) -> None:
        f = req.frame
        link = req.conn.link
        a = f.action
        body: dict[int, Any]
        if a == Action.HEARTBEAT:
            body = {Key.TIME: proto_ts(now)}
        elif a == Action.TIME_SYNC:
            body = {Key.TIME: proto_ts(now), Key.TIME_MS: int(now * 1000) % 1000}
        elif a == Action.BOOT_NOTIFICATION:
            boot = self.boot.body(req, now)
            if boot is None:
                return  # held: the uplink is starting, the CSMS answers it
            body = boot
        elif a == Action.AUTHORIZE and req.decision is not None:
            d = req.decision  # looked up once, when the request was decoded
            body = {Key.AUTH_STATUS: d.status}
            if d.expiry is not None:
                body[Key.EXPIRY] = d.expiry
            if d.status != AuthStatus.ACCEPTED:
                body[Key.REASON] = f"token {d.source} at this site"
        elif a == Action.FIRMWARE_CHUNK and (
            chunk := self.firmware.chunk(int(f.body[Key.IMAGE_ID]), int(f.body[Key.OFFSET]))
        ):
            body = chunk  # M4: a verified image in the site's cache
        else:
            name = MESSAGES[a].name
            req.conn.send_one(
                link.error(ErrorCode.NOT_SUPPORTED, f"{name} is not served by this gateway", f.msg_id, f.prio, a, now)
            )
            self.count_name("NOT_SUPPORTED")
            return
        req.conn.send_one(link.respond(f.msg_id, f.prio, a, body, now))

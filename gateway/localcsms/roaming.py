"""Online identification through the CSO's roaming endpoint (IEC 63119 mixed mode: R3-1, R4-1).

The local CSMS answers an `Authorize` from its list and cache (S2). A token it does not
know is, while the roaming endpoint is reachable, asked of the CSO roaming endpoint with
`gateway.protocol.roaming.client.RoamingClient` (platform login token, HMAC per message): the
endpoint answers from the operator's own token table or asks the home CSP directly. A
definite answer (anything but `unknown`) is cached (S2) and sent to the board at once; an
`unknown` answer, a refusal or an unreachable endpoint hands the request on to the next
handler (the CSMS over the uplink, or the local offline policy), so roaming never makes
the site's own answers slower or worse.

It is on when the gateway's configuration has a `[roaming]` section (docs/gateway.md,
`config.RoamingConfig`): `Gateway` then hands every board request to `board_request` first,
as the head of the chain roaming endpoint → CSMS over the uplink → local CSMS; the token
comes decrypted and looked up once, in the `BoardRequest` (gateway/boards.py).

The EVSE of board `device_id` is `evse_gid(site_id, device_id)` — the one rule shared with
the CSMS's roaming adapter (tools/peers/evedge_roaming/csms_operator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.boards import BoardRequest
from gateway.config import RoamingConfig
from gateway.localcsms.auth import Authorizer
from gateway.localcsms.clock import Clock
from gateway.protocol import gid
from gateway.protocol.roaming.client import Peer, RoamingClient, RoamingError
from gateway.protocol.roaming.http3 import TlsFiles
from gateway.schema import EPOCH_UNIX, Action, AuthStatus, Key, TokenType

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0
"""After a failure, the endpoint is not asked again for this long."""

Handler = Callable[[BoardRequest, float], None]
"""The next stage of a board request's chain (the CSMS over the uplink, then the local CSMS)."""


class RoamingSite(Protocol):
    """What online identification needs of the site (gateway.service.Gateway is one)."""

    @property
    def auth(self) -> Authorizer: ...

    @property
    def clock(self) -> Clock: ...


class SiteRoaming:
    """The site gateway as a party (role `site`) of its CSO's roaming endpoint."""

    def __init__(self, site: RoamingSite, site_id: str, settings: RoamingConfig) -> None:
        if settings.ca is None:
            raise ValueError("roaming.ca is required when [roaming] is present")
        self.site = site
        self.site_id = site_id
        self.s = settings
        tls = TlsFiles(settings.ca, settings.cert, settings.key)
        peer = Peer(
            settings.cso_party, settings.host, settings.port, tls, settings.party_id, settings.password,
            settings.secret, settings.server_name,
        )  # fmt: skip
        self.client = RoamingClient(settings.party_id, peer)
        self.down_until = 0.0
        self.asked = 0
        self.answered = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def reachable(self) -> bool:
        return time.monotonic() >= self.down_until

    async def authorize(self, token: str, evse: str, token_type: int) -> dict[str, Any] | None:
        """The roaming answer, or None when the endpoint cannot be asked or fails."""
        if not self.reachable():
            return None
        self.asked += 1
        try:
            kind = TokenType(token_type).name.lower()
        except ValueError:
            kind = "rfid"
        try:
            answer = await asyncio.wait_for(self.client.authorize(token, evse, kind), self.s.timeout_s)
        except (TimeoutError, ConnectionError, RoamingError, OSError) as e:
            self.failed += 1
            if not isinstance(e, RoamingError) or e.status >= 500:
                self.down_until = time.monotonic() + RETRY_AFTER_S
            log.warning("roaming authorization of a token at %s failed: %s", evse, e)
            return None
        self.answered += 1
        return answer

    def board_request(self, req: BoardRequest, now: float, then: Handler) -> None:
        """An Authorize of a token the site does not know is asked of the endpoint; every
        other request, and every answer that is not definite, goes on to `then`."""
        f = req.frame
        if f.action != Action.AUTHORIZE or req.token is None or req.known_here or not self.reachable():
            then(req, now)  # not for roaming, or known at the site: answered at once
            return
        evse = gid.evse_gid(self.site_id, req.device, int(f.body.get(Key.EVSE, 1) or 1))
        task = asyncio.get_running_loop().create_task(
            self._ask(req, req.token, evse, int(f.body.get(Key.TOKEN_TYPE, 0) or 0), then)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, req: BoardRequest, token: str, evse: str, token_type: int, then: Handler) -> None:
        answer = await self.authorize(token, evse, token_type)
        if req.conn.closed:
            return
        now = self.site.clock.now()
        if answer is None or answer.get("auth_status") == "unknown":
            then(req, now)  # the CSMS (uplink up) or the site's offline policy
            return
        status = int(AuthStatus[str(answer["auth_status"]).upper()])
        expiry = answer.get("expiry")
        proto_expiry = None if expiry is None else max(0, int(expiry) - EPOCH_UNIX)
        self.site.auth.remember(token, status, proto_expiry)  # S2: the site's cache
        body: dict[int, Any] = {Key.AUTH_STATUS: status}
        if proto_expiry is not None:
            body[Key.EXPIRY] = proto_expiry
        if status != AuthStatus.ACCEPTED:
            body[Key.REASON] = "refused by the home CSP"
        f = req.frame
        req.conn.send_one(req.conn.link.respond(f.msg_id, f.prio, f.action, body, now))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.client.close()

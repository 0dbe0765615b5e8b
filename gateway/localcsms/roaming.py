"""Online identification through the CSO's roaming endpoint (IEC 63119 mixed mode: R3-1, R4-1).

The local CSMS answers an `Authorize` from its list and cache (S2). A token it does not
know is, while the roaming endpoint is reachable, asked of the CSO roaming endpoint with
`gateway.protocol.roaming.client.RoamingClient` (platform login token, HMAC per message): the
endpoint answers from the operator's own token table or asks the home CSP directly. A
definite answer (anything but `unknown`) is cached (S2) and sent to the board at once; an
`unknown` answer, a refusal or an unreachable endpoint hands the request on to the next
handler (the CSMS over the uplink, or the local offline policy), so roaming never makes
the site's own answers slower or worse.

It is on when the gateway's configuration has a `[roaming]` section (docs/gateway.md):
`Gateway` then asks this module first for every board request it cannot answer itself.

The EVSE of board `device_id` is `evse_gid(site_id, device_id)` — the one rule shared with
the CSMS's roaming adapter (tools/peers/roaming/csms_operator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import _core
from gateway.link import proto_ts
from gateway.protocol import gid
from gateway.protocol.roaming.client import Peer, RoamingClient, RoamingError
from gateway.protocol.roaming.http3 import TlsFiles
from gateway.schema import EPOCH_UNIX, Action, AuthStatus, Key, TokenType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoamingSettings:
    """The site gateway as a party (role `site`) of its CSO's roaming endpoint."""

    party_id: str  # this site's party id at the CSO endpoint (type O)
    cso_party: str  # the CSO endpoint's party id
    host: str
    port: int
    ca: Path
    password: str
    secret: bytes
    cert: Path | None = None
    key: Path | None = None
    server_name: str = "localhost"
    timeout_s: float = 3.0  # an Authorize must be answered well within the board's own timeout
    retry_after_s: float = 5.0  # after a failure, the endpoint is not asked again for this long


class SiteRoaming:
    def __init__(self, gw: Any, settings: RoamingSettings) -> None:
        self.gw = gw
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
                self.down_until = time.monotonic() + self.s.retry_after_s
            log.warning("roaming authorization of a token at %s failed: %s", evse, e)
            return None
        self.answered += 1
        return answer

    def board_request(self, next_handler: Any, conn: Any, frame: bytes, now: float) -> None:
        gw = self.gw
        f = _core.decode(frame)
        if f.action != Action.AUTHORIZE or not self.reachable():
            next_handler(conn, frame, now)
            return
        ct = f.body.get(Key.ID_TOKEN)
        if not isinstance(ct, bytes):
            next_handler(conn, frame, now)
            return
        token = conn.link.decrypt(f.seq, Key.ID_TOKEN, ct).decode("utf-8", "replace")
        if gw.auth.authorize(token, proto_ts(now)).source in ("list", "cache"):
            next_handler(conn, frame, now)  # known at the site: answered at once
            return
        evse = gid.evse_gid(gw.cfg.site_id, conn.link.device_id, int(f.body.get(Key.EVSE, 1) or 1))
        task = asyncio.get_running_loop().create_task(
            self._ask(next_handler, conn, frame, f, token, evse, int(f.body.get(Key.TOKEN_TYPE, 0) or 0))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(
        self, next_handler: Any, conn: Any, frame: bytes, f: _core.Frame, token: str, evse: str, token_type: int
    ) -> None:
        answer = await self.authorize(token, evse, token_type)
        gw = self.gw
        if conn.closed:
            return
        now = gw.clock.now()
        if answer is None or answer.get("auth_status") == "unknown":
            next_handler(conn, frame, now)  # the CSMS (uplink up) or the site's offline policy
            return
        status = int(AuthStatus[str(answer["auth_status"]).upper()])
        expiry = answer.get("expiry")
        proto_expiry = None if expiry is None else max(0, int(expiry) - EPOCH_UNIX)
        gw.auth.remember(token, status, proto_expiry)  # S2: the site's cache
        body: dict[int, Any] = {Key.AUTH_STATUS: status}
        if proto_expiry is not None:
            body[Key.EXPIRY] = proto_expiry
        if status != AuthStatus.ACCEPTED:
            body[Key.REASON] = "refused by the home CSP"
        conn.send_one(conn.link.respond(f.msg_id, f.prio, f.action, body, now))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.client.close()


def roaming_settings(cfg: Any) -> RoamingSettings:
    """The `[roaming]` section of a `gateway.config.Config`."""
    if cfg.roaming_ca is None:
        raise ValueError("roaming.ca is required when [roaming] is present")
    return RoamingSettings(
        cfg.roaming_party, cfg.roaming_cso, cfg.roaming_host, cfg.roaming_port, cfg.roaming_ca,
        cfg.roaming_password, cfg.roaming_secret, cfg.roaming_cert, cfg.roaming_key, cfg.roaming_server_name,
        cfg.roaming_timeout_s,
    )  # fmt: skip

"""Typed roaming calls to one peer: login, automatic re-login, one method per R message.

    peer = Peer("DE*CSP*O", "127.0.0.1", 4433, TlsFiles(ca), username="DE*CSO*O", password=..., secret=...)
    async with RoamingClient("DE*CSO*O", peer) as c:
        answer = await c.authorize("04A1B2C3", "DE*CSO*E1-1", "rfid", to="DE*CSP*O")

Every body is checked against the schema before it leaves and every answer when it
arrives (`json_body`). A refused request raises `RoamingError` with the HTTP status and the
peer's JSON error (cause, field, detail). A request that got no answer is sent once more on a
new connection; `ConnectFailed` means nothing was sent, `MaybeDelivered` that the retry failed
after an attempt that may have been carried out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gateway import schema
from gateway.protocol.roaming import auth, json_body
from gateway.protocol.roaming.http3 import ConnectFailed, H3Client, H3Error, TlsFiles

PREFIX = "/roaming/v1/"
RELOGIN_MARGIN = 5  # seconds before the token's expiry at which we log in again


def path_of(message: str) -> str:
    return PREFIX + message


@dataclass(frozen=True)
class Peer:
    """Where a peer is and the credentials we hold for it."""

    party_id: str
    host: str
    port: int
    tls: TlsFiles
    username: str
    password: str
    secret: bytes
    server_name: str = "localhost"


class RoamingError(Exception):
    """The peer refused a request."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.cause = str(body.get("error", "unknown"))
        self.field = body.get("field")
        self.detail = str(body.get("detail", ""))
        super().__init__(
            f"HTTP {status} {self.cause}" + (f" [{self.field}]" if self.field else "") + f": {self.detail}"
        )


class MaybeDelivered(H3Error):
    """The request was sent but no answer came, and the automatic retry failed too (even without
    connecting): the peer may have carried it out. Never "nothing sent" like `ConnectFailed`."""


class RoamingClient:
    def __init__(
        self, me: str, peer: Peer, *, clock: Callable[[], float] = time.time, http: H3Client | None = None
    ) -> None:
        self.me, self.peer, self.clock = me, peer, clock
        self.http = http or H3Client(peer.host, peer.port, peer.tls, server_name=peer.server_name)
        self._token: str | None = None
        self._expiry = 0
        self.logins = 0

    async def __aenter__(self) -> RoamingClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.close()

    async def _send(self, message: str, body: bytes, route: auth.Route, token: str | None) -> tuple[int, bytes]:
        path = path_of(message)
        timeout = schema.MESSAGE_BY_NAME[message].timeout_ms / 1000  # B1: each message's own timeout
        for attempt in range(2):
            headers = auth.sign(
                self.peer.secret, "POST", path, route, body, now=self.clock()
            )  # a fresh nonce each time
            headers["content-type"] = "application/json"
            if token is not None:
                headers[auth.H_AUTH] = f"Bearer {token}"
            try:
                r = await self.http.request("POST", path, headers, body, timeout=timeout)
            except H3Error as exc:
                if attempt:  # the first attempt may have been delivered: so may this request
                    raise MaybeDelivered(f"{exc} (after an earlier attempt that got no answer)") from exc
                if isinstance(exc, ConnectFailed):
                    raise
                continue  # the connection went away (peer restarted): once more on a new one
            return r.status, r.body
        raise AssertionError("unreachable")

    @staticmethod
    def _answer(message: str, status: int, data: bytes) -> dict[str, Any]:
        try:
            body = json_body.parse(data)
        except json_body.BodyError as exc:
            raise RoamingError(
                status if status != 200 else 502, {"error": "bad_response", "detail": str(exc)}
            ) from None
        if status != 200:
            raise RoamingError(status, body)
        try:
            return json_body.check(message, body, response=True)
        except json_body.BodyError as exc:
            raise RoamingError(502, {"error": "bad_response", "field": exc.field, "detail": exc.detail}) from None

    async def login(self) -> str:
        """PlatformLogin (R1-1): a token valid until `self.expiry`."""
        body = {"party_id": self.me, "username": self.peer.username, "password": self.peer.password}
        json_body.check("PlatformLogin", body)
        status, data = await self._send("PlatformLogin", json_body.dump(body), auth.Route(self.me), None)
        answer = self._answer("PlatformLogin", status, data)
        self._token, self._expiry = str(answer["token"]), int(answer["expiry"])
        self.logins += 1
        return self._token

    async def ensure_login(self) -> None:
        """Log in unless the token is good for a while yet: a caller that must tell "nothing
        sent" apart calls this first (a failed login sends no request)."""
        if self._token is None or self.clock() >= self._expiry - RELOGIN_MARGIN:
            await self.login()

    @property
    def expiry(self) -> int:
        return self._expiry

    async def call(self, message: str, body: dict[str, Any], *, to: str = "", origin: str = "") -> dict[str, Any]:
        """Send one roaming request; log in first, and again once if the token has expired."""
        json_body.check(message, body)
        data = json_body.dump(body)
        route = auth.Route(self.me, origin if origin != self.me else "", to)
        for attempt in range(2):
            await self.ensure_login()
            status, answer = await self._send(message, data, route, self._token)
            if status == 401 and attempt == 0:
                try:
                    cause = json_body.parse(answer).get("error")
                except json_body.BodyError:
                    cause = None
                if cause in ("token_expired", "unknown_token"):
                    self._token = None
                    continue
            return self._answer(message, status, answer)
        raise AssertionError("unreachable")

    # ---- one method per roaming message (docs/roaming.md lists who sends which)
    async def put_location(self, location: dict[str, Any], *, to: str = "") -> dict[str, Any]:
        """R1-2: a location with its EVSEs (CSO → CSP)."""
        return await self.call("PutLocation", location, to=to)

    async def evse_status(
        self,
        evse_gid: str,
        evse_status: str,
        t: int,
        *,
        outage_kind: str | None = None,
        reason: str | None = None,
        to: str = "",
    ) -> dict[str, Any]:
        """R1-3 dynamic status, R5-1 outage/maintenance (CSO → CSP)."""
        body: dict[str, Any] = {"evse_gid": evse_gid, "evse_status": evse_status, "time": t}
        if outage_kind is not None:
            body["outage_kind"] = outage_kind
        if reason is not None:
            body["reason"] = reason
        return await self.call("EvseStatusUpdate", body, to=to)

    async def push_tariff(self, tariff: dict[str, Any], *, to: str = "") -> dict[str, Any]:
        """R2-1 (CSO → CSP)."""
        return await self.call("PushTariff", tariff, to=to)

    async def get_tariffs(self, operator_id: str, *, to: str = "") -> dict[str, Any]:
        """R2-2 (CSP → CSO)."""
        return await self.call("GetTariffs", {"operator_id": operator_id}, to=to)

    async def authorize(self, token_uid: str, evse_gid: str, token_type: str, *, to: str = "") -> dict[str, Any]:
        """R3-1, R3-3 (token_type iso15118, token_uid a contract id), R4-1 (CSO → home CSP)."""
        body = {"token_uid": token_uid, "evse_gid": evse_gid, "token_type": token_type}
        return await self.call("AuthorizeRoaming", body, to=to)

    async def remote_start(self, evse_gid: str, token_uid: str, session_id: str, *, to: str = "") -> dict[str, Any]:
        """R3-2 (home CSP → CSO)."""
        body = {"evse_gid": evse_gid, "token_uid": token_uid, "roaming_session_id": session_id}
        return await self.call("RemoteStart", body, to=to)

    async def remote_stop(self, session_id: str, *, to: str = "") -> dict[str, Any]:
        """R3-4 (home CSP → CSO)."""
        return await self.call("RemoteStop", {"roaming_session_id": session_id}, to=to)

    async def session_update(self, update: dict[str, Any], *, to: str = "") -> dict[str, Any]:
        """R3-6 live energy/power/cost, R3-5 the final state (CSO → CSP)."""
        return await self.call("SessionUpdate", update, to=to)

    async def charge_plan(self, session_id: str, plan: list[dict[str, Any]], *, to: str = "") -> dict[str, Any]:
        """R3-7 (CSP → CSO; the answer may carry the plan the CSO can do), R3-10 (CSO → CSP)."""
        return await self.call("ChargePlan", {"roaming_session_id": session_id, "plan": plan}, to=to)

    async def reserve(
        self, evse_gid: str, token_uid: str, expiry: int, reservation_id: int, *, to: str = ""
    ) -> dict[str, Any]:
        """R3-8 (home CSP → CSO)."""
        body = {"evse_gid": evse_gid, "token_uid": token_uid, "expiry": expiry, "reservation_id": reservation_id}
        return await self.call("ReserveRoaming", body, to=to)

    async def put_sdr(self, sdr: dict[str, Any], *, to: str = "") -> dict[str, Any]:
        """R3-9, R3-5 (CSO → CSP, copied to the CH)."""
        return await self.call("PutSdr", sdr, to=to)

    async def token_list(
        self, party_id: str, version: int, update_type: str, tokens: list[dict[str, Any]], *, to: str = ""
    ) -> dict[str, Any]:
        """R4-2 (CSP → CSO)."""
        body = {"party_id": party_id, "list_version": version, "update_type": update_type, "tokens": tokens}
        return await self.call("TokenList", body, to=to)

    async def unlock(
        self, evse_gid: str, session_id: str | None = None, reason: str | None = None, *, to: str = ""
    ) -> dict[str, Any]:
        """R5-2 (session active) and R5-3 (activation failed) (CSP → CSO)."""
        body: dict[str, Any] = {"evse_gid": evse_gid}
        if session_id is not None:
            body["roaming_session_id"] = session_id
        if reason is not None:
            body["reason"] = reason
        return await self.call("UnlockRoaming", body, to=to)

    async def settlement(
        self, party_id: str, sdrs: list[str], amount: int, currency: str, *, to: str = ""
    ) -> dict[str, Any]:
        """CH → party: the settled SDRs with the counterpart `party_id` and their total."""
        body = {"party_id": party_id, "sdrs": sdrs, "amount": amount, "currency": currency}
        return await self.call("Settlement", body, to=to)

    async def delete_user_data(
        self, token_uid: str, party_id: str | None = None, *, to: str = "", origin: str = ""
    ) -> dict[str, Any]:
        """M10: delete a user's data at the peer (which passes it on to everyone it sent it to)."""
        body: dict[str, Any] = {"token_uid": token_uid}
        if party_id is not None:
            body["party_id"] = party_id
        return await self.call("DeleteUserData", body, to=to, origin=origin)

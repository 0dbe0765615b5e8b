"""A CSMS nobody here wrote the protocol of: the `ocpp` library's OCPP 2.0.1 `ChargePoint`
(mobilityhouse) on a `websockets` server, with the library's JSON-schema validation on in both
directions (every CALL it receives and every answer it gets is checked against the OCPP 2.0.1
schemas; an invalid one is answered with a CALLERROR or raises in the test).

It records every CALL the stations send (`calls`, with the message id), answers
BootNotification with the status a test chooses per station (`boot_status`), Authorize from
`tokens`, checks basic auth (security profiles 1 and 2) or the client certificate (3, `ssl`
with a CA to verify the stations against), can leave every CALL of some stations unanswered
(`mute`: a CSMS that stops answering them) and can be stopped and started again on the same
port (an outage). Used by tests/scenarios/test_ocpp*.py, the fault campaign's OCPP mode
(tools/site/campaign.py --ocpp) and the OCPP benchmark (tools/bench/ocpp_bridge.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v201 import ChargePoint, call_result

PASSWORD = "ocpp-test-password-0123"
"""The stations' basic-auth password (OCPP 2.0.1: 16 to 40 characters)."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Seen:
    station: str
    action: str
    payload: dict[str, Any]
    uid: str = ""
    """The CALL's message id (a station sending a message again after a restart keeps it)."""


class CsmsSide(ChargePoint):  # type: ignore[misc]
    """The CSMS's end of one station's WebSocket."""

    csms: OcppCsms

    async def route_message(self, raw_msg: str) -> None:
        msg = json.loads(raw_msg)
        if isinstance(msg, list) and msg and msg[0] == 2:
            self.csms.calls.append(Seen(self.id, str(msg[2]), dict(msg[3]), str(msg[1])))
            if self.id in self.csms.mute:
                return  # a CSMS that stopped answering this station
        else:
            self.csms.answers.append((self.id, msg))
        await super().route_message(raw_msg)

    @on("BootNotification")  # type: ignore[untyped-decorator]
    async def boot(self, charging_station: dict[str, Any], reason: str, **_: Any) -> Any:
        status = self.csms.boot_status.get(self.id, "Accepted")
        return call_result.BootNotification(current_time=now_iso(), interval=self.csms.interval, status=status)

    @on("Heartbeat")  # type: ignore[untyped-decorator]
    async def heartbeat(self, **_: Any) -> Any:
        return call_result.Heartbeat(current_time=now_iso())

    @on("StatusNotification")  # type: ignore[untyped-decorator]
    async def status(self, **_: Any) -> Any:
        return call_result.StatusNotification()

    @on("Authorize")  # type: ignore[untyped-decorator]
    async def authorize(self, id_token: dict[str, Any], **_: Any) -> Any:
        status = self.csms.tokens.get(id_token["id_token"], "Unknown")
        return call_result.Authorize(id_token_info={"status": status})

    @on("TransactionEvent")  # type: ignore[untyped-decorator]
    async def transaction_event(self, **_: Any) -> Any:
        if self.csms.hold_tx:
            await self.csms.release.wait()
        return call_result.TransactionEvent()

    @on("MeterValues")  # type: ignore[untyped-decorator]
    async def meter_values(self, **_: Any) -> Any:
        return call_result.MeterValues()

    @on("FirmwareStatusNotification")  # type: ignore[untyped-decorator]
    async def fw_status(self, **_: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    @on("LogStatusNotification")  # type: ignore[untyped-decorator]
    async def log_status(self, **_: Any) -> Any:
        return call_result.LogStatusNotification()

    @on("SecurityEventNotification")  # type: ignore[untyped-decorator]
    async def security_event(self, **_: Any) -> Any:
        return call_result.SecurityEventNotification()

    @on("NotifyEvent")  # type: ignore[untyped-decorator]
    async def notify_event(self, **_: Any) -> Any:
        return call_result.NotifyEvent()

    @on("NotifyReport")  # type: ignore[untyped-decorator]
    async def notify_report(self, **_: Any) -> Any:
        return call_result.NotifyReport()

    @on("ReservationStatusUpdate")  # type: ignore[untyped-decorator]
    async def reservation(self, **_: Any) -> Any:
        return call_result.ReservationStatusUpdate()

    @on("NotifyDisplayMessages")  # type: ignore[untyped-decorator]
    async def displays(self, **_: Any) -> Any:
        return call_result.NotifyDisplayMessages()

    @on("SignCertificate")  # type: ignore[untyped-decorator]
    async def sign_certificate(self, csr: str, **_: Any) -> Any:
        """Accepted: the test signs the CSR (recorded in `calls`) and sends CertificateSigned."""
        return call_result.SignCertificate(status="Accepted")


@dataclass
class OcppCsms:
    port: int = 0
    interval: int = 60
    boot_status: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    calls: list[Seen] = field(default_factory=list)
    answers: list[tuple[str, Any]] = field(default_factory=list)
    """Every CALLRESULT and CALLERROR a station sent, as (station, parsed frame)."""
    stations: dict[str, CsmsSide] = field(default_factory=dict)
    sockets: dict[str, Any] = field(default_factory=dict)
    auth_seen: list[tuple[str, str]] = field(default_factory=list)
    """(station id in the path, user:password of its basic auth)."""
    mute: set[str] = field(default_factory=set)
    """Stations whose CALLs are recorded and never answered."""
    ssl: Any = None
    """An ssl.SSLContext: wss:// (security profiles 2 and 3)."""
    hold_tx: bool = False
    """Hold every TransactionEvent's answer until `release` is set (a CSMS that stops answering)."""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: Any = None
    client_cn: Any = None
    """Profile 3: a check of the connection's client certificate (None: basic auth is checked)."""

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl is not None else 'ws'}://127.0.0.1:{self.port}/ocpp"

    def of(self, station: str, action: str) -> list[dict[str, Any]]:
        return [c.payload for c in self.calls if c.station == station and c.action == action]

    async def start(self) -> OcppCsms:
        async def process_request(conn: Any, request: Any) -> Any:
            header = request.headers.get("Authorization", "")
            station = request.path.rsplit("/", 1)[-1]
            user_pw = base64.b64decode(header.removeprefix("Basic ")).decode() if header.startswith("Basic ") else ""
            self.auth_seen.append((station, user_pw))
            if self.client_cn is not None:  # profile 3: the station is who its certificate says
                return None if self.client_cn(conn) else conn.respond(403, "no client certificate\n")
            if user_pw != f"{station}:{PASSWORD}":
                return conn.respond(401, "bad credentials\n")
            return None

        async def handler(ws: Any) -> None:
            station = ws.request.path.rsplit("/", 1)[-1]
            cp = CsmsSide(station, ws, response_timeout=15)
            cp.csms = self
            self.stations[station] = cp
            self.sockets[station] = ws
            with contextlib.suppress(websockets.ConnectionClosed):
                await cp.start()

        self.server = await websockets.serve(
            handler,
            "127.0.0.1",
            self.port,
            subprotocols=[websockets.Subprotocol("ocpp2.0.1")],
            process_request=process_request,
            ssl=self.ssl,
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        self.stations.clear()
        self.sockets.clear()

    async def call(self, station: str, payload: Any) -> Any:
        """A CALL to a station, through the library (validated both ways); its result, or raises
        the CALLERROR as an OCPPError."""
        return await self.stations[station].call(payload, suppress=False)

    async def raw(self, station: str, text: str, timeout: float = 10.0) -> Any:
        """Sends a frame as it is (no validation) and returns the station's answer to its id."""
        n = len(self.answers)
        await self.sockets[station].send(text)
        end = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < end:
            for st, msg in self.answers[n:]:
                if st == station:
                    return msg
            await asyncio.sleep(0.02)
        raise TimeoutError("no answer from the station")

"""A small test-side gateway for the CSMS peer: QUIC client per docs/upstream.md (mutual
TLS, ALPN evedge-up/1, four class streams, u32 framing), SiteHello, Relays of board frames
built with the Rust core, acks, errors and Commands received."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from evedge_csms.wire import Envelope, decode_up, proto_time
from gateway import _core
from gateway.protocol.upstream_wire import ALPN, K_UP, StreamReader, prefix
from gateway.schema import FIELDS, MESSAGES, Action, Key, Kind

URGENT, CONTROL, TELEMETRY, BULK = 0, 4, 8, 12
"""The gateway's class streams (client-initiated)."""
CMD_URGENT, CMD_CONTROL, CMD_TELEMETRY, CMD_BULK = 1, 5, 9, 13
"""The CSMS's command streams (server-initiated, docs/upstream.md)."""


class Board:
    """One EVSE board's frames as the gateway accepted them on the LAN (tagged under a
    session key the test makes up; the CSMS decodes them without a key)."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        k_dev = os.urandom(32)
        self.k_up, _, self.e_up, _ = _core.derive_keys(k_dev, os.urandom(16), os.urandom(16))
        self.sender = _core.Sender(self.k_up)
        self.next_id = 1

    def frame(
        self, action: int, body: dict[Any, Any], *, kind: int | None = None, msg_id: int | None = None, ts: int = 0
    ) -> dict[Any, Any]:
        """A Relay item: the board frame, secret fields encrypted, the id token's plaintext
        beside it as `token_uid` (as the gateway adds it, docs/upstream.md)."""
        spec = MESSAGES[action]
        if msg_id is None:
            msg_id, self.next_id = self.next_id, self.next_id + 1
        seq = self.sender.seq
        wire_body, secrets = {}, {}
        for k, v in body.items():
            if k in FIELDS and FIELDS[k].type == "secret":
                plain = v.encode() if isinstance(v, str) else v
                secrets[k] = plain
                wire_body[k] = _core.aes_ctr(self.e_up, seq, k, plain)
            else:
                wire_body[k] = v
        raw = self.sender.seal(
            spec.kind if kind is None else kind, msg_id, int(spec.priority), ts or proto_time(1.7e9), action, wire_body
        )
        item: dict[Any, Any] = {Key.DEVICE_ID: self.device_id, Key.FRAME: raw}
        if Key.ID_TOKEN in secrets:
            item[Key.TOKEN_UID] = secrets[Key.ID_TOKEN].decode()
        return item


@dataclass
class Received:
    acks: dict[int, asyncio.Event] = field(default_factory=dict)
    errors: list[tuple[int, Envelope]] = field(default_factory=list)
    responses: dict[int, asyncio.Future[Envelope]] = field(default_factory=dict)
    commands: asyncio.Queue[tuple[int, Envelope]] = field(default_factory=asyncio.Queue)
    terminated: ConnectionTerminated | None = None


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rx = Received()
        self.readers: dict[int, StreamReader] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            reader = self.readers.setdefault(event.stream_id, StreamReader())
            for frame in reader.feed(event.data):
                self._frame(event.stream_id, decode_up(frame))
        elif isinstance(event, ConnectionTerminated):
            self.rx.terminated = event
            for fut in self.rx.responses.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(event.reason_phrase))

    def _frame(self, stream_id: int, env: Envelope) -> None:
        rx = self.rx
        if env.kind == Kind.ACK:
            rx.acks.setdefault(env.msg_id, asyncio.Event()).set()
        elif env.kind == Kind.ERROR:
            rx.errors.append((stream_id, env))
            fut = rx.responses.get(env.msg_id)
            if fut is not None and not fut.done():
                fut.set_result(env)
        elif env.kind == Kind.RESPONSE:
            fut = rx.responses.get(env.msg_id)
            if fut is not None and not fut.done():
                fut.set_result(env)
        elif env.kind in (Kind.REQUEST, Kind.EVENT):
            rx.commands.put_nowait((stream_id, env))


class GatewayClient:
    def __init__(self, proto: _ClientProtocol, site_id: str) -> None:
        self.proto = proto
        self.site_id = site_id
        self.seq: dict[int, int] = {}
        self.next_id = 1000
        # Open the four class streams in order (urgent, control, telemetry, bulk); the empty
        # STREAM frames make them known to the CSMS before any frame travels on them.
        self.streams = []
        for _ in range(4):
            sid = proto._quic.get_next_available_stream_id()
            proto._quic.send_stream_data(sid, b"")
            self.streams.append(sid)
        proto.transmit()

    @property
    def rx(self) -> Received:
        return self.proto.rx

    def send_raw(self, stream_id: int, data: bytes) -> None:
        self.proto._quic.send_stream_data(stream_id, data)
        self.proto.transmit()

    def send(self, stream_id: int, kind: int, action: int, body: dict[Any, Any], msg_id: int | None = None) -> int:
        if msg_id is None:
            msg_id, self.next_id = self.next_id, self.next_id + 1
        seq = self.seq.get(stream_id, 0) + 1
        self.seq[stream_id] = seq
        prio = min(stream_id // 4, 3)  # a command stream's answer: the same class as its stream
        frame = _core.encode(kind, seq, msg_id, prio, proto_time(1.7e9), action, body, K_UP)
        self.send_raw(stream_id, prefix(frame))
        return msg_id

    async def request(self, stream_id: int, action: int, body: dict[Any, Any], timeout: float = 20) -> Envelope:
        msg_id = self.next_id
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self.rx.responses[msg_id] = fut
        self.send(stream_id, Kind.REQUEST, action, body, msg_id)
        return await asyncio.wait_for(fut, timeout)

    async def hello(self) -> Envelope:
        body = {Key.SITE_ID: self.site_id, Key.VER_MIN: 1, Key.VER_MAX: 1, Key.SCHEMA_REV: _core.SCHEMA_REV}
        return await self.request(CONTROL, Action.SITE_HELLO, body)

    def relay(self, items: list[dict[Any, Any]], relay_id: int | None = None, stream_id: int = CONTROL) -> int:
        body = {Key.SITE_ID: self.site_id, Key.FRAMES: items}
        rid = self.send(stream_id, Kind.EVENT, Action.RELAY, body, relay_id)
        self.rx.acks.setdefault(rid, asyncio.Event())
        return rid

    async def relay_acked(self, items: list[dict[Any, Any]], relay_id: int | None = None, timeout: float = 20) -> int:
        rid = self.relay(items, relay_id)
        await asyncio.wait_for(self.rx.acks[rid].wait(), timeout)
        return rid

    async def error_for(self, msg_id: int, timeout: float = 20) -> Envelope:
        for _ in range(int(timeout / 0.02)):
            for _, env in self.rx.errors:
                if env.msg_id == msg_id:
                    return env
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no error frame for id {msg_id}")

    async def command(self, timeout: float = 20) -> tuple[int, Envelope, _core.Frame | None]:
        """The next Command (or bare request) from the CSMS, with its inner frame decoded."""
        stream_id, env = await asyncio.wait_for(self.rx.commands.get(), timeout)
        inner = _core.decode(env.body[Key.FRAME], K_UP) if env.action == Action.COMMAND else None
        return stream_id, env, inner

    def answer(self, stream_id: int, env: Envelope, results: list[dict[Any, Any]]) -> None:
        self.send(stream_id, Kind.RESPONSE, Action.COMMAND, {Key.RESULTS: results}, env.msg_id)

    def accept_all(self, stream_id: int, env: Envelope, frames: dict[str, bytes] | None = None) -> None:
        results = []
        for d in env.body[Key.TARGETS] or [""]:
            r: dict[Any, Any] = {Key.DEVICE_ID: d, Key.STATUS: 0}
            if frames and d in frames:
                r[Key.FRAME] = frames[d]
            results.append(r)
        self.answer(stream_id, env, results)


def client_configuration(ca: Path, cert: Path | None, key: Path | None, alpn: str = ALPN) -> QuicConfiguration:
    qc = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost")
    qc.load_verify_locations(cafile=str(ca))
    qc.verify_mode = ssl.CERT_REQUIRED
    if cert is not None and key is not None:
        qc.load_cert_chain(str(cert), str(key))
    return qc


@contextlib.asynccontextmanager
async def gateway(
    port: int,
    site_id: str,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    *,
    alpn: str = ALPN,
    hello: bool = True,
) -> AsyncIterator[GatewayClient]:
    config = client_configuration(ca, cert, key, alpn)
    async with connect("127.0.0.1", port, configuration=config, create_protocol=_ClientProtocol) as proto:
        assert isinstance(proto, _ClientProtocol)
        client = GatewayClient(proto, site_id)
        if hello:
            await client.hello()
        yield client


# ---------------------------------------------------------------- harness
@contextlib.asynccontextmanager
async def running_csms(folder: Path, **policy: Any) -> AsyncIterator[Any]:
    """A CSMS on 127.0.0.1 with an ephemeral port and its data under `folder`."""
    import dataclasses

    from evedge_csms.config import load
    from evedge_csms.server import CsmsServer

    cfg = load(None, data_dir=folder, port=0)
    if policy:
        cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, **policy))
    server = CsmsServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def site_identity(server: Any, site_id: str) -> tuple[Path, Path]:
    from gateway.protocol import devpki

    cfg = server.config
    (cfg.data_dir / "sites").mkdir(parents=True, exist_ok=True)
    issued = devpki.issue(cfg.data_dir / "sites", site_id, ca=(cfg.ca, cfg.ca_key), server=False)
    return issued.cert, issued.key


@contextlib.asynccontextmanager
async def site(server: Any, site_id: str = "site-1", **kw: Any) -> AsyncIterator[GatewayClient]:
    cert, key = site_identity(server, site_id)
    async with gateway(server.port, site_id, server.config.ca, cert, key, **kw) as client:
        yield client


async def until(predicate: Any, timeout: float = 20.0) -> Any:
    """Poll `predicate()` until it returns a truthy value."""
    for _ in range(int(timeout / 0.02)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")

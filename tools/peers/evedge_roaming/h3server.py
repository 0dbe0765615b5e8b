"""HTTP/3 server glue on aioquic: buffers each request stream (up to a size limit), hands the
complete request to an async handler and writes its response. No protocol logic lives here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, ProtocolNegotiated, QuicEvent

from gateway.protocol.mtls import peer_common_name, require_client_certificates


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    oversize: bool = False
    peer: str = ""  # common name of the client's verified certificate


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Reply]]


class _ServerProtocol(QuicConnectionProtocol):
    handler: Handler
    max_body: int
    client_ca: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None
        self._requests: dict[int, Request] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._peer = ""
        require_client_certificates(self._quic, self.client_ca)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self._peer = peer_common_name(self._quic) or ""  # the handshake completes only for a verified client
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)  # ALPN is settled during the handshake, before the check
        if not self._peer:
            return  # no request is read from a client before its certificate checked out
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            h = {k.decode("ascii", "replace"): v.decode("utf-8", "replace") for k, v in event.headers}
            self._requests[event.stream_id] = Request(h.pop(":method", ""), h.pop(":path", ""), h, peer=self._peer)
        elif isinstance(event, DataReceived):
            pending = self._requests.get(event.stream_id)
            if pending is None:
                return
            if not pending.oversize:
                pending.body += event.data
                if len(pending.body) > self.max_body:
                    pending.oversize, pending.body = True, b""  # keep draining, answer 413 at the end
        else:
            return
        if event.stream_ended:
            done = self._requests.pop(event.stream_id)
            task = asyncio.ensure_future(self._answer(event.stream_id, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, stream_id: int, req: Request) -> None:
        try:
            reply = await self.handler(req)
        except Exception:  # a handler bug must not kill the connection, nor tell the peer our internals
            incident = secrets.token_hex(6)
            log.exception("roaming request %s %s failed (incident %s)", req.method, req.path[:80], incident)
            body = {"error": "internal", "detail": f"internal error, incident {incident}"}
            reply = Reply(500, json.dumps(body).encode())
        if self._h3 is None:
            return
        headers = [(b":status", str(reply.status).encode())]
        headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        self._h3.send_headers(stream_id, headers)
        self._h3.send_data(stream_id, reply.body, end_stream=True)
        self.transmit()


class H3Server:
    """One listening UDP socket; `port` is the bound port (ask for 0 to get an ephemeral one)."""

    def __init__(self, transport: asyncio.DatagramTransport, server: QuicServer) -> None:
        self._transport, self._server = transport, server
        self.port: int = transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        self._server.close()


async def serve(
    host: str, port: int, cert: Path, key: Path, handler: Handler, *, max_body: int, client_ca: Path
) -> H3Server:
    """Serve HTTP/3 with mutual TLS: clients must present a certificate issued by `client_ca`."""
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    cfg.load_cert_chain(str(cert), str(key))
    attrs = {"handler": staticmethod(handler), "max_body": max_body, "client_ca": str(client_ca)}
    protocol = type("RoamingH3", (_ServerProtocol,), attrs)
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=cfg, create_protocol=protocol), local_addr=(host, port)
    )
    assert isinstance(server, QuicServer)
    return H3Server(transport, server)

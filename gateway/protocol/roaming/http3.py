"""A small HTTP/3 client on aioquic: TLS 1.3 verifying the peer against a CA, one QUIC
connection reused for every request (a request is one bidirectional stream), reconnecting
when the connection is gone. A client certificate is presented when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from gateway.protocol.mtls import require_server_usage

MAX_RESPONSE = 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA the peer must chain to, and optionally our certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


class H3Error(ConnectionError):
    """The request could not be completed (connection refused, handshake failed, reset, timeout)."""


class ConnectFailed(H3Error):
    """No connection could be made (nothing was sent): safe to try elsewhere or later."""


class _Pending:
    def __init__(self, fut: asyncio.Future[Response]) -> None:
        self.fut = fut
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require_server_usage(self._quic)  # before connect() initialises TLS
        self.h3 = H3Connection(self._quic)
        self.pending: dict[int, _Pending] = {}
        self.closed = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.closed = True
            for p in self.pending.values():
                if not p.fut.done():
                    p.fut.set_exception(H3Error(f"connection closed: {event.reason_phrase or event.error_code}"))
            self.pending.clear()
            return
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived | DataReceived):
            return
        p = self.pending.get(event.stream_id)
        if p is None:
            return
        if isinstance(event, HeadersReceived):
            for k, v in event.headers:
                if k == b":status":
                    p.status = int(v)
                else:
                    p.headers[k.decode("ascii", "replace")] = v.decode("utf-8", "replace")
        else:
            p.body += event.data
            if len(p.body) > MAX_RESPONSE:
                del self.pending[event.stream_id]
                p.fut.set_exception(H3Error(f"response larger than {MAX_RESPONSE} bytes"))
                return
        if event.stream_ended:
            del self.pending[event.stream_id]
            if not p.fut.done():
                p.fut.set_result(Response(p.status, p.headers, bytes(p.body)))

    def send_request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> asyncio.Future[Response]:
        stream_id = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = _Pending(fut)
        self.h3.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return fut


class H3Client:
    """HTTP/3 to one peer (host, port); safe for concurrent requests from one event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsFiles,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.connect_timeout = connect_timeout
        self.server_name = server_name or host
        self._stack: contextlib.AsyncExitStack | None = None
        self._proto: _ClientProtocol | None = None
        self._lock = asyncio.Lock()

    def _configuration(self) -> QuicConfiguration:
        cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_REQUIRED)
        cfg.server_name = self.server_name
        cfg.load_verify_locations(cafile=str(self.tls.ca))
        if self.tls.cert is not None:
            cfg.load_cert_chain(str(self.tls.cert), str(self.tls.key) if self.tls.key else None)
        return cfg

    async def _connection(self) -> _ClientProtocol:
        async with self._lock:
            if self._proto is not None and not self._proto.closed:
                return self._proto
            await self._drop()
            stack = contextlib.AsyncExitStack()
            try:
                proto = await asyncio.wait_for(
                    stack.enter_async_context(
                        connect(
                            self.host, self.port, configuration=self._configuration(), create_protocol=_ClientProtocol
                        )
                    ),
                    self.connect_timeout,
                )
            except (ConnectionError, OSError, TimeoutError) as exc:
                await stack.aclose()
                raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc or type(exc).__name__}") from exc
            assert isinstance(proto, _ClientProtocol)
            self._stack, self._proto = stack, proto
            return proto

    async def _drop(self) -> None:
        stack, self._stack, self._proto = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b"", *, timeout: float | None = None
    ) -> Response:
        """One request on the shared connection; `timeout` (default: the client's) bounds the answer."""
        proto = await self._connection()
        timeout = self.timeout if timeout is None else timeout
        h = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", f"{self.server_name}:{self.port}".encode()),
            (b":path", path.encode()),
        ]
        h += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        h.append((b"content-length", str(len(body)).encode()))
        try:
            return await asyncio.wait_for(proto.send_request(h, body), timeout)
        except TimeoutError:
            raise H3Error(f"no response from {self.host}:{self.port}{path} within {timeout} s") from None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

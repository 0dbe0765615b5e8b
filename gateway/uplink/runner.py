"""The uplink's connect loop: keeps one connection to the CSMS up.

Rule: nothing owed is forgotten across connections. On every loss the rows in flight go
back to the front of their class (`Uplink.reset`), and the next connection resumes from the
outbox rows still owed; every wait (name lookup, handshake, SiteHello, closing) is bounded,
so that a peer that refuses or never answers holds neither the runner nor the shutdown.

Mechanism: connect, SiteHello, relay, PINGs every third of the idle timeout; on any failure
back off exponentially (with jitter) between `backoff_min_s` and `backoff_max_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aioquic.quic.connection import QuicConnection

from gateway.config import UpstreamConfig
from gateway.protocol.mtls import require_server_usage
from gateway.protocol.revocation import Revocations
from gateway.schema import Key
from gateway.uplink.protocol import RequestHandler, UpstreamProtocol
from gateway.uplink.relay import Uplink
from gateway.uplink.settings import quic_configuration

log = logging.getLogger("gateway.uplink")


class UplinkRunner:
    """Keeps one connection up: connect, SiteHello, relay; on loss, back off and resume
    from the outbox rows still owed (nothing in flight is forgotten).

    Every wait is bounded with `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11,
    `wait_for` returns the inner result when its awaitable completes in the same loop turn as
    a cancellation of the task, and swallows the cancellation; the runner then reconnected
    instead of ending, and the gateway's `stop()` waited for it for good."""

    def __init__(self, uplink: Uplink, up: UpstreamConfig, site_id: str,
                 on_acked: Callable[[list[int]], None], on_request: RequestHandler) -> None:  # fmt: skip
        self.uplink = uplink
        self.up = up
        self.site_id = site_id
        self.on_acked = on_acked
        self.on_request = on_request
        self.protocol: UpstreamProtocol | None = None
        self.state = "down"
        self.connects = 0
        self.last_error = ""
        self.up_since = 0.0
        self.on_up: Callable[[], None] = lambda: None
        """Called on each connection once SiteHello is answered (the site's reports start it)."""
        self.revocations: Revocations | None = None
        """M19: the handshake refuses a CSMS whose certificate this list names."""
        self.on_crl: Callable[[bytes], object] = lambda crl: None
        """M19: the revocation list of the SiteHello answer (gateway/security.py)."""

    @property
    def ready(self) -> bool:
        """Up and past SiteHello: what is sent now reaches the CSMS (or is owed again)."""
        return self.protocol is not None and self.protocol.ready

    def kick(self, now: bool = False) -> None:
        """More rows to relay: pump in the next loop turn, or at once (`now`, urgent rows)."""
        if self.protocol is not None:
            if now and self.protocol.ready:
                self.protocol.pump()
            else:
                self.protocol.kick()

    def send_relay(self, relay_id: int, prio: int, body: dict[int, Any]) -> bool:
        """A Relay outside the outbox (a board request the CSMS answers); False when not up."""
        return self.protocol is not None and self.protocol.send_relay(relay_id, prio, body)

    def send_event(self, action: int, body: dict[int, Any]) -> bool:
        """A site event outside the outbox (`UpstreamProtocol.send_event`); False when not up."""
        return self.protocol is not None and self.protocol.send_event(action, body)

    def path_state(self) -> dict[str, float]:
        """The path's figures while up (`UpstreamProtocol.path_state`), else {}."""
        p = self.protocol
        return p.path_state() if p is not None and p.ready else {}

    async def run(self) -> None:
        up = self.up
        backoff = up.backoff_min_s
        while True:
            self.state = "connecting"
            try:
                async with self._connect() as proto:
                    async with asyncio.timeout(up.connect_timeout_s):
                        reply = await proto.hello(self.site_id)
                    if Key.CRL in reply.body:
                        self.on_crl(reply.body[Key.CRL])
                    self.protocol = proto
                    self.state = "up"
                    self.connects += 1
                    self.up_since = time.time()
                    backoff = up.backoff_min_s
                    log.info("upstream up (%s:%d)", up.host, up.port)
                    self.on_up()
                    await self._keepalive(proto)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure of one connection leads to a reconnect
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (the connection ended)"
                log.warning("upstream: %s", self.last_error)
            finally:
                self.protocol = None
                self.uplink.reset()
            self.state = "down"
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, up.backoff_max_s)

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[UpstreamProtocol]:
        """aioquic's `connect`, with every wait bounded: the handshake by `connect_timeout_s`
        and the closing handshake by one second, so that neither a peer that never answers
        nor one that refuses us can hold the runner (or the gateway's shutdown)."""
        up = self.up
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(up.connect_timeout_s):
            infos = await loop.getaddrinfo(up.host, up.port, type=socket.SOCK_DGRAM)
        host, port = str(infos[0][4][0]), int(infos[0][4][1])
        addr = ("::ffff:" + host if ":" not in host else host, port, 0, 0)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0, 0, 0))
        except OSError:
            sock.close()
            raise
        quic = QuicConnection(configuration=quic_configuration(up))
        require_server_usage(quic, self.revocations)
        transport, proto = await loop.create_datagram_endpoint(
            lambda: UpstreamProtocol(
                quic, uplink=self.uplink, up=up, on_acked=self.on_acked, on_request=self.on_request
            ),
            sock=sock,
        )
        try:
            proto.connect(addr)
            async with asyncio.timeout(up.connect_timeout_s):
                try:
                    await proto.wait_connected()
                except ConnectionError:  # refused in the handshake: say why (e.g. a revoked certificate)
                    raise ConnectionError(proto.close_reason or "the handshake failed") from None
            yield proto
        finally:
            proto.close()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(1.0):
                    await proto.wait_closed()
            transport.close()

    async def _keepalive(self, proto: UpstreamProtocol) -> None:
        """PINGs keep a quiet connection alive and find a dead peer within the idle timeout."""
        period = self.up.idle_timeout_s / 3
        while not proto.closed.is_set():
            try:
                async with asyncio.timeout(period):
                    await proto.closed.wait()
            except TimeoutError:
                proto.ping_now()

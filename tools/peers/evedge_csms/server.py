"""Thin asyncio glue: aioquic server ↔ `SiteConnection` (sans I/O). No protocol logic here.

M19: the handshake refuses a site whose certificate the CA's revocation list names
(`gateway.protocol.mtls`, the list read from beside the CA certificate at each handshake);
each site's certificate is recorded when it connects (revocable by the operator), and a
connection whose certificate is revoked meanwhile is closed at the next poll."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived
from cryptography import x509

from evedge_csms import revocation
from evedge_csms.api import Csms
from evedge_csms.config import Config, provision
from evedge_csms.core import CloseConnection, Output, SendData, SiteConnection
from evedge_csms.inbound import Ctx
from evedge_csms.pki import CRL_FILE, Ca, load_or_create_signer
from evedge_csms.store import SqliteStore, Store
from gateway._core import MAX_UP_FRAME
from gateway.protocol.mtls import peer_certificate, peer_common_name, require_client_certificates
from gateway.protocol.revocation import Revocations, describe
from gateway.protocol.upstream_wire import ALPN

log = logging.getLogger("csms.server")
POLL_S = 0.1
CLOSE_DELAY_S = 0.2


class _Protocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, server: CsmsServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server
        self._conn: SiteConnection | None = None
        self.cert: x509.Certificate | None = None
        require_client_certificates(self._quic, str(server.config.ca), server.revocations)

    def quic_event_received(self, event: QuicEvent) -> None:
        now = time.time()
        if isinstance(event, HandshakeCompleted):
            cn = peer_common_name(self._quic)
            self.cert = peer_certificate(self._quic)
            if self.cert is not None:
                store = self._server.store
                with store.transaction():
                    revocation.record_tls(store, self.cert, revocation.SITE, cn, now)
            self._conn = SiteConnection(self._server.ctx, cn)
            self._server.connections.add(self)
        elif isinstance(event, StreamDataReceived) and self._conn is not None:
            self.apply(self._conn.stream_data(event.stream_id, event.data, now))
        elif isinstance(event, ConnectionTerminated):
            self._server.connections.discard(self)
            if self._conn is not None:
                self._conn.connection_lost(now)

    def _close(self, out: CloseConnection) -> None:
        self._quic.close(error_code=out.error_code, reason_phrase=out.reason)
        self.transmit()

    def refuse(self, reason: str) -> None:
        """Closes the connection at once (its certificate was revoked meanwhile)."""
        log.warning("closing a site connection: %s", reason)
        self._quic.close(error_code=0x100 + 44, reason_phrase=reason)  # TLS certificate_revoked
        self.transmit()

    def lost(self, now: float) -> None:
        if self._conn is not None:
            self._conn.connection_lost(now)

    def poll(self, now: float) -> None:
        if self._conn is not None:
            self.apply(self._conn.poll(now))

    def apply(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, SendData):
                self._quic.send_stream_data(out.stream_id, out.data)
            elif isinstance(out, CloseConnection):
                # let the error frame reach the peer before the CONNECTION_CLOSE
                asyncio.get_running_loop().call_later(CLOSE_DELAY_S, self._close, out)
        if outputs:
            self.transmit()


class CsmsServer:
    """The CSMS: store, keys, QUIC listener, and the poll loop that sends queued Commands."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        provision(config)
        self.config = config
        self.store: Store = store or SqliteStore(config.db_path)
        ca = Ca.load(config.ca, config.ca_key) if config.ca_key.exists() else None
        self.ctx = Ctx(self.store, load_or_create_signer(config.signing_key), ca, config.settings)
        self.api = Csms(self.ctx)
        self.revocations = Revocations.for_cafile(config.ca.with_name(CRL_FILE), config.ca)
        """M19: the list the handshakes check (published by `evedge_csms.revocation` beside the CA)."""
        self._crl_seen = self.revocations.number
        self.connections: set[_Protocol] = set()
        self._quic_server: QuicServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self.port = config.port

    def quic_configuration(self) -> QuicConfiguration:
        qc = QuicConfiguration(
            is_client=False, alpn_protocols=[ALPN], max_stream_data=2 * MAX_UP_FRAME, max_data=8 * MAX_UP_FRAME
        )
        qc.load_cert_chain(str(self.config.cert), str(self.config.key))
        qc.load_verify_locations(cafile=str(self.config.ca))
        qc.verify_mode = ssl.CERT_REQUIRED
        return qc

    async def start(self) -> None:
        own = x509.load_pem_x509_certificate(self.config.cert.read_bytes())
        with self.store.transaction():
            revocation.record_tls(self.store, own, revocation.CSMS, None, time.time())

        def factory(*args: Any, **kwargs: Any) -> _Protocol:
            return _Protocol(*args, server=self, **kwargs)

        self._quic_server = await serve(
            self.config.listen, self.config.port, configuration=self.quic_configuration(), create_protocol=factory
        )
        transport = getattr(self._quic_server, "_transport", None)
        if transport is not None:
            self.port = int(transport.get_extra_info("sockname")[1])
        self._poller = asyncio.ensure_future(self._poll_loop())
        log.info("CSMS listening on %s:%d (ALPN %s)", self.config.listen, self.port, ALPN)

    def _drop_revoked(self) -> None:
        """A new revocation list: the connections whose certificate it names are closed."""
        number = self.revocations.number
        if number == self._crl_seen:
            return
        self._crl_seen = number
        for proto in list(self.connections):
            why = self.revocations.revoked(proto.cert) if proto.cert is not None else None
            if why is not None and proto.cert is not None:
                proto.refuse(f"the client's certificate {describe(proto.cert)} is {why}")

    async def _poll_loop(self) -> None:
        while True:
            now = time.time()
            self._drop_revoked()
            for proto in list(self.connections):
                try:
                    proto.poll(now)
                except Exception:
                    log.exception("poll failed")
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        now = time.time()
        for proto in list(self.connections):
            proto.lost(now)
            proto.close()
        if self._quic_server is not None:
            self._quic_server.close()
        self.connections.clear()
        self.store.close()

    async def __aenter__(self) -> CsmsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

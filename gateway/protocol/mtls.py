"""Client-certificate authentication for aioquic servers (B4, B10): mutual TLS in one place.

aioquic 1.x can request a client certificate but has no public switch for it and never
verifies one on the server side. This module adds both for every server of the project
(the CSMS, the roaming endpoints, the test peers): the TLS context of each server
connection requests a certificate, refuses a client without one (certificate_required)
and verifies the chain against the configured CA with aioquic's own
`tls.verify_certificate` before the handshake completes (bad_certificate), so a refused
client never gets a stream. It relies on two private aioquic names
(`QuicConnection._initialize`, `tls.Context._request_client_certificate`), pinned by
tests/test_mtls.py.
"""

from __future__ import annotations

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection
from cryptography.x509.oid import NameOID


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class _ClientCertContext(tls.Context):
    client_cafile: str
    verified_cn: str | None

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:
            raise AlertCertificateRequired("a client certificate is required")

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate_verify(input_buf)
        if self._peer_certificate is None:  # the override above already refused this
            raise AlertCertificateRequired("a client certificate is required")
        tls.verify_certificate(
            certificate=self._peer_certificate, chain=self._peer_certificate_chain, cafile=self.client_cafile
        )
        cns = self._peer_certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.verified_cn = str(cns[0].value) if cns else None


def require_client_certificates(quic: QuicConnection, cafile: str) -> None:
    """Make this (server) connection demand a client certificate chaining to `cafile`."""
    original = quic._initialize

    def initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        ctx = quic.tls
        ctx.__class__ = _ClientCertContext
        ctx._request_client_certificate = True
        assert isinstance(ctx, _ClientCertContext)
        ctx.client_cafile = cafile
        ctx.verified_cn = None

    setattr(quic, "_initialize", initialize)  # noqa: B010 - no public hook in aioquic


def peer_common_name(quic: QuicConnection) -> str | None:
    """The CN of the verified client certificate (None before the handshake)."""
    ctx = getattr(quic, "tls", None)
    return ctx.verified_cn if isinstance(ctx, _ClientCertContext) else None

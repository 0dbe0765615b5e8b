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

aioquic checks neither side's extended key usage (its chain check is OpenSSL's without a
purpose), so a server certificate could log in as a client and the reverse. Here a client's
certificate must allow clientAuth (`require_client_certificates`) and a server's serverAuth
(`require_server_usage`, for the clients: the gateway's uplink, the roaming HTTP/3 client).
A certificate without the extension is not restricted (RFC 5280, 4.2.1.12).

Revocation (M19): aioquic's chain check takes no CRL (its `verify_certificate` builds an
OpenSSL store of the CA file only), so both sides check the peer's certificate against the
revocation list in force (`gateway.protocol.revocation.Revocations`, when one is given)
right after aioquic's own checks, still inside the handshake: a revoked peer is refused with
the `certificate_revoked` alert naming the certificate and the reason, before any stream.
"""

from __future__ import annotations

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol.revocation import Revocations, describe


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class AlertCertificateRevoked(tls.Alert):
    description = tls.AlertDescription.certificate_revoked


def check_revocation(cert: x509.Certificate, revocations: Revocations | None, role: str) -> None:
    """Refuse (certificate_revoked) a `role` certificate the revocation list names."""
    why = revocations.revoked(cert) if revocations is not None else None
    if why is not None:
        raise AlertCertificateRevoked(f"the {role}'s certificate {describe(cert)} is {why}")


def check_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier, role: str) -> None:
    """Refuse (bad_certificate) a `role` certificate whose extended key usage excludes `usage`."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise tls.AlertBadCertificate(
            f"the {role}'s certificate is not for TLS {role} authentication (extended key usage)"
        )


class _ClientCertContext(tls.Context):
    client_cafile: str
    revocations: Revocations | None
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
        check_usage(self._peer_certificate, ExtendedKeyUsageOID.CLIENT_AUTH, "client")
        check_revocation(self._peer_certificate, self.revocations, "client")
        cns = self._peer_certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.verified_cn = str(cns[0].value) if cns else None


def require_client_certificates(quic: QuicConnection, cafile: str, revocations: Revocations | None = None) -> None:
    """Make this (server) connection demand a client certificate chaining to `cafile`, for
    TLS clients, and not revoked (`revocations`, when given)."""
    original = quic._initialize

    def initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        ctx = quic.tls
        ctx.__class__ = _ClientCertContext
        ctx._request_client_certificate = True
        assert isinstance(ctx, _ClientCertContext)
        ctx.client_cafile = cafile
        ctx.revocations = revocations
        ctx.verified_cn = None

    setattr(quic, "_initialize", initialize)  # noqa: B010 - no public hook in aioquic


class _ServerUsageContext(tls.Context):
    revocations: Revocations | None

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._client_handle_certificate_verify(input_buf)  # signature, chain, name
        if self._peer_certificate is not None:
            check_usage(self._peer_certificate, ExtendedKeyUsageOID.SERVER_AUTH, "server")
            check_revocation(self._peer_certificate, self.revocations, "server")


def require_server_usage(quic: QuicConnection, revocations: Revocations | None = None) -> None:
    """Make this (client) connection refuse a server certificate not meant for TLS servers
    or revoked (`revocations`, when given)."""
    original = quic._initialize

    def initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        ctx = quic.tls
        ctx.__class__ = _ServerUsageContext
        assert isinstance(ctx, _ServerUsageContext)
        ctx.revocations = revocations

    setattr(quic, "_initialize", initialize)  # noqa: B010 - no public hook in aioquic


def peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    """The peer's certificate once the handshake checked it (None before, or without one)."""
    ctx = getattr(quic, "tls", None)
    return getattr(ctx, "_peer_certificate", None) if ctx is not None else None


def peer_common_name(quic: QuicConnection) -> str | None:
    """The CN of the verified client certificate (None before the handshake)."""
    ctx = getattr(quic, "tls", None)
    return ctx.verified_cn if isinstance(ctx, _ClientCertContext) else None

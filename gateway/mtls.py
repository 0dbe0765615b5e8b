"""Mutual TLS on aioquic servers: ask for the client's certificate and check its chain.

aioquic 1.7 servers neither request a client certificate nor verify one: the TLS context
has a request flag (`_request_client_certificate`) that its own tests use, and it checks
the client's CertificateVerify signature (proof that the client holds the key), but it
never validates the chain. This module is the one place that closes that gap:

1. `request_client_certificate(quic)` sets the flag on the connection's TLS context as
   soon as aioquic creates it (the context is made when the first datagram arrives);
2. `check_client(quic, verifier)` runs on `HandshakeCompleted` and validates the
   presented chain against the configured CA with `cryptography`'s X.509 verifier
   (client-auth policy: chain, validity period, extended key usage).

A server must not act on any stream data of a connection before `check_client` passed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.x509.verification import ClientVerifier, PolicyBuilder, Store, VerificationError


class ClientRejected(Exception):
    """The client presented no certificate, or one that does not chain to the CA."""


def client_verifier(ca_file: Path) -> ClientVerifier:
    """A verifier of client certificates issued by the CA(s) in `ca_file` (PEM)."""
    cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
    return PolicyBuilder().store(Store(cas)).build_client_verifier()


def request_client_certificate(quic: QuicConnection) -> None:
    """Make the server side of `quic` send a CertificateRequest in its handshake."""
    create: Callable[[bytes], None] = quic._initialize

    def initialize(peer_cid: bytes) -> None:
        create(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize  # type: ignore[method-assign]


def check_client(quic: QuicConnection, verifier: ClientVerifier) -> x509.Certificate:
    """The client's verified leaf certificate; raises ClientRejected naming the cause."""
    leaf: x509.Certificate | None = quic.tls._peer_certificate
    if leaf is None:
        raise ClientRejected("client presented no certificate (mutual TLS is required)")
    chain: list[x509.Certificate] = list(quic.tls._peer_certificate_chain)
    try:
        verifier.verify(leaf, chain)
    except VerificationError as e:
        raise ClientRejected(f"client certificate {leaf.subject.rfc4514_string()} refused: {e}") from e
    return leaf


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN (the site id of a gateway, the party id of an endpoint)."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        raise ClientRejected("client certificate has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()

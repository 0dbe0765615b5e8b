"""Mutual TLS over real QUIC on 127.0.0.1: the server asks for and checks the client's
certificate; both sides refuse a peer the CA's revocation list names (M19)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evedge_csms.pki import Ca, Revoked
from gateway.protocol.devpki import ensure_ca, issue
from gateway.protocol.mtls import peer_common_name, require_client_certificates, require_server_usage
from gateway.protocol.revocation import RevocationError, Revocations

ALPN = ["mtls-test"]


class Server(QuicConnectionProtocol):
    verdicts: list[str]
    cafile: str
    revocations: Revocations | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        require_client_certificates(self._quic, self.cafile, self.revocations)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.verdicts.append(f"accepted: {peer_common_name(self._quic)}")


class Client(QuicConnectionProtocol):
    """A client that checks the server's extended key usage, as the project's clients do."""

    revocations: Revocations | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        require_server_usage(self._quic, self.revocations)


async def _attempt(
    tmp: Path, client_cert: tuple[Path, Path] | None, server_for_clients_only: bool = False
) -> tuple[list[str], str]:
    """Connect with `client_cert`; returns what the server saw and how the client fared."""
    ca = ensure_ca(tmp / "pki", org="site operator")
    srv = issue(tmp / "pki", "csms", ca=ca, server=not server_for_clients_only)
    verdicts: list[str] = []
    Server.verdicts, Server.cafile = verdicts, str(ca[0])
    cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    cfg.load_cert_chain(srv.cert, srv.key)
    server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=Server)
    transport = server._transport
    assert transport is not None
    port = transport.get_extra_info("sockname")[1]
    ccfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name="csms", idle_timeout=2.0)
    ccfg.load_verify_locations(str(ca[0]))
    if client_cert is not None:
        ccfg.load_cert_chain(client_cert[0], client_cert[1])
    try:
        async with connect("127.0.0.1", port, configuration=ccfg, create_protocol=Client) as client:
            await asyncio.wait_for(client.ping(), 2.0)
            outcome = "connected"
    except (ConnectionError, TimeoutError) as e:
        outcome = f"refused: {type(e).__name__}"
    finally:
        server.close()
        Server.revocations = Client.revocations = None
    return verdicts, outcome


def test_client_from_the_site_ca_is_accepted(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    verdicts, outcome = asyncio.run(_attempt(tmp_path, (gw.cert, gw.key)))
    assert verdicts == ["accepted: DE*ABC*L1"]
    assert outcome == "connected"


def test_client_from_another_ca_is_refused_during_the_handshake(tmp_path: Path) -> None:
    rogue_ca = ensure_ca(tmp_path / "rogue", org="someone else")
    rogue = issue(tmp_path / "rogue", "DE*ABC*L1", ca=rogue_ca)
    verdicts, outcome = asyncio.run(_attempt(tmp_path, (rogue.cert, rogue.key)))
    assert verdicts == []
    assert outcome.startswith("refused")


def test_client_without_certificate_is_refused_during_the_handshake(tmp_path: Path) -> None:
    verdicts, outcome = asyncio.run(_attempt(tmp_path, None))
    assert verdicts == []
    assert outcome.startswith("refused")


def test_a_certificate_for_servers_only_is_refused_as_a_client(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    server_only = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca, client=False)  # extended key usage: serverAuth
    verdicts, outcome = asyncio.run(_attempt(tmp_path, (server_only.cert, server_only.key)))
    assert verdicts == []
    assert outcome.startswith("refused")


def test_a_server_whose_certificate_is_for_clients_only_is_refused_by_the_client(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    _, outcome = asyncio.run(_attempt(tmp_path, (gw.cert, gw.key), server_for_clients_only=True))
    assert outcome.startswith("refused")


def _revoke(tmp: Path, certs: list[Path], number: int = 1) -> Revocations:
    """The site CA's CRL naming `certs`, in force for a verifier trusting that CA."""
    ca_paths = ensure_ca(tmp / "pki", org="site operator")
    ca = Ca.load(*ca_paths)
    serials = [x509.load_pem_x509_certificate(c.read_bytes()).serial_number for c in certs]
    ca.publish([Revoked(s, 0, x509.ReasonFlags.key_compromise) for s in serials], number, 1e9)
    assert ca.crl_path is not None
    return Revocations.for_cafile(ca.crl_path, ca_paths[0])


def test_m19_a_revoked_client_is_refused_during_the_handshake(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    Server.revocations = _revoke(tmp_path, [gw.cert])
    verdicts, outcome = asyncio.run(_attempt(tmp_path, (gw.cert, gw.key)))
    assert verdicts == [] and outcome.startswith("refused")


def test_m19_a_revoked_server_is_refused_by_the_client(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    srv = issue(tmp_path / "pki", "csms", ca=ca)
    Client.revocations = _revoke(tmp_path, [srv.cert])
    _, outcome = asyncio.run(_attempt(tmp_path, (gw.cert, gw.key)))
    assert outcome.startswith("refused")


def test_m19_a_revocation_list_counts_only_signed_by_the_ca_and_never_goes_back(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    cert = x509.load_pem_x509_certificate(gw.cert.read_bytes())
    newer = _revoke(tmp_path, [gw.cert], number=2)
    assert newer.revoked(cert) == "revoked (keyCompromise)"
    held = Revocations.for_cafile(tmp_path / "site" / "crl.pem", ca[0])
    assert held.revoked(cert) is None
    assert held.offer(newer.path.read_bytes()) and held.revoked(cert) is not None
    older = _revoke(tmp_path, [], number=1)  # an older list that lifts the revocation
    assert not held.offer(older.path.read_bytes()) and held.revoked(cert) is not None
    rogue = ensure_ca(tmp_path / "rogue", org="site operator")  # same name, another key
    rogue_crl = Ca.load(*rogue).crl([], 3, 1e9)
    with pytest.raises(RevocationError, match="not signed by a trusted CA"):
        held.offer(rogue_crl.public_bytes(serialization.Encoding.DER))
    assert held.revoked(cert) is not None

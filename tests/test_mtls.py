"""Mutual TLS over real QUIC on 127.0.0.1: the server asks for and checks the client's certificate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent

from gateway.protocol.devpki import ensure_ca, issue
from gateway.protocol.mtls import peer_common_name, require_client_certificates, require_server_usage

ALPN = ["mtls-test"]


class Server(QuicConnectionProtocol):
    verdicts: list[str]
    cafile: str

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        require_client_certificates(self._quic, self.cafile)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.verdicts.append(f"accepted: {peer_common_name(self._quic)}")


class Client(QuicConnectionProtocol):
    """A client that checks the server's extended key usage, as the project's clients do."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        require_server_usage(self._quic)


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

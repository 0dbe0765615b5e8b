"""Mutual TLS over real QUIC on 127.0.0.1: the server asks for and checks the client's certificate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent
from cryptography import x509

from gateway.devpki import ensure_ca, issue
from gateway.mtls import ClientRejected, check_client, client_verifier, common_name, request_client_certificate

ALPN = ["mtls-test"]


class Server(QuicConnectionProtocol):
    verdicts: list[str]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        request_client_certificate(self._quic)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            try:
                leaf = check_client(self._quic, VERIFIER[0])
            except ClientRejected as e:
                self.verdicts.append(f"refused: {e}")
                self._quic.close(error_code=0x0100, reason_phrase=str(e)[:100])
                self.transmit()
                return
            self.verdicts.append(f"accepted: {common_name(leaf)}")


VERIFIER: list[x509.verification.ClientVerifier] = []


async def _attempt(tmp: Path, client_cert: tuple[Path, Path] | None) -> tuple[list[str], bool]:
    ca = ensure_ca(tmp / "pki", org="site operator")
    srv = issue(tmp / "pki", "csms", ca=ca)
    VERIFIER[:] = [client_verifier(ca[0])]
    verdicts: list[str] = []
    Server.verdicts = verdicts
    cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    cfg.load_cert_chain(srv.cert, srv.key)
    server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=Server)
    transport = server._transport
    assert transport is not None
    port = transport.get_extra_info("sockname")[1]
    ccfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name="csms")
    ccfg.load_verify_locations(str(ca[0]))
    if client_cert is not None:
        ccfg.load_cert_chain(client_cert[0], client_cert[1])
    terminated = False
    try:
        async with connect("127.0.0.1", port, configuration=ccfg) as client:
            await client.ping()
            for _ in range(50):
                if verdicts:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            terminated = client._closed.is_set()
    except ConnectionError:
        terminated = True
    finally:
        server.close()
    return verdicts, terminated


def test_client_from_the_site_ca_is_accepted(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki", org="site operator")
    gw = issue(tmp_path / "pki", "DE*ABC*L1", ca=ca)
    verdicts, terminated = asyncio.run(_attempt(tmp_path, (gw.cert, gw.key)))
    assert verdicts == ["accepted: DE*ABC*L1"]
    assert not terminated


def test_client_from_another_ca_is_refused(tmp_path: Path) -> None:
    rogue_ca = ensure_ca(tmp_path / "rogue", org="someone else")
    rogue = issue(tmp_path / "rogue", "DE*ABC*L1", ca=rogue_ca)
    verdicts, terminated = asyncio.run(_attempt(tmp_path, (rogue.cert, rogue.key)))
    assert len(verdicts) == 1 and verdicts[0].startswith("refused: client certificate")
    assert terminated


def test_client_without_certificate_is_refused(tmp_path: Path) -> None:
    verdicts, terminated = asyncio.run(_attempt(tmp_path, None))
    assert verdicts == ["refused: client presented no certificate (mutual TLS is required)"]
    assert terminated

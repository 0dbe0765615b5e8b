"""OCPP 2.0.1 northbound (issue #17), security profiles 2 and 3 (OCPP 2.0.1 A00, A01) and a CSMS
that stops answering one station, on the real site against the `ocpp` library's CSMS served over
TLS (websockets with an ssl context):

- profile 2: basic auth over TLS, the CSMS verified against the CA the gateway is given; a CSMS
  whose certificate another CA signed is never spoken to (no BootNotification reaches it);
- profile 3: mutual TLS with the site's certificate (issued by the site CA, gateway/protocol/
  devpki.py), no password sent; a client without a certificate is refused by the CSMS;
- a CSMS that never answers one station's CALLs does not stall the other boards: another
  board's whole session goes through meanwhile (issue #17, 4)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import websockets
from ocpp_csms import OcppCsms
from ocpp_site import ocpp_scenario
from realsite import Invariants

from gateway.protocol import devpki
from tools.site.harness import SITE_ID, Site, board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)
DEV = "ev-0000"


def site_ca(tmp: Path) -> tuple[Path, Path]:
    """The site CA, made before the site starts: the native CSMS takes it as its own (it makes one
    only where none is) and issues the site's certificate from it (tools/site/harness.py)."""
    devpki.private_dir(tmp / "csms")
    return devpki.ensure_ca(tmp / "csms" / "pki", "ca")


def server_context(tmp: Path, ca: tuple[Path, Path], clients: Path | None) -> ssl.SSLContext:
    """The OCPP CSMS's TLS: a server certificate from `ca`; `clients`: the CA its clients'
    certificates must chain to (profile 3), None: no client certificate asked (profile 2)."""
    issued = devpki.issue(devpki.private_dir(tmp / "ocpp-pki"), "ocpp-csms", ca=ca, client=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert, issued.key)
    if clients is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(clients)
    return ctx


def peer_cn(conn: Any) -> str | None:
    """The common name of the client certificate on a websockets server connection."""
    ssl_object = conn.transport.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return None


async def a_session(b: Any, csms: OcppCsms, token: str) -> str:
    """A driver's whole session at board `b`; the transaction id (the CSMS saw it end)."""
    m = b.mark()
    b.cmd("card", token=token)
    assert (await board_wait(b, "auth", since=m))["status"] == 0
    b.cmd("plug")
    tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
    await board_status(b, lambda st: st["power_w"] > 0)
    await board_step(b, 60_000)
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)
    return tx


def ended(csms: OcppCsms, station: str, tx: str) -> bool:
    return any(e["eventType"] == "Ended" and e["transactionInfo"]["transactionId"] == tx
               for e in csms.of(station, "TransactionEvent"))  # fmt: skip


def test_ocpp_security_profile_2_basic_auth_over_tls_with_the_csms_verified(tmp_path: Path) -> None:
    ca = site_ca(tmp_path)
    csms = OcppCsms(ssl=server_context(tmp_path, ca, None))

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        assert csms.url.startswith("wss://")
        assert (await board_wait(b, "registration"))["status"] == 0  # accepted by the CSMS over TLS
        assert csms.auth_seen and all(pw.endswith(":ocpp-test-password-0123") for _, pw in csms.auth_seen)
        csms.tokens["TLS-2"] = "Accepted"
        tx = await a_session(b, csms, "TLS-2")
        await until(lambda: ended(csms, DEV, tx), 10, "the session at the CSMS")

    ocpp_scenario(tmp_path, fn, csms=csms, ocpp={"security_profile": 2, "ca": str(ca[0])})


def test_ocpp_security_profile_2_a_csms_the_ca_does_not_vouch_for_is_never_spoken_to(tmp_path: Path) -> None:
    ca = site_ca(tmp_path)
    other = devpki.ensure_ca(tmp_path / "rogue-pki", "rogue")  # the CSMS's certificate is signed by another CA
    csms = OcppCsms(ssl=server_context(tmp_path, other, None))

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        # the board still registers: the gateway answers for the CSMS it cannot reach (Pending)
        assert (await board_wait(b, "registration"))["status"] != 0
        assert not csms.calls and not csms.auth_seen  # no password was ever sent to it
        assert site.gw is not None and site.gw.ocpp is not None
        assert site.gw.ocpp.stations[DEV].state != "accepted"

    ocpp_scenario(tmp_path, fn, csms=csms, ocpp={"security_profile": 2, "ca": str(ca[0])})


def test_ocpp_security_profile_3_mutual_tls_with_the_site_certificate(tmp_path: Path) -> None:
    ca = site_ca(tmp_path)
    csms = OcppCsms(ssl=server_context(tmp_path, ca, clients=ca[0]))
    cns: list[str | None] = []

    def client_cn(conn: Any) -> bool:
        cns.append(peer_cn(conn))
        return cns[-1] is not None

    csms.client_cn = client_cn

    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        assert (await board_wait(b, "registration"))["status"] == 0
        assert cns and set(cns) == {SITE_ID}  # the site's certificate, for every station
        assert all(pw == "" for _, pw in csms.auth_seen)  # no password on the wire in profile 3
        csms.tokens["TLS-3"] = "Accepted"
        tx = await a_session(b, csms, "TLS-3")
        await until(lambda: ended(csms, DEV, tx), 10, "the session at the CSMS")
        # a client without a certificate does not get through the handshake
        anonymous = ssl.create_default_context(cafile=str(ca[0]))
        with pytest.raises((ssl.SSLError, websockets.InvalidStatus, ConnectionError, websockets.InvalidMessage)):
            ws = await websockets.connect(f"{csms.url}/ev-9999", ssl=anonymous,
                                          subprotocols=[websockets.Subprotocol("ocpp2.0.1")])  # fmt: skip
            await ws.recv()

    ocpp_scenario(tmp_path, fn, csms=csms, ocpp={"security_profile": 3, "ca": str(ca[0])})


def test_ocpp_a_csms_that_stops_answering_one_station_does_not_stall_another_board(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b0, b1 = site.boards
        csms.tokens["MUTE-0"] = csms.tokens["LIVE-1"] = "Accepted"
        csms.mute.add("ev-0000")  # from now on ev-0000's CALLs are never answered
        n = len(csms.calls)
        b0.cmd("card", token="MUTE-0")  # its Authorize goes unanswered: the site decides in time
        await board_wait(b0, "auth")
        await until(lambda: any(c.station == "ev-0000" for c in csms.calls[n:]), 10, "ev-0000 calls the mute CSMS")
        tx = await a_session(b1, csms, "LIVE-1")  # meanwhile, the other board's whole session
        await until(lambda: ended(csms, "ev-0001", tx), 10, "ev-0001's session at the CSMS, ev-0000 still unanswered")
        assert "ev-0000" in csms.mute

    ocpp_scenario(tmp_path, fn, boards=2)

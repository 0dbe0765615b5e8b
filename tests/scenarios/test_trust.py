"""The certificates a board holds decide which gateway it talks to (M14, M17, M12; issue #15),
on the real site: the operator gives the boards the gateway's local-CSMS certificate from the
CSMS (M17); from then on a board accepts a Hello answer only when it is signed by that
certificate's Ed25519 key. A rogue gateway holding a copy of the device table (so the
per-device HMAC keys) but not that key is refused by name and counted; the real one is
accepted again. Migrate (M12) hands the new gateway's certificate over: the migrated board
trusts only that gateway at its new address, and a migration to an unknown gateway (no
anchor) is refused by name, at the CSMS and at the board. OCSP responses (M15) reach the EV
side of the board when the EV asks, and no longer once past their nextUpdate."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from realsite import Invariants, Site, scenario

from evedge_csms import commands as cmds
from evedge_csms.errors import CsmsError
from gateway import config as gwconfig
from gateway.protocol import devpki
from gateway.schema import CertType, ErrorCode, Registration, Status
from gateway.service import Gateway
from tools.site.harness import SITE_ID, board_status, board_wait, rebind, until

pytestmark = pytest.mark.timeout(120)

REFUSED = "hello answer not signed by the local CSMS anchor"


def bad_signatures(status: dict[str, Any]) -> int:
    """The Hello answers the board refused for their signature (its link's error counts)."""
    errors = status["errors"]
    code = int(ErrorCode.BAD_SIGNATURE)
    return int(errors.get(code, errors.get(str(code), 0)))


async def rogue_gateway(site: Site) -> Gateway:
    """A second gateway on the real one's LAN port, with a copy of its data (device table,
    keys) but its own local-CSMS certificate: what a stolen backup of the gateway can do."""
    real = site.root / "gw"
    rogue = site.root / "rogue"
    shutil.copytree(real, rogue)
    for f in (rogue / "pki").glob("localcsms.*"):
        f.unlink()
    doc = site.gateway_doc()
    doc["site"]["data_dir"] = str(rogue)
    doc["upstream"]["address"] = "127.0.0.1:9"  # it reaches no CSMS: the boards are its target
    gw = Gateway(gwconfig.prepare(gwconfig.parse(doc)))
    await rebind(gw.start, "rogue LAN")
    return gw


def test_m17_a_board_refuses_a_gateway_not_holding_the_anchored_key(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        b = site.boards[0]
        own = site.gw.local_csms_cert
        assert site.gw.hello_signer is not None  # the gateway's local-CSMS key is Ed25519
        # M17 from the CSMS operator: the board trusts the gateway's certificate as its local CSMS
        row = await site.command_done(site.csms.api.send(SITE_ID, cmds.install_certificate((), CertType.LOCAL_CSMS,
                                                                                          b"")))  # fmt: skip
        assert row["state"] == "done" and row["results"][0]["status"] == Status.ACCEPTED, row
        h = hashlib.sha256(own).digest()
        await board_wait(b, "cert_installed", lambda e: e["hash"] in (h, h.hex()))
        # the real gateway stops; a rogue one with a copy of its device table takes its port
        m = b.mark()
        await site.gw.stop()
        rogue = await rogue_gateway(site)
        try:
            closed = await board_wait(b, "link_closed", lambda e: e["reason"] == REFUSED, since=m)
            assert closed["reason"] == REFUSED
            st = await board_status(b, lambda s: bad_signatures(s) >= 1)
            assert not st["online"]
            # the rogue answered a Hello, but the board hung up on it
            await until(lambda: not rogue.online, what="the board gone from the rogue gateway")
        finally:
            await rogue.stop()
        # the real gateway back on its port: the board signs on again
        m = b.mark()
        gw = await site.start_gateway()
        await board_wait(b, "online", since=m)
        await until(lambda: "ev-0000" in gw.online, what="ev-0000 online at the real gateway")

    scenario(tmp_path, fn, boards=1)


def new_site(site: Site, data: str, port: int = 0) -> Gateway:
    """A gateway of another site of the same CSMS (its own data, certificates and local-CSMS
    key; the boards' factory seed, as any gateway of the manufacturer's boards has)."""
    assert site.csms is not None
    cfg = site.csms.config
    pki = site.root / "gw2-pki"
    pki.mkdir(parents=True, exist_ok=True)
    issued = devpki.issue(pki, SITE2, ca=(cfg.ca, cfg.ca_key), server=False)
    doc = site.gateway_doc()
    doc["site"] = {"id": SITE2, "data_dir": str(site.root / data)}
    doc["lan"] = {"listen": f"127.0.0.1:{port}"}
    doc["upstream"] = {**doc["upstream"], "cert": str(issued.cert), "key": str(issued.key)}
    doc["power"] = {"site_limit_w": 100000}
    return Gateway(gwconfig.prepare(gwconfig.parse(doc)))


SITE2 = "DE*EVE*LSITE2"


def test_m12_a_migration_to_an_unknown_gateway_is_refused_by_name(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        api = site.csms.api
        with pytest.raises(CsmsError, match="unknown gateway"):
            api.migrate(SITE_ID, ["ev-0000"], "127.0.0.1:7799")
        # the command itself, without the anchor: the board refuses it too and stays
        row = await site.command_done(api.send(SITE_ID, cmds.migrate(["ev-0000"], "127.0.0.1:7799")))
        res = row["results"][0]
        assert res["status"] == Status.REJECTED and "unknown gateway" in res["reason"], row
        # an anchor that is no Ed25519 key (the site CA's own certificate) is no anchor either
        ca = Path(site.csms.config.ca).read_bytes()
        der = x509.load_pem_x509_certificate(ca).public_bytes(serialization.Encoding.DER)
        row = await site.command_done(api.send(SITE_ID, cmds.migrate(["ev-0000"], "127.0.0.1:7799", der)))
        assert row["results"][0]["status"] == Status.REJECTED, row
        st = await board_status(site.boards[0], lambda s: s["online"])
        assert st["registered"] and "ev-0000" in site.gw.online

    scenario(tmp_path, fn, boards=1)


def test_m12_a_migrated_board_trusts_only_the_new_gateway(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[0]
        gw2 = new_site(site, "gw2")
        await gw2.start()
        port, anchor = gw2.lan_port, gw2.local_csms_cert
        await gw2.stop()  # the new site's gateway is not up yet when the board moves
        m = b.mark()
        row = await site.command_done(api.migrate(SITE_ID, ["ev-0000"], f"127.0.0.1:{port}", anchor))
        assert row["results"][0]["status"] == Status.ACCEPTED, row
        # at the new address first: a gateway holding the factory seed but not the new site's key
        rogue = new_site(site, "rogue", port)
        await rebind(rogue.start, "rogue LAN")
        try:
            await board_wait(b, "link_closed", lambda e: e["reason"] == REFUSED, since=m)
            assert bad_signatures(await board_status(b)) >= 1
            await until(lambda: not rogue.online, what="the board gone from the rogue gateway")
        finally:
            await rogue.stop()
        # the real new gateway: the board onboards and is accepted there
        m = b.mark()
        gw2 = new_site(site, "gw2", port)
        await rebind(gw2.start, "second gateway")
        try:
            await board_wait(b, "registration", lambda e: e["status"] == int(Registration.ACCEPTED), since=m)
            assert "ev-0000" in gw2.online
        finally:
            await gw2.stop()

    scenario(tmp_path, fn, boards=1)


def ocsp_for(folder: Path, name: str, next_update: dt.datetime) -> tuple[bytes, bytes]:
    """A CA certificate (DER) and a signed OCSP response (DER) saying it is good until
    `next_update`, as the CA's responder sends it."""
    pem, key_path = devpki.ensure_ca(folder, name)
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    single = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=cert, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=min(now, next_update) - dt.timedelta(hours=1), next_update=next_update,
        revocation_time=None, revocation_reason=None,
    )  # fmt: skip
    resp = single.responder_id(ocsp.OCSPResponderEncoding.HASH, cert).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER), resp.public_bytes(serialization.Encoding.DER)


def test_m15_the_ev_gets_the_ocsp_response_until_its_next_update(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root, fresh = ocsp_for(tmp_path / "pki", "v2g-root", now + dt.timedelta(hours=1))
    _, stale = ocsp_for(tmp_path / "pki", "v2g-root", now - dt.timedelta(minutes=5))
    h = hashlib.sha256(root).digest()

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[0]
        (res,) = (await site.command_done(api.install_root(SITE_ID, ["ev-0000"], root, CertType.V2G_ROOT)))["results"]
        assert res["status"] == Status.ACCEPTED, res
        # a response already past its nextUpdate is refused by name
        (res,) = (await site.command_done(api.send(SITE_ID, cmds.ocsp_response(["ev-0000"], h, stale))))["results"]
        assert res["status"] == Status.REJECTED and "expired" in res["reason"], res
        (res,) = (await site.command_done(api.send(SITE_ID, cmds.ocsp_response(["ev-0000"], h, fresh))))["results"]
        assert res["status"] == Status.ACCEPTED, res
        # the EV asks for it (ISO 15118 stapling): it gets the CA's response, byte for byte
        b.cmd("ev_ocsp", hash=h.hex())
        assert (await board_status(b, lambda s: s["ev_ocsp"]))["ev_ocsp"] == fresh.hex()
        # two hours later on the board's clock, the response is past its nextUpdate
        m = b.mark()
        b.cmd("step", ms=2 * 3600 * 1000)
        b.cmd("ev_ocsp", hash=h.hex())
        await board_wait(b, "ocsp_expired", since=m)
        assert (await board_status(b))["ev_ocsp"] is None  # dropped: the EV is given none
        b.cmd("ev_ocsp", hash=h.hex())  # and it is gone from the board's flash too
        assert (await board_status(b))["ev_ocsp"] is None

    scenario(tmp_path, fn, boards=1)

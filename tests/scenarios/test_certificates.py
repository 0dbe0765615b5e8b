"""Certificates on the real site, driven from the CSMS operator's API (M14 CA certificates,
M15 OCSP responses, M16 the board's CSR signed by the CSMS, M17 the local CSMS's certificate,
M18 a key pair made outside, M19 revocation), checked on what the boards hold
(GetInstalledCertificates through the CSMS, the board's secure element) and what the CSMS
records. The certificates' real semantics (chains, validity, handing trust over) are issue
#15; these prove the chain as it works now."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from realsite import Invariants, Site, scenario

from evedge_csms import commands as cmds
from gateway.protocol import devpki
from gateway.schema import Action, CertType, Key, Status
from tools.site.harness import SITE_ID, board_status, board_wait

pytestmark = pytest.mark.timeout(120)


def ca_der(folder: Path, name: str) -> bytes:
    """A CA certificate (DER) as an operator's PKI would hand it over."""
    pem, _key = devpki.ensure_ca(folder, name)
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)


async def done(site: Site, cmd: int) -> list[dict[str, Any]]:
    row = await site.command_done(cmd)
    assert row["state"] == "done", row
    return list(row["results"])


async def installed(site: Site, device: str, cert_type: int | None = None) -> list[bytes]:
    """The hashes the board reports holding (GetInstalledCertificates through the CSMS)."""
    assert site.csms is not None
    (res,) = await done(site, site.csms.api.send(SITE_ID, cmds.get_installed_certificates([device], cert_type)))
    assert res["status"] == Status.ACCEPTED, res
    return [bytes(h) for h in res["response"][str(int(Key.CERT_HASHES))]]


def test_m14_the_operator_installs_and_deletes_a_ca_certificate(tmp_path: Path) -> None:
    root = ca_der(tmp_path / "pki", "operator-root")
    h = hashlib.sha256(root).digest()

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        res = await done(site, api.install_root(SITE_ID, ["ev-0000", "ev-0001"], root, CertType.CSMS_ROOT))
        assert [r["status"] for r in res] == [Status.ACCEPTED] * 2, res
        assert site.csms.store.get("certificates", cert_hash=h.hex()) is not None  # the CSMS's record
        for d in ("ev-0000", "ev-0001"):
            assert h in await installed(site, d, CertType.CSMS_ROOT)
        # a certificate that is not DER is refused by the board, by name
        (bad,) = await done(site, api.send(SITE_ID, cmds.install_certificate(["ev-0000"], CertType.CSMS_ROOT,
                                                                             b"not a certificate")))  # fmt: skip
        assert bad["status"] == Status.REJECTED and "DER" in bad["reason"], bad
        (rm,) = await done(site, api.send(SITE_ID, cmds.delete_certificate(["ev-0000"], h)))
        assert rm["status"] == Status.ACCEPTED, rm
        assert h not in await installed(site, "ev-0000")
        assert h in await installed(site, "ev-0001")  # only where it was deleted
        (again,) = await done(site, api.send(SITE_ID, cmds.delete_certificate(["ev-0000"], h)))
        assert again["status"] != Status.ACCEPTED  # nothing left to delete

    scenario(tmp_path, fn)


def test_m15_the_csms_supplies_an_ocsp_response_for_an_installed_certificate(tmp_path: Path) -> None:
    v2g = ca_der(tmp_path / "pki", "v2g-root")
    h = hashlib.sha256(v2g).digest()

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[0]
        ocsp = b"\x30\x03\x0a\x01\x00"  # an OCSPResponse (status successful), as the responder sends it
        (early,) = await done(site, api.send(SITE_ID, cmds.ocsp_response(["ev-0000"], h, ocsp)))
        assert early["status"] == Status.REJECTED, early  # no such certificate on the board yet
        await done(site, api.install_root(SITE_ID, ["ev-0000"], v2g, CertType.V2G_ROOT))
        m = b.mark()
        (res,) = await done(site, api.send(SITE_ID, cmds.ocsp_response(["ev-0000"], h, ocsp)))
        assert res["status"] == Status.ACCEPTED, res
        stored = await board_wait(b, "ocsp_stored", since=m)
        assert bytes.fromhex(stored["hash"]) == h if isinstance(stored["hash"], str) else stored["hash"]

    scenario(tmp_path, fn, boards=1)


def test_m16_the_boards_csr_is_signed_by_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        b = site.boards[0]
        m = b.mark()
        (res,) = await done(site, api.send(SITE_ID, cmds.trigger_message(["ev-0000"], Action.SIGN_CERTIFICATE)))
        assert res["status"] == Status.ACCEPTED, res  # the board's secure element made a key pair and a CSR
        sent = await board_wait(b, "csr_sent", since=m)
        assert sent["ok"], "the CSMS refused the board's CSR"
        await board_wait(b, "cs_cert_installed", since=m)
        rows = site.csms.store.select("certificates", {"device_id": "ev-0000"})
        assert rows and rows[0]["cert_type"] == CertType.CHARGING_STATION
        # the certificate the board installed is for the secure element's own key pair
        se_key = serialization.load_pem_private_key((b.dir / "se-key.pem").read_bytes(), None)
        issued = [x509.load_der_x509_certificate(bytes(r["der"])) for r in rows if r["der"]]
        assert any(c.public_key() == se_key.public_key() for c in issued), rows

    scenario(tmp_path, fn, boards=1)


def test_m17_the_site_tells_its_boards_to_trust_the_local_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None and site.gw is not None
        own = site.gw.local_csms_cert
        assert own  # the gateway's certificate as local CSMS (made at its first start)
        cmd = site.csms.api.send(SITE_ID, cmds.install_certificate((), CertType.LOCAL_CSMS, b""))
        res = await done(site, cmd)
        assert res[0]["status"] == Status.ACCEPTED, res  # the site's own result, then one per board
        h = hashlib.sha256(own).digest()
        for d in ("ev-0000", "ev-0001"):
            assert await installed(site, d, CertType.LOCAL_CSMS) == [h]
        # a certificate that is not the gateway's is refused by the site, by name
        other = ca_der(tmp_path / "pki", "other")
        (bad, *_) = await done(site, site.csms.api.send(SITE_ID, cmds.install_certificate((), CertType.LOCAL_CSMS,
                                                                                         other)))  # fmt: skip
        assert bad["status"] == Status.REJECTED and "not this gateway" in bad["reason"], bad

    scenario(tmp_path, fn)


def test_m18_a_key_pair_made_outside_reaches_the_boards_secure_element(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        b = site.boards[0]
        m = b.mark()
        (res,) = await done(site, site.csms.api.issue_with_key(SITE_ID, "ev-0000"))
        assert res["status"] == Status.ACCEPTED, res
        ev = await board_wait(b, "cs_cert_installed", since=m)
        assert ev["key_outside"]
        (row,) = site.csms.store.select("certificates", {"device_id": "ev-0000"})
        h = hashlib.sha256(bytes(row["der"])).digest()
        assert ev["hash"] == h or ev["hash"] == h.hex()
        st = await board_status(b, lambda st: st["se_key"])
        assert len(bytes.fromhex(st["se_key"])) > 32  # the PKCS#8 key, in the secure element (decrypted)

    scenario(tmp_path, fn, boards=1)


def test_m19_a_revoked_certificate_leaves_every_board_and_cannot_come_back(tmp_path: Path) -> None:
    root = ca_der(tmp_path / "pki", "compromised-root")
    h = hashlib.sha256(root).digest()

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        api = site.csms.api
        await done(site, api.install_root(SITE_ID, ["ev-0000", "ev-0001"], root, CertType.MO_ROOT))
        (cmd,) = api.revoke(h.hex(), "key compromised")
        res = await done(site, cmd)
        assert all(r["status"] == Status.ACCEPTED for r in res), res
        row = site.csms.store.get("certificates", cert_hash=h.hex())
        assert row is not None and row["revoked"] and row["revoke_reason"] == "key compromised"
        for d in ("ev-0000", "ev-0001"):
            assert h not in await installed(site, d)
        (again,) = await done(site, api.install_root(SITE_ID, ["ev-0000"], root, CertType.MO_ROOT))
        assert again["status"] == Status.REJECTED and "revoked" in again.get("reason", ""), again
        events = site.csms.store.select("security_events", {"device_id": "ev-0000"})
        assert any(e["event_name"] == "CertificateRevoked" for e in events)

    scenario(tmp_path, fn)

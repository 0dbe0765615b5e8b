"""The device security lifecycle on the real site (issue #15, part A): M19 revocation that
bites (a site's certificate revoked at the CSMS, the CSMS's own certificate revoked, a board's
certificate revoked; a certificate with the wrong extended key usage), M13 onboarding and
re-keying by the operator's decision. The operator acts through the CSMS's API
(`site.csms.api`) and the gateway's `devices` command; the installer powers boards; checked
on what the gateway admits, what the boards show and what the CSMS stores."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, scenario

from gateway.__main__ import main as gateway_cli
from gateway.protocol import devpki
from gateway.schema import Key, Registration, Status
from tools.board import Board
from tools.site.harness import SITE_ID, board_status, board_wait, factory_key, until

pytestmark = pytest.mark.timeout(120)

ACCEPTED = int(Registration.ACCEPTED)


def uplink(site: Site) -> Any:
    assert site.gw is not None and site.gw.runner is not None
    return site.gw.runner


async def done(site: Site, cmd: int) -> list[dict[str, Any]]:
    row = await site.command_done(cmd)
    assert row["state"] == "done", row
    return list(row["results"])


async def refused_at_handshake(site: Site, *words: str) -> str:
    """Waits until the gateway's uplink has been refused naming `words`; the error."""
    r = uplink(site)
    await until(lambda: r.state != "up" and all(w in r.last_error for w in words), 20, f"uplink refused: {words}")
    return str(r.last_error)


async def charges(b: Board, token: str) -> dict[str, Any]:
    m = b.mark()
    b.cmd("card", token=token)
    await board_wait(b, "auth", since=m)
    b.cmd("plug")
    return await board_status(b, lambda st: st["tx_id"] is not None and st["power_w"] > 0)


def security_events(site: Site, device: str) -> list[str]:
    return [e["event_name"] for e in api(site).security_events(SITE_ID) if e["device_id"] == device]


def gateway_toml(site: Site) -> Path:
    """A configuration file naming the running gateway's data folder, for its `devices` command."""
    assert site.gw is not None
    path = site.root / "gateway-cli.toml"
    path.write_text(f'[site]\nid = "{SITE_ID}"\ndata_dir = "{site.gw.cfg.site.data_dir}"\n')
    return path


def replacement(site: Site, i: int, device: str) -> Board:
    """The installer swaps board i for a new one with the same device id (a fresh flash: no
    device key, only the factory key)."""
    assert site.gw is not None
    site.boards[i].stop()
    b = Board(site.root / "boards" / f"{device}-new", site.gw.lan_port, device, factory_key(site.seed, device))
    site.boards[i] = b.start()
    return b


# ---------------------------------------------------------------- M19


def test_m19_a_site_whose_certificate_is_revoked_at_the_csms_is_refused_at_the_handshake(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        (cert,) = [c for c in api(site).tls_certificates() if c["role"] == "site"]
        assert cert["site_id"] == SITE_ID and not cert["revoked"]  # recorded when the site connected
        api(site).revoke_site(SITE_ID, "keyCompromise")
        err = await refused_at_handshake(site, "client's certificate", "revoked (keyCompromise)")
        assert f"serial {cert['serial']}" in err
        (row,) = [c for c in api(site).tls_certificates() if c["role"] == "site"]
        assert row["revoked"] and row["revoke_reason"] == "keyCompromise"
        # the operator gives the site a new certificate: it connects again
        assert site.gw is not None
        for f in (site.root / "gw-pki").glob(f"{SITE_ID}.*"):
            f.unlink()
        await site.gw.stop()
        await site.start_gateway()
        await until(lambda: uplink(site).state == "up", 20, "uplink up with the new certificate")

    scenario(tmp_path, fn, boards=1)


def test_m19_a_revoked_csms_certificate_is_refused_by_the_gateway_at_the_handshake(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.gw is not None
        (crl_cmd,) = api(site).revoke_server_certificate("keyCompromise")
        (res,) = await done(site, crl_cmd)  # the site holds the new revocation list
        assert res[str(int(Key.STATUS))] == Status.ACCEPTED and site.gw.revocations.number >= 1, res
        # a server presenting that certificate (here the CSMS itself, restarted) is refused
        await site.stop_csms()
        await site.start_csms()
        await refused_at_handshake(site, "server's certificate", "revoked (keyCompromise)")
        assert site.gw.snapshot()["upstream"] != "up"
        # the operator gives the CSMS a new certificate: the site connects again
        await site.stop_csms()
        assert site.csms is not None
        cfg = site.csms.config
        cfg.cert.unlink()
        cfg.key.unlink()
        await site.start_csms()
        await until(lambda: uplink(site).state == "up", 20, "uplink up to the CSMS's new certificate")

    scenario(tmp_path, fn, boards=1)


def test_m19_a_board_whose_certificate_is_revoked_is_disconnected_and_refused(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        b0, b1 = site.boards
        api(site).add_token("CARD-M19")
        (res,) = await done(site, api(site).issue_with_key(SITE_ID, "ev-0000"))  # M18: the board's certificate
        assert res["status"] == Status.ACCEPTED, res
        (row,) = [r for r in api(site).store.select("certificates", {"device_id": "ev-0000"})]
        h = hashlib.sha256(bytes(row["der"])).hexdigest()
        m = b0.mark()
        api(site).revoke(h, "keyCompromise")
        ev = await board_wait(b0, "link_closed", lambda e: "revoked" in str(e.get("reason", "")), since=m)
        assert "hello refused" in ev["reason"] or "revoked" in ev["reason"]
        await until(lambda: "CertificateRevoked" in security_events(site, "ev-0000"), 20, "reported at the CSMS")
        assert site.gw is not None
        await until(lambda: site.gw is not None and "ev-0000" not in site.gw.online, 20, "ev-0000 kept out")
        assert site.gw.snapshot()["security"]["events"].get("CertificateRevoked", 0) >= 1
        await charges(b1, "CARD-M19")  # the other board is not affected

    scenario(tmp_path, fn, boards=2)


def test_m19_eku_a_site_certificate_for_tls_servers_only_is_refused_by_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.gw is not None and site.csms is not None
        cfg = site.csms.config
        pki = devpki.private_dir(site.root / "gw-pki-serveronly")
        issued = devpki.issue(pki, "site-server-only", ca=(cfg.ca, cfg.ca_key), client=False, subject=SITE_ID)
        site.extra["upstream"] = {"cert": str(issued.cert), "key": str(issued.key)}
        await site.gw.stop()
        await site.start_gateway()
        await refused_at_handshake(site, "client's certificate is not for TLS client authentication")

    scenario(tmp_path, fn, boards=1)


# ---------------------------------------------------------------- M13


def test_m13_an_unregistered_device_is_refused_onboarding_until_the_operator_registers_it(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.gw is not None
        site.extra["devices"] = {"onboarding": "registered"}  # the default of a real site
        await site.gw.stop()
        await site.start_gateway()
        api(site).add_token("CARD-NEW")
        b = Board(site.root / "boards" / "ev-0009", site.gw.lan_port, "ev-0009", factory_key(site.seed, "ev-0009"))
        site.boards.append(b.start())
        ev = await board_wait(b, "link_closed", lambda e: "not registered" in str(e.get("reason", "")))
        assert "onboarding refused" in ev["reason"]
        await until(lambda: "OnboardingRefused" in security_events(site, "ev-0009"), 20, "reported at the CSMS")
        assert site.gw.snapshot()["rejections"].get("UNKNOWN_DEVICE", 0) >= 1
        api(site).register_device(SITE_ID, "ev-0009")  # the operator registers it at the CSMS
        await board_wait(b, "registration", lambda e: e["status"] == ACCEPTED)
        await charges(b, "CARD-NEW")

    scenario(tmp_path, fn, boards=1)


def test_m13_a_rekey_of_an_active_device_is_refused_and_reported_until_the_operator_approves(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        api(site).add_token("CARD-RK")
        b = replacement(site, 0, "ev-0000")  # a fresh board asks for a key for an active device
        ev = await board_wait(b, "link_closed", lambda e: "re-keying" in str(e.get("reason", "")))
        assert "needs the operator's approval" in ev["reason"]
        assert gateway_cli(["--config", str(gateway_toml(site)), "devices", "rekey", "ev-0000"]) == 0
        await board_wait(b, "registration", lambda e: e["status"] == ACCEPTED)
        st = await charges(b, "CARD-RK")

        # the replacement counts above the old board's message ids (the Hello's `id_floor`): its
        # transaction reaches the CSMS instead of being dropped there as a repeat
        def at_csms() -> bool:
            return any(t["device_id"] == "ev-0000" and t["tx_id"] == st["tx_id"] and t["id_token"] == "CARD-RK"
                       for t in api(site).sessions())  # fmt: skip

        await until(at_csms, 20, "the new board's transaction at the CSMS")
        await until(lambda: "RekeyRefused" in security_events(site, "ev-0000"), 20, "reported at the CSMS")
        assert site.gw is not None
        assert site.gw.snapshot()["security"]["events"]["RekeyRefused"] >= 1

    scenario(tmp_path, fn, boards=1)

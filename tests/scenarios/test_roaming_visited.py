"""CSP↔CSP roaming (IEC 63119-1, a visited CSP) on the real chain, peer to peer: real
MicroPython boards, the real gateway, the real CSMS over QUIC, its CSO endpoint, and a third
home CSP `site.csp3` (DE*HC3*O) that has no agreement with the CSO, only with provider A
(`site.csp`, its visited CSP: `realsite.scenario(…, visited=True)`). csp3's customers present
their cards at the boards; every scenario ends with the billing invariants
(roaming_books.check_books: one SDR at the CSMS, the CSO, the visited CSP and the home CSP,
priced with the CSO's tariff in force, the signed meter data end to end, matched by the
visited CSP against its record and by the home against its own).

R1-2, R1-3, R2-1 (the CSO's locations, status and tariffs passed on to csp3), R3-1/R4-1 (online
authorization CSO → visited CSP → csp3, the card number along that path only), R3-6, R3-5,
R3-9: test_r1_2_r1_3_r2_1_r3_1_…; R4-2 (csp3's list reaches the CSO through the visited CSP and
the site's local list: a csp3 card charges while the site is offline) and M10 (a deletion at
csp3 reaches the visited CSP, the CSO and the site's list): test_r4_2_m10_…; R3-2, R3-7, R3-10,
R3-4 (csp3 starts, plans and stops remotely through the visited CSP; the CSO's new plan reaches
csp3): test_r3_2_r3_7_r3_10_r3_4_…; R3-3 (Plug & Charge: the contract certificate issued by
csp3 through the visited CSP, then the contract authorized): test_r3_3_…; R3-8 and R5-2 (csp3
reserves and unlocks through the visited CSP; an unused reservation's expiry reaches csp3 by
its own id): test_r3_8_r5_2_…."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from realsite import Invariants, Site, api, charge, scenario, site_id
from roaming_books import check_books

from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.visited import VisitedCspEndpoint
from gateway.schema import TokenType
from tools.site.harness import SITE_PARTY, board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)
MODE = "peer_to_peer"


def parties(site: Site) -> tuple[VisitedCspEndpoint, CspEndpoint]:
    """The visited CSP (provider A) and the home CSP that roams through it."""
    assert isinstance(site.csp, VisitedCspEndpoint) and site.csp3 is not None
    return site.csp, site.csp3


async def unplug(site: Site, i: int) -> None:
    b = site.boards[i]
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


def test_r1_2_r1_3_r2_1_r3_1_r4_1_r3_6_r3_5_r3_9_a_card_of_a_csp_roaming_through_a_visited_csp(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        visited, home = parties(site)
        assert site.cso is not None and site.csp_b is not None and site.ch is not None
        cso = site.cso
        every = sorted([site.evse(0), site.evse(1)])

        def location() -> Any:  # R1-2: the CSO's location, passed on unchanged
            row = home.store.one("SELECT body FROM locations")
            body = json.loads(row["body"]) if row else None
            return body if body and sorted(e["evse_gid"] for e in body["evses"]) == every else None

        assert (await until(location, 15, "the location at csp3"))["operator_id"] == cso.me
        row = await site.command_done(api(site).set_tariff(site_id(site), 4, 280, "EUR", price_session=60,
                                                           price_min=1, targets=site.devices))  # fmt: skip
        assert row["state"] == "done", row
        await until(lambda: 4 in home.tariffs(cso.me), 10, "the CSO's tariff at csp3")  # R2-1
        assert home.tariffs(cso.me)[4] == visited.tariffs(cso.me)[4]  # passed on unchanged
        card = "DE*HC3*CCARD00003"  # in no list: the CSO asks the visited CSP that serves its provider
        home.add_customer(card)
        await charge(site, 0, card, 300_000, unplug=False)  # R3-1, R4-1: identified online by csp3, through csp

        def status() -> Any:  # R1-3
            row = home.store.one("SELECT status FROM evse_status WHERE evse_gid=?", site.evse(0))
            return row is not None and row[0] == "occupied"

        await until(status, 10, "occupied at csp3")
        sid = await until(lambda: cso.open_session(site.evse(0), card), 10, "the roaming session")
        link = visited.link(sid)
        assert link is not None and link.home == home.me and cso.session(sid)["csp"] == visited.me
        # R3-6: the home's own record grows with the charge
        await until(lambda: [r for r in home.readings(link.home_session) if r[1] > 0], 10, "a reading at csp3")
        await board_step(site.boards[0], 300_000)
        await unplug(site, 0)
        (book,) = await check_books(site, MODE)  # R3-5, R3-9: CSMS, CSO, visited CSP, csp3
        assert (book.csp, book.home, book.home_session) == (visited.me, home.me, link.home_session)
        assert book.home_sdr["tariff_id"] == 4 and book.home_sdr["cost"] > 60
        # privacy: the card number went site → CSO → csp → csp3 only
        assert {r[0] for r in cso.store.all("SELECT party FROM shared WHERE token_uid=?", card)} == {
            SITE_PARTY,
            visited.me,
        }
        assert {r[0] for r in visited.store.all("SELECT party FROM shared WHERE token_uid=?", card)} == {
            cso.me,
            home.me,
        }
        for other in (site.csp_b, site.ch):  # (repr: a table may hold bytes, e.g. meter keys)
            tables = other.store.snapshot().values()
            assert all(card not in json.dumps([tuple(r) for r in rows], default=repr) for rows in tables)

    scenario(tmp_path, fn, boards=2, roaming=MODE, visited=True)


def test_r4_2_m10_a_listed_card_of_a_csp_roaming_through_a_visited_csp_charges_offline_and_is_deleted(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        visited, home = parties(site)
        assert site.cso is not None and site.gw is not None
        cso, gw = site.cso, site.gw
        home.add_customer("04HC3OFF")
        await home.distribute_tokens("full")

        def listed(uid: str) -> bool:
            d = gw.auth.authorize(uid, 0)
            return (d.status, d.source) == (0, "list")

        # csp3's list → the visited CSP's list → the CSO → the CSMS → the site's local list
        await until(lambda: listed("04HC3OFF"), 20, "csp3's card in the site's list")
        assert cso.store.get("SELECT party FROM token_cache WHERE token_uid='04HC3OFF'")[0] == visited.me
        await site.stop_csms()  # the site is offline
        await charge(site, 0, "04HC3OFF", 300_000, unplug=False)
        await unplug(site, 0)
        await site.start_csms()  # back: the transaction reaches the CSMS, its SDR csp3 via csp
        (book,) = await check_books(site, MODE, timeout=30)
        assert book.csms["id_token"] == "04HC3OFF" and book.home == home.me and book.csp == visited.me
        # M10: the customer leaves csp3: deleted at the visited CSP, the CSO and from the site's list
        await home.delete_user("04HC3OFF")
        assert visited.store.one("SELECT 1 FROM partner_tokens WHERE token_uid='04HC3OFF'") is None
        assert cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04HC3OFF'") is None
        await until(lambda: not listed("04HC3OFF"), 20, "the card gone from the site's list")
        await check_books(site, MODE, known={"04HC3OFF"})  # the books stand as billed

    scenario(tmp_path, fn, boards=1, roaming=MODE, visited=True)


def test_r3_2_r3_7_r3_10_r3_4_a_csp_roaming_through_a_visited_csp_starts_plans_and_stops_remotely(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        visited, home = parties(site)
        assert site.cso is not None
        b = site.boards[0]
        await until(lambda: home.store.one("SELECT 1 FROM evse_status WHERE evse_gid=?", site.evse(0)), 15,
                    "the EVSE at csp3")  # fmt: skip
        home.add_customer("APP-HC3-1")
        m = b.mark()
        b.cmd("plug")  # the EV is at the EVSE; the driver starts from csp3's app (R3-2)
        start = await home.start_remote(site.evse(0), "APP-HC3-1")
        assert start["result"] == "accepted", start
        home_sid = start["roaming_session_id"]
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 4000)
        plan = await home.send_plan(home_sid, [{"start_s": 0, "limit_w": 4000}])  # R3-7, through csp
        assert plan["status"] == "accepted", plan
        lim = inv.limit(4000, [b.device_id], what="R3-7 plan")
        await board_status(b, lambda st: 0 < st["power_w"] <= 4000)
        sid = str(visited.store.get("SELECT session_id FROM partner_sessions WHERE home_session=?", home_sid)[0])
        again = await site.cso.update_plan(sid, [{"start_s": 0, "limit_w": 2000}])  # R3-10: the CSO replans
        assert again["status"] == "accepted", again
        inv.lift(lim)
        inv.limit(2000, [b.device_id], what="R3-10 plan")
        await board_status(b, lambda st: 0 < st["power_w"] <= 2000)
        kept = json.loads(home.store.get("SELECT plan FROM plans WHERE session_id=?", home_sid)[0])
        assert kept[0]["limit_w"] == 2000  # the CSO's new plan reached csp3
        await board_step(b, 300_000)
        stop = await home.stop_remote(home_sid)  # R3-4
        assert stop["result"] == "accepted", stop
        await board_wait(b, "tx_ended", since=m)
        st = await board_status(b, lambda st: st["power_w"] == 0)
        assert not st["contactor"]
        b.cmd("unplug")
        (book,) = await check_books(site, MODE)
        assert book.home_session == home_sid and book.session_id == sid and book.home_sdr["energy_wh"] > 0

    scenario(tmp_path, fn, boards=1, roaming=MODE, visited=True)


def test_r3_3_plug_and_charge_a_contract_of_a_csp_roaming_through_a_visited_csp(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        visited, home = parties(site)
        b = site.boards[0]
        contract = "DE*HC3*C0000PNC3"
        home.add_customer("EV-VIN-3", contract_id=contract)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DEHC3C0000PNC3")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        m = b.mark()
        b.cmd("ev_cert", exi=csr.public_bytes(serialization.Encoding.DER).hex())  # the EV asks (S7)
        assert (await board_wait(b, "ev_certificate", since=m))["ok"] is True
        chain = split_chain(bytes.fromhex((await board_status(b, lambda st: st["exi"]))["exi"]))
        verify_chain(chain, home.mo.root)  # issued by csp3's MO sub-CA, through csp
        assert chain[0].public_key() == key.public_key()
        assert visited.store.one("SELECT 1 FROM contract_certs") is None
        b.cmd("card", token=contract, type=int(TokenType.ISO15118))  # the EV presents its contract
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 300_000)
        await unplug(site, 0)
        (book,) = await check_books(site, MODE)
        assert book.csms["id_token"] == contract and (book.csp, book.home) == (visited.me, home.me)

    scenario(tmp_path, fn, boards=1, roaming=MODE, visited=True)


def test_r3_8_r5_2_a_reservation_and_an_unlock_of_a_csp_roaming_through_a_visited_csp(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        visited, home = parties(site)
        assert site.cso is not None
        cso, b = site.cso, site.boards[0]
        await until(lambda: home.store.one("SELECT 1 FROM evse_status WHERE evse_gid=?", site.evse(0)), 15,
                    "the EVSE at csp3")  # fmt: skip
        card = "DE*HC3*CRES00003"
        home.add_customer(card)
        ok = await home.reserve(site.evse(0), card, int(time.time()) + 600, 41)  # R3-8, through csp
        assert ok["result"] == "accepted", ok
        m = b.mark()
        await charge(site, 0, card, 300_000, unplug=False)  # the reserving card charges at the EVSE held for it
        q = "SELECT reservation_id, state FROM reservations WHERE csp=?"
        assert tuple(cso.store.get(q, visited.me)) == (41, "used")  # held for it, and taken by it
        sid = await until(lambda: cso.open_session(site.evse(0), card), 10, "the roaming session")
        link = visited.link(sid)
        assert link is not None
        unlocked = await home.unlock(site.evse(0), link.home_session, "cable stuck")  # R5-2, through csp
        assert unlocked["result"] == "accepted", unlocked
        await board_wait(b, "tx_ended", since=m)
        await board_status(b, lambda st: st["power_w"] == 0 and not st["contactor"])
        b.cmd("unplug")  # the cable is free: the service session ends, its SDR follows
        # a reservation left unused expires: the CSO tells csp, csp tells csp3 by csp3's id
        ok = await home.reserve(site.evse(0), card, int(time.time()) + 3, 42)
        assert ok["result"] == "accepted", ok
        q = "SELECT state FROM reservations WHERE reservation_id=42"
        await until(lambda: (home.store.one(q) or [""])[0] == "expired", 15, "the expiry at csp3")
        (book,) = await check_books(site, MODE)
        assert book.home_session == link.home_session and home.session(link.home_session)["state"] == "completed"

    scenario(tmp_path, fn, boards=1, roaming=MODE, visited=True)

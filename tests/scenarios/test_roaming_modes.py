"""Every roaming use case (IEC 63119, R1-1 … R5-3) on the real chain, in each of the three modes
(peer_to_peer, clearing_house, mixed): real MicroPython boards, the real gateway, the real
CSMS over QUIC, its CSO endpoint (CsmsOperator, CsmsRoaming, the publisher), two home CSPs and
the clearing house over HTTP/3. The driver acts at the board, the home CSP through its
endpoint, the operator through the CSMS's API; every scenario ends with the billing
invariants (roaming_books.check_books: one SDR per roaming session at the CSMS, the CSO, the
home CSP and the CH, priced with the tariff in force, signed meter data end to end, matched).

R1-1 login, R1-2 locations (the operator's site record: name, address, coordinates, connectors,
capabilities), R1-3 status, R2-1 tariff push, R2-2 tariff pull, R5-1 outage:
test_r1_r2_r5_1_…; R3-1, R4-1, R3-5, R3-6, R3-9 (with a wrong SDR disputed): test_r3_1_…;
R3-5 and R3-9 with two cards in one service session: test_r3_5_r3_9_two_cards_…;
R3-2, R3-7, R3-10, R3-4: test_r3_2_…; R3-3: test_r3_3_…; R3-8: test_r3_8_…; R4-2:
test_r4_2_…; R5-2, R5-3 and a failed remote start: test_r5_2_r5_3_…."""

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
from realsite import Invariants, Site, api, scenario, site_id
from roaming_books import MODES, check_books, roaming_sdrs

from evedge_roaming import pricing, publish
from evedge_roaming.contract_pki import split_chain, verify_chain
from gateway.schema import TokenType
from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = [pytest.mark.timeout(150), pytest.mark.parametrize("mode", MODES)]
CARD = "DE*HCP*CCARD00001"
"""An RFID card of provider A with its contract id printed on it (the CSO routes it by that)."""


async def tariff(site: Site, tariff_id: int, price_kwh: int, **kw: Any) -> None:
    """The operator sets a tariff at the CSMS; it reaches the boards and the home CSPs (R2-1)."""
    row = await site.command_done(api(site).set_tariff(site_id(site), tariff_id, price_kwh, "EUR", **kw,
                                                       targets=site.devices))  # fmt: skip
    assert row["state"] == "done", row
    csp, cso = site.csp, site.cso
    assert csp is not None and cso is not None
    await until(lambda: tariff_id in csp.tariffs(cso.me), 10, f"tariff {tariff_id} at the home CSP")


async def customer(site: Site, uid: str, **kw: Any) -> None:
    """A customer of provider A; its token list reaches the CSO (and through the CH its index)."""
    assert site.csp is not None
    site.csp.add_customer(uid, **kw)
    await site.csp.distribute_tokens("differential")


async def plug_and_charge(site: Site, i: int, ms: int) -> None:
    b = site.boards[i]
    await board_status(b, lambda st: st["power_w"] > 0)
    await board_step(b, ms)


def csp_session(site: Site, sid: str) -> dict[str, Any]:
    assert site.csp is not None
    return dict(site.csp.session(sid))


# ---------------------------------------------------------------- R1, R2, R5-1


def test_r1_1_r1_2_r1_3_r2_1_r2_2_r5_1_what_the_csms_publishes_reaches_the_home_csp(tmp_path: Path, mode: str) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None and site.ch is not None
        csp, cso = site.csp, site.cso
        # R1-2: the location with every EVSE (published again as the site's report names each board)
        every = sorted([site.evse(0), site.evse(1)])

        def whole() -> Any:
            row = csp.store.one("SELECT body FROM locations")
            return row if row and sorted(e["evse_gid"] for e in json.loads(row["body"])["evses"]) == every else None

        loc = await until(whole, 15, "the location with every EVSE at the home CSP")
        body = json.loads(loc["body"])
        # the operator records the site (name, coordinates): the location is published again
        rec = api(site).set_site(site_id(site), name="Depot Nord", address="Hafenstr. 1", city="Hamburg",
                                 postal_code="20457", country="DE", lat=53.54, lon=9.99)  # fmt: skip
        assert rec["address"] == "Hafenstr. 1"

        def placed() -> Any:
            got = json.loads(csp.store.get("SELECT body FROM locations")[0])
            return got if got["name"] == "Depot Nord" else None

        body = await until(placed, 10, "the site's record at the home CSP")
        assert (body["latitude"], body["longitude"]) == (53.54, 9.99) and len(body["evses"]) == 2
        place = (body.get("street"), body.get("city"), body.get("postal_code"), body.get("country"))
        assert place == ("Hafenstr. 1", "Hamburg", "20457", "DE")
        # each EVSE's connector: the chain's default kind, the rating the board reported
        conn = {c["evse_gid"]: c for c in body["connectors"]}
        assert sorted(conn) == sorted([site.evse(0), site.evse(1)])
        kinds = {(c["connector_standard"], c["connector_format"], c["power_type"]) for c in conn.values()}
        assert kinds == {("IEC_62196_T2", "SOCKET", "AC_3_PHASE")} and all(c["max_power_w"] > 0 for c in conn.values())
        rated = {e["evse_gid"]: e["max_power_w"] for e in body["evses"]}
        assert rated == {g: c["max_power_w"] for g, c in conn.items()}
        assert "REMOTE_START_STOP" in body["capabilities"]
        # the operator records the kind of connector and the capabilities
        api(site).set_site(site_id(site), connector_standard="IEC_62196_T2_COMBO", connector_format="CABLE",
                           power_type="DC", capabilities=["RFID_READER", "REMOTE_START_STOP"])  # fmt: skip

        def dc() -> Any:
            got = json.loads(csp.store.get("SELECT body FROM locations")[0])
            return got if got["connectors"][0]["power_type"] == "DC" else None

        body = await until(dc, 10, "the connectors at the home CSP")
        assert {(c["connector_standard"], c["connector_format"]) for c in body["connectors"]} == {
            ("IEC_62196_T2_COMBO", "CABLE")
        }
        assert body["capabilities"] == ["RFID_READER", "REMOTE_START_STOP"]
        with pytest.raises(ValueError, match="power_type"):
            api(site).set_site(site_id(site), power_type="AC_7_PHASE")
        with pytest.raises(ValueError, match="latitude"):  # bad input: named, nothing changed
            api(site).set_site(site_id(site), lat=95.0)
        kept = api(site).site_record(site_id(site))
        assert kept is not None and kept["latitude"] == 53.54
        # R1-1: the CSO logged in where it sends (its home CSP; the CH in CH and mixed modes), with a
        # limited validity
        logins = (site.ch if mode != "peer_to_peer" else csp).store.all(
            "SELECT party, expiry FROM login_tokens WHERE party=?", cso.me
        )
        assert logins and all(0 < r["expiry"] - time.time() <= cso.cfg.token_lifetime_s for r in logins)
        # R2-1: the operator's tariff, every element, pushed; R2-2: pulled by the CSP
        await tariff(site, 7, 300, price_min=2, price_session=50)
        pulled = await csp.pull_tariffs(cso.me)
        assert (pulled["tariff_id"], pulled["price_kwh"], pulled["price_min"], pulled["price_session"]) == (
            7,
            300,
            2,
            50,
        )
        # R1-3: occupied while a roaming card charges, available after
        await customer(site, "04PUB001")
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token="04PUB001")
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)

        def status(want: str) -> Any:
            row = csp.store.one("SELECT status, outage_kind FROM evse_status WHERE evse_gid=?", site.evse(0))
            return row if row is not None and row[0] == want else None

        await until(lambda: status("occupied"), 10, "occupied at the home CSP")
        await board_step(b, 120_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        await until(lambda: status("available"), 10, "available at the home CSP")
        # R5-1: a power cut takes board 1 away: an outage at the home CSP; back: restored
        b1 = site.boards[1]
        b1.stop()
        q = "SELECT status, outage_kind FROM evse_status WHERE evse_gid=? AND status=?"
        row = await until(lambda: csp.store.one(q, site.evse(1), "out_of_order"), 20, "the outage")
        assert row["outage_kind"] == "outage"
        b1.start()
        row = await until(lambda: csp.store.one(q, site.evse(1), "available"), 30, "restored")
        assert row["outage_kind"] == "restored"
        await check_books(site, mode)

    # the site reports its boards within half a second of a change (R5-1)
    scenario(tmp_path, fn, boards=2, roaming=mode, gateway_extra={"upstream": {"reports_interval_s": 0.5}})


# ---------------------------------------------------------------- R3-1, R4-1, R3-5, R3-6, R3-9


def test_r3_1_r4_1_r3_5_r3_6_r3_9_a_card_session_is_billed_once_everywhere_and_a_wrong_sdr_disputed(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None and site.bridge is not None
        csp, cso = site.csp, site.cso
        await tariff(site, 3, 250, price_min=1, price_session=40)
        csp.add_customer(CARD)  # in no token list: only its home CSP can say (its provider is printed on it)
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token=CARD)  # R3-1, R4-1: identified online by the home CSP
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 300_000)
        sid = await until(lambda: cso.open_session(site.evse(0), CARD), 10, "the roaming session")
        # R3-6: the home CSP's own record grows with the charge
        await until(lambda: csp.readings(sid) and csp.readings(sid)[-1][1] > 0, 10, "a reading at the home CSP")
        await board_step(b, 300_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        (book,) = await check_books(site, mode)  # R3-5, R3-9
        assert book.session_id == sid and book.csp_sdr["tariff_id"] == 3 and book.csp_sdr["cost"] > 40
        assert csp_session(site, sid)["state"] == "completed"

        # a wrong SDR: the CSO bills a second session with more energy than it measured
        await site.bridge.stop()
        m = b.mark()
        b.cmd("card", token=CARD)
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 120_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        csms_sdr = await until(lambda: [s for s in api(site).sdrs() if s["id_token"] == CARD][1:], 20,
                               "the second SDR at the CSMS")  # fmt: skip
        (s2,) = csms_sdr
        started = publish.unix(s2["started"])
        sid2 = cso.open_session(site.evse(0), CARD) or cso.adopt_session(site.evse(0), CARD, started)
        assert sid2 is not None
        bad = [pricing.Line(x.started, x.stopped, x.energy_wh + 500, x.tariff_id) for x in publish.sdr_lines(s2)]
        cso.store.exec("INSERT INTO csms_sdrs VALUES(?,?,?,?)", s2["sdr_id"], sid2, "sent", int(time.time()))
        answer = await cso.session_ended(sid2, int(s2["energy_wh"]) + 500, meter_start_wh=int(s2["meter_start_wh"]),
                                         signed_meter=publish.signed_meter(s2), lines=bad)  # fmt: skip
        assert answer["status"] == "accepted"
        sdr_id = answer["sdr_id"]
        verdict = await until(lambda: csp.store.one("SELECT verdict FROM sdrs WHERE sdr_id=?", sdr_id), 10, "verdict")
        assert verdict[0].startswith("mismatch"), verdict[0]
        disputed = await csp.dispute(sdr_id)
        assert disputed["status"] == "accepted"
        assert cso.store.one("SELECT reason FROM disputes WHERE sdr_id=?", sdr_id) is not None
        books = await check_books(site, mode, wrong={sid2})
        if mode != "peer_to_peer":
            assert [x.ch_verdict for x in books if x.session_id == sid2] == ["disputed"]
            assert site.ch is not None
            assert all(sdr_id not in s["sdrs"] for s in await site.ch.settle())  # held out

    scenario(tmp_path, fn, boards=1, roaming=mode)


def test_r3_5_r3_9_two_cards_in_one_service_session_are_two_roaming_sessions_each_billed_to_its_home(
    tmp_path: Path, mode: str
) -> None:
    """The EV stays plugged: card A charges and stops, card B charges (campaign --roaming found
    it): one service session and one SDR at the CSMS, but two roaming sessions, each card's
    transactions billed to its own home CSP only; the next service session of card B is a new
    roaming session."""

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.csp_b is not None
        await tariff(site, 3, 250, price_session=40)
        card_b = "DE*HCB*CCARD00002"
        site.csp.add_customer(CARD)
        site.csp_b.add_customer(card_b)
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token=CARD)
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 300_000)
        m = b.mark()
        b.cmd("card", token=CARD)  # A stops; the EV stays plugged
        await board_wait(b, "tx_ended", since=m)
        b.cmd("card", token=card_b)
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 120_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        await until(lambda: len(roaming_sdrs(site)) == 2, 20, "the service session's SDR at the CSMS")
        books = await check_books(site, mode)
        assert sorted((x.csms["id_token"], x.csp) for x in books) == [(card_b, site.csp_b.me), (CARD, site.csp.me)]
        assert len({x.csms["session_id"] for x in books}) == 1  # one service session at the CSMS
        # card B again, a new service session: a roaming session of its own
        m = b.mark()
        b.cmd("card", token=card_b)
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 60_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        await until(lambda: len(roaming_sdrs(site)) == 3, 20, "the next SDR at the CSMS")
        books = await check_books(site, mode)
        assert len(books) == 3 and len({x.session_id for x in books}) == 3

    scenario(tmp_path, fn, boards=1, roaming=mode)


# ---------------------------------------------------------------- R3-2, R3-7, R3-10, R3-4


def test_r3_2_r3_7_r3_10_r3_4_the_home_csp_starts_plans_and_stops_a_session_the_cso_replans(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None
        csp, cso, b = site.csp, site.cso, site.boards[0]
        csp.add_customer("APP-USER-1")
        m = b.mark()
        b.cmd("plug")  # the EV is at the EVSE; the driver starts from the app (R3-2)
        start = await csp.start_remote(site.evse(0), "APP-USER-1")
        assert start["result"] == "accepted", start
        sid = start["roaming_session_id"]
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 4000)
        plan = await csp.send_plan(sid, [{"start_s": 0, "limit_w": 4000}])  # R3-7
        assert plan["status"] == "accepted", plan
        lim = inv.limit(4000, [b.device_id], what="R3-7 plan")
        await board_status(b, lambda st: 0 < st["power_w"] <= 4000)
        again = await cso.update_plan(sid, [{"start_s": 0, "limit_w": 2000}])  # R3-10: the CSO replans
        assert again["status"] == "accepted", again
        inv.lift(lim)
        inv.limit(2000, [b.device_id], what="R3-10 plan")
        await board_status(b, lambda st: 0 < st["power_w"] <= 2000)
        assert json.loads(csp.store.get("SELECT plan FROM plans WHERE session_id=?", sid)[0])[0]["limit_w"] == 2000
        await board_step(b, 600_000)
        stop = await csp.stop_remote(sid)  # R3-4
        assert stop["result"] == "accepted", stop
        await board_wait(b, "tx_ended", since=m)
        st = await board_status(b, lambda st: st["power_w"] == 0)
        assert not st["contactor"]
        b.cmd("unplug")
        (book,) = await check_books(site, mode)
        assert book.session_id == sid and book.csp_sdr["energy_wh"] > 0

    scenario(tmp_path, fn, boards=1, roaming=mode)


# ---------------------------------------------------------------- R3-3


def test_r3_3_plug_and_charge_contract_installed_then_authorized_by_the_home_csp(tmp_path: Path, mode: str) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None
        csp, b = site.csp, site.boards[0]
        contract = "DE*HCP*C0000PNC1"
        csp.add_customer("EV-VIN-1", contract_id=contract)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DEHCPC0000PNC1")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        m = b.mark()
        b.cmd("ev_cert", exi=csr.public_bytes(serialization.Encoding.DER).hex())  # the EV asks (S7)
        assert (await board_wait(b, "ev_certificate", since=m))["ok"] is True
        chain = split_chain(bytes.fromhex((await board_status(b, lambda st: st["exi"]))["exi"]))
        verify_chain(chain, csp.mo.root)
        assert chain[0].public_key() == key.public_key()
        b.cmd("card", token=contract, type=int(TokenType.ISO15118))  # the EV presents its contract
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 600_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        (book,) = await check_books(site, mode)
        assert book.csms["id_token"] == contract and book.csp == csp.me

    scenario(tmp_path, fn, boards=1, roaming=mode)


# ---------------------------------------------------------------- R3-8


def test_r3_8_a_reservation_holds_the_evse_for_its_card_and_an_unused_one_expires(tmp_path: Path, mode: str) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None and site.csp_b is not None
        csp, b = site.csp, site.boards[0]
        csp.add_customer(CARD)
        site.csp_b.add_customer("DE*HCB*COTHER0001")
        ok = await csp.reserve(site.evse(0), CARD, int(time.time()) + 600, 41)
        assert ok["result"] == "accepted", ok
        m = b.mark()
        b.cmd("card", token="DE*HCB*COTHER0001")  # another provider's customer: the EVSE is held
        assert (await board_wait(b, "auth", since=m))["status"] != 0 or not await _starts(b, m)
        m = b.mark()
        b.cmd("card", token=CARD)  # the reserving card uses it
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 300_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        # a reservation left unused expires: cancelled at the board, the home CSP told
        ok = await csp.reserve(site.evse(0), CARD, int(time.time()) + 3, 42)
        assert ok["result"] == "accepted", ok
        q = "SELECT state FROM reservations WHERE reservation_id=42"
        await until(lambda: (csp.store.one(q) or [""])[0] == "expired", 15, "the expiry at the home CSP")
        (book,) = await check_books(site, mode)
        assert book.csms["id_token"] == CARD

    scenario(tmp_path, fn, boards=1, roaming=mode)


async def _starts(b: Any, m: int) -> bool:
    """Whether a transaction starts when the EV is plugged (False: none within 3 s)."""
    b.cmd("plug")
    try:
        await board_wait(b, "tx_started", since=m, timeout=3)
        return True
    except TimeoutError:
        return False
    finally:
        b.cmd("unplug")


# ---------------------------------------------------------------- R4-2


def test_r4_2_a_listed_roaming_card_charges_at_a_site_offline_and_is_billed_to_its_home_csp(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.csp_b is not None and site.gw is not None
        for i in range(300):  # more than one page of a token list
            site.csp_b.add_customer(f"04B{i:05d}")
        await site.csp_b.distribute_tokens("full")
        await customer(site, "04OFFLN1")
        gw = site.gw

        def listed(uid: str) -> bool:
            d = gw.auth.authorize(uid, 0)
            return (d.status, d.source) == (0, "list")

        # the CSO's lists reach the site's local list through the CSMS
        await until(lambda: listed("04OFFLN1") and listed("04B00299"), 20, "the roaming cards in the site's list")
        await site.stop_csms()  # the site is offline
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token="04OFFLN1")
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 300_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        await site.start_csms()  # back: the transaction reaches the CSMS and its SDR the home CSP
        (book,) = await check_books(site, mode, timeout=30)
        assert book.csms["id_token"] == "04OFFLN1" and book.csp == site.csp.me

    scenario(tmp_path, fn, boards=1, roaming=mode)


# ---------------------------------------------------------------- R5-2, R5-3, a failed remote start


def test_r5_2_r5_3_emergency_unlock_with_and_without_a_session_and_a_failed_remote_start_ends(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None
        csp, b = site.csp, site.boards[0]
        csp.add_customer("APP-USER-2")
        # a remote start with no EV: the board drops it after its EV-connection timeout
        start = await csp.start_remote(site.evse(0), "APP-USER-2")
        assert start["result"] == "accepted", start
        failed = start["roaming_session_id"]
        await board_step(b, 61_000)
        await until(lambda: csp_session(site, failed)["state"] == "failed", 15, "the failed start ended at the CSP")
        unlocked = await csp.unlock(site.evse(0), None, "cable stuck")  # R5-3: activation failed
        assert unlocked["result"] == "accepted", unlocked
        # R5-2: unlocked during a session: the charge ends and is billed
        m = b.mark()
        b.cmd("plug")
        start = await csp.start_remote(site.evse(0), "APP-USER-2")
        assert start["result"] == "accepted", start
        sid = start["roaming_session_id"]
        await board_wait(b, "tx_started", since=m)
        await plug_and_charge(site, 0, 300_000)
        unlocked = await csp.unlock(site.evse(0), sid, "cable stuck")
        assert unlocked["result"] == "accepted", unlocked
        await board_wait(b, "tx_ended", since=m)
        await board_status(b, lambda st: st["power_w"] == 0 and not st["contactor"])
        b.cmd("unplug")  # the cable is free: the service session ends, its SDR follows
        (book,) = await check_books(site, mode)
        assert book.session_id == sid and csp_session(site, sid)["state"] == "completed"
        assert cso_state(site, failed) == "failed"

    scenario(tmp_path, fn, boards=1, roaming=mode)


def cso_state(site: Site, sid: str) -> str:
    assert site.cso is not None
    return str(site.cso.session(sid)["state"])

"""Roaming on the real chain (IEC 63119, mixed mode): real MicroPython boards, the real
gateway, the real CSMS over QUIC, its CSO endpoint (CsmsOperator, CsmsRoaming, the publisher),
two home CSPs and the clearing house over HTTP/3. Proves R1-2 and R1-3 (what the CSMS
publishes reaches the home CSP), R2-1 (the CSMS's tariffs are published and price the SDR),
R3-1/R3-5/R3-9 with S2 (a second charge with a cached roaming card is billed to the home CSP
too: one SDR per session at the CSMS, the CSO, the home CSP and the CH, each matched), R3-4 (the
home CSP stops a card-started session) and R3-6 (the home CSP's own record grows with the
charge). The driver acts at the board; the home CSP through its endpoint; the operator through
the CSMS's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from realsite import Invariants, Site, api, charge, scenario, site_id
from roaming_books import check_books

from tools.site.harness import board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)


async def customer(site: Site, uid: str) -> None:
    """A customer of provider A, whose token list reaches the CSO and the CH (R4-2)."""
    assert site.csp is not None
    site.csp.add_customer(uid)
    await site.csp.distribute_tokens("differential")


def csp_sdrs(site: Site) -> list[dict[str, Any]]:
    assert site.csp is not None
    return [json.loads(r["body"]) | {"verdict": r["verdict"]} for r in site.csp.store.all("SELECT * FROM sdrs")]


def test_r3_9_s2_a_second_charge_with_a_cached_roaming_card_is_billed_to_the_home_csp(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.cso is not None and site.ch is not None and site.csp is not None
        card = "DE*HCP*CROAM00002"  # in no list (a listed card is in the site's own list): asked online
        site.csp.add_customer(card)
        for _ in range(2):  # the second card is answered from the site's cache (S2): no roaming request
            await charge(site, 0, card)
        assert site.site_roaming is not None and site.site_roaming.asked == 1

        def at_csms() -> list[dict[str, Any]] | None:
            rows = [s for s in api(site).sdrs() if s["id_token"] == card]
            return rows if len(rows) == 2 else None

        csms_sdrs = await until(at_csms, 20, "2 SDRs at the CSMS")
        got = await until(lambda: csp_sdrs(site) if len(csp_sdrs(site)) == 2 else None, 20, "2 SDRs at the home CSP")
        assert sorted(s["energy_wh"] for s in got) == sorted(s["energy_wh"] for s in csms_sdrs)
        assert all(s["verdict"] == "matched" for s in got), got
        assert site.cso.store.get("SELECT COUNT(*) FROM sessions WHERE sdr_id IS NOT NULL")[0] == 2
        ch = site.ch

        def books() -> list[str] | None:
            verdicts = [r.verdict for r in ch.reconcile()]
            return verdicts if len(verdicts) == 2 and "missing" not in verdicts else None

        assert await until(books, 10, "the CH's books") == ["matched", "matched"]
        await check_books(site, "mixed")

    # the operator trusts a cached answer for an hour while online (auth.online_trust_s)
    scenario(tmp_path, fn, boards=1, roaming=True, gateway_extra={"auth": {"online_trust_s": 3600.0}})


def test_r2_1_r3_9_the_csms_tariff_reaches_the_home_csp_and_prices_the_sdr(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None
        row = await site.command_done(api(site).set_tariff(site_id(site), 5, 30, "EUR", price_session=100,
                                                           targets=["ev-0000"]))  # fmt: skip
        assert row["state"] == "done", row
        csp = site.csp
        await until(lambda: csp.tariffs(site.cso.me if site.cso else "").get(5), 10, "the tariff at the home CSP")
        await customer(site, "04TARIF5")
        end = await charge(site, 0, "04TARIF5")
        (sdr,) = await until(lambda: csp_sdrs(site) or None, 20, "the SDR at the home CSP")
        assert sdr["tariff_id"] == 5 and sdr["energy_wh"] == end["wh"] > 0
        assert sdr["cost"] == sdr["energy_wh"] * 30 // 1000 + 100 and sdr["verdict"] == "matched"
        await check_books(site, "mixed")

    scenario(tmp_path, fn, boards=1, roaming=True)


def test_r1_2_r1_3_locations_and_status_reach_the_home_csp(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None
        csp = site.csp
        loc = await until(lambda: csp.store.one("SELECT body FROM locations"), 10, "the location at the home CSP")
        evses = sorted(e["evse_gid"] for e in json.loads(loc["body"])["evses"])
        assert evses == sorted([site.evse(0), site.evse(1)])
        await customer(site, "04STAT01")
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token="04STAT01")
        await board_wait(b, "auth", since=m)
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)

        def status() -> str | None:
            row = csp.store.one("SELECT status FROM evse_status WHERE evse_gid=?", site.evse(0))
            return None if row is None or row[0] != "occupied" else str(row[0])

        assert await until(status, 10, "occupied at the home CSP") == "occupied"
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        await check_books(site, "mixed")

    scenario(tmp_path, fn, boards=2, roaming=True)


def test_r3_4_r3_6_the_home_csp_follows_and_stops_a_card_started_session(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None
        csp, b = site.csp, site.boards[0]
        await customer(site, "04STOP01")
        m = b.mark()
        b.cmd("card", token="04STOP01")
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 300_000)
        cso = site.cso
        sid = await until(lambda: cso.open_session(site.evse(0), "04STOP01"), 10, "the roaming session")
        # R3-6: the home CSP's own record grows with the charge
        await until(lambda: csp.readings(sid) and csp.readings(sid)[-1][1] > 0, 10, "a reading at the home CSP")
        stop = await csp.stop_remote(sid)  # R3-4: a card-started session, stopped by the home CSP
        assert stop["result"] == "accepted", stop
        await board_wait(b, "tx_ended", since=m)
        st = await board_status(b, lambda st: st["power_w"] == 0)
        assert not st["contactor"]
        b.cmd("unplug")
        (sdr,) = await until(lambda: csp_sdrs(site) or None, 20, "the SDR at the home CSP")
        assert sdr["roaming_session_id"] == sid and sdr["verdict"] == "matched", sdr
        await check_books(site, "mixed")

    scenario(tmp_path, fn, boards=1, roaming=True)

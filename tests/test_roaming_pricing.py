"""Roaming prices and the books (R2-1, R2-2, R3-5, R3-6, R3-9), over real HTTP/3 in each mode:
an SDR is priced with the tariff its session ran under (per transaction when the tariff
changed), with every tariff element (energy, time, session fee, validity); GetTariffs loses
none of them; the home CSP checks an SDR against its own record (the readings it received and
its own copy of the tariffs), flags a wrong one as a mismatch and can dispute it; the CH
reconciles (matched / mismatch / missing) and settles nothing disputed; a duplicate SDR or an
out-of-order session update is refused by name and the books stay consistent."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from evedge_roaming import pricing
from evedge_roaming.testbed import CSO, CSP, EVSES, Net, running
from gateway.protocol.roaming.client import RoamingError

MODES = ["peer_to_peer", "clearing_house", "mixed"]
OLD = {"tariff_id": 7, "operator_id": CSO, "price_kwh": 45, "currency": "EUR", "price_session": 50}
NEW = {"tariff_id": 8, "operator_id": CSO, "price_kwh": 90, "currency": "EUR", "price_session": 50}
pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("mode", MODES)]


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await scenario(net)

    asyncio.run(main())


def via_ch(net: Net) -> bool:
    return net.cfgs["cso"].mode != "peer_to_peer"


async def started(net: Net, uid: str = "04A1B2C3D4", evse: str = EVSES[0]) -> str:
    net.csp.add_customer(uid)
    await net.csp.distribute_tokens()  # the card's home is known from the list (R4-2)
    answer = await net.cso.token_presented(evse, uid, "rfid")
    assert answer["result"] == "accepted", answer
    return str(answer["roaming_session_id"])


def verdict(net: Net, sdr_id: str) -> str:
    return str(net.csp.store.get("SELECT verdict FROM sdrs WHERE sdr_id=?", sdr_id)[0])


def test_r3_9_a_tariff_change_mid_session_bills_the_sessions_tariff(tmp_path: Path, mode: str) -> None:
    """The issue's numbers: 1 kWh under tariff 7 (45/kWh + 50) is 95, not tariff 8's 140."""

    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.session_progress(sid, 500, 7000)
        net.clock.advance(30)
        await net.cso.publish_tariff(NEW)  # mid-session
        net.clock.advance(30)
        done = await net.cso.session_ended(sid, 1000)
        assert done["cost"] == 95
        sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0])
        assert (sdr["tariff_id"], sdr["cost"]) == (7, 95)
        assert verdict(net, done["sdr_id"]) == "matched"
        if via_ch(net):
            assert [r.verdict for r in net.ch.reconcile()] == ["matched"]

    run(tmp_path, mode, scenario)


def test_r3_9_each_transaction_is_priced_with_its_own_tariff(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        t0 = int(net.clock())
        await net.cso.publish_tariff(NEW)
        net.clock.advance(120)
        await net.cso.session_progress(sid, 3000, 7000)
        lines = [pricing.Line(t0, t0 + 60, 1000, 7), pricing.Line(t0 + 60, t0 + 120, 2000, 8)]
        done = await net.cso.session_ended(sid, 3000, lines=lines)
        assert done["cost"] == (45 + 50) + 180  # the session fee once, on the first transaction
        sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0])
        assert [(x["tariff_id"], x["cost"]) for x in sdr["lines"]] == [(7, 95), (8, 180)]
        assert verdict(net, done["sdr_id"]) == "matched"

    run(tmp_path, mode, scenario)


def test_r2_2_a_pulled_tariff_keeps_its_session_fee_so_later_sdrs_match(tmp_path: Path, mode: str) -> None:
    """Before: GetTariffs dropped price_session and every later SDR was a mismatch (225 vs 275)."""

    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        net.csp.store.exec("DELETE FROM tariffs")  # the CSP missed the push
        await net.csp.pull_tariffs(CSO)
        sid = await started(net)
        net.clock.advance(60)
        done = await net.cso.session_ended(sid, 5000)
        assert done["cost"] == 5000 * 45 // 1000 + 50 == 275
        assert verdict(net, done["sdr_id"]) == "matched"

    run(tmp_path, mode, scenario)


def test_r2_1_price_per_minute_and_validity_are_honoured(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        now = int(net.clock())
        await net.cso.publish_tariff({**OLD, "price_min": 10})
        await net.cso.publish_tariff({**NEW, "valid_from": now + 3600})  # announced, not yet in force
        sid = await started(net)
        net.clock.advance(125)  # 3 started minutes
        done = await net.cso.session_ended(sid, 1000)
        assert done["cost"] == 45 + 3 * 10 + 50
        assert verdict(net, done["sdr_id"]) == "matched"
        net.clock.advance(3600)  # tariff 8 is in force now: a new session runs under it
        sid2 = await started(net, "04FFFF01", EVSES[1])
        assert net.cso.session(sid2)["tariff_id"] == 8

    run(tmp_path, mode, scenario)


def _wrong_sdr(net: Net, sid: str, **change: Any) -> dict[str, Any]:
    s = net.cso.session(sid)
    now = int(net.clock())
    body = {
        "sdr_id": net.cso.issue("R", secrets.token_hex(8)),
        "roaming_session_id": sid,
        "evse_gid": s["evse_gid"],
        "token_uid": s["token_uid"],
        "started": s["started"],
        "stopped": now,
        "meter_start_wh": 0,
        "meter_stop_wh": 1000,
        "energy_wh": 1000,
        "cost": 95,
        "currency": "EUR",
        "tariff_id": 7,
    }
    return body | change


def test_r3_9_a_wrong_sdr_is_a_mismatch_and_is_disputed(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.publish_tariff(NEW)
        await net.cso.session_progress(sid, 1000, 7000)
        net.clock.advance(60)
        net.cso._price = lambda lines: ([140], "EUR")  # type: ignore[method-assign]  # a CSO's pricing bug
        done = await net.cso.session_ended(sid, 1000)  # names tariff 7, bills tariff 8's price
        wrong = {"sdr_id": done["sdr_id"]}
        assert verdict(net, wrong["sdr_id"]) == "mismatch: cost 140, own price 95"
        if via_ch(net):
            [r] = net.ch.reconcile()
            assert (r.verdict, r.detail) == ("mismatch", "CSO energy 1000 Wh cost 140, CSP energy 1000 Wh cost 95")
        answer = await net.csp.dispute(wrong["sdr_id"])
        assert answer["status"] == "accepted"
        row = net.cso.store.get("SELECT csp, energy_wh, cost, reason FROM disputes WHERE sdr_id=?", wrong["sdr_id"])
        assert tuple(row) == (CSP, 1000, 95, "mismatch: cost 140, own price 95")
        if via_ch(net):
            assert net.ch.store.get("SELECT verdict FROM sdrs")[0] == "disputed"
            assert await net.ch.settle() == []  # a disputed SDR is not settled
            assert net.ch.reconcile() == []

    run(tmp_path, mode, scenario)


def test_r3_9_an_sdr_whose_energy_is_not_the_csps_reading_is_a_mismatch(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.session_progress(sid, 1000, 7000)
        wrong = _wrong_sdr(net, sid, energy_wh=2000, meter_stop_wh=2000, cost=140)
        await net.cso.send("PutSdr", wrong, CSP)
        assert verdict(net, wrong["sdr_id"]) == "mismatch: energy 2000 Wh, own record 1000 Wh"
        sid2 = await started(net, "04NOREAD", EVSES[1])  # no reading ever reached the CSP
        blind = _wrong_sdr(net, sid2)
        await net.cso.send("PutSdr", blind, CSP)
        assert verdict(net, blind["sdr_id"]) == "mismatch: no meter reading of the session was received"

    run(tmp_path, mode, scenario)


def test_r3_9_the_ch_marks_an_sdr_without_the_csps_record_missing(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        if not via_ch(net):
            return
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.session_progress(sid, 1000, 7000)
        done = await net.cso.session_ended(sid, 1000)
        net.ch.store.exec("DELETE FROM csp_records")  # the CSP's record has not arrived (yet)
        assert [(r.sdr_id, r.verdict) for r in net.ch.reconcile()] == [(done["sdr_id"], "missing")]
        assert await net.ch.settle() == []

    run(tmp_path, mode, scenario)


def test_r3_9_a_second_sdr_for_one_session_is_refused_and_the_books_stay(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.session_progress(sid, 1000, 7000)
        done = await net.cso.session_ended(sid, 1000)
        again = await net.cso.session_ended(sid, 1000)  # a retry: the same SDR, nothing new
        assert again["sdr_id"] == done["sdr_id"]
        with pytest.raises(RoamingError) as exc:
            await net.cso.send("PutSdr", _wrong_sdr(net, sid), CSP)
        assert (exc.value.status, exc.value.cause) == (409, "duplicate_sdr")
        assert net.csp.store.get("SELECT COUNT(*) FROM sdrs")[0] == 1
        if via_ch(net):
            assert net.ch.store.get("SELECT COUNT(*) FROM sdrs")[0] == 1
            assert [r.verdict for r in net.ch.reconcile()] == ["matched"]

    run(tmp_path, mode, scenario)


def test_r3_6_an_out_of_order_session_update_is_refused_by_name(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        t0 = int(net.clock())
        upd = {"roaming_session_id": sid, "evse_gid": EVSES[0], "power_w": 7000}
        await net.cso.send("SessionUpdate", upd | {"energy_wh": 800, "time": t0 + 20}, CSP)
        await net.cso.send("SessionUpdate", upd | {"energy_wh": 800, "time": t0 + 20}, CSP)  # a repeat
        for body, cause in (
            ({"energy_wh": 500, "time": t0 + 10}, "out_of_order"),
            ({"energy_wh": 700, "time": t0 + 30}, "energy_decreased"),
        ):
            with pytest.raises(RoamingError) as exc:
                await net.cso.send("SessionUpdate", upd | body, CSP)
            assert exc.value.cause == cause
        assert net.csp.readings(sid) == [(t0 + 20, 800)]
        assert net.csp.session(sid)["energy_wh"] == 800

    run(tmp_path, mode, scenario)


def test_r3_9_signed_meter_data_reaches_the_home_csp(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(OLD)
        sid = await started(net)
        await net.cso.session_progress(sid, 1000, 7000)
        signed = "T0NNRjpzaWduZWQ="
        done = await net.cso.session_ended(sid, 1000, signed_meter=signed)
        sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0])
        assert sdr["signed_meter"] == signed

    run(tmp_path, mode, scenario)

"""Every R-series use case end to end over real HTTP/3 + TLS 1.3 on loopback, in each roaming mode."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from evedge_roaming.testbed import CH, CSO, CSP, EVSES, LOCATION, Net, lose_answer, running
from gateway.protocol.roaming.client import MaybeDelivered, RoamingError
from gateway.protocol.roaming.http3 import H3Error
from gateway.protocol.roaming.json_body import BodyError

MODES = ["peer_to_peer", "clearing_house", "mixed"]
TARIFF = {"tariff_id": 7, "operator_id": CSO, "price_kwh": 45, "currency": "EUR", "price_session": 50}
pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("mode", MODES)]


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await scenario(net)

    asyncio.run(main())


def routed(net: Net, message: str) -> list[tuple[str, str]]:
    """(origin, destination) of each time the CH routed `message`."""
    return [(r[0], r[1]) for r in net.ch.store.all("SELECT origin, dest FROM routed WHERE message=?", message)]


def expect_route(net: Net, message: str, origin: str, dest: str, direct_in_mixed: bool = False) -> None:
    via_ch = net.cfgs["cso"].mode == "clearing_house" or (net.cfgs["cso"].mode == "mixed" and not direct_in_mixed)
    assert ((origin, dest) in routed(net, message)) is via_ch, routed(net, message)


def test_r1_1_platform_login_gives_token_of_limited_validity(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        c = net.cso.client(CSP)
        token = await c.login()
        assert len(token) >= 40
        assert c.expiry == int(net.clock()) + 20 * 60  # the default lifetime
        await c.login()
        assert c.logins == 2

    run(tmp_path, mode, scenario)


def test_r1_2_r1_3_r5_1_locations_status_and_outages(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        assert await net.cso.publish_locations() == 1
        loc = json.loads(net.csp.store.get("SELECT body FROM locations WHERE location_id=?", LOCATION)[0])
        assert [e["evse_gid"] for e in loc["evses"]] == EVSES and loc["operator_id"] == CSO
        net.clock.advance(1)
        await net.cso.publish_status(EVSES[0], "occupied")
        row = net.csp.store.get("SELECT status FROM evse_status WHERE evse_gid=?", EVSES[0])
        assert row[0] == "occupied"
        net.clock.advance(1)
        await net.cso.publish_status(EVSES[1], "out_of_order", outage_kind="maintenance", reason="RCD test")
        row = net.csp.store.get("SELECT status, outage_kind, reason FROM evse_status WHERE evse_gid=?", EVSES[1])
        assert tuple(row) == ("out_of_order", "maintenance", "RCD test")
        expect_route(net, "EvseStatusUpdate", CSO, CSP)

    run(tmp_path, mode, scenario)


def test_r2_1_tariff_push_and_r2_2_pull(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        row = net.csp.store.get("SELECT body FROM tariffs WHERE operator_id=?", CSO)
        assert json.loads(row[0])["price_kwh"] == 45
        net.csp.store.exec("DELETE FROM tariffs")
        answer = await net.csp.pull_tariffs(CSO)
        every = TARIFF | {"price_min": 0, "valid_from": 0}
        del every["operator_id"]
        assert answer == {"status": "accepted", **every, "tariffs": [every]}  # every element, price_session too
        assert json.loads(net.csp.store.get("SELECT body FROM tariffs WHERE operator_id=?", CSO)[0]) == {
            **every,
            "operator_id": CSO,
        }
        expect_route(net, "GetTariffs", CSP, CSO)

    run(tmp_path, mode, scenario)


async def _charge(net: Net, sid: str) -> None:
    """R3-6, R3-7, R3-10, R3-4, R3-5, R3-9 on a started session."""
    await net.cso.session_progress(sid, 2000, 11000)
    s = net.csp.session(sid)
    assert (s["energy_wh"], s["power_w"], s["cost"]) == (2000, 11000, 2000 * 45 // 1000 + 50)
    plan = [{"start_s": 0, "limit_w": 50000}, {"start_s": 600, "limit_w": 7000}]
    answer = await net.csp.send_plan(sid, plan)  # R3-7: the CSO caps the plan at the EVSE's power
    assert answer["status"] == "accepted" and answer["plan"][0]["limit_w"] == 22000
    await net.cso.update_plan(sid, [{"start_s": 0, "limit_w": 3700}])  # R3-10
    assert json.loads(net.csp.store.get("SELECT plan FROM plans WHERE session_id=?", sid)[0])[0]["limit_w"] == 3700
    assert (await net.csp.stop_remote(sid))["result"] == "accepted"  # R3-4
    assert net.operator.evses[EVSES[0]].session is None
    net.clock.advance(60)
    done = await net.cso.session_ended(sid, 5000, meter_start_wh=100)  # R3-5 + R3-9
    assert done["status"] == "accepted" and done["cost"] == 5000 * 45 // 1000 + 50
    verdict = net.csp.store.get("SELECT verdict FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0]
    assert verdict == "matched"
    assert net.csp.session(sid)["state"] == "completed"
    again = await net.cso.session_ended(sid, 5000, meter_start_wh=100)  # a retry: same SDR id, nothing new
    assert again["sdr_id"] == done["sdr_id"]
    assert net.csp.store.get("SELECT COUNT(*) FROM sdrs")[0] == 1
    if net.cfgs["cso"].mode != "peer_to_peer":  # clearing house: reconciliation and settlement
        assert [r.verdict for r in net.ch.reconcile()] == ["matched"]
        settled = await net.ch.settle()
        assert settled == [
            {"cso": CSO, "csp": CSP, "sdrs": [done["sdr_id"]], "amount": done["cost"], "currency": "EUR"}
        ]
        for ep, other in ((net.cso, CSP), (net.csp, CSO)):
            row = ep.store.get("SELECT party, amount FROM settlements")
            assert tuple(row) == (other, done["cost"])
        assert await net.ch.settle() == []  # settled once


def test_r3_1_local_start_and_the_whole_session(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        net.csp.add_customer("04A1B2C3D4")
        await net.csp.distribute_tokens()  # the card's home is known from its list (R4-2): nobody else sees it
        answer = await net.cso.token_presented(EVSES[0], "04A1B2C3D4", "rfid")
        assert answer["auth_status"] == "accepted" and answer["result"] == "accepted"
        sid = answer["roaming_session_id"]
        assert sid.startswith("DE*CSP*S")
        assert net.operator.evses[EVSES[0]].session == sid
        expect_route(net, "AuthorizeRoaming", CSO, CSP, direct_in_mixed=True)
        await _charge(net, sid)

    run(tmp_path, mode, scenario)


def test_r3_2_remote_start_from_the_home_csp(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        answer = await net.csp.start_remote(EVSES[0], "APP-USER-1")
        assert answer["result"] == "accepted"
        sid = answer["roaming_session_id"]
        assert net.cso.session(sid)["how"] == "remote"
        again = await net.csp.start_remote(EVSES[0], "APP-USER-1", sid)  # idempotent by session id
        assert again["result"] == "accepted"
        assert net.cso.store.get("SELECT COUNT(*) FROM sessions")[0] == 1
        busy = await net.csp.start_remote(EVSES[0], "APP-USER-2")
        assert busy["result"] == "evse_occupied"
        expect_route(net, "RemoteStart", CSP, CSO, direct_in_mixed=True)
        await _charge(net, sid)

    run(tmp_path, mode, scenario)


def test_r3_2_a_remote_start_whose_answer_was_lost_on_the_last_hop_is_kept_and_billed(
    tmp_path: Path, mode: str
) -> None:
    """The CSO started it, but the answer was lost on the way back to the hop that sent it there
    (the home CSP directly, or the CH in clearing_house mode, which answers 504 `no_answer`,
    not 502 `unreachable`): the home keeps the session, its SDR is billed."""

    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        via_ch = net.cfgs["csp"].mode == "clearing_house"
        lose_answer(net.ch if via_ch else net.csp, CSO, "RemoteStart")
        with pytest.raises((RoamingError, MaybeDelivered)) as e:
            await net.csp.start_remote(EVSES[0], "APP-LOST-1", "DE*CSP*SLOST0001")
        if via_ch:
            assert isinstance(e.value, RoamingError) and (e.value.status, e.value.cause) == (504, "no_answer")
        assert net.csp.session("DE*CSP*SLOST0001")["state"] == "active"
        assert net.cso.session("DE*CSP*SLOST0001")["how"] == "remote"
        net.clock.advance(60)
        done = await net.cso.session_ended("DE*CSP*SLOST0001", 3000)
        assert net.csp.store.get("SELECT verdict FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0] == "matched"

    run(tmp_path, mode, scenario)


def test_r3_2_a_start_the_operator_did_not_confirm_in_time_is_kept_at_both_ends_and_billed(
    tmp_path: Path, mode: str
) -> None:
    """The operator's command timed out (CommandResult `timeout`) but the charge began: the CSO
    records the session like an accepted one, so the home's `active` session is one the CSO
    knows, and its SDR is billed."""

    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        real = net.operator.start

        async def late(evse_gid: str, token_uid: str, session_id: str) -> str:
            await real(evse_gid, token_uid, session_id)  # the EVSE starts after the operator stopped waiting
            return "timeout"

        net.operator.start = late  # type: ignore[method-assign]
        answer = await net.csp.start_remote(EVSES[0], "APP-LATE-1")
        assert answer["result"] == "timeout"
        sid = answer["roaming_session_id"]
        assert net.csp.session(sid)["state"] == "active" and net.cso.session(sid)["state"] == "active"
        net.clock.advance(60)
        done = await net.cso.session_ended(sid, 2000)
        assert net.csp.store.get("SELECT verdict FROM sdrs WHERE sdr_id=?", done["sdr_id"])[0] == "matched"

    run(tmp_path, mode, scenario)


def test_r3_2_a_remote_start_that_failed_before_anything_was_sent_keeps_no_session(tmp_path: Path, mode: str) -> None:
    """A body the schema refuses, or a login that gets no answer: nothing reached the CSO, so
    the home keeps no `active` session that no CSO knows."""

    async def scenario(net: Net) -> None:
        before = net.csp.store.snapshot()
        with pytest.raises(BodyError):
            await net.csp.start_remote(EVSES[0], "X" * 65, "DE*CSP*SBODY0001")
        assert net.csp.store.snapshot() == before
        client = net.csp.client(net.csp.hop("RemoteStart", CSO))

        async def no_login() -> str:
            raise H3Error("no answer to PlatformLogin within its timeout")

        client.login = no_login  # type: ignore[method-assign]
        with pytest.raises(H3Error):
            await net.csp.start_remote(EVSES[0], "APP-NOLOGIN", "DE*CSP*SLOGIN001")
        assert net.csp.store.snapshot() == before

    run(tmp_path, mode, scenario)


def test_r3_3_plug_and_charge(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04FFEE", contract_id="DE*CSP*CABC123-4")
        answer = await net.cso.token_presented(EVSES[1], "DE*CSP*CABC123-4", "iso15118")
        assert answer["auth_status"] == "accepted" and answer["contract_id"] == "DE*CSP*CABC123-4"
        assert net.operator.evses[EVSES[1]].status == "occupied"
        unknown = await net.cso.token_presented(EVSES[0], "DE*CSP*CNOPE", "iso15118")
        assert unknown["auth_status"] == "unknown"

    run(tmp_path, mode, scenario)


def test_r3_8_reservation(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        expiry = int(net.clock()) + 900
        assert (await net.csp.reserve(EVSES[1], "04A1", expiry, 42))["result"] == "accepted"
        assert net.operator.evses[EVSES[1]].status == "reserved"
        assert (await net.csp.reserve(EVSES[1], "04A1", expiry, 42))["result"] == "accepted"  # repeated
        assert (await net.csp.reserve(EVSES[1], "04B2", expiry, 43))["result"] == "evse_occupied"
        assert net.cso.store.get("SELECT COUNT(*) FROM reservations")[0] == 1

    run(tmp_path, mode, scenario)


def test_r4_1_online_identification_answers_per_token(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("BLOCKED1", status="blocked")
        net.csp.add_customer("OLD1", expiry=int(net.clock()) - 1)
        net.csp.add_customer("LATER1")
        await net.csp.distribute_tokens()
        net.csp.add_customer("LATER1", status="blocked")  # after the list: only the online answer knows
        assert (await net.cso.token_presented(EVSES[0], "BLOCKED1"))["auth_status"] == "blocked"
        assert (await net.cso.token_presented(EVSES[0], "OLD1"))["auth_status"] == "expired"
        assert (await net.cso.token_presented(EVSES[0], "LATER1"))["auth_status"] == "blocked"
        asked = len(routed(net, "AuthorizeRoaming"))
        assert (await net.cso.token_presented(EVSES[0], "STRANGER"))["auth_status"] == "unknown"
        assert len(routed(net, "AuthorizeRoaming")) == asked  # the CH passed the unknown card to no CSP
        assert "STRANGER" not in json.dumps(net.csp.store.snapshot())
        assert net.operator.evses[EVSES[0]].status == "available"
        assert net.cso.store.get("SELECT COUNT(*) FROM sessions")[0] == 0

    run(tmp_path, mode, scenario)


def test_r4_2_token_list_authorizes_offline(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04CAFE01")
        net.csp.add_customer("04BAD002", status="blocked")
        await net.csp.distribute_tokens()
        rows = net.cso.store.all("SELECT token_uid, party, auth_status FROM token_cache ORDER BY token_uid")
        assert [tuple(r) for r in rows] == [("04BAD002", CSP, "blocked"), ("04CAFE01", CSP, "accepted")]
        await net.csp.stop()  # the home CSP is offline now
        answer = await net.cso.token_presented(EVSES[0], "04CAFE01")
        assert answer["auth_status"] == "accepted" and answer["roaming_session_id"].startswith("DE*CSO*S")
        assert net.cso.session(answer["roaming_session_id"])["csp"] == CSP
        assert (await net.cso.token_presented(EVSES[1], "04BAD002"))["auth_status"] == "blocked"

    run(tmp_path, mode, scenario)


def test_r5_2_r5_3_emergency_unlock(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        sid = (await net.csp.start_remote(EVSES[0], "APP-USER-1"))["roaming_session_id"]
        assert (await net.csp.unlock(EVSES[0], sid, "cable stuck"))["result"] == "accepted"  # R5-2
        assert (await net.csp.unlock(EVSES[1], None, "activation failed"))["result"] == "accepted"  # R5-3
        assert net.operator.evses[EVSES[0]].unlocked == 1 and net.operator.evses[EVSES[1]].unlocked == 1
        # the unlocked session is over at both ends (it stayed active before)
        assert (net.cso.session(sid)["state"], net.csp.session(sid)["state"]) == ("stopping", "unlocked")

    run(tmp_path, mode, scenario)


def test_m10_delete_user_data_follows_the_data(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        net.csp.add_customer("04DE1E7E")
        await net.csp.distribute_tokens()
        sid = (await net.cso.token_presented(EVSES[0], "04DE1E7E"))["roaming_session_id"]
        await net.cso.session_progress(sid, 1000, 7000)
        await net.cso.session_ended(sid, 1000)
        count = await net.csp.delete_user("04DE1E7E")
        assert count >= 3
        assert net.cso.store.get("SELECT token_uid FROM sessions WHERE session_id=?", sid)[0] is None
        assert net.cso.store.get("SELECT COUNT(*) FROM token_cache")[0] == 0
        assert net.csp.store.get("SELECT COUNT(*) FROM customers")[0] == 0
        assert "04DE1E7E" not in json.dumps(net.csp.store.snapshot())
        assert "04DE1E7E" not in json.dumps(net.cso.store.snapshot())
        assert "04DE1E7E" not in json.dumps(net.ch.store.snapshot())
        assert CH != CSO

    run(tmp_path, mode, scenario)


def test_retention_purges_personal_data(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04AGED01")
        await net.csp.distribute_tokens()
        sid = (await net.cso.token_presented(EVSES[0], "04AGED01"))["roaming_session_id"]
        assert net.cso.purge() == 0
        net.clock.advance(net.cfgs["cso"].retention_s + 1)
        assert net.cso.purge() >= 1 and net.csp.purge() >= 1
        assert net.cso.session(sid)["token_uid"] is None and net.csp.session(sid)["token_uid"] is None
        assert net.csp.store.get("SELECT COUNT(*) FROM customers")[0] == 1  # a customer is not a record to purge

    run(tmp_path, mode, scenario)

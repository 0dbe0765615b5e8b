"""OCPP 2.0.1 northbound (issue #17) on the real site: real MicroPython boards, the real gateway
with its `[ocpp]` section, against a CSMS built on the `ocpp` library with its JSON-schema
validation on in both directions (tests/scenarios/ocpp_csms.py). Proves, as OCPP use cases:
B01–B03 / M13 (BootNotification: Accepted and Rejected are what the board obeys), G01
(StatusNotification), C01/C10 (Authorize, the Authorization Cache), E01–E07 / S3 / S6
(TransactionEvent Started/Updated/Ended with continuous seqNo and the board's own ids), F01/F03
/ S3 (RequestStart/StopTransaction from the CSMS), A04 (SecurityEventNotification), D01/D02
(SendLocalList, GetLocalListVersion),
the offline behaviour (E04: queued TransactionEvents delivered afterwards in order, exactly once,
offline=true, seqNo continuous, across a gateway restart), and OCPP-J CALLERRORs for bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ocpp.v201 import call
from ocpp_csms import OcppCsms
from ocpp_site import ocpp_scenario
from realsite import Invariants

from tools.site.harness import Site, board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)
DEV = "ev-0000"


def tx_events(csms: OcppCsms, tx: str | None = None) -> list[dict[str, Any]]:
    evs = csms.of(DEV, "TransactionEvent")
    return [e for e in evs if tx is None or e["transactionInfo"]["transactionId"] == tx]


async def ended(csms: OcppCsms, tx: str) -> list[dict[str, Any]]:
    """The transaction's events once its Ended event is in."""
    await until(lambda: any(e["eventType"] == "Ended" for e in tx_events(csms, tx)), 20, f"tx {tx} ended at the CSMS")
    return tx_events(csms, tx)


def assert_sequence(evs: list[dict[str, Any]]) -> None:
    """One transaction's events: Started first, Ended last, seqNo 0, 1, 2, … (none lost, none twice)."""
    assert [e["seqNo"] for e in evs] == list(range(len(evs))), [e["seqNo"] for e in evs]
    assert evs[0]["eventType"] == "Started" and evs[-1]["eventType"] == "Ended"
    assert all(e["eventType"] == "Updated" for e in evs[1:-1])


# ---------------------------------------------------------------- boot, status, authorize, transaction


def test_ocpp_m13_boot_status_authorize_and_a_session_with_continuous_seqno(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        (boot,) = csms.of(DEV, "BootNotification")[:1]
        cs = boot["chargingStation"]
        assert cs["model"] and cs["vendorName"] and cs["firmwareVersion"], boot  # from the board
        assert (await board_wait(b, "registration"))["status"] == 0  # the CSMS's Accepted, obeyed
        await until(lambda: csms.of(DEV, "StatusNotification"), 10, "a StatusNotification")
        csms.tokens["04OCPP"] = "Accepted"  # known to the OCPP CSMS only
        m = b.mark()
        b.cmd("card", token="04OCPP")
        assert (await board_wait(b, "auth", since=m))["status"] == 0
        assert csms.of(DEV, "Authorize")[-1]["idToken"]["idToken"] == "04OCPP"
        b.cmd("plug")
        tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 300_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        evs = await ended(csms, tx)
        assert_sequence(evs)
        assert evs[0]["idToken"]["idToken"] == "04OCPP"
        assert not any(e.get("offline") for e in evs)  # all sent while connected
        energy = [v for v in evs[-1]["meterValue"][0]["sampledValue"] if v["measurand"].startswith("Energy.Active.Im")]
        assert energy and energy[0]["value"] > 0
        # a token the CSMS refuses is refused at the board, and cached as such (C10)
        csms.tokens["04BAD"] = "Blocked"
        m = b.mark()
        b.cmd("card", token="04BAD")
        assert (await board_wait(b, "auth", since=m))["status"] != 0

    ocpp_scenario(tmp_path, fn)


def test_ocpp_m13_a_board_the_csms_rejected_is_told_rejected(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        assert (await board_wait(b, "registration"))["status"] == 2
        assert site.gw is not None and site.gw.ocpp is not None
        assert site.gw.ocpp.stations[DEV].state == "rejected"
        await site.gw.stop()  # the decision is kept: answered so while the CSMS is away
        await csms.stop()
        m = b.mark()
        await site.start_gateway()
        assert (await board_wait(b, "registration", since=m, timeout=30))["status"] == 2

    ocpp_scenario(tmp_path, fn, csms=OcppCsms(boot_status={DEV: "Rejected"}))


# ---------------------------------------------------------------- remote start and stop (F01, F03, S3)


def test_ocpp_s3_remote_start_then_remote_stop_from_the_csms(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        res = await csms.call(DEV, call.RequestStartTransaction(id_token={"id_token": "APP-7", "type": "Central"},
                                                                remote_start_id=77, evse_id=1))  # fmt: skip
        assert res.status == "Accepted", res
        b.cmd("plug")
        tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
        await board_status(b, lambda st: st["power_w"] > 0)
        started = tx_events(csms, tx)
        await until(lambda: tx_events(csms, tx), 10, "the Started event")
        started = tx_events(csms, tx)
        assert started[0]["transactionInfo"].get("remoteStartId") == 77, started[0]
        res = await csms.call(DEV, call.RequestStopTransaction(transaction_id=tx))
        assert res.status == "Accepted", res
        await board_status(b, lambda st: st["power_w"] == 0 and not st["contactor"])
        evs = await ended(csms, tx)
        assert evs[-1]["transactionInfo"]["stoppedReason"] == "Remote"
        assert_sequence(evs)
        b.cmd("unplug")
        # a stop for a transaction the board does not run is refused, not passed on blindly
        res = await csms.call(DEV, call.RequestStopTransaction(transaction_id="424242"))
        assert res.status == "Rejected"

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- offline (E04, D01, C10)


def test_ocpp_offline_session_is_delivered_afterwards_in_order_exactly_once_across_a_gateway_restart(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        # D01: the CSMS hands the site its local list while online
        entry = {"id_token": {"id_token": "04LOCAL", "type": "ISO14443"}, "id_token_info": {"status": "Accepted"}}
        res = await csms.call(
            DEV, call.SendLocalList(version_number=3, update_type="Full", local_authorization_list=[entry])
        )
        assert res.status == "Accepted"
        assert (await csms.call(DEV, call.GetLocalListVersion())).version_number == 3
        await csms.stop()  # the CSMS is unreachable from here on
        assert site.gw is not None and site.gw.ocpp is not None
        await until(lambda: site.gw is not None and site.gw.ocpp is not None
                    and site.gw.ocpp.stations[DEV].state != "accepted", 10, "the station cut off")  # fmt: skip
        n_before = len(tx_events(csms))
        m = b.mark()
        b.cmd("card", token="04LOCAL")
        assert (await board_wait(b, "auth", since=m))["status"] == 0  # the local list, offline
        b.cmd("plug")
        tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
        await board_status(b, lambda st: st["power_w"] > 0)
        await board_step(b, 120_000)
        # the gateway goes down and comes back during the outage: the outbox keeps the events
        await site.gw.stop()
        await site.start_gateway()
        await until(lambda: site.gw is not None and len(site.gw.online) == 1, 20, "board back online")
        await board_step(b, 120_000)
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)
        assert len(tx_events(csms)) == n_before  # nothing reached the CSMS while it was away
        await csms.start()  # back, on the same port
        evs = await ended(csms, tx)
        assert_sequence(evs)  # in order, none lost, none twice
        assert all(e.get("offline") is True for e in evs), [e.get("offline") for e in evs]
        assert evs[0]["idToken"]["idToken"] == "04LOCAL"  # kept across the restart

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- bad input from the CSMS


def test_ocpp_bad_input_from_the_csms_gets_the_named_callerror_and_never_reaches_a_board(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        m = b.mark()
        cases = [
            ("not json at all", "RpcFrameworkError"),
            (json.dumps([2, "b1", "NoSuchAction", {}]), "NotImplemented"),
            (json.dumps([2, "b2", "GetTransactionStatus", {}]), "NotSupported"),
            (json.dumps([2, "b3", "RequestStopTransaction", {}]), "OccurrenceConstraintViolation"),
            (json.dumps([2, "b4", "RequestStopTransaction", {"transactionId": 5}]), "TypeConstraintViolation"),
            (json.dumps([2, "b5", "Reset", {"type": "Sometime"}]), "FormatViolation"),
            (json.dumps([2, "b6", "Reset", {"type": "Immediate", "extra": 1}]), "FormatViolation"),
            (json.dumps([7, "b7", "Reset", {}]), "MessageTypeNotSupported"),
            (json.dumps([2, "b8", "DataTransfer", {"vendorId": "x", "data": "y" * 70_000}]), "FormatViolation"),
        ]
        for text, code in cases:
            answer = await csms.raw(DEV, text)
            assert answer[0] == 4 and answer[2] == code, (text[:60], answer)
        # and the station still works: a good call after them reaches the board
        res = await csms.call(DEV, call.ChangeAvailability(operational_status="Operative", evse={"id": 1}))
        assert res.status == "Accepted"
        # nothing before it reached the board: the one command it was asked is that one
        await board_status(b)
        got = [e for e in b.events[m:] if e["ev"] == "command"]
        assert len(got) == 1, got

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- management from the CSMS


def test_ocpp_e1_charging_profile_from_the_csms_limits_the_board_and_is_composited(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        csms.tokens["04SCP"] = "Accepted"
        m = b.mark()
        b.cmd("card", token="04SCP")
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 5000)
        period = {"start_period": 0, "limit": 4000}
        schedule = {"id": 1, "charging_rate_unit": "W", "charging_schedule_period": [period]}
        profile = {
            "id": 5,
            "stack_level": 0,
            "charging_profile_purpose": "TxDefaultProfile",
            "charging_profile_kind": "Absolute",
            "charging_schedule": [schedule],
        }
        res = await csms.call(DEV, call.SetChargingProfile(evse_id=1, charging_profile=profile))
        assert res.status == "Accepted", res
        inv.limit(4000, [DEV], what="OCPP TxDefaultProfile")
        await board_status(b, lambda st: 0 < st["power_w"] <= 4000)
        comp = await csms.call(DEV, call.GetCompositeSchedule(duration=3600, evse_id=1, charging_rate_unit="W"))
        assert comp.status == "Accepted", comp
        assert comp.schedule["charging_schedule_period"][0]["limit"] <= 4000
        res = await csms.call(DEV, call.ClearChargingProfile(charging_profile_id=5))
        assert res.status == "Accepted", res
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)

    ocpp_scenario(tmp_path, fn)


def test_ocpp_m1_m2_m3_m5_device_model_trigger_availability_display_and_reset(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        var = {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}
        got = await csms.call(DEV, call.GetVariables(get_variable_data=[var]))
        # a variable the board does not have is named so (the board's device model, M1)
        assert got.get_variable_result[0]["attribute_status"] == "UnknownVariable"
        n = len(csms.of(DEV, "StatusNotification"))
        res = await csms.call(DEV, call.TriggerMessage(requested_message="StatusNotification", evse={"id": 1}))
        assert res.status == "Accepted", res
        await until(lambda: len(csms.of(DEV, "StatusNotification")) > n, 10, "the triggered StatusNotification")
        res = await csms.call(DEV, call.ChangeAvailability(operational_status="Inoperative", evse={"id": 1}))
        assert res.status in ("Accepted", "Scheduled"), res
        await until(lambda: any(s["connectorStatus"] == "Unavailable" for s in csms.of(DEV, "StatusNotification")),
                    10, "Unavailable at the CSMS")  # fmt: skip
        res = await csms.call(DEV, call.ChangeAvailability(operational_status="Operative", evse={"id": 1}))
        assert res.status in ("Accepted", "Scheduled"), res
        msg = {"id": 9, "priority": "InFront", "message": {"format": "UTF8", "content": "Hallo", "language": "de"}}
        res = await csms.call(DEV, call.SetDisplayMessage(message=msg))
        assert res.status == "Accepted", res
        res = await csms.call(DEV, call.ClearDisplayMessage(id=9))
        assert res.status == "Accepted", res
        res = await csms.call(DEV, call.UnlockConnector(evse_id=1, connector_id=1))
        assert res.status == "Unlocked", res
        boots = len(csms.of(DEV, "BootNotification"))
        m = b.mark()
        res = await csms.call(DEV, call.Reset(type="Immediate"))
        assert res.status in ("Accepted", "Scheduled"), res
        assert (await board_wait(b, "exit", since=m, timeout=20))["rc"] == 3  # OCPP's Reset reboots the board
        m = b.mark()
        b.start()  # powering up again
        assert (await board_wait(b, "registration", since=m))["status"] == 0  # the CSMS accepted it again
        assert len(csms.of(DEV, "BootNotification")) > boots
        assert csms.of(DEV, "BootNotification")[-1]["reason"] == "RemoteReset"
        # A04 / M8: the reset is a security event, told to the CSMS
        await until(lambda: any(e["type"] == "ResetOrReboot" for e in csms.of(DEV, "SecurityEventNotification")),
                    10, "SecurityEventNotification ResetOrReboot")  # fmt: skip

    ocpp_scenario(tmp_path, fn)

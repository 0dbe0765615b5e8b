"""OCPP 2.0.1 northbound (issue #17), the CSMS's management calls on the real site: real boards,
the real gateway, the `ocpp` library's CSMS with validation on (tests/scenarios/ocpp_csms.py).
Proves, as OCPP use cases: H01–H04 / S1 (ReserveNow, CancelReservation, ReservationStatusUpdate:
held for its token, Occupied for another, cancelled, expired), I02 / S4 (CostUpdated shown at the
board), P01 (DataTransfer), B07 / M1 (GetBaseReport → NotifyReport), N04–N07 / M3
(SetVariableMonitoring → NotifyEvent, ClearVariableMonitoring), O01–O04 / M6 (GetDisplayMessages
→ NotifyDisplayMessages), C11 / S2 (ClearCache), L01 / N01 / M4 M7 (FirmwareStatusNotification and
LogStatusNotification on TriggerMessage)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from ocpp.v201 import call
from ocpp_csms import OcppCsms
from ocpp_site import ocpp_scenario
from realsite import Invariants

from tools.board import Board
from tools.site.harness import Site, board_status, board_step, board_wait, until

pytestmark = pytest.mark.timeout(120)
DEV = "ev-0000"


def iso_in(seconds: float) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def card(b: Board, token: str) -> dict[str, Any]:
    """The driver presents `token`: the board's decision (its `auth` note)."""
    m = b.mark()
    b.cmd("card", token=token)
    return await board_wait(b, "auth", since=m)


async def charge(b: Board, token: str) -> str:
    """Card, plug, the EV draws: the transaction id."""
    m = b.mark()
    assert (await card(b, token))["status"] == 0
    b.cmd("plug")
    tx = str((await board_wait(b, "tx_started", since=m))["tx_id"])
    await board_status(b, lambda st: st["power_w"] > 0)
    return tx


async def unplug(b: Board) -> None:
    m = b.mark()
    b.cmd("unplug")
    await board_wait(b, "tx_ended", since=m)


def updates(csms: OcppCsms, rid: int) -> list[str]:
    return [u["reservationUpdateStatus"] for u in csms.of(DEV, "ReservationStatusUpdate") if u["reservationId"] == rid]


# ---------------------------------------------------------------- S1 reservations (H01–H04)


def test_ocpp_s1_reserve_now_holds_the_evse_for_its_token_and_cancel_and_expiry_free_it(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        for tok in ("RES-OWNER", "RES-OTHER", "WALK-IN"):
            csms.tokens[tok] = "Accepted"

        async def reserve(rid: int, token: str, in_s: float = 600) -> str:
            res = await csms.call(DEV, call.ReserveNow(id=rid, expiry_date_time=iso_in(in_s), evse_id=1,
                                                       id_token={"id_token": token, "type": "ISO14443"}))  # fmt: skip
            return str(res.status)

        assert await reserve(11, "RES-OWNER") == "Accepted"
        await until(lambda: any(s["connectorStatus"] == "Reserved" for s in csms.of(DEV, "StatusNotification")),
                    10, "Reserved at the CSMS")  # fmt: skip
        assert (await card(b, "RES-OTHER"))["status"] == "reserved"  # another driver is turned away
        assert await reserve(12, "RES-OTHER") == "Occupied"  # H01: the EVSE is reserved already
        tx = await charge(b, "RES-OWNER")  # the holder comes: the reservation is used
        started = await until(lambda: [e for e in csms.of(DEV, "TransactionEvent")
                                       if e["transactionInfo"]["transactionId"] == tx], 10, "Started")  # fmt: skip
        assert started[0]["reservationId"] == 11, started[0]
        await unplug(b)
        # H02: cancelled by the CSMS: removed, the EVSE free, a second cancel refused
        assert await reserve(13, "RES-GONE") == "Accepted"
        res = await csms.call(DEV, call.CancelReservation(reservation_id=13))
        assert res.status == "Accepted", res
        await until(lambda: updates(csms, 13) == ["Removed"], 10, "ReservationStatusUpdate Removed")
        assert (await csms.call(DEV, call.CancelReservation(reservation_id=13))).status == "Rejected"
        # H04: the holder never comes: expired, reported, the EVSE free for a walk-in driver
        assert await reserve(14, "RES-LATE", in_s=60) == "Accepted"
        assert (await card(b, "WALK-IN"))["status"] == "reserved"
        await board_step(b, 120_000)
        await until(lambda: updates(csms, 14) == ["Expired"], 10, "ReservationStatusUpdate Expired")
        assert (await card(b, "WALK-IN"))["status"] == 0

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- S4 running cost (I02), DataTransfer (P01)


def test_ocpp_s4_cost_updated_is_shown_at_the_board_and_data_transfer_names_the_unknown_vendor(
    tmp_path: Path,
) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        csms.tokens["COST-1"] = "Accepted"
        tx = await charge(b, "COST-1")
        res = await csms.call(DEV, call.CostUpdated(total_cost=3.21, transaction_id=tx))
        assert res is not None
        await board_status(b, lambda st: "3.21" in st["text"])  # what the driver reads
        # a cost for a transaction the board does not run changes nothing it shows
        await csms.call(DEV, call.CostUpdated(total_cost=9.99, transaction_id="424242"))
        assert "9.99" not in (await board_status(b))["text"]
        await unplug(b)
        # P01: the boards carry no vendor extension: the CSMS is told the vendor is unknown
        m = b.mark()
        res = await csms.call(DEV, call.DataTransfer(vendor_id="com.example.ext", message_id="Ping", data="x"))
        assert res.status == "UnknownVendorId", res
        assert any(e["ev"] == "command" for e in b.events[m:])  # asked of the board, not guessed

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- M1 base report (B07)


def test_ocpp_m1_get_base_report_arrives_as_notify_report(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        res = await csms.call(DEV, call.GetBaseReport(request_id=41, report_base="FullInventory"))
        assert res.status == "Accepted", res

        def parts() -> list[dict[str, Any]]:
            return [r for r in csms.of(DEV, "NotifyReport") if r["requestId"] == 41]

        await until(lambda: parts() and not parts()[-1].get("tbc"), 15, "the report's last part")
        assert [r["seqNo"] for r in parts()] == list(range(len(parts())))
        data = [d for r in parts() for d in r.get("reportData", ())]
        names = {(d["component"]["name"], d["variable"]["name"]): d["variableAttribute"][0].get("value") for d in data}
        boot = csms.of(DEV, "BootNotification")[-1]["chargingStation"]
        assert names[("ChargingStation", "Model")] == boot["model"]  # the board's own model
        assert ("TxCtrlr", "EVConnectionTimeOut") in names

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- M3 monitoring (N04–N07)


def test_ocpp_m3_variable_monitoring_fires_notify_event_and_is_cleared(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        csms.tokens["MON-1"] = "Accepted"

        def mon(comp: str, var: str, kind: str, value: float) -> dict[str, Any]:
            return {"value": value, "type": kind, "severity": 4, "component": {"name": comp},
                    "variable": {"name": var}}  # fmt: skip

        data = [mon("EVSE", "Power", "UpperThreshold", 5000), mon("ChargingStation", "Colour", "Delta", 1),
                mon("Blender", "Speed", "UpperThreshold", 1), mon("EVSE", "Energy", "Delta", 0)]  # fmt: skip
        res = await csms.call(DEV, call.SetVariableMonitoring(set_monitoring_data=data))
        got = [r["status"] for r in res.set_monitoring_result]
        assert got == ["Accepted", "UnknownVariable", "UnknownComponent", "Rejected"], res
        mid = res.set_monitoring_result[0]["id"]  # numbered by the station (N04: no id given)
        await charge(b, "MON-1")  # the EV draws 11 kW: above the monitor's 5 kW
        ev = await until(lambda: [d for e in csms.of(DEV, "NotifyEvent") for d in e["eventData"]
                                  if d["variableMonitoringId"] == mid], 15, "NotifyEvent")  # fmt: skip
        assert ev[0]["component"]["name"] == "EVSE" and ev[0]["variable"]["name"] == "Power"
        assert float(ev[0]["actualValue"]) > 5000
        res = await csms.call(DEV, call.ClearVariableMonitoring(id=[mid, 4242]))
        assert [(r["id"], r["status"]) for r in res.clear_monitoring_result] == [(mid, "Accepted"), (4242, "NotFound")]
        await unplug(b)

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- M6 display messages (O01–O04)


def test_ocpp_m6_get_display_messages_tells_the_messages_in_force(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        front = {
            "id": 5,
            "priority": "InFront",
            "message": {"format": "UTF8", "content": "Willkommen", "language": "de"},
        }
        cycle = {"id": 6, "priority": "NormalCycle", "message": {"format": "UTF8", "content": "Tarif 0.30"},
                 "endDateTime": iso_in(3600)}  # fmt: skip
        for m in (front, cycle):
            assert (await csms.call(DEV, call.SetDisplayMessage(message=m))).status == "Accepted"
        await board_status(b, lambda st: st["text"] == "Willkommen")  # the front one is shown

        async def asked(request_id: int, **filters: Any) -> tuple[str, list[int]]:
            res = await csms.call(DEV, call.GetDisplayMessages(request_id=request_id, **filters))
            if res.status != "Accepted":
                return str(res.status), []
            got = await until(lambda: [n for n in csms.of(DEV, "NotifyDisplayMessages")
                                       if n["requestId"] == request_id], 10, "NotifyDisplayMessages")  # fmt: skip
            return "Accepted", sorted(m["id"] for n in got for m in n["messageInfo"])

        assert await asked(1) == ("Accepted", [5, 6])
        assert await asked(2, priority="NormalCycle") == ("Accepted", [6])
        info = [m for n in csms.of(DEV, "NotifyDisplayMessages") if n["requestId"] == 1 for m in n["messageInfo"]]
        assert {m["id"]: m["message"]["content"] for m in info} == {5: "Willkommen", 6: "Tarif 0.30"}
        assert (await csms.call(DEV, call.ClearDisplayMessage(id=5))).status == "Accepted"
        assert await asked(3, id=[5]) == ("Unknown", [])
        await board_status(b, lambda st: st["text"] == "Tarif 0.30")

    ocpp_scenario(tmp_path, fn)


# ---------------------------------------------------------------- S2 ClearCache (C11)


def test_ocpp_s2_clear_cache_makes_the_site_ask_the_csms_again(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        b = site.boards[0]
        csms.tokens["CC-1"] = "Accepted"
        assert (await card(b, "CC-1"))["status"] == 0
        assert len(csms.of(DEV, "Authorize")) == 1
        csms.tokens["CC-1"] = "Blocked"  # blocked at the CSMS: the site trusts its cache (operator's window)
        assert (await card(b, "CC-1"))["status"] == 0
        assert len(csms.of(DEV, "Authorize")) == 1
        assert (await csms.call(DEV, call.ClearCache())).status == "Accepted"
        assert (await card(b, "CC-1"))["status"] != 0  # asked again: refused
        assert len(csms.of(DEV, "Authorize")) == 2

    ocpp_scenario(tmp_path, fn, gateway_extra={"auth": {"online_trust_s": 3600.0}})


# ---------------------------------------------------------------- M4, M7 status notifications (L01, N01)


def test_ocpp_m4_m7_firmware_and_log_status_notifications_on_trigger(tmp_path: Path) -> None:
    async def fn(site: Site, csms: OcppCsms, inv: Invariants) -> None:
        for what, action in (("FirmwareStatusNotification", "FirmwareStatusNotification"),
                             ("LogStatusNotification", "LogStatusNotification")):  # fmt: skip
            res = await csms.call(DEV, call.TriggerMessage(requested_message=what))
            assert res.status == "Accepted", (what, res)
            got = await until(lambda a=action: csms.of(DEV, a), 10, action)  # type: ignore[misc]
            assert got[-1]["status"] == "Idle", got

    ocpp_scenario(tmp_path, fn)

"""gateway/ocpp sans I/O: the enum tables line up with the schema's enums, every translated
frame passes the OCPP 2.0.1 JSON schema (the `ocpp` library's validator), the retire gate
retires a row only once every northbound delivered it, and the `[ocpp]` section's checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ocpp.messages import Call, validate_payload

from gateway import config as gwconfig
from gateway.ocpp import down, up
from gateway.ocpp.bridge import read_password
from gateway.ocpp.ledger import Ledger, RetireGate
from gateway.schema import (
    AuthStatus,
    ChargingState,
    ConnectorStatus,
    FirmwareStatus,
    Key,
    LogStatus,
    Measurand,
    ReservationStatus,
    Status,
    StopReason,
    TokenType,
    TxEvent,
    TxTrigger,
)


def valid(action: str, payload: dict[str, Any]) -> None:
    asyncio.run(validate_payload(Call("1", action, payload), "2.0.1"))


def test_tables_follow_the_schema_enums() -> None:
    for table, enum in ((up.TX_EVENT, TxEvent), (up.TRIGGER, TxTrigger), (up.CHARGING_STATE, ChargingState),
                        (up.CONNECTOR_STATUS, ConnectorStatus), (up.STOP_REASON, StopReason),
                        (up.TOKEN_TYPE, TokenType), (up.AUTH_STATUS, AuthStatus),
                        (up.FIRMWARE_STATUS, FirmwareStatus), (up.LOG_STATUS, LogStatus),
                        (up.RESERVATION_STATUS, ReservationStatus), (up.MEASURAND, Measurand),
                        (down.STATUS, Status)):  # fmt: skip
        assert len(table) == len(enum), enum


@pytest.mark.parametrize("ev", list(TxEvent))
def test_transaction_events_pass_the_schema(ev: TxEvent) -> None:
    body: dict[int, Any] = {
            Key.EVENT: ev, Key.TX_ID: 12, Key.SEQ_NO: 3, Key.TRIGGER: TxTrigger.TARIFF_CHANGED, Key.EVSE: 1,
            Key.ENERGY_WH: 1234, Key.ENERGY_OUT_WH: 5, Key.POWER_W: -3000, Key.TIME: 1000,
            Key.CHARGING_STATE: ChargingState.DISCHARGING, Key.STOP_REASON: StopReason.TIMEOUT,
            Key.REMOTE_START_ID: 9, Key.RESERVATION_ID: 4, Key.TOKEN_TYPE: TokenType.APP,
            Key.SAMPLES: [{Key.MEASURAND: Measurand.SOC, Key.VALUE: 50.0}]}  # fmt: skip
    got = up.event(78, body, 0, True, "04AB")
    assert got is not None
    action, p = got
    valid(action, p)
    assert p["seqNo"] == 3 and p["offline"] is True and p["transactionInfo"]["transactionId"] == "12"


def test_other_events_pass_the_schema_or_are_not_carried() -> None:
    from gateway.schema import Action

    cases: list[tuple[int, dict[int, Any]]] = [
        (Action.STATUS_NOTIFICATION, {Key.EVSE: 1, Key.STATE: ConnectorStatus.FAULTED}),
        (Action.METER_VALUES, {Key.EVSE: 1, Key.ENERGY_WH: 10, Key.CURRENT_MA: 16000, Key.VOLTAGE_DV: 2300}),
        (Action.FIRMWARE_STATUS, {Key.IMAGE_ID: 3, Key.FW_STATUS: FirmwareStatus.SIGNATURE_INVALID}),
        (Action.LOG_STATUS, {Key.REQUEST_ID: 3, Key.LOG_STATUS: LogStatus.UPLOADED}),
        (Action.SECURITY_EVENT, {Key.EVENT_NAME: "ResetOrReboot", Key.TIME: 5, Key.REASON: "hard"}),
        (Action.RESERVATION_UPDATE, {Key.RESERVATION_ID: 3, Key.RES_STATUS: ReservationStatus.EXPIRED}),
        (
            Action.MONITOR_EVENT,
            {
                Key.MONITOR_ID: 1,
                Key.COMPONENT: "EVSE",
                Key.VARIABLE: "Power",
                Key.VAL: "9",
                Key.SEVERITY: 2,
                Key.TIME: 1,
                Key.EVSE: 1,
            },
        ),
        (
            Action.NOTIFY_REPORT,
            {
                Key.REQUEST_ID: 1,
                Key.SEQ_NO: 0,
                Key.LAST: False,
                Key.VARS: [{Key.COMPONENT: "OCPPCommCtrlr", Key.VARIABLE: "X", Key.VAL: "1"}],
            },
        ),
    ]
    for action, body in cases:
        got = up.event(action, body, 0, False, None)
        assert got is not None, action
        valid(*got)
    assert up.event(Action.METER_VALUES, {Key.EVSE: 1}, 0, False, None) is None  # nothing to carry
    assert up.event(Action.SESSION_EVENT, {}, 0, False, None) is None  # no 2.0.1 equivalent


def test_boot_request_passes_the_schema_and_names_resets_as_ocpp_does() -> None:
    p = up.boot_request(up.BoardInfo("SIM-1", "evedge", "SIM0001", "1.0.0", "HardReset"))
    valid("BootNotification", p)
    assert p["reason"] == "RemoteReset"


def test_calls_become_board_requests_and_unfit_ones_are_answered_here() -> None:
    cmd = down.command("RequestStopTransaction", {"transactionId": "17"})
    assert cmd.body == {Key.TX_ID: 17}
    assert cmd.answer({Key.STATUS: Status.ACCEPTED}) == {"status": "Accepted"}
    with pytest.raises(down.Unfit):
        down.command("RequestStopTransaction", {"transactionId": "not-ours"})
    prof = {"evseId": 1, "chargingProfile": {"id": 1, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute", "chargingSchedule": [{"id": 1, "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16, "numberPhases": 1}]}]}}  # fmt: skip
    assert down.command("SetChargingProfile", prof).body[Key.PERIODS][0][Key.LIMIT_W] == 16 * 230
    with pytest.raises(KeyError):
        down.command("UpdateFirmware", {})


def test_the_gate_retires_a_row_once_every_northbound_delivered_it() -> None:
    both = RetireGate({"ocpp", "native"})
    assert both.delivered("native", [1, 2]) == []
    assert both.delivered("ocpp", [2, 3]) == [2]
    assert both.delivered("native", [3]) == [3]
    assert both.waiting == 1
    assert RetireGate({"ocpp"}).delivered("ocpp", [5]) == [5]


def test_the_ledger_keeps_cursors_stations_and_tokens(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "o.sqlite")
    led.save_station("ev-1", up.BoardInfo("m", "v", "s", "f"), 0)
    led.save_tokens([(7, "ev-1", "04AB")])
    led.delivered("ev-1", 6)
    assert led.token(7) == "04AB"
    led.delivered("ev-1", 7)
    led.close()
    again = Ledger(tmp_path / "o.sqlite")
    assert again.cursors == {"ev-1": 7} and again.token(7) is None
    assert again.stations()["ev-1"][1] == 0


def test_ocpp_section_checks(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x" * 20)
    pw.chmod(0o644)
    with pytest.raises(gwconfig.ConfigError, match="readable by others"):
        read_password(pw)
    pw.chmod(0o600)
    assert read_password(pw) == "x" * 20
    with pytest.raises(gwconfig.ConfigError, match=r"ocpp\.url"):
        gwconfig.parse({"ocpp": {"url": "http://x"}})
    with pytest.raises(gwconfig.ConfigError, match="password_file"):
        gwconfig.parse({"ocpp": {"url": "ws://x/ocpp"}})
    with pytest.raises(gwconfig.ConfigError, match="wants wss"):
        gwconfig.parse({"ocpp": {"url": "ws://x/ocpp", "security_profile": 3}})
    cfg = gwconfig.parse({"ocpp": {"url": "wss://x/ocpp", "security_profile": 3}})
    assert cfg.ocpp.enabled and not gwconfig.parse({}).ocpp.enabled


def test_monitors_number_new_ones_and_answer_what_no_board_can_hold() -> None:
    def d(comp: str, var: str, kind: str = "UpperThreshold", value: float = 7000, **kw: Any) -> dict[str, Any]:
        return {"component": {"name": comp}, "variable": {"name": var}, "type": kind, "value": value, "severity": 5,
                **kw}  # fmt: skip

    p = {"setMonitoringData": [d("EVSE", "Power"), d("EVSE", "Power", id=7), d("EVSE", "Colour"), d("Moon", "Phase"),
                               d("EVSE", "Energy", "Delta", 0), d("EVSE", "Power", transaction=True)]}  # fmt: skip
    ids = iter([100000])
    cmd, results = down.monitors(p, lambda: next(ids))
    assert [r["status"] for r in results] == ["Accepted", "Accepted", "UnknownVariable", "UnknownComponent",
                                              "Rejected", "Rejected"]  # fmt: skip
    assert cmd is not None and [m[Key.MONITOR_ID] for m in cmd.body[Key.MONITORS]] == [100000, 7]
    refused = cmd.answer({Key.STATUS: Status.REJECTED, Key.REASON: "full"})["setMonitoringResult"]
    assert [r["status"] for r in refused[:2]] == ["Rejected", "Rejected"]  # the board takes all or none
    assert down.monitors({"setMonitoringData": [d("Moon", "Phase")]}, lambda: 1)[0] is None
    assert down.clear_monitor(9).answer({Key.STATUS: Status.UNKNOWN}) == {"status": "NotFound", "id": 9}


def test_displays_matching_filters_by_id_priority_state_and_end() -> None:
    now = down.proto_time("2026-01-01T12:00:00Z")
    infos = [{"id": 1, "priority": "NormalCycle", "message": {"format": "UTF8", "content": "a"}},
             {"id": 2, "priority": "InFront", "state": "Charging", "message": {"format": "UTF8", "content": "b"}},
             {"id": 3, "priority": "InFront", "endDateTime": "2026-01-01T11:00:00Z",
              "message": {"format": "UTF8", "content": "gone"}}]  # fmt: skip
    assert [m["id"] for m in down.displays_matching(infos, {"requestId": 1}, now)] == [1, 2]
    assert [m["id"] for m in down.displays_matching(infos, {"requestId": 1, "id": [2, 3]}, now)] == [2]
    assert [m["id"] for m in down.displays_matching(infos, {"requestId": 1, "priority": "InFront"}, now)] == [2]
    assert down.displays_matching(infos, {"requestId": 1, "state": "Idle"}, now) == []


def test_monitor_ids_are_never_reused_across_restarts(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ocpp.sqlite")
    assert led.monitor_ids(2) == [100000, 100001]
    led.close()
    led = Ledger(tmp_path / "ocpp.sqlite")
    assert led.monitor_ids(1) == [100002]
    led.delivered_many({"ev-1": 5, "ev-2": 9})  # the group commit of several boards' cursors
    led.close()
    assert Ledger(tmp_path / "ocpp.sqlite").cursors == {"ev-1": 5, "ev-2": 9}

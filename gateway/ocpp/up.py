"""Board → CSMS: the site's frames as OCPP 2.0.1 payloads, sans I/O.

Rule: a translation is a pure function of the frame (and of what the gateway knew when it
accepted it: the id token in clear, whether the station was offline), so that a row
translated again after a restart gives the same payload. The board numbers a transaction's
events from 0 (`seq_no`, kept on its flash), so OCPP's seqNo is the board's and stays
continuous across a gateway kill or a board power cut; `transactionId` is the board's
`tx_id` in decimal (unique per board, and each board is a station of its own).

A frame OCPP 2.0.1 cannot carry gives None (docs/ocpp.md lists them): it is retired at once.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from gateway.schema import EPOCH_UNIX, Action, Key, Registration, TxEvent

Payload = dict[str, Any]

# Our enums in schema order → the OCPP 2.0.1 names (tests/test_ocpp_translate.py checks the lengths).
TX_EVENT = ("Started", "Updated", "Ended")
TRIGGER = ("Authorized", "CablePluggedIn", "ChargingStateChanged", "EVDeparted", "EnergyLimitReached",
           "MeterValuePeriodic", "RemoteStart", "RemoteStop", "StopAuthorized", "Deauthorized",
           "ChargingRateChanged",  # tariff_changed: OCPP 2.1's TariffChanged; 2.0.1 has no such reason
           "AbnormalCondition", "SignedDataReceived", "TimeLimitReached", "Trigger", "EVCommunicationLost")  # fmt: skip
CHARGING_STATE = ("Idle", "EVConnected", "Charging", "SuspendedEV", "SuspendedEVSE",
                  "Charging")  # discharging: 2.0.1 knows no discharge state (2.1 does, V2X)  # fmt: skip
CONNECTOR_STATUS = ("Available", "Occupied", "Reserved", "Unavailable", "Faulted")
STOP_REASON = ("Local", "Remote", "EVDisconnected", "PowerLoss", "EmergencyStop", "DeAuthorized",
               "EnergyLimitReached", "Reboot", "TimeLimitReached", "Other", "Timeout")  # fmt: skip
TOKEN_TYPE = ("ISO14443", "KeyCode", "Central", "Central", "eMAID", "Local", "Central", "NoAuthorization")
"""rfid, pin, qr, app, iso15118, local, central, no_auth (qr and app codes are issued centrally)."""
AUTH_STATUS = ("Accepted", "Blocked", "Expired", "Invalid", "NoCredit", "NotAllowedTypeEVSE",
               "NotAtThisLocation", "NotAtThisTime", "Unknown", "ConcurrentTx")  # fmt: skip
FIRMWARE_STATUS: tuple[str | None, ...] = (
    "Idle", "Downloading", "Downloaded", "DownloadFailed",
    None,  # verifying: 2.0.1 reports only the verdict
    "SignatureVerified", "InstallVerificationFailed", "InvalidSignature", "Installing", "Installed",
    "InstallationFailed",
    None,  # activated: the board runs the image it reported Installed
    "InstallationFailed",  # rolled_back: the new image did not come up
)  # fmt: skip
LOG_STATUS: tuple[str | None, ...] = ("Idle", None, "Uploading", "Uploaded", "UploadFailure", "PermissionDenied")
RESERVATION_STATUS: tuple[str | None, ...] = ("Expired", "Removed", None)  # used: told by the TransactionEvent
MEASURAND: tuple[tuple[str, str, float], ...] = (
    ("Energy.Active.Import.Register", "Wh", 1.0),
    ("Energy.Active.Export.Register", "Wh", 1.0),
    ("Power.Active.Import", "W", 1.0),
    ("Current.Import", "A", 0.001),
    ("Voltage", "V", 0.1),
    ("SoC", "Percent", 1.0),
    ("Frequency", "Hz", 0.001),
    ("Temperature", "Celsius", 0.1),
)
"""energy_import_wh … temperature_dc: OCPP's measurand, its unit, the factor from ours."""
BOOT_REASONS = frozenset({"ApplicationReset", "FirmwareUpdate", "LocalReset", "PowerUp", "RemoteReset",
                          "ScheduledReset", "Triggered", "Unknown", "Watchdog"})  # fmt: skip
BOOT_REASON = {"HardReset": "RemoteReset", "SoftReset": "RemoteReset"}
"""The board's boot reasons OCPP names otherwise (the board resets only when the CSMS says so)."""
REGISTRATION = {"Accepted": Registration.ACCEPTED, "Pending": Registration.PENDING, "Rejected": Registration.REJECTED}


@dataclass(frozen=True)
class BoardInfo:
    """What a board's BootNotification tells about it: its station's identity at the CSMS."""

    model: str
    vendor: str
    serial: str
    fw_version: str
    reason: str = "PowerUp"


def iso(ts: int) -> str:
    """Seconds since the protocol epoch as OCPP's date-time (UTC, second precision)."""
    t = datetime.datetime.fromtimestamp(EPOCH_UNIX + ts, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(names: tuple[str | None, ...], v: object, default: str | None = None) -> str | None:
    i = int(v) if isinstance(v, int) else -1
    return names[i] if 0 <= i < len(names) else default


def boot_request(info: BoardInfo) -> Payload:
    station: Payload = {
        "model": info.model[:20] or "evedge",
        "vendorName": info.vendor[:50] or "evedge",
        "serialNumber": info.serial[:25],
        "firmwareVersion": info.fw_version[:50],
    }
    if not station["serialNumber"]:
        del station["serialNumber"]
    reason = BOOT_REASON.get(info.reason, info.reason)
    if reason not in BOOT_REASONS:
        reason = "Unknown"
    return {"chargingStation": station, "reason": reason}


def board_info(body: dict[int, Any]) -> BoardInfo:
    """A board's BootNotification body as its station's identity."""
    return BoardInfo(str(body.get(Key.MODEL, "")), str(body.get(Key.VENDOR, "")), str(body.get(Key.SERIAL, "")),
                     str(body.get(Key.FW_VERSION, "")), str(body.get(Key.REASON, "") or "PowerUp"))  # fmt: skip


def id_token(token: str, token_type: object) -> Payload:
    return {"idToken": token[:36], "type": _name(TOKEN_TYPE, token_type, "ISO14443")}


def sampled(body: dict[int, Any]) -> list[Payload]:
    """The frame's readings as OCPP sampled values: the registers and power it carries, then
    its `samples` (a final TransactionEvent's start and stop readings are in the event's own
    fields, so only the readings of other measurands are taken from its samples)."""
    out: list[Payload] = []
    for key, m in ((Key.ENERGY_WH, 0), (Key.ENERGY_OUT_WH, 1), (Key.POWER_W, 2), (Key.CURRENT_MA, 3),
                   (Key.VOLTAGE_DV, 4), (Key.SOC, 5)):  # fmt: skip
        v = body.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out.append(_value(m, v))
    have = {m for m in range(len(MEASURAND)) if any(s["measurand"] == MEASURAND[m][0] for s in out)}
    for s in body.get(Key.SAMPLES) or ():
        ms = s.get(Key.MEASURAND) if isinstance(s, dict) else None
        if isinstance(ms, int) and 0 <= ms < len(MEASURAND) and ms not in have:
            out.append(_value(ms, s.get(Key.VALUE, 0)))
    return out


def _value(m: int, v: float) -> Payload:
    name, unit, factor = MEASURAND[m]
    if m == 2 and v < 0:  # a board discharging (E6) exports
        return {"value": -v, "measurand": "Power.Active.Export", "unitOfMeasure": {"unit": unit}}
    return {"value": round(v * factor, 3), "measurand": name, "unitOfMeasure": {"unit": unit}}


def event(action: int, body: dict[int, Any], ts: int, offline: bool, token: str | None) -> tuple[str, Payload] | None:
    """The OCPP call that carries a board's event, or None when OCPP 2.0.1 has none. `ts`: the
    frame's time when the body has none; `offline`: the station was cut from the CSMS when the
    gateway accepted it; `token`: the event's id token in clear, when the gateway still knows it."""
    t = iso(int(body.get(Key.TIME) or ts))
    if action == Action.TRANSACTION_EVENT:
        return "TransactionEvent", transaction_event(body, t, offline, token)
    if action == Action.STATUS_NOTIFICATION:
        status = _name(CONNECTOR_STATUS, body.get(Key.STATE), "Unavailable")
        return "StatusNotification", {"timestamp": t, "connectorStatus": status, "evseId": int(body.get(Key.EVSE, 1)),
                                      "connectorId": int(body.get(Key.CONNECTOR) or 1)}  # fmt: skip
    if action == Action.METER_VALUES:
        values = sampled(body)
        if not values:
            return None
        mv = [{"timestamp": t, "sampledValue": values}]
        return "MeterValues", {"evseId": int(body.get(Key.EVSE, 1)), "meterValue": mv}
    if action == Action.FIRMWARE_STATUS:
        fw = _name(FIRMWARE_STATUS, body.get(Key.FW_STATUS))
        if fw is None:
            return None
        return "FirmwareStatusNotification", {"status": fw, "requestId": int(body[Key.IMAGE_ID])}
    if action == Action.LOG_STATUS:
        ls = _name(LOG_STATUS, body.get(Key.LOG_STATUS))
        return None if ls is None else ("LogStatusNotification", {"status": ls, "requestId": int(body[Key.REQUEST_ID])})
    if action == Action.SECURITY_EVENT:
        p: Payload = {"type": str(body[Key.EVENT_NAME])[:50], "timestamp": t}
        if body.get(Key.REASON):
            p["techInfo"] = str(body[Key.REASON])[:255]
        return "SecurityEventNotification", p
    if action == Action.RESERVATION_UPDATE:
        rs = _name(RESERVATION_STATUS, body.get(Key.RES_STATUS))
        if rs is None:
            return None
        rid = int(body[Key.RESERVATION_ID])
        return "ReservationStatusUpdate", {"reservationId": rid, "reservationUpdateStatus": rs}
    if action == Action.MONITOR_EVENT:
        return "NotifyEvent", notify_event(body, t)
    if action == Action.NOTIFY_REPORT:
        return "NotifyReport", notify_report(body, t)
    return None


def transaction_event(body: dict[int, Any], t: str, offline: bool, token: str | None) -> Payload:
    ev = int(body[Key.EVENT])
    info: Payload = {"transactionId": str(body[Key.TX_ID])}
    cs = _name(CHARGING_STATE, body.get(Key.CHARGING_STATE))
    if cs is not None:
        info["chargingState"] = cs
    if ev == TxEvent.ENDED:
        info["stoppedReason"] = _name(STOP_REASON, body.get(Key.STOP_REASON), "Other")
    if isinstance(body.get(Key.REMOTE_START_ID), int):
        info["remoteStartId"] = int(body[Key.REMOTE_START_ID])
    p: Payload = {
        "eventType": TX_EVENT[ev],
        "timestamp": t,
        "triggerReason": _name(TRIGGER, body.get(Key.TRIGGER), "Trigger"),
        "seqNo": int(body[Key.SEQ_NO]),
        "transactionInfo": info,
        "evse": {"id": int(body.get(Key.EVSE, 1)), "connectorId": 1},
    }
    if offline or body.get(Key.OFFLINE):
        p["offline"] = True
    if token and ev == TxEvent.STARTED:
        p["idToken"] = id_token(token, body.get(Key.TOKEN_TYPE))
    if isinstance(body.get(Key.RESERVATION_ID), int):
        p["reservationId"] = int(body[Key.RESERVATION_ID])
    values = sampled(body)
    if values:
        ctx = (
            "Transaction.Begin"
            if ev == TxEvent.STARTED
            else "Transaction.End"
            if ev == TxEvent.ENDED
            else "Sample.Periodic"
        )
        for v in values:
            v["context"] = ctx
        p["meterValue"] = [{"timestamp": t, "sampledValue": values}]
    return p


def notify_event(body: dict[int, Any], t: str) -> Payload:
    data: Payload = {
        "eventId": int(body[Key.MONITOR_ID]),
        "timestamp": t,
        "trigger": "Alerting",
        "actualValue": str(body.get(Key.VAL, ""))[:2500],
        "component": _component(body),
        "variable": {"name": str(body[Key.VARIABLE])[:50]},
        "eventNotificationType": "CustomMonitor",
        "variableMonitoringId": int(body[Key.MONITOR_ID]),
    }
    return {"generatedAt": t, "seqNo": 0, "eventData": [data]}


def _component(v: dict[int, Any]) -> Payload:
    c: Payload = {"name": str(v[Key.COMPONENT])[:50]}
    if isinstance(v.get(Key.EVSE), int):
        c["evse"] = {"id": int(v[Key.EVSE])}
    return c


def notify_report(body: dict[int, Any], t: str) -> Payload:
    data = []
    for v in body.get(Key.VARS) or ():
        var: Payload = {"name": str(v[Key.VARIABLE])[:50]}
        if v.get(Key.INSTANCE):
            var["instance"] = str(v[Key.INSTANCE])[:50]
        attr: Payload = {"type": "Actual", "mutability": "ReadWrite"}
        if Key.VAL in v:
            attr["value"] = str(v[Key.VAL])[:2500]
        data.append({"component": _component(v), "variable": var, "variableAttribute": [attr]})
    p: Payload = {"requestId": int(body[Key.REQUEST_ID]), "generatedAt": t, "seqNo": int(body[Key.SEQ_NO])}
    if data:
        p["reportData"] = data
    if not body.get(Key.LAST, True):
        p["tbc"] = True
    return p

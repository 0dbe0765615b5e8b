"""CSMS → board: an OCPP 2.0.1 call as the request a board understands, and the board's
answer as the call's result, sans I/O.

Rule: a call is translated before anything reaches a board, and whatever the board cannot be
asked (a value it cannot hold, a unit it does not know) is answered here with OCPP's own
refusal (`Rejected`, `NotSupported`, …), so that only requests that fit the site's schema are
re-sealed for a board. The payload was checked against OCPP 2.0.1's JSON schema before
(gateway/ocpp/link.py): keys the schema requires are present.

`command(action, payload)` gives a `ToBoard` (the board's action and body, and how its result
becomes the OCPP response) or, for a call answered without the board, the response itself.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import _core
from gateway.ocpp.up import AUTH_STATUS, TOKEN_TYPE, Payload, iso
from gateway.schema import EPOCH_UNIX, Action, Key, MonitorType, ProfilePurpose, ResetType, ResetWhen, Status

Result = dict[int, Any]
"""One target's result (gateway.boards.Boards.deliver): status, reason?, frame?."""

STATUS = ("Accepted", "Rejected", "RebootRequired", "NotSupported", "Unknown", "Accepted", "Rejected", "Scheduled")
"""Our Status in schema order → OCPP's usual name; `reply` keeps it only where the call's
response enum has it."""
PURPOSE = {"ChargingStationMaxProfile": ProfilePurpose.MAX_STATION, "TxDefaultProfile": ProfilePurpose.TX_DEFAULT,
           "TxProfile": ProfilePurpose.TX, "ChargingStationExternalConstraints": ProfilePurpose.DSO}  # fmt: skip
PRIORITY = {"AlwaysFront": 0, "InFront": 1, "NormalCycle": 2}
TRIGGER = {"BootNotification": Action.BOOT_NOTIFICATION, "StatusNotification": Action.STATUS_NOTIFICATION,
           "MeterValues": Action.METER_VALUES, "Heartbeat": Action.HEARTBEAT,
           "TransactionEvent": Action.TRANSACTION_EVENT,
           "SignChargingStationCertificate": Action.SIGN_CERTIFICATE}  # fmt: skip
"""FirmwareStatusNotification and LogStatusNotification are the gateway's to trigger: it saw the
board's last status (gateway/ocpp/bridge.py)."""
BUSY = {"FirmwareStatusNotification": frozenset({"Downloading", "Downloaded", "SignatureVerified", "Installing",
                                                 "DownloadScheduled", "DownloadPaused", "InstallScheduled",
                                                 "InstallRebooting"}),
        "LogStatusNotification": frozenset({"Uploading"})}  # fmt: skip
"""The statuses of an update or upload still under way (L01.FR.?? / N01: triggered when idle, Idle)."""
VOLTS = 230
"""A limit in amperes becomes watts at this voltage per phase (the boards take watts)."""


@dataclass(frozen=True)
class ToBoard:
    action: int
    body: dict[int, Any]
    answer: Callable[[Result], Payload]
    evse: int = 0
    """The EVSE the call names (0: the station)."""


class Unfit(ValueError):
    """A call the board cannot be asked: answered with `response` without the board."""

    def __init__(self, response: Payload) -> None:
        super().__init__(str(response))
        self.response = response


def proto_time(text: str) -> int:
    """OCPP's date-time as protocol seconds."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return max(0, int(t.timestamp()) - EPOCH_UNIX)


def status_of(res: Result) -> int:
    return int(res.get(Key.STATUS, Status.FAILED))


def reply(res: Result, allowed: tuple[str, ...], key: str = "status") -> Payload:
    """The board's status as the one of `allowed` it means (the first, Accepted, else Rejected)."""
    st = status_of(res)
    name = STATUS[st] if 0 <= st < len(STATUS) else "Rejected"
    if name not in allowed:
        name = allowed[0] if st == Status.ACCEPTED else ("Rejected" if "Rejected" in allowed else allowed[-1])
    p: Payload = {key: name}
    reason = res.get(Key.REASON)
    if reason and name != "Accepted":
        p["statusInfo"] = {"reasonCode": name[:20], "additionalInfo": str(reason)[:512]}
    return p


def answer_body(res: Result) -> dict[int, Any]:
    raw = res.get(Key.FRAME)
    if not isinstance(raw, bytes):
        return {}
    body = _core.decode(raw).body
    return dict(body) if isinstance(body, dict) else {}


def _token_type(name: str) -> int:
    return TOKEN_TYPE.index(name) if name in TOKEN_TYPE else 0


def command(action: str, p: Payload) -> ToBoard:
    """The board request an OCPP call is; `Unfit` when the board cannot be asked it."""
    fn = COMMANDS.get(action)
    if fn is None:
        raise KeyError(action)
    return fn(p)


def _start(p: Payload) -> ToBoard:
    tok = p["idToken"]
    body: dict[int, Any] = {Key.ID_TOKEN: str(tok["idToken"]), Key.REMOTE_START_ID: int(p["remoteStartId"]),
            Key.TOKEN_TYPE: _token_type(str(tok["type"]))}  # fmt: skip
    evse = int(p.get("evseId", 0))
    if evse:
        body[Key.EVSE] = evse

    def answer(res: Result) -> Payload:
        out = reply(res, ("Accepted", "Rejected"))
        tx = answer_body(res).get(Key.TX_ID)
        if isinstance(tx, int):
            out["transactionId"] = str(tx)
        return out

    return ToBoard(Action.REQUEST_START_TRANSACTION, body, answer, evse)


def _tx_id(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise Unfit({"status": "Rejected", "statusInfo": {"reasonCode": "UnknownTx"}})
    return int(text)


def _stop(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.TX_ID: _tx_id(str(p["transactionId"]))}
    return ToBoard(Action.REQUEST_STOP_TRANSACTION, body, lambda r: reply(r, ("Accepted", "Rejected")))


def _reset(p: Payload) -> ToBoard:
    when = ResetWhen.NOW if p["type"] == "Immediate" else ResetWhen.IDLE
    body: dict[int, Any] = {Key.RESET_TYPE: ResetType.HARD, Key.WHEN: when}  # OCPP resets the station: a reboot
    return ToBoard(Action.RESET, body, lambda r: reply(r, ("Accepted", "Rejected", "Scheduled")))


def _availability(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.OPERATIVE: p["operationalStatus"] == "Operative"}
    evse = int((p.get("evse") or {}).get("id", 0))
    if evse:
        body[Key.EVSE] = evse
    return ToBoard(Action.CHANGE_AVAILABILITY, body, lambda r: reply(r, ("Accepted", "Rejected", "Scheduled")), evse)


def _unlock(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.EVSE: int(p["evseId"]), Key.CONNECTOR: int(p["connectorId"])}

    def answer(res: Result) -> Payload:
        if status_of(res) == Status.ACCEPTED:
            return {"status": "Unlocked"}
        why = str(res.get(Key.REASON, ""))
        return {"status": "OngoingAuthorizedTransaction" if "transaction" in why else "UnlockFailed"}

    return ToBoard(Action.UNLOCK_CONNECTOR, body, answer, int(p["evseId"]))


def _trigger(p: Payload) -> ToBoard:
    what = TRIGGER.get(str(p["requestedMessage"]))
    if what is None:
        raise Unfit({"status": "NotImplemented"})
    body: dict[int, Any] = {Key.REQUESTED_ACTION: int(what)}
    evse = int((p.get("evse") or {}).get("id", 0))
    if evse:
        body[Key.EVSE] = evse
    return ToBoard(Action.TRIGGER_MESSAGE, body, lambda r: reply(r, ("Accepted", "Rejected", "NotImplemented")), evse)


def _reserve(p: Payload) -> ToBoard:
    tok = p["idToken"]
    body: dict[int, Any] = {Key.RESERVATION_ID: int(p["id"]), Key.EXPIRY: proto_time(str(p["expiryDateTime"])),
                            Key.ID_TOKEN: str(tok["idToken"])}  # fmt: skip
    evse = int(p.get("evseId", 0))
    if evse:
        body[Key.EVSE] = evse

    def answer(res: Result) -> Payload:
        if status_of(res) == Status.ACCEPTED:
            return {"status": "Accepted"}
        why = str(res.get(Key.REASON, "")).lower()
        taken = "occupied" in why or "reserved" in why  # H01: reserved for another is Occupied too
        return {"status": "Occupied" if taken else "Unavailable" if "unavailable" in why else "Rejected"}

    return ToBoard(Action.RESERVE_NOW, body, answer, evse)


def _cancel(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.RESERVATION_ID: int(p["reservationId"])}
    return ToBoard(Action.CANCEL_RESERVATION, body, lambda r: reply(r, ("Accepted", "Rejected")))


def _display(p: Payload) -> ToBoard:
    m = p["message"]
    content = m["message"]
    body: dict[int, Any] = {Key.DISPLAY_ID: int(m["id"]), Key.TEXT: str(content["content"])[:256],
                            Key.DISPLAY_PRIORITY: PRIORITY[str(m["priority"])]}  # fmt: skip
    if content.get("language"):
        body[Key.LANGUAGE] = str(content["language"])[:8]
    for src, key in (("startDateTime", Key.VALID_FROM), ("endDateTime", Key.VALID_TO)):
        if m.get(src):
            body[key] = proto_time(str(m[src]))
    allowed = ("Accepted", "NotSupportedMessageFormat", "Rejected", "NotSupportedPriority", "NotSupportedState",
               "UnknownTransaction")  # fmt: skip
    return ToBoard(Action.SET_DISPLAY_MESSAGE, body, lambda r: reply(r, allowed))


def _clear_display(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.DISPLAY_ID: int(p["id"])}
    return ToBoard(Action.CLEAR_DISPLAY_MESSAGE, body,
                   lambda r: {"status": "Accepted" if status_of(r) == Status.ACCEPTED else "Unknown"})  # fmt: skip


def _cost(p: Payload) -> ToBoard:
    body: dict[int, Any] = {
        Key.TX_ID: _tx_id(str(p["transactionId"])),
        Key.COST: max(0, round(float(p["totalCost"]) * 100)),
    }
    return ToBoard(Action.COST_UPDATE, body, lambda r: {})


def _profile(p: Payload) -> ToBoard:
    prof = p["chargingProfile"]
    purpose = PURPOSE.get(str(prof["chargingProfilePurpose"]))
    schedules = prof["chargingSchedule"]
    if purpose is None or len(schedules) != 1:
        raise Unfit({"status": "Rejected", "statusInfo": {"reasonCode": "UnsupportedProfile"}})
    sch = schedules[0]
    amps = sch["chargingRateUnit"] == "A"
    periods = []
    for per in sch["chargingSchedulePeriod"][:24]:
        phases = int(per.get("numberPhases", 3))
        limit = float(per["limit"]) * (VOLTS * phases if amps else 1)
        item: dict[int, Any] = {Key.START_S: int(per["startPeriod"]), Key.LIMIT_W: int(limit)}
        if "numberPhases" in per:
            item[Key.PHASES] = phases
        periods.append(item)
    body: dict[int, Any] = {Key.EVSE: int(p["evseId"]), Key.PROFILE_ID: int(prof["id"]),
                            Key.STACK_LEVEL: min(16, int(prof["stackLevel"])), Key.PURPOSE: int(purpose),
                            Key.PERIODS: periods}  # fmt: skip
    for src, key in (("validFrom", Key.VALID_FROM), ("validTo", Key.VALID_TO)):
        if prof.get(src):
            body[key] = proto_time(str(prof[src]))
    return ToBoard(Action.SET_CHARGING_PROFILE, body, lambda r: reply(r, ("Accepted", "Rejected")), int(p["evseId"]))


def _clear_profile(p: Payload) -> ToBoard:
    body: dict[int, Any] = {}
    if "chargingProfileId" in p:
        body[Key.PROFILE_ID] = int(p["chargingProfileId"])
    crit = p.get("chargingProfileCriteria") or {}
    if "evseId" in crit:
        body[Key.EVSE] = int(crit["evseId"])
    if crit.get("chargingProfilePurpose") in PURPOSE:
        body[Key.PURPOSE] = int(PURPOSE[str(crit["chargingProfilePurpose"])])
    return ToBoard(Action.CLEAR_CHARGING_PROFILE, body,
                   lambda r: {"status": "Accepted" if status_of(r) == Status.ACCEPTED else "Unknown"})  # fmt: skip


def _composite(p: Payload) -> ToBoard:
    evse, duration = int(p["evseId"]), int(p["duration"])
    body: dict[int, Any] = {Key.EVSE: evse, Key.DURATION_S: min(duration, 604800)}

    def answer(res: Result) -> Payload:
        if status_of(res) != Status.ACCEPTED:
            return reply(res, ("Accepted", "Rejected"))
        periods = answer_body(res).get(Key.PERIODS) or [{Key.START_S: 0, Key.LIMIT_W: 0}]
        sch = [{"startPeriod": int(x[Key.START_S]), "limit": float(x[Key.LIMIT_W])} for x in periods]
        return {"status": "Accepted", "schedule": {"evseId": evse, "duration": duration,
                "scheduleStart": iso(answer_body(res).get(Key.TIME) or 0), "chargingRateUnit": "W",
                "chargingSchedulePeriod": sch}}  # fmt: skip

    return ToBoard(Action.GET_COMPOSITE_SCHEDULE, body, answer, evse)


VAR_STATUS = ("Accepted", "Rejected", "RebootRequired", "NotSupportedAttributeType", "UnknownVariable")


def _var(d: Payload, value: str | None = None) -> dict[int, Any]:
    comp, var = d["component"], d["variable"]
    v: dict[int, Any] = {Key.COMPONENT: str(comp["name"])[:32], Key.VARIABLE: str(var["name"])[:32]}
    if var.get("instance"):
        v[Key.INSTANCE] = str(var["instance"])[:16]
    if isinstance(comp.get("evse"), dict):
        v[Key.EVSE] = int(comp["evse"]["id"])
    if value is not None:
        v[Key.VAL] = value[:256]
    return v


def _vars(p: Payload, get: bool) -> ToBoard:
    asked = p["getVariableData" if get else "setVariableData"]
    key = "getVariableResult" if get else "setVariableResult"
    if len(asked) > 32:
        refused = [
            {"attributeStatus": "Rejected", "component": d["component"], "variable": d["variable"]} for d in asked
        ]
        raise Unfit({key: refused})
    body: dict[int, Any] = {Key.VARS: [_var(d, None if get else str(d["attributeValue"])) for d in asked]}

    def answer(res: Result) -> Payload:
        got = answer_body(res).get(Key.VARS) or []
        out = []
        for i, d in enumerate(asked):
            v = got[i] if i < len(got) and isinstance(got[i], dict) else {}
            st = int(v.get(Key.STATUS, status_of(res)))
            name = VAR_STATUS[st] if st < len(VAR_STATUS) else "Rejected"
            if not get and name == "NotSupportedAttributeType":
                name = "Rejected"
            r: Payload = {"attributeStatus": name, "component": d["component"], "variable": d["variable"]}
            if get and name == "Accepted" and Key.VAL in v:
                r["attributeValue"] = str(v[Key.VAL])[:2500]
            out.append(r)
        return {key: out}

    return ToBoard(Action.GET_VARIABLES if get else Action.SET_VARIABLES, body, answer)


def _base_report(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.REQUEST_ID: int(p["requestId"])}
    return ToBoard(Action.GET_BASE_REPORT, body, lambda r: reply(r, ("Accepted", "Rejected", "NotSupported")))


def _data_transfer(p: Payload) -> ToBoard:
    body: dict[int, Any] = {Key.VENDOR: str(p["vendorId"])[:64]}
    if "data" in p:
        data = p["data"] if isinstance(p["data"], str) else str(p["data"])
        body[Key.DATA] = data.encode()[:1024]

    def answer(res: Result) -> Payload:
        if status_of(res) != Status.ACCEPTED and "not supported" in str(res.get(Key.REASON, "")):
            return {"status": "UnknownVendorId"}  # the board knows no vendor extension at all
        out = reply(res, ("Accepted", "Rejected", "UnknownMessageId", "UnknownVendorId"))
        data = answer_body(res).get(Key.DATA)
        if isinstance(data, bytes):
            out["data"] = data.decode("utf-8", "replace")
        return out

    return ToBoard(Action.DATA_TRANSFER, body, answer)


MONITORABLE = (("EVSE", "Power"), ("EVSE", "Energy"), ("ChargingStation", "Temperature"),
               ("ChargingStation", "Frequency"))  # fmt: skip
"""The variables a board can monitor (firmware/csc/services/monitoring.py), with OCPP's names."""
MONITOR_TYPE = {"UpperThreshold": MonitorType.UPPER, "LowerThreshold": MonitorType.LOWER, "Delta": MonitorType.DELTA,
                "Periodic": MonitorType.PERIODIC, "PeriodicClockAligned": MonitorType.PERIODIC_CLOCK}  # fmt: skip


def monitors(p: Payload, new_id: Callable[[], int]) -> tuple[ToBoard | None, list[Payload]]:
    """SetVariableMonitoring: the SetMonitors the board is asked (None when no monitor fits)
    and the result of each monitor, in order; those the board is asked get the board's verdict
    (it takes all or none). A monitor without `id` is a new one: `new_id()` numbers it."""
    results: list[Payload] = []
    asked: list[dict[int, Any]] = []
    for d in p["setMonitoringData"]:
        comp, var = str(d["component"]["name"]), str(d["variable"]["name"])
        r: Payload = {"status": "Accepted", "type": d["type"], "severity": int(d["severity"]),
                      "component": d["component"], "variable": d["variable"]}  # fmt: skip
        kind = MONITOR_TYPE[str(d["type"])]
        value = float(d["value"])
        if (comp, var) not in MONITORABLE:
            known = any(c == comp for c, _ in MONITORABLE)
            r["status"] = "UnknownVariable" if known else "UnknownComponent"
        elif d.get("transaction"):
            r["status"] = "Rejected"
            r["statusInfo"] = {"reasonCode": "NoTxMonitor", "additionalInfo": "monitors hold beyond transactions"}
        elif kind >= MonitorType.DELTA and value <= 0:
            r["status"] = "Rejected"
            r["statusInfo"] = {"reasonCode": "BadValue", "additionalInfo": "delta and periodic need a value > 0"}
        else:
            r["id"] = int(d["id"]) if "id" in d else new_id()
            m: dict[int, Any] = {Key.MONITOR_ID: r["id"], Key.COMPONENT: comp, Key.VARIABLE: var,
                                 Key.MONITOR_TYPE: int(kind), Key.THRESHOLD: value,
                                 Key.SEVERITY: int(d["severity"])}  # fmt: skip
            if isinstance(d["component"].get("evse"), dict):
                m[Key.EVSE] = int(d["component"]["evse"]["id"])
            asked.append(m)
        results.append(r)
    if not asked:
        return None, results

    def answer(res: Result) -> Payload:
        ok = status_of(res) == Status.ACCEPTED
        out = []
        for r in results:
            o = dict(r)
            if "id" in o and not ok:
                o["status"] = "Rejected"
                o["statusInfo"] = {"reasonCode": "Board", "additionalInfo": str(res.get(Key.REASON, ""))[:512]}
            out.append(o)
        return {"setMonitoringResult": out}

    return ToBoard(Action.SET_MONITORS, {Key.MONITORS: asked}, answer), results


def clear_monitor(monitor_id: int) -> ToBoard:
    """One id of a ClearVariableMonitoring (the board answers found or not for its whole list,
    so each id is asked alone)."""

    def answer(res: Result) -> Payload:
        st = status_of(res)
        name = "Accepted" if st == Status.ACCEPTED else "NotFound" if st == Status.UNKNOWN else "Rejected"
        return {"status": name, "id": monitor_id}

    return ToBoard(Action.CLEAR_MONITORS, {Key.IDS: [monitor_id]}, answer)


def displays_matching(infos: list[Payload], p: Payload, now: int) -> list[Payload]:
    """The display messages (OCPP MessageInfo) a GetDisplayMessages asks for and still valid at
    `now` (protocol seconds): the board drops a message past its end, so does the answer."""
    ids = set(p.get("id") or ())

    def fits(m: Payload) -> bool:
        if ids and m["id"] not in ids:
            return False
        if any(k in p and m.get(k) != p[k] for k in ("priority", "state")):
            return False
        return not (m.get("endDateTime") and proto_time(str(m["endDateTime"])) <= now)

    return [m for m in infos if fits(m)]


COMMANDS: dict[str, Callable[[Payload], ToBoard]] = {
    "RequestStartTransaction": _start,
    "RequestStopTransaction": _stop,
    "Reset": _reset,
    "ChangeAvailability": _availability,
    "UnlockConnector": _unlock,
    "TriggerMessage": _trigger,
    "ReserveNow": _reserve,
    "CancelReservation": _cancel,
    "SetDisplayMessage": _display,
    "ClearDisplayMessage": _clear_display,
    "CostUpdated": _cost,
    "SetChargingProfile": _profile,
    "ClearChargingProfile": _clear_profile,
    "GetCompositeSchedule": _composite,
    "GetVariables": lambda p: _vars(p, True),
    "SetVariables": lambda p: _vars(p, False),
    "GetBaseReport": _base_report,
    "DataTransfer": _data_transfer,
}
"""The calls a board answers, by OCPP action."""


def authorize_answer(status: str) -> int:
    """OCPP's AuthorizationStatus as ours (Unknown for a name we do not have)."""
    return AUTH_STATUS.index(status) if status in AUTH_STATUS else AUTH_STATUS.index("Unknown")

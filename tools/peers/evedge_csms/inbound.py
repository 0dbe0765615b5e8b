"""What the CSMS does with each board message relayed by a gateway (the CS → CSMS side of
the E, M and S use cases). Every handler only writes rows and queues Commands; the caller
runs it inside the transaction that also records the message id (deduplication) and
commits before the Relay is acknowledged."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from evedge_csms import commands as cmds
from evedge_csms.pki import Ca, PkiError, Signer, cert_hash, der
from evedge_csms.settings import Settings
from evedge_csms.store import Store
from evedge_csms.wire import error_body, proto_time
from gateway import _core
from gateway.protocol import gid
from gateway.schema import (
    MAX_CHUNK,
    Action,
    AuthStatus,
    ErrorCode,
    Key,
    Kind,
    Registration,
    Status,
    TxEvent,
)

log = logging.getLogger("csms.inbound")


@dataclass
class Ctx:
    store: Store
    signer: Signer
    ca: Ca | None
    settings: Settings
    counters: dict[str, int] = field(default_factory=dict)
    """Figures of this CSMS run: `redelivered` = board frames received again and deduplicated
    by (site, device, message id, group)."""
    ev_cert_relay: bool = False
    """S7: a contract-certificate relay (the CSO roaming endpoint, `CsmsRoaming`) takes the
    pending Get15118EVCertificate requests; without one they are refused at once."""


@dataclass(frozen=True)
class Relayed:
    """One board frame of a Relay, decoded."""

    site_id: str
    device_id: str
    frame: _core.Frame
    evse_gid: str | None = None
    secrets: dict[int, bytes] = field(default_factory=dict)
    """Plaintext of the frame's `secret` fields, carried beside it in the Relay item (docs/csms.md)."""

    @property
    def body(self) -> dict[Any, Any]:
        return self.frame.body

    def time(self) -> int:
        t = self.body.get(Key.TIME)
        return int(t) if isinstance(t, int) else self.frame.ts

    def token(self) -> str | None:
        raw = self.secrets.get(Key.ID_TOKEN)
        return raw.decode("utf-8", "replace") if raw is not None else None


def _key(it: Relayed) -> dict[str, Any]:
    return {"site_id": it.site_id, "device_id": it.device_id}


def _answer(ctx: Ctx, it: Relayed, body: dict[Any, Any], now: float) -> None:
    cmds.enqueue(
        ctx.store, it.site_id, cmds.answer(it.device_id, it.frame.msg_id, it.frame.action, body), now, ctx.signer
    )


def _refuse(ctx: Ctx, it: Relayed, code: int, reason: str, now: float) -> None:
    spec = cmds.CommandSpec(
        it.frame.action,
        error_body(code, reason),
        (it.device_id,),
        kind=Kind.ERROR,
        msg_id=it.frame.msg_id,
        expiry_s=300,
    )
    cmds.enqueue(ctx.store, it.site_id, spec, now, ctx.signer)


# ---------------------------------------------------------------- M13, M1
def boot_notification(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    row = ctx.store.get("stations", **_key(it))
    decided = row["registration"] if row and row["registration"] else ctx.settings.registration
    if row and row["deregistered"]:
        decided = "rejected"
    ctx.store.upsert(
        "stations",
        {
            **_key(it),
            "model": b[Key.MODEL],
            "vendor": b[Key.VENDOR],
            "serial": b[Key.SERIAL],
            "fw_version": b[Key.FW_VERSION],
            "boot_reason": b.get(Key.REASON),
            "registration": decided,
            "first_seen": row["first_seen"] if row and row["first_seen"] else int(now),
            "last_seen": int(now),
        },
    )
    _answer(
        ctx,
        it,
        {
            Key.REGISTRATION: int(Registration[decided.upper()]),
            Key.INTERVAL_S: ctx.settings.heartbeat_s,
            Key.TIME: proto_time(now),
        },
        now,
    )


def status_notification(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.upsert(
        "evses",
        {
            **_key(it),
            "evse": b[Key.EVSE],
            "connector": b.get(Key.CONNECTOR, 0),
            "state": b[Key.STATE],
            "cp_state": b.get(Key.CP_STATE),
            "time": it.time(),
            "evse_gid": it.evse_gid,
        },
    )


def notify_report(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.upsert(
        "reports",
        {
            **_key(it),
            "request_id": b[Key.REQUEST_ID],
            "seq_no": b[Key.SEQ_NO],
            "vars": b[Key.VARS],
            "last": int(b[Key.LAST]),
        },
    )
    for v in b[Key.VARS]:
        store_variable(ctx.store, it.site_id, it.device_id, v, now)


def store_variable(store: Store, site_id: str, device_id: str, v: dict[Any, Any], now: float) -> None:
    store.upsert(
        "variables",
        {
            "site_id": site_id,
            "device_id": device_id,
            "component": v[Key.COMPONENT],
            "variable": v[Key.VARIABLE],
            "instance": v.get(Key.INSTANCE, ""),
            "evse": v.get(Key.EVSE, -1),
            "attr": v.get(Key.ATTR, 0),
            "val": v.get(Key.VAL),
            "status": v.get(Key.STATUS),
            "updated": int(now),
        },
    )


# ---------------------------------------------------------------- M3, M4, M7–M9, M19
def monitor_event(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.insert(
        "monitor_events",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "monitor_id": b[Key.MONITOR_ID],
            "component": b[Key.COMPONENT],
            "variable": b[Key.VARIABLE],
            "val": b[Key.VAL],
            "severity": b[Key.SEVERITY],
            "time": b[Key.TIME],
            "evse": b.get(Key.EVSE),
        },
        ignore=True,
    )


def firmware_status(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    key = {**_key(it), "image_id": b[Key.IMAGE_ID]}
    row = ctx.store.get("fw_status", **key)
    history = list(row["history"]) if row and row["history"] else []
    history.append([it.time(), b[Key.FW_STATUS]])
    ctx.store.upsert(
        "fw_status",
        {
            **key,
            "fw_status": b[Key.FW_STATUS],
            "reason": b.get(Key.REASON),
            "version": b.get(Key.VERSION),
            "slot": b.get(Key.SLOT),
            "time": it.time(),
            "history": history,
        },
    )


def firmware_chunk(ctx: Ctx, it: Relayed, now: float) -> None:
    """M4: a board (through its gateway) fetches the image by chunks of MAX_CHUNK bytes."""
    image_id, offset = it.body[Key.IMAGE_ID], it.body[Key.OFFSET]
    camp = ctx.store.select("fw_campaigns", {"image_id": image_id})
    if not camp:
        _refuse(ctx, it, ErrorCode.REJECTED, f"image {image_id} is not in any firmware campaign", now)
        return
    path = ctx.settings.data_dir / str(camp[0]["path"])
    size = int(camp[0]["size"])
    if offset > size:
        _refuse(ctx, it, ErrorCode.OUT_OF_RANGE, f"offset {offset} beyond the image size {size}", now)
        return
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(MAX_CHUNK)
    body = {Key.IMAGE_ID: image_id, Key.OFFSET: offset, Key.DATA: data, Key.LAST: offset + len(data) >= size}
    _answer(ctx, it, body, now)


def security_event(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.insert(
        "security_events",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "event_name": b[Key.EVENT_NAME],
            "time": b[Key.TIME],
            "reason": b.get(Key.REASON),
        },
        ignore=True,
    )


def fault_report(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.insert(
        "fault_reports",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "fault_code": b[Key.FAULT_CODE],
            "active": int(b[Key.ACTIVE]),
            "time": b[Key.TIME],
            "evse": b.get(Key.EVSE),
            "reason": b.get(Key.REASON),
        },
        ignore=True,
    )


def log_status(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.upsert(
        "logs", {**_key(it), "request_id": b[Key.REQUEST_ID], "log_status": b[Key.LOG_STATUS], "updated": int(now)}
    )


def log_chunk(ctx: Ctx, it: Relayed, now: float) -> None:
    """M8: chunks stored by offset; once the last one is in and the offsets are contiguous
    from 0, the log is reassembled into `logs.data`."""
    b = it.body
    key = {**_key(it), "request_id": b[Key.REQUEST_ID]}
    ctx.store.upsert("log_chunks", {**key, "offset": b[Key.OFFSET], "data": b[Key.DATA], "last": int(b[Key.LAST])})
    chunks = ctx.store.select("log_chunks", key, order="offset")
    if not any(c["last"] for c in chunks):
        ctx.store.upsert("logs", {**key, "complete": 0, "updated": int(now)})
        return
    buf, pos = bytearray(), 0
    for c in chunks:
        if c["offset"] != pos:
            ctx.store.upsert("logs", {**key, "complete": 0, "updated": int(now)})
            return
        buf += c["data"]
        pos += len(c["data"])
        if c["last"]:
            break
    ctx.store.upsert("logs", {**key, "data": bytes(buf), "size": len(buf), "complete": 1, "updated": int(now)})


# ---------------------------------------------------------------- M16, S7
def sign_certificate(ctx: Ctx, it: Relayed, now: float) -> None:
    """M16: the board's CSR is signed by the CSMS's CA; the certificate follows in a
    CertificateSigned command (the SignCertificate answer only accepts the request)."""
    if ctx.ca is None:
        _answer(ctx, it, {Key.STATUS: Status.REJECTED}, now)
        return
    try:
        cert = ctx.ca.sign_csr(it.body[Key.CSR], expect_cn=it.device_id)
    except PkiError as e:
        log.warning("SignCertificate from %s/%s refused: %s", it.site_id, it.device_id, e)
        _answer(ctx, it, {Key.STATUS: Status.REJECTED}, now)
        return
    _answer(ctx, it, {Key.STATUS: Status.ACCEPTED}, now)
    record_certificate(ctx.store, der(cert), it.site_id, it.device_id, it.body[Key.CERT_TYPE], now)
    spec = cmds.certificate_signed((it.device_id,), der(cert), it.body[Key.CERT_TYPE])
    cmds.enqueue(ctx.store, it.site_id, spec, now, ctx.signer)


def record_certificate(
    store: Store, cert_der: bytes, site_id: str | None, device_id: str | None, cert_type: int, now: float
) -> str:
    cert = x509.load_der_x509_certificate(cert_der)
    h = cert_hash(cert_der).hex()
    store.upsert(
        "certificates",
        {
            "cert_hash": h,
            "serial": format(cert.serial_number, "x"),
            "subject": cert.subject.rfc4514_string(),
            "site_id": site_id,
            "device_id": device_id,
            "cert_type": int(cert_type),
            "der": cert_der,
            "issued": int(now),
        },
    )
    return h


def get_15118_ev_certificate(ctx: Ctx, it: Relayed, now: float) -> None:
    """S7, R3-3: the EV's contract certificate request is recorded `pending`; the contract
    PKI is the EV user's home CSP, reached through the CSO roaming endpoint (`CsmsRoaming`
    takes the request and answers with `answer_ev_certificate`). Without such a relay the
    request is refused at once (the CSMS runs no contract PKI of its own)."""
    row = {
        **_key(it),
        "msg_id": it.frame.msg_id,
        "action_15118": it.body[Key.ACTION_15118],
        "exi": it.body[Key.EXI],
        "evse_gid": it.evse_gid,
        "at": int(now),
    }
    if ctx.ev_cert_relay:
        ctx.store.insert("ev_cert_requests", {**row, "status": "pending"}, ignore=True)
        return
    reason = "no contract PKI: no roaming relay"
    ctx.store.insert("ev_cert_requests", {**row, "status": "rejected", "reason": reason, "answered": int(now)},
                     ignore=True)  # fmt: skip
    _answer(ctx, it, {Key.STATUS: Status.REJECTED}, now)


def answer_ev_certificate(
    ctx: Ctx, site_id: str, device_id: str, msg_id: int, status: str, exi: bytes | None, reason: str | None, now: float
) -> bool:
    """The contract PKI's answer to a pending Get15118EVCertificate, sent to the board (a
    response Command with the board's request id); False if it was answered already."""
    with ctx.store.transaction():
        row = ctx.store.get("ev_cert_requests", site_id=site_id, device_id=device_id, msg_id=msg_id)
        if row is None or row["status"] != "pending":
            return False
        ok = status == "accepted" and exi is not None
        ctx.store.update(
            "ev_cert_requests",
            {"status": "accepted" if ok else "rejected", "reason": reason, "answered": int(now)},
            {"site_id": site_id, "device_id": device_id, "msg_id": msg_id},
        )
        body: dict[Any, Any] = {Key.STATUS: Status.ACCEPTED if ok else Status.REJECTED}
        if ok:
            body[Key.EXI] = exi
        spec = cmds.answer(device_id, msg_id, Action.GET15118_EV_CERTIFICATE, body)
        cmds.enqueue(ctx.store, site_id, spec, now, ctx.signer)
    return True


# ---------------------------------------------------------------- S1–S6
def authorize(ctx: Ctx, it: Relayed, now: float) -> None:
    token = it.token()
    row = ctx.store.get("tokens", id_token=token) if token is not None else None
    body: dict[Any, Any]
    if row is None:
        body = {Key.AUTH_STATUS: AuthStatus.UNKNOWN}
    else:
        status = int(row["auth_status"])
        if row["expiry"] is not None and row["expiry"] < proto_time(now) and status == AuthStatus.ACCEPTED:
            status = AuthStatus.EXPIRED
        body = {Key.AUTH_STATUS: status}
        if row["expiry"] is not None:
            body[Key.EXPIRY] = row["expiry"]
        tariff = row["tariff_id"] if row["tariff_id"] is not None else ctx.settings.default_tariff
        if tariff is not None:
            body[Key.TARIFF_ID] = tariff
    _answer(ctx, it, body, now)


def reservation_update(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    names = {0: "expired", 1: "removed", 2: "used"}
    ctx.store.insert(
        "reservation_updates",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "reservation_id": b[Key.RESERVATION_ID],
            "res_status": b[Key.RES_STATUS],
        },
        ignore=True,
    )
    ctx.store.update(
        "reservations",
        {"status": names[b[Key.RES_STATUS]], "updated": int(now)},
        {"reservation_id": b[Key.RESERVATION_ID]},
    )


def transaction_event(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    key = {**_key(it), "tx_id": b[Key.TX_ID]}
    ctx.store.upsert(
        "tx_events",
        {
            **key,
            "seq_no": b[Key.SEQ_NO],
            "msg_id": it.frame.msg_id,
            "event": b[Key.EVENT],
            "trigger": b[Key.TRIGGER],
            "time": it.time(),
            "energy_wh": b.get(Key.ENERGY_WH),
            "power_w": b.get(Key.POWER_W),
            "signed_meter": b.get(Key.SIGNED_METER),
            "body": {k: v for k, v in b.items() if k != Key.ID_TOKEN},
        },
    )
    row = ctx.store.get("transactions", **key) or {}
    update: dict[str, Any] = {**key, "evse": b[Key.EVSE], "evse_gid": it.evse_gid or row.get("evse_gid")}
    token = it.token()
    if token is not None:
        update["id_token"] = token
    for col, k in (
        ("token_type", Key.TOKEN_TYPE),
        ("tariff_id", Key.TARIFF_ID),
        ("board_cost", Key.COST),
        ("stop_reason", Key.STOP_REASON),
        ("remote_start_id", Key.REMOTE_START_ID),
        ("reservation_id", Key.RESERVATION_ID),
    ):
        if k in b:
            update[col] = b[k]
    if b[Key.EVENT] == TxEvent.STARTED:
        update["state"] = row.get("state") or "active"
    elif b[Key.EVENT] == TxEvent.ENDED:
        update["state"] = "ended"
    elif not row.get("state"):
        update["state"] = "active"
    ctx.store.upsert("transactions", update)
    if b.get(Key.RESERVATION_ID) is not None and b[Key.EVENT] == TxEvent.STARTED:
        ctx.store.update(
            "reservations", {"status": "used", "updated": int(now)}, {"reservation_id": b[Key.RESERVATION_ID]}
        )
    build_sdr(ctx, it.site_id, it.device_id, b[Key.TX_ID], now)


def meter_values(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.insert(
        "meter_values",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "evse": b[Key.EVSE],
            "tx_id": b.get(Key.TX_ID),
            "time": it.time(),
            "energy_wh": b.get(Key.ENERGY_WH),
            "power_w": b.get(Key.POWER_W),
            "signed_meter": b.get(Key.SIGNED_METER),
            "body": b,
        },
        ignore=True,
    )
    if b.get(Key.TX_ID) is not None:
        build_sdr(ctx, it.site_id, it.device_id, b[Key.TX_ID], now)


def sdr_id(settings: Settings, site_id: str, device_id: str, tx_id: int) -> str:
    local = hashlib.sha256(f"{site_id}|{device_id}|{tx_id}".encode()).hexdigest()[:24].upper()
    return gid.make(settings.country, settings.party, "R", local)


def tariff_cost(tariff: dict[str, Any] | None, energy_wh: int, duration_s: int) -> int:
    """Cost in minor units: energy_wh × price_kwh / 1000 (floor) + price_min per started
    minute + price_session (the rule of docs/roaming.md, with the time component)."""
    if tariff is None:
        return 0
    minutes = -(-max(duration_s, 0) // 60)
    return (
        energy_wh * int(tariff["price_kwh"]) // 1000
        + minutes * int(tariff["price_min"] or 0)
        + int(tariff["price_session"] or 0)
    )


def build_sdr(ctx: Ctx, site_id: str, device_id: str, tx_id: int, now: float) -> None:
    """S6: the SDR of a transaction, (re)made once its Ended event is in."""
    key = {"site_id": site_id, "device_id": device_id, "tx_id": tx_id}
    events = ctx.store.select("tx_events", key, order="seq_no")
    ended = [e for e in events if e["event"] == TxEvent.ENDED]
    if not ended:
        return
    tx = ctx.store.get("transactions", **key) or {}
    started_ev = next((e for e in events if e["event"] == TxEvent.STARTED), events[0])
    with_energy = [e for e in events if e["energy_wh"] is not None]
    meter_start = (
        started_ev["energy_wh"]
        if started_ev["energy_wh"] is not None
        else (with_energy[0]["energy_wh"] if with_energy else 0)
    )
    meter_stop = (
        ended[-1]["energy_wh"]
        if ended[-1]["energy_wh"] is not None
        else (with_energy[-1]["energy_wh"] if with_energy else meter_start)
    )
    started, stopped = int(started_ev["time"]), int(ended[-1]["time"])
    energy = max(0, int(meter_stop) - int(meter_start))
    tariff_id = tx.get("tariff_id") if tx.get("tariff_id") is not None else ctx.settings.default_tariff
    tariff = ctx.store.get("tariffs", tariff_id=tariff_id) if tariff_id is not None else None
    cost = tariff_cost(tariff, energy, stopped - started) if tariff else int(tx.get("board_cost") or 0)
    signed = [e["signed_meter"] for e in events if e["signed_meter"]]
    mv = ctx.store.select("meter_values", {"site_id": site_id, "device_id": device_id, "tx_id": tx_id}, order="msg_id")
    signed += [m["signed_meter"] for m in mv if m["signed_meter"]]
    ctx.store.upsert(
        "sdrs",
        {
            "sdr_id": sdr_id(ctx.settings, site_id, device_id, tx_id),
            **key,
            "evse": tx.get("evse"),
            "evse_gid": tx.get("evse_gid"),
            "id_token": tx.get("id_token"),
            "started": started,
            "stopped": stopped,
            "meter_start_wh": int(meter_start),
            "meter_stop_wh": int(meter_stop),
            "energy_wh": energy,
            "tariff_id": tariff_id,
            "currency": tariff["currency"] if tariff else ctx.settings.currency,
            "cost": cost,
            "signed_meter": signed,
            "created": int(now),
        },
    )


# ---------------------------------------------------------------- E2, E3, E7, E8
def measured_values(ctx: Ctx, it: Relayed, now: float) -> None:
    b = it.body
    ctx.store.insert(
        "measurements",
        {
            **_key(it),
            "msg_id": it.frame.msg_id,
            "kind": "frequency" if it.frame.action == Action.FREQUENCY_RESPONSE else "measured",
            "evse": b[Key.EVSE],
            "power_w": b[Key.POWER_W],
            "setpoint_w": b.get(Key.SETPOINT_W),
            "freq_mhz": b.get(Key.FREQ_MHZ),
            "time": it.time(),
        },
        ignore=True,
    )


def notify_ev_needs(ctx: Ctx, it: Relayed, now: float) -> None:
    ctx.store.insert(
        "ev_needs",
        {**_key(it), "msg_id": it.frame.msg_id, "evse": it.body[Key.EVSE], "body": it.body},
        ignore=True,
    )


Handler = Callable[[Ctx, Relayed, float], None]

HANDLERS: dict[int, Handler] = {
    Action.BOOT_NOTIFICATION: boot_notification,
    Action.STATUS_NOTIFICATION: status_notification,
    Action.NOTIFY_REPORT: notify_report,
    Action.MONITOR_EVENT: monitor_event,
    Action.FIRMWARE_STATUS: firmware_status,
    Action.FIRMWARE_CHUNK: firmware_chunk,
    Action.SECURITY_EVENT: security_event,
    Action.FAULT_REPORT: fault_report,
    Action.LOG_STATUS: log_status,
    Action.LOG_CHUNK: log_chunk,
    Action.SIGN_CERTIFICATE: sign_certificate,
    Action.GET15118_EV_CERTIFICATE: get_15118_ev_certificate,
    Action.AUTHORIZE: authorize,
    Action.RESERVATION_UPDATE: reservation_update,
    Action.TRANSACTION_EVENT: transaction_event,
    Action.METER_VALUES: meter_values,
    Action.MEASURED_VALUES: measured_values,
    Action.FREQUENCY_RESPONSE: measured_values,
    Action.NOTIFY_EV_NEEDS: notify_ev_needs,
}
"""Board messages with a CSMS side. Other board messages from a CS (Heartbeat, TimeSync,
Close, DataTransfer …) are recorded (deduplicated) and otherwise left to the gateway."""

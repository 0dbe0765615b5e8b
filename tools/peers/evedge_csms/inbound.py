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


def _evse_gid(it: Relayed, evse: object) -> str | None:
    """The global id of the frame's EVSE: the gateway's, else the site's rule for it
    (`gid.evse_gid`: site, device and EVSE number, as the roaming operator names it), so that
    the EVSEs of a board with several are told apart; None if the site id is not a global one."""
    if it.evse_gid:
        return it.evse_gid
    try:
        return gid.evse_gid(it.site_id, it.device_id, int(evse) if isinstance(evse, int) and evse else 1)
    except gid.GidError:
        return None


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
            "evse_gid": _evse_gid(it, b[Key.EVSE]),
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
    update: dict[str, Any] = {
        **key,
        "evse": b[Key.EVSE],
        "evse_gid": _evse_gid(it, b[Key.EVSE]) or row.get("evse_gid"),
        "tx_gid": global_id(ctx.settings, it.site_id, it.device_id, "T", b[Key.TX_ID]),
    }
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
        ("session_id", Key.SESSION_ID),
        ("charging_session_id", Key.CHARGING_SESSION_ID),
        ("meter_start_wh", Key.METER_START_WH),
        ("meter_stop_wh", Key.METER_STOP_WH),
        ("meter_start_out_wh", Key.METER_START_OUT_WH),
        ("meter_stop_out_wh", Key.METER_STOP_OUT_WH),
    ):
        if k in b:
            update[col] = b[k]
    session = b.get(Key.SESSION_ID)
    if session:
        update["session_gid"] = global_id(ctx.settings, it.site_id, it.device_id, "S", session)
    if b[Key.EVENT] == TxEvent.STARTED:
        update["state"] = row.get("state") or "active"
        update["started"] = it.time()
    elif b[Key.EVENT] == TxEvent.ENDED:
        update["state"] = "ended"
        update["stopped"] = it.time()
    elif not row.get("state"):
        update["state"] = "active"
    ctx.store.upsert("transactions", update)
    if b.get(Key.RESERVATION_ID) is not None and b[Key.EVENT] == TxEvent.STARTED:
        ctx.store.update(
            "reservations", {"status": "used", "updated": int(now)}, {"reservation_id": b[Key.RESERVATION_ID]}
        )
    if session:
        srow = ctx.store.get("service_sessions", **_key(it), session_id=session)
        if srow is None:
            ctx.store.insert(
                "service_sessions",
                {
                    **_key(it),
                    "session_id": session,
                    "session_gid": update["session_gid"],
                    "evse": b[Key.EVSE],
                    "evse_gid": _evse_gid(it, b[Key.EVSE]),
                    "started": it.time(),
                    "state": "active",
                },
            )
        build_sdr(ctx, it.site_id, it.device_id, session, now)
    else:  # a board that sends no service session id: its transaction is a service session of its own
        build_tx_sdr(ctx, it.site_id, it.device_id, b[Key.TX_ID], now)


def session_event(ctx: Ctx, it: Relayed, now: float) -> None:
    """Clause 6: a service session ended (the EV left, it never came: S3's EV-connection
    timeout, a power cut); its SDR is made once its transactions have ended."""
    b = it.body
    session = b[Key.SESSION_ID]
    if b[Key.EVENT] != TxEvent.ENDED:
        return
    key = {**_key(it), "session_id": session}
    row = ctx.store.get("service_sessions", **key) or {}
    ctx.store.upsert(
        "service_sessions",
        {
            **key,
            "session_gid": global_id(ctx.settings, it.site_id, it.device_id, "S", session),
            "evse": b[Key.EVSE],
            "evse_gid": _evse_gid(it, b[Key.EVSE]) or row.get("evse_gid"),
            "charging_session_id": b.get(Key.CHARGING_SESSION_ID),
            "remote_start_id": b.get(Key.REMOTE_START_ID),
            "started": row.get("started") or it.time(),
            "stopped": it.time(),
            "stop_reason": b[Key.STOP_REASON],
            "state": "ended",
        },
    )
    build_sdr(ctx, it.site_id, it.device_id, session, now)


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
        tx = ctx.store.get("transactions", **_key(it), tx_id=b[Key.TX_ID]) or {}
        if tx.get("session_id"):
            build_sdr(ctx, it.site_id, it.device_id, tx["session_id"], now)
        else:
            build_tx_sdr(ctx, it.site_id, it.device_id, b[Key.TX_ID], now)


def sdr_id(settings: Settings, site_id: str, device_id: str, tx_id: int) -> str:
    """The SDR id of a transaction that is a service session of its own (a board without
    service session ids)."""
    local = hashlib.sha256(f"{site_id}|{device_id}|{tx_id}".encode()).hexdigest()[:24].upper()
    return gid.make(settings.country, settings.party, "R", local)


def global_id(settings: Settings, site_id: str, device_id: str, kind: str, local_id: int) -> str:
    """Clause 6: the global id of a board's service session ("S") or transaction ("T"): a
    board's ids are unique for its life only, so the site and the device are part of it (a
    session id of this operator, type S; the SDR of a service session is type R)."""
    local = hashlib.sha256(f"{site_id}|{device_id}|{kind}{local_id}".encode()).hexdigest()[:24].upper()
    return gid.make(settings.country, settings.party, "R" if kind == "R" else "S", local)


def tariff_cost(tariff: dict[str, Any] | None, energy_wh: int, duration_s: int, session_fee: bool = True) -> int:
    """Cost in minor units: energy_wh × price_kwh / 1000 (floor) + price_min per started
    minute + price_session (the rule of docs/roaming.md, with the time component); the
    session fee only once per service session (`session_fee` on its first transaction)."""
    if tariff is None:
        return 0
    minutes = -(-max(duration_s, 0) // 60)
    return (
        energy_wh * int(tariff["price_kwh"]) // 1000
        + minutes * int(tariff["price_min"] or 0)
        + (int(tariff["price_session"] or 0) if session_fee else 0)
    )


def _line(ctx: Ctx, site_id: str, device_id: str, tx: dict[str, Any], first: bool) -> dict[str, Any] | None:
    """One transaction of an SDR, from its events; None while it has not ended."""
    key = {"site_id": site_id, "device_id": device_id, "tx_id": tx["tx_id"]}
    events = ctx.store.select("tx_events", key, order="seq_no")
    ended = [e for e in events if e["event"] == TxEvent.ENDED]
    if not ended:
        return None
    started_ev = next((e for e in events if e["event"] == TxEvent.STARTED), events[0])
    with_energy = [e for e in events if e["energy_wh"] is not None]

    def meter(col: str, ev: dict[str, Any], fallback: Any) -> int:
        k = str(int(Key.METER_START_WH if col == "start" else Key.METER_STOP_WH))
        body = ev["body"] or {}
        return int(body[k]) if body.get(k) is not None else int(fallback)

    meter_start = meter("start", started_ev, started_ev["energy_wh"] if started_ev["energy_wh"] is not None
                        else (with_energy[0]["energy_wh"] if with_energy else 0))  # fmt: skip
    meter_stop = meter("stop", ended[-1], ended[-1]["energy_wh"] if ended[-1]["energy_wh"] is not None
                       else (with_energy[-1]["energy_wh"] if with_energy else meter_start))  # fmt: skip
    out_start, out_stop = tx.get("meter_start_out_wh"), tx.get("meter_stop_out_wh")
    energy_out = max(0, int(out_stop) - int(out_start)) if out_start is not None and out_stop is not None else 0
    started, stopped = int(started_ev["time"]), int(ended[-1]["time"])
    energy = max(0, meter_stop - meter_start)
    tariff_id = tx.get("tariff_id") if tx.get("tariff_id") is not None else ctx.settings.default_tariff
    tariff = ctx.store.get("tariffs", tariff_id=tariff_id) if tariff_id is not None else None
    cost = tariff_cost(tariff, energy, stopped - started, first) if tariff else int(tx.get("board_cost") or 0)
    signed = [e["signed_meter"] for e in events if e["signed_meter"]]
    mv = ctx.store.select("meter_values", key, order="msg_id")
    signed += [m["signed_meter"] for m in mv if m["signed_meter"]]
    return {
        "tx_id": tx["tx_id"],
        "tx_gid": tx.get("tx_gid"),
        "charging_session_id": tx.get("charging_session_id"),
        "id_token": tx.get("id_token"),
        "started": started,
        "stopped": stopped,
        "meter_start_wh": meter_start,
        "meter_stop_wh": meter_stop,
        "energy_wh": energy,
        "meter_start_out_wh": out_start,
        "meter_stop_out_wh": out_stop,
        "energy_out_wh": energy_out,
        "tariff_id": tariff_id,
        "currency": tariff["currency"] if tariff else ctx.settings.currency,
        "cost": cost,
        "stop_reason": tx.get("stop_reason"),
        "signed_meter": signed,
    }


def _write_sdr(ctx: Ctx, sdr: str, site_id: str, device_id: str, txs: list[dict[str, Any]],
               lines: list[dict[str, Any]], session: dict[str, Any], now: float) -> None:  # fmt: skip
    first, last = lines[0], lines[-1]
    tx0 = txs[0]
    ctx.store.upsert(
        "sdrs",
        {
            "sdr_id": sdr,
            "site_id": site_id,
            "device_id": device_id,
            "tx_id": first["tx_id"],
            "session_id": session.get("session_id"),
            "session_gid": session.get("session_gid"),
            "evse": tx0.get("evse"),
            "evse_gid": tx0.get("evse_gid"),
            "id_token": first["id_token"],
            "started": first["started"],
            "stopped": last["stopped"],
            "meter_start_wh": first["meter_start_wh"],
            "meter_stop_wh": last["meter_stop_wh"],
            "energy_wh": sum(x["energy_wh"] for x in lines),
            "meter_start_out_wh": first["meter_start_out_wh"],
            "meter_stop_out_wh": last["meter_stop_out_wh"],
            "energy_out_wh": sum(x["energy_out_wh"] for x in lines),
            "tariff_id": first["tariff_id"],
            "currency": first["currency"],
            "cost": sum(x["cost"] for x in lines),
            "signed_meter": [m for x in lines for m in x["signed_meter"]],
            "transactions": [{k: v for k, v in x.items() if k not in ("signed_meter", "id_token")} for x in lines],
            "created": int(now),
        },
    )


def build_sdr(ctx: Ctx, site_id: str, device_id: str, session_id: int, now: float) -> None:
    """S6, clause 6: the SDR of a service session, made once the session has ended and every
    transaction of it has its Ended event (made again if a late event of it comes in). It
    lists its transactions (energy imported and exported, times, meter readings, tariff,
    cost); the flat session fee is charged once, with the first."""
    key = {"site_id": site_id, "device_id": device_id}
    session = ctx.store.get("service_sessions", **key, session_id=session_id)
    if session is None or session["state"] != "ended":
        return
    txs = ctx.store.select("transactions", {**key, "session_id": session_id}, order="tx_id")
    lines = [_line(ctx, site_id, device_id, t, i == 0) for i, t in enumerate(txs)]
    done = [x for x in lines if x is not None]
    if not done or len(done) != len(lines):
        return  # nothing to bill (the EV never came: S3), or a transaction still to end
    sdr = global_id(ctx.settings, site_id, device_id, "R", session_id)
    _write_sdr(ctx, sdr, site_id, device_id, txs, done, session, now)


def build_tx_sdr(ctx: Ctx, site_id: str, device_id: str, tx_id: int, now: float) -> None:
    """The SDR of a transaction without a service session id, once its Ended event is in."""
    tx = ctx.store.get("transactions", site_id=site_id, device_id=device_id, tx_id=tx_id) or {"tx_id": tx_id}
    line = _line(ctx, site_id, device_id, tx, True)
    if line is not None:
        _write_sdr(ctx, sdr_id(ctx.settings, site_id, device_id, tx_id), site_id, device_id, [tx], [line], {}, now)


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
    Action.SESSION_EVENT: session_event,
    Action.METER_VALUES: meter_values,
    Action.MEASURED_VALUES: measured_values,
    Action.FREQUENCY_RESPONSE: measured_values,
    Action.NOTIFY_EV_NEEDS: notify_ev_needs,
}
"""Board messages with a CSMS side. Other board messages from a CS (Heartbeat, TimeSync,
Close, DataTransfer …) are recorded (deduplicated) and otherwise left to the gateway."""

"""Commands of the E, M and S use cases: builders (pure functions → `CommandSpec`) and the
durable outbox (`enqueue`).

A Command (docs/upstream.md) carries one inner envelope that the gateway re-seals for each
target board. Conventions of this CSMS (docs/csms.md):

- the inner frame is a complete envelope tagged under K_UP, `seq` 0, `id` = the Command's id
  (for an answer to a board's request: kind response, `id` = the board's request id);
- `signature`/`signer` (Ed25519 over the inner frame bytes) on firmware, certificate and
  tariff commands; the firmware manifest is also signed on its own (`manifest`);
- `secret` fields (id_token, entries, private_key, device_key) are plaintext in the inner
  frame: the gateway encrypts them per board; `entries` is the msgpack list of
  `{id_token, auth_status, expiry?, token_type?, tariff_id?}` maps (schema keys);
- empty `targets` addresses the site, i.e. the gateway as local CSMS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evedge_csms.pki import Signer
from evedge_csms.store import Store
from evedge_csms.wire import encode_up, proto_time
from gateway import _core
from gateway.schema import (
    MESSAGES,
    Action,
    CertType,
    GridEvent,
    Key,
    Kind,
    LogType,
    Priority,
    ProfilePurpose,
    ResetType,
    ResetWhen,
    UpdateType,
)

DEFAULT_EXPIRY_S = 3600
SIGNED_ACTIONS = frozenset(
    {
        Action.UPDATE_FIRMWARE,
        Action.INSTALL_CERTIFICATE,
        Action.CERTIFICATE_SIGNED,
        Action.SET_TARIFF,
        Action.REVOKE_CERTIFICATE,
    }
)


@dataclass(frozen=True)
class CommandSpec:
    action: int
    body: dict[Any, Any]
    targets: tuple[str, ...] = ()
    kind: int = Kind.REQUEST
    msg_id: int | None = None
    prio: int | None = None
    expiry_s: int | None = DEFAULT_EXPIRY_S
    wrap: bool = True
    ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return self.action in SIGNED_ACTIONS and self.kind == Kind.REQUEST

    @property
    def priority(self) -> int:
        return int(self.prio if self.prio is not None else MESSAGES[self.action].priority)


def _opt(body: dict[Any, Any], **values: Any) -> dict[Any, Any]:
    for name, v in values.items():
        if v is not None:
            body[Key[name.upper()]] = v
    return body


def _t(targets: Sequence[str]) -> tuple[str, ...]:
    return tuple(targets)


# ---------------------------------------------------------------- energy (E1–E8)
def period(start_s: int, limit_w: int, phases: int | None = None, setpoint_w: int | None = None) -> dict[Any, Any]:
    return _opt({Key.START_S: start_s, Key.LIMIT_W: limit_w}, phases=phases, setpoint_w=setpoint_w)


def set_charging_profile(
    targets: Sequence[str],
    evse: int,
    profile_id: int,
    periods: Sequence[dict[Any, Any]],
    *,
    stack_level: int = 0,
    purpose: int = ProfilePurpose.TX_DEFAULT,
    valid_from: int | None = None,
    valid_to: int | None = None,
    zone: int | None = None,
) -> CommandSpec:
    """E1 (and E2/E6): a charging profile — limits over time — for an EVSE or a zone."""
    body = {
        Key.EVSE: evse,
        Key.PROFILE_ID: profile_id,
        Key.STACK_LEVEL: stack_level,
        Key.PURPOSE: int(purpose),
        Key.PERIODS: list(periods),
    }
    return CommandSpec(
        Action.SET_CHARGING_PROFILE, _opt(body, valid_from=valid_from, valid_to=valid_to, zone=zone), _t(targets)
    )


def v2g_profile(targets: Sequence[str], evse: int, profile_id: int, periods: Sequence[dict[Any, Any]]) -> CommandSpec:
    """E6: a bidirectional profile; a negative limit is a discharge limit (power to the grid)."""
    if not any(p[Key.LIMIT_W] < 0 for p in periods):
        raise ValueError("a V2G profile needs at least one period with a negative limit_w (discharge)")
    return set_charging_profile(targets, evse, profile_id, periods, purpose=ProfilePurpose.TX, stack_level=1)


def clear_charging_profile(
    targets: Sequence[str], profile_id: int | None = None, evse: int | None = None, purpose: int | None = None
) -> CommandSpec:
    return CommandSpec(
        Action.CLEAR_CHARGING_PROFILE, _opt({}, profile_id=profile_id, evse=evse, purpose=purpose), _t(targets)
    )


def get_composite_schedule(targets: Sequence[str], evse: int, duration_s: int) -> CommandSpec:
    return CommandSpec(Action.GET_COMPOSITE_SCHEDULE, {Key.EVSE: evse, Key.DURATION_S: duration_s}, _t(targets))


def demand_response(
    grid_event: int = GridEvent.PRICE,
    *,
    price: int | None = None,
    limit_w: int | None = None,
    zone: int | None = None,
    valid_from: int | None = None,
    valid_to: int | None = None,
    targets: Sequence[str] = (),
) -> CommandSpec:
    """E2: an external signal (price, grid event); the site re-plans within the users' needs."""
    body = _opt({Key.GRID_EVENT: int(grid_event)}, price=price, limit_w=limit_w, zone=zone)
    return CommandSpec(Action.DEMAND_RESPONSE, _opt(body, valid_from=valid_from, valid_to=valid_to), _t(targets))


def available_power(available_w: int, zone: int | None = None, valid_to: int | None = None) -> CommandSpec:
    """E4: the site's available power, sent to the gateway as a bare AvailablePower request."""
    return CommandSpec(
        Action.AVAILABLE_POWER, _opt({Key.AVAILABLE_W: available_w}, zone=zone, valid_to=valid_to), wrap=False
    )


def revocation_list(crl: bytes) -> CommandSpec:
    """M19: the CA's new revocation list, sent to the site's gateway as a bare request."""
    return CommandSpec(Action.REVOCATION_LIST, {Key.CRL: crl}, wrap=False)


def dso_limit(
    limit_w: int,
    deadline_ms: int,
    *,
    zone: int | None = None,
    evse: int | None = None,
    valid_to: int | None = None,
    targets: Sequence[str] = (),
    expiry_s: int = 60,
) -> CommandSpec:
    """E5: a DSO limit, urgent class, for the site (the gateway shares it among the zone's EVSEs)."""
    body = _opt({Key.LIMIT_W: limit_w, Key.DEADLINE_MS: deadline_ms}, zone=zone, evse=evse, valid_to=valid_to)
    return CommandSpec(Action.DSO_LIMIT, body, _t(targets), expiry_s=expiry_s)


def start_setpoint_loop(targets: Sequence[str], evse: int, rate_ms: int, duration_s: int | None = None) -> CommandSpec:
    """E7: start the fast loop: the board reports MeasuredValues every `rate_ms`."""
    body = _opt({Key.EVSE: evse, Key.RATE_MS: rate_ms}, duration_s=duration_s)
    return CommandSpec(Action.START_SETPOINT_LOOP, body, _t(targets))


def setpoint(targets: Sequence[str], evse: int, setpoint_w: int) -> CommandSpec:
    """E7/E6: one setpoint (an event: no answer; negative = discharge). Short expiry."""
    return CommandSpec(
        Action.SETPOINT, {Key.EVSE: evse, Key.SETPOINT_W: setpoint_w}, _t(targets), kind=Kind.EVENT, expiry_s=5
    )


def set_frequency_droop(
    targets: Sequence[str],
    curve: Sequence[tuple[int, int]],
    deadband_mhz: int,
    evse: int | None = None,
    rate_ms: int | None = None,
) -> CommandSpec:
    """E8: the droop curve, points (frequency in mHz, power in W)."""
    droop = [{Key.FREQ_MHZ: f, Key.POWER_W: p} for f, p in curve]
    body = _opt({Key.DROOP: droop, Key.DEADBAND_MHZ: deadband_mhz}, evse=evse, rate_ms=rate_ms)
    return CommandSpec(Action.SET_FREQUENCY_DROOP, body, _t(targets))


# ---------------------------------------------------------------- manage CS (M1–M19)
def var(
    component: str,
    variable: str,
    val: str | None = None,
    *,
    instance: str | None = None,
    evse: int | None = None,
    attr: int | None = None,
) -> dict[Any, Any]:
    return _opt({Key.COMPONENT: component, Key.VARIABLE: variable}, val=val, instance=instance, evse=evse, attr=attr)


def get_base_report(targets: Sequence[str], request_id: int) -> CommandSpec:
    return CommandSpec(Action.GET_BASE_REPORT, {Key.REQUEST_ID: request_id}, _t(targets))


def get_variables(targets: Sequence[str], vars_: Sequence[dict[Any, Any]]) -> CommandSpec:
    return CommandSpec(Action.GET_VARIABLES, {Key.VARS: list(vars_)}, _t(targets))


def set_variables(targets: Sequence[str], vars_: Sequence[dict[Any, Any]]) -> CommandSpec:
    return CommandSpec(Action.SET_VARIABLES, {Key.VARS: list(vars_)}, _t(targets))


def trigger_message(targets: Sequence[str], action: int, evse: int | None = None) -> CommandSpec:
    return CommandSpec(Action.TRIGGER_MESSAGE, _opt({Key.REQUESTED_ACTION: int(action)}, evse=evse), _t(targets))


def change_availability(targets: Sequence[str], operative: bool, evse: int | None = None) -> CommandSpec:
    return CommandSpec(Action.CHANGE_AVAILABILITY, _opt({Key.OPERATIVE: operative}, evse=evse), _t(targets))


def monitor(
    monitor_id: int,
    component: str,
    variable: str,
    monitor_type: int,
    threshold: float,
    severity: int = 5,
    evse: int | None = None,
) -> dict[Any, Any]:
    body = {
        Key.MONITOR_ID: monitor_id,
        Key.COMPONENT: component,
        Key.VARIABLE: variable,
        Key.MONITOR_TYPE: int(monitor_type),
        Key.THRESHOLD: float(threshold),
        Key.SEVERITY: severity,
    }
    return _opt(body, evse=evse)


def set_monitors(targets: Sequence[str], monitors: Sequence[dict[Any, Any]]) -> CommandSpec:
    return CommandSpec(Action.SET_MONITORS, {Key.MONITORS: list(monitors)}, _t(targets))


def clear_monitors(targets: Sequence[str], ids: Sequence[int]) -> CommandSpec:
    return CommandSpec(Action.CLEAR_MONITORS, {Key.IDS: list(ids)}, _t(targets))


def manifest_bytes(image_id: int, version: str, size: int, sha256: bytes) -> bytes:
    """The signed firmware manifest: canonical msgpack of [image_id, version, size, sha256]."""
    return _core.pack([image_id, version, size, sha256])


def update_firmware(
    targets: Sequence[str],
    image: bytes,
    image_id: int,
    version: str,
    signer: Signer,
    valid_from: int | None = None,
    when: int = ResetWhen.IDLE,
) -> CommandSpec:
    """M4: announce a signed image; the manifest signature lets any party verify it. `when`:
    install once the station is idle (default), or `now`: as soon as the image is verified,
    ending a running session (stop reason `reboot`)."""
    digest = hashlib.sha256(image).digest()
    signature = signer.sign(manifest_bytes(image_id, version, len(image), digest))
    body = {
        Key.IMAGE_ID: image_id,
        Key.VERSION: version,
        Key.SIZE: len(image),
        Key.SHA256: digest,
        Key.SIGNATURE: signature,
        Key.SIGNER: signer.name,
    }
    if when != ResetWhen.IDLE:
        body[Key.WHEN] = int(when)
    return CommandSpec(Action.UPDATE_FIRMWARE, _opt(body, valid_from=valid_from), _t(targets), expiry_s=86400)


def reset(targets: Sequence[str], reset_type: int = ResetType.SOFT, when: int = ResetWhen.IDLE) -> CommandSpec:
    """M5: soft/hard, now or when idle."""
    return CommandSpec(Action.RESET, {Key.RESET_TYPE: int(reset_type), Key.WHEN: int(when)}, _t(targets))


def set_display_message(
    targets: Sequence[str],
    display_id: int,
    text: str,
    priority: int,
    *,
    language: str | None = None,
    valid_from: int | None = None,
    valid_to: int | None = None,
    evse: int | None = None,
) -> CommandSpec:
    body = {Key.DISPLAY_ID: display_id, Key.TEXT: text, Key.DISPLAY_PRIORITY: int(priority)}
    body = _opt(body, language=language, valid_from=valid_from, valid_to=valid_to, evse=evse)
    return CommandSpec(Action.SET_DISPLAY_MESSAGE, body, _t(targets))


def clear_display_message(targets: Sequence[str], display_id: int) -> CommandSpec:
    return CommandSpec(Action.CLEAR_DISPLAY_MESSAGE, {Key.DISPLAY_ID: display_id}, _t(targets))


def set_log_criteria(
    targets: Sequence[str], log_level: int, log_type: int | None = None, components: Sequence[str] | None = None
) -> CommandSpec:
    body = _opt({Key.LOG_LEVEL: log_level}, log_type=log_type, components=list(components) if components else None)
    return CommandSpec(Action.SET_LOG_CRITERIA, body, _t(targets))


def get_log(
    targets: Sequence[str],
    request_id: int,
    log_type: int = LogType.DIAGNOSTICS,
    valid_from: int | None = None,
    valid_to: int | None = None,
) -> CommandSpec:
    body = _opt({Key.REQUEST_ID: request_id, Key.LOG_TYPE: int(log_type)}, valid_from=valid_from, valid_to=valid_to)
    return CommandSpec(Action.GET_LOG, body, _t(targets))


def set_fault_table(targets: Sequence[str], table: Sequence[tuple[int, int, str]]) -> CommandSpec:
    """M9: provision the fault-code table: (code, severity, text)."""
    rows = [{Key.FAULT_CODE: c, Key.SEVERITY: s, Key.TEXT: t} for c, s, t in table]
    return CommandSpec(Action.SET_FAULT_TABLE, {Key.FAULT_TABLE: rows}, _t(targets))


def delete_personal_data(id_token: str, targets: Sequence[str] = ()) -> CommandSpec:
    """M10: the site deletes the token's data (id_token in clear: the gateway encrypts it)."""
    return CommandSpec(Action.DELETE_PERSONAL_DATA, {Key.ID_TOKEN: id_token.encode()}, _t(targets))


def deregister(targets: Sequence[str], reason: str | None = None) -> CommandSpec:
    return CommandSpec(Action.DEREGISTER, _opt({}, reason=reason), _t(targets))


def migrate(targets: Sequence[str], address: str, cert: bytes | None = None) -> CommandSpec:
    """M12: move the CS to another CSMS (its address and, optionally, its trust anchor, DER)."""
    return CommandSpec(Action.MIGRATE, _opt({Key.ADDRESS: address}, cert=cert), _t(targets))


def install_certificate(targets: Sequence[str], cert_type: int, cert_der: bytes) -> CommandSpec:
    """M14 (a root) and M17 (cert_type local_csms)."""
    return CommandSpec(Action.INSTALL_CERTIFICATE, {Key.CERT_TYPE: int(cert_type), Key.CERT: cert_der}, _t(targets))


def delete_certificate(targets: Sequence[str], cert_hash: bytes) -> CommandSpec:
    return CommandSpec(Action.DELETE_CERTIFICATE, {Key.CERT_HASH: cert_hash}, _t(targets))


def get_installed_certificates(targets: Sequence[str], cert_type: int | None = None) -> CommandSpec:
    return CommandSpec(Action.GET_INSTALLED_CERTIFICATES, _opt({}, cert_type=cert_type), _t(targets))


def ocsp_response(targets: Sequence[str], cert_hash: bytes, ocsp: bytes) -> CommandSpec:
    return CommandSpec(Action.OCSP_RESPONSE, {Key.CERT_HASH: cert_hash, Key.OCSP: ocsp}, _t(targets))


def certificate_signed(
    targets: Sequence[str],
    cert_der: bytes,
    cert_type: int = CertType.CHARGING_STATION,
    private_key: bytes | None = None,
) -> CommandSpec:
    """M16 (the CSR signed) and M18 (with the key pair made outside, `private_key` DER PKCS#8,
    a secret field: encrypted by the gateway on the LAN)."""
    body = _opt({Key.CERT: cert_der, Key.CERT_TYPE: int(cert_type)}, private_key=private_key)
    return CommandSpec(Action.CERTIFICATE_SIGNED, body, _t(targets))


def revoke_certificate(cert_hash: bytes, reason: str | None = None, targets: Sequence[str] = ()) -> CommandSpec:
    return CommandSpec(Action.REVOKE_CERTIFICATE, _opt({Key.CERT_HASH: cert_hash}, reason=reason), _t(targets))


# ---------------------------------------------------------------- e-mobility services (S1–S7)
def unlock_connector(targets: Sequence[str], evse: int, connector: int | None = None) -> CommandSpec:
    """R5-2/R5-3: emergency cable unlock (urgent)."""
    return CommandSpec(Action.UNLOCK_CONNECTOR, _opt({Key.EVSE: evse}, connector=connector), _t(targets),
                       prio=Priority.URGENT, expiry_s=60)  # fmt: skip


def reserve_now(
    targets: Sequence[str], reservation_id: int, expiry: int, id_token: str, evse: int | None = None
) -> CommandSpec:
    """S1: reserve an EVSE (or any EVSE of the CS when `evse` is None) until `expiry`."""
    body = {Key.RESERVATION_ID: reservation_id, Key.EXPIRY: expiry, Key.ID_TOKEN: id_token.encode()}
    return CommandSpec(Action.RESERVE_NOW, _opt(body, evse=evse), _t(targets))


def cancel_reservation(targets: Sequence[str], reservation_id: int) -> CommandSpec:
    return CommandSpec(Action.CANCEL_RESERVATION, {Key.RESERVATION_ID: reservation_id}, _t(targets))


def local_list_entries(tokens: Sequence[dict[str, Any]]) -> bytes:
    """S2: the plaintext of `entries`: msgpack list of token maps with schema keys."""
    out = []
    for t in tokens:
        entry: dict[Any, Any] = {Key.ID_TOKEN: t["id_token"], Key.AUTH_STATUS: int(t["auth_status"])}
        for name in ("expiry", "token_type", "tariff_id"):
            if t.get(name) is not None:
                entry[Key[name.upper()]] = int(t[name])
        out.append(entry)
    return _core.pack(out)


def send_local_list(
    targets: Sequence[str],
    list_version: int,
    tokens: Sequence[dict[str, Any]],
    update_type: int = UpdateType.FULL,
    last: bool = True,
) -> CommandSpec:
    body = {
        Key.LIST_VERSION: list_version,
        Key.UPDATE_TYPE: int(update_type),
        Key.ENTRIES: local_list_entries(tokens),
        Key.LAST: last,
    }
    return CommandSpec(Action.SEND_LOCAL_LIST, body, _t(targets))


def clear_cache(targets: Sequence[str] = ()) -> CommandSpec:
    return CommandSpec(Action.CLEAR_CACHE, {}, _t(targets))


def request_start(
    targets: Sequence[str], id_token: str, remote_start_id: int, evse: int | None = None, token_type: int | None = None
) -> CommandSpec:
    body = {Key.ID_TOKEN: id_token.encode(), Key.REMOTE_START_ID: remote_start_id}
    return CommandSpec(Action.REQUEST_START_TRANSACTION, _opt(body, evse=evse, token_type=token_type), _t(targets))


def request_stop(targets: Sequence[str], tx_id: int) -> CommandSpec:
    return CommandSpec(Action.REQUEST_STOP_TRANSACTION, {Key.TX_ID: tx_id}, _t(targets))


def cost_update(targets: Sequence[str], tx_id: int, cost: int, currency: str | None = None) -> CommandSpec:
    return CommandSpec(Action.COST_UPDATE, _opt({Key.TX_ID: tx_id, Key.COST: cost}, currency=currency), _t(targets))


def set_tariff(
    targets: Sequence[str],
    tariff_id: int,
    price_kwh: int,
    currency: str,
    *,
    price_min: int | None = None,
    price_session: int | None = None,
    valid_from: int | None = None,
    text: str | None = None,
    evse: int | None = None,
) -> CommandSpec:
    body = {Key.TARIFF_ID: tariff_id, Key.PRICE_KWH: price_kwh, Key.CURRENCY: currency}
    body = _opt(body, price_min=price_min, price_session=price_session, valid_from=valid_from, text=text, evse=evse)
    return CommandSpec(Action.SET_TARIFF, body, _t(targets))


def answer(device_id: str, request_id: int, action: int, body: dict[Any, Any]) -> CommandSpec:
    """The CSMS's response to a board's request relayed upstream (BootNotification,
    Authorize, SignCertificate, Get15118EVCertificate, FirmwareChunk): a Command to that
    board whose inner frame is kind response with the board's request id."""
    return CommandSpec(action, body, (device_id,), kind=Kind.RESPONSE, msg_id=request_id, expiry_s=300)


# ---------------------------------------------------------------- outbox
def enqueue(store: Store, site_id: str, spec: CommandSpec, now: float, signer: Signer | None) -> int:
    """Write the Command in the durable outbox (state `queued`); the connection of the site
    sends it (again after a reconnect) until it is answered or expires. Returns its id."""
    with store.transaction():
        cmd_id = store.next_id("command")
        ts = proto_time(now)
        prio = spec.priority
        inner = encode_up(
            spec.kind, 0, spec.msg_id if spec.msg_id is not None else cmd_id, prio, ts, spec.action, spec.body
        )
        signature = signer.sign(inner) if (spec.signed and signer is not None) else None
        store.insert(
            "commands",
            {
                "cmd_id": cmd_id,
                "site_id": site_id,
                "action": int(spec.action),
                "name": MESSAGES[spec.action].name,
                "kind": int(spec.kind),
                "wrap": int(spec.wrap),
                "targets": list(spec.targets),
                "frame": inner,
                "prio": prio,
                "expiry": ts + spec.expiry_s if spec.expiry_s is not None else None,
                "signature": signature,
                "signer": signer.name if signature is not None and signer is not None else None,
                "state": "queued",
                "created": int(now),
                "ref": spec.ref,
            },
        )
        return cmd_id

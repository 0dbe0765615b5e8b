"""The typical message mix, as our frames and as OCPP 2.0.1 JSON (OCPP-J) with the same content.

The OCPP side is built with the `ocpp` package's own v2.0.1 dataclasses and validated
against the package's JSON schemas, so the baseline is what a user of that library sends.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ocpp.messages import Call, _validate_payload
from ocpp.v201 import call

from gateway.schema import EPOCH_UNIX, Action, Key, Kind, Priority

K = Key
TOKEN = b"04A2B3C4D5E6F7"
TS = 30_000_000  # seconds since the protocol epoch
ISO_TS = datetime.fromtimestamp(EPOCH_UNIX + TS, UTC).isoformat().replace("+00:00", "Z")
TX_UUID = "3f2c6a1e-8b4d-4c1e-9a57-0c9e6b1d2f40"


@dataclasses.dataclass(frozen=True)
class MixEntry:
    """One message of the mix: our envelope fields and the OCPP-J payload with the same content."""

    name: str
    kind: int
    prio: int
    action: int
    body: Callable[[Callable[[int, bytes], bytes]], dict[int, Any]]  # given a field encryptor
    ocpp: Any


def _sample(value: float, measurand: str, unit: str) -> dict[str, Any]:
    return {
        "timestamp": ISO_TS,
        "sampledValue": [{"value": value, "measurand": measurand, "unitOfMeasure": {"unit": unit}}],
    }


MIX: tuple[MixEntry, ...] = (
    MixEntry(
        "TransactionEvent",
        Kind.EVENT,
        Priority.CONTROL,
        Action.TRANSACTION_EVENT,
        lambda enc: {
            K.EVENT: 0,
            K.TX_ID: 4242,
            K.SEQ_NO: 0,
            K.TRIGGER: 0,
            K.EVSE: 1,
            K.ENERGY_WH: 1_234_567,
            K.ID_TOKEN: enc(K.ID_TOKEN, TOKEN),
            K.TOKEN_TYPE: 0,
        },
        call.TransactionEvent(
            event_type="Started",
            timestamp=ISO_TS,
            trigger_reason="Authorized",
            seq_no=0,
            transaction_info={"transactionId": TX_UUID},
            id_token={"idToken": TOKEN.decode(), "type": "ISO14443"},
            evse={"id": 1, "connectorId": 1},
            meter_value=[_sample(1_234_567, "Energy.Active.Import.Register", "Wh")],
        ),
    ),
    MixEntry(
        "MeterValues",
        Kind.EVENT,
        Priority.TELEMETRY,
        Action.METER_VALUES,
        lambda enc: {K.EVSE: 1, K.ENERGY_WH: 1_240_000},
        call.MeterValues(evse_id=1, meter_value=[_sample(1_240_000, "Energy.Active.Import.Register", "Wh")]),
    ),
    MixEntry(
        "StatusNotification",
        Kind.EVENT,
        Priority.TELEMETRY,
        Action.STATUS_NOTIFICATION,
        lambda enc: {K.EVSE: 1, K.STATE: 1, K.CONNECTOR: 1},
        call.StatusNotification(timestamp=ISO_TS, connector_status="Occupied", evse_id=1, connector_id=1),
    ),
    MixEntry("Heartbeat", Kind.REQUEST, Priority.TELEMETRY, Action.HEARTBEAT, lambda enc: {}, call.Heartbeat()),
    MixEntry(
        "Authorize",
        Kind.REQUEST,
        Priority.CONTROL,
        Action.AUTHORIZE,
        lambda enc: {K.ID_TOKEN: enc(K.ID_TOKEN, TOKEN), K.TOKEN_TYPE: 0},
        call.Authorize(id_token={"idToken": TOKEN.decode(), "type": "ISO14443"}),
    ),
)


def ocpp_json(payload: Any) -> str:
    """The OCPP-J text of a CALL, exactly as the `ocpp` library frames and validates it."""
    action = type(payload).__name__
    body = {k: v for k, v in _camel(dataclasses.asdict(payload)).items() if v is not None}
    msg = Call(unique_id=str(uuid.UUID(int=0x1234)), action=action, payload=body)
    _validate_payload(msg, "2.0.1")  # the sync core of the library's async validator
    return str(msg.to_json())


def _camel(d: dict[str, Any]) -> dict[str, Any]:
    def conv(k: str) -> str:
        head, *rest = k.split("_")
        return head + "".join(p.capitalize() for p in rest)

    return {conv(k): v for k, v in d.items()}


def websocket_header(n: int, masked: bool = True) -> int:
    """Bytes of a WebSocket frame header for an n-byte payload (RFC 6455); boards mask."""
    base = 2 if n < 126 else 4 if n < 65536 else 10
    return base + (4 if masked else 0)


def ocpp_wire_bytes(payload: Any) -> tuple[int, int]:
    text = ocpp_json(payload).encode()
    return len(text), len(text) + websocket_header(len(text))


def dumps_compact(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))

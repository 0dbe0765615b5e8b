"""Upstream envelopes for the CSMS (docs/upstream.md), sans I/O.

The Rust core decodes frames up to the LAN's MAX_FRAME (4096 bytes); upstream frames may be
as large as MAX_UP_FRAME (a Relay of many board frames). Larger ones are checked here with
the same rules: the K_UP tag, the 9-element envelope, the action, and the body against the
generated schema (`gateway.schema`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

from gateway import _core
from gateway.schema import (
    ACK_BODY,
    EPOCH_UNIX,
    ERROR_BODY,
    FIELDS,
    MAX_FRAME,
    MESSAGES,
    Action,
    ErrorCode,
    Key,
    Kind,
)
from gateway.upstream_wire import K_UP, MAX_UP_FRAME

MAX_REASON: Final = 120


def proto_time(now: float) -> int:
    """Protocol time (seconds since 2024-01-01Z) of a Unix time."""
    return max(0, int(now) - EPOCH_UNIX)


def unix_time(t: int) -> int:
    return t + EPOCH_UNIX


def clip_reason(text: str) -> str:
    data = text.encode()
    if len(data) <= MAX_REASON:
        return text
    return data[:MAX_REASON].decode("utf-8", "ignore")


class WireError(Exception):
    """A frame was refused: `code` from the schema's error table, `reason` names the cause.

    `msg_id`/`action`/`prio` are those of the refused frame when they could be read (the
    error frame answers them)."""

    def __init__(
        self,
        code: int,
        reason: str,
        *,
        msg_id: int = 0,
        action: int = 0,
        prio: int = 1,
        field: int | None = None,
    ) -> None:
        super().__init__(f"{ErrorCode(code).name}: {reason}")
        self.code = code
        self.reason = reason
        self.msg_id = msg_id
        self.action = action
        self.prio = prio
        self.field = field

    @property
    def name(self) -> str:
        return ErrorCode(self.code).name


@dataclass(frozen=True)
class Envelope:
    kind: int
    seq: int
    msg_id: int
    prio: int
    ts: int
    action: int
    body: dict[Any, Any]


def _peek(frame: bytes) -> tuple[int, int, int]:
    """Best effort (msg_id, action, prio) of a frame that failed to decode."""
    try:
        v = _core.unpack(frame)
    except _core.CoreError:
        return 0, 0, 1
    if isinstance(v, list) and len(v) == 9:
        ids = [x if isinstance(x, int) and not isinstance(x, bool) else 0 for x in (v[3], v[6], v[4])]
        return ids[0], ids[1], ids[2] if 0 <= ids[2] <= 3 else 1
    return 0, 0, 1


def decode_up(frame: bytes) -> Envelope:
    """Decode and check one upstream envelope (tag under K_UP). Raises WireError."""
    if len(frame) <= MAX_FRAME:
        try:
            f = _core.decode(frame, K_UP)
        except _core.CoreError as e:
            msg_id, action, prio = _peek(frame)
            raise WireError(e.code, e.reason, msg_id=msg_id, action=action, prio=prio, field=e.field) from None
        return Envelope(f.kind, f.seq, f.msg_id, f.prio, f.ts, f.action, f.body)
    return _decode_large(frame)


def _decode_large(frame: bytes) -> Envelope:
    if len(frame) > MAX_UP_FRAME:
        raise WireError(ErrorCode.OVERSIZE, f"frame of {len(frame)} bytes, max {MAX_UP_FRAME}")
    try:
        v = _core.unpack(frame)
    except _core.CoreError as e:
        raise WireError(e.code, e.reason) from None
    if not isinstance(v, list) or len(v) != 9:
        raise WireError(ErrorCode.BAD_ENVELOPE, "frame is not a 9-element envelope array")
    ver, kind, seq, msg_id, prio, ts, action, body, tag = v
    for name, x in (("ver", ver), ("kind", kind), ("seq", seq), ("id", msg_id), ("prio", prio), ("ts", ts)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise WireError(ErrorCode.BAD_ENVELOPE, f"envelope element {name} is not an unsigned integer")
    ids = {"msg_id": msg_id, "action": action if isinstance(action, int) else 0, "prio": min(prio, 3)}
    if ver != 1:
        raise WireError(ErrorCode.BAD_VERSION, f"protocol version {ver}, this CSMS speaks 1", **ids)
    if not isinstance(tag, bytes) or len(tag) != 16 or frame[-18:-16] != b"\xc4\x10":
        raise WireError(ErrorCode.BAD_ENVELOPE, "tag is not a 16-byte bin8", **ids)
    want = hmac.new(K_UP, frame[:-18], hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(want, tag):
        raise WireError(ErrorCode.BAD_TAG, "tag does not verify under K_UP", **ids)
    if kind > Kind.ACK:
        raise WireError(ErrorCode.BAD_ENVELOPE, f"kind {kind} is not 0..4", **ids)
    if not isinstance(action, int) or action not in MESSAGES:
        raise WireError(ErrorCode.UNKNOWN_ACTION, f"action {action} not in the schema", **ids)
    if prio > 3:
        raise WireError(ErrorCode.BAD_PRIORITY, f"priority {prio} above 3", **ids)
    if not isinstance(body, dict):
        raise WireError(ErrorCode.BAD_TYPE, "body is not a map", **ids)
    spec = MESSAGES[action]
    if kind in (Kind.REQUEST, Kind.EVENT):
        if kind != spec.kind:
            raise WireError(ErrorCode.BAD_KIND, f"{spec.name} is not a {Kind(kind).name.lower()}", **ids)
        members = spec.fields
    else:
        members = {Kind.RESPONSE: spec.response, Kind.ERROR: ERROR_BODY, Kind.ACK: ACK_BODY}[Kind(kind)]
    try:
        check_struct(body, members, depth=2)
    except WireError as e:
        raise WireError(e.code, e.reason, field=e.field, **ids) from None
    return Envelope(kind, seq, msg_id, prio, ts, action, body)


def check_struct(body: dict[Any, Any], members: tuple[tuple[int, bool], ...], depth: int) -> None:
    """Check a map against its members (required present, known keys typed); unknown keys kept."""
    for key, required in members:
        if required and key not in body:
            raise WireError(ErrorCode.MISSING_FIELD, f"{FIELDS[key].name} is required", field=key)
    for key, value in body.items():
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise WireError(ErrorCode.BAD_KEY, f"map key {key!r} is not an unsigned integer")
        if key in FIELDS and key != Key.EXT:
            check_value(key, value, depth + 1)


def check_value(key: int, value: Any, depth: int, elem: str | None = None) -> None:
    spec = FIELDS[key]
    kind = elem if elem is not None else spec.type
    name = spec.name

    def bad(code: int, why: str) -> WireError:
        return WireError(code, f"{name}: {why}", field=key)

    if kind in ("uint", "int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(ErrorCode.BAD_TYPE, "not an integer")
        if not spec.min <= value <= spec.max:
            raise bad(ErrorCode.OUT_OF_RANGE, f"{value} outside {spec.min:g}..{spec.max:g}")
    elif kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad(ErrorCode.BAD_TYPE, "not a number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad(ErrorCode.BAD_TYPE, "not a boolean")
    elif kind == "str":
        limit = spec.item_len if elem is not None else spec.max_len
        if not isinstance(value, str):
            raise bad(ErrorCode.BAD_TYPE, "not a string")
        if limit and len(value.encode()) > limit:
            raise bad(ErrorCode.OUT_OF_RANGE, f"longer than {limit} bytes")
    elif kind in ("bin", "secret"):
        limit = spec.item_len if elem is not None else spec.max_len
        if not isinstance(value, bytes):
            raise bad(ErrorCode.BAD_TYPE, "not a bin")
        if limit and len(value) > limit:
            raise bad(ErrorCode.OUT_OF_RANGE, f"longer than {limit} bytes")
    elif kind == "list":
        if not isinstance(value, list):
            raise bad(ErrorCode.BAD_TYPE, "not an array")
        if len(value) > spec.max_len:
            raise bad(ErrorCode.TOO_MANY_ITEMS, f"{len(value)} items, max {spec.max_len}")
        for item in value:
            check_value(key, item, depth + 1, elem=spec.elem)
    elif kind == "struct":
        if not isinstance(value, dict):
            raise bad(ErrorCode.BAD_TYPE, "item is not a map")
        check_struct(value, spec.members, depth + 1)


def encode_up(kind: int, seq: int, msg_id: int, prio: int, ts: int, action: int, body: dict[Any, Any]) -> bytes:
    """One upstream envelope tagged under K_UP."""
    frame = _core.encode(kind, seq, msg_id, prio, ts, action, body, K_UP)
    if len(frame) > MAX_UP_FRAME:
        raise ValueError(f"frame of {len(frame)} bytes above MAX_UP_FRAME")
    return frame


def error_body(code: int, reason: str, field: int | None = None) -> dict[Any, Any]:
    body: dict[Any, Any] = {Key.ERROR_CODE: int(code), Key.REASON: clip_reason(reason)}
    if field is not None:
        body[Key.FIELD] = field
    return body


def answerable_action(action: int) -> int:
    """The action an error frame carries: the refused frame's when it is in the schema."""
    return action if action in MESSAGES else int(Action.RELAY)

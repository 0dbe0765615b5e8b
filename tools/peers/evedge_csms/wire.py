"""Upstream envelopes for the CSMS (docs/upstream.md), sans I/O.

Every envelope, up to MAX_UP_FRAME (a Relay of many board frames), is decoded and checked
by the Rust core (`_core.decode(frame, K_UP, max_frame=MAX_UP_FRAME)`): one validator for
the LAN and upstream, no second copy of the schema rules here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from gateway import _core
from gateway.protocol.text import clip_reason
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import (
    EPOCH_UNIX,
    MESSAGES,
    Action,
    ErrorCode,
    Key,
)

MAX_UP_FRAME: Final = _core.MAX_UP_FRAME


def proto_time(now: float) -> int:
    """Protocol time (seconds since 2024-01-01Z) of a Unix time."""
    return max(0, int(now) - EPOCH_UNIX)


def unix_time(t: int) -> int:
    return t + EPOCH_UNIX


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
    """Decode and check one upstream envelope (tag under K_UP, up to MAX_UP_FRAME) with the
    Rust core, the one validator of the project. Raises WireError."""
    if len(frame) > MAX_UP_FRAME:
        raise WireError(ErrorCode.OVERSIZE, f"frame of {len(frame)} bytes, max {MAX_UP_FRAME}")
    try:
        f = _core.decode(frame, K_UP, max_frame=MAX_UP_FRAME)
    except _core.CoreError as e:
        msg_id, action, prio = _peek(frame)
        raise WireError(e.code, e.reason, msg_id=msg_id, action=action, prio=prio, field=e.field) from None
    return Envelope(f.kind, f.seq, f.msg_id, f.prio, f.ts, f.action, f.body)


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

"""The pure-Python ingest path a user would write without the Rust core.

msgpack for decoding, `hmac` for the tag, `heapq` for the priority queue, and the same
checks as the core (envelope, version, tag, replay window, action, kind, priority, body
against the schema). It exists as the baseline of `tools.bench.core`: the figures compare
the Rust core with this on the same frames.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
from typing import Any

import msgpack

from gateway.schema import ACK_BODY, ERROR_BODY, FIELDS, MAX_FRAME, MESSAGES, ErrorCode, Kind


class Rejected(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code


def _check_value(key: int, v: Any, elem: bool = False) -> None:
    f = FIELDS.get(key)
    if f is None:
        return
    ty = f.elem if elem else f.type
    if ty in ("uint", "int"):
        if not isinstance(v, int) or isinstance(v, bool):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if not f.min <= v <= f.max:
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
    elif ty == "float":
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if math.isnan(v) or not f.min <= v <= f.max:
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
    elif ty == "bool":
        if not isinstance(v, bool):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
    elif ty == "str":
        if not isinstance(v, str):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if len(v.encode()) > (f.item_len if elem else f.max_len):
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
    elif ty in ("bin", "secret"):
        if not isinstance(v, bytes):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if len(v) > (f.item_len if elem else f.max_len):
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
    elif ty == "list":
        if not isinstance(v, list):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if len(v) > f.max_len:
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
        for item in v:
            _check_value(key, item, elem=True)
    elif ty == "struct":
        if not isinstance(v, dict):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        _check_body(v, f.members)


def _check_body(body: dict[Any, Any], members: tuple[tuple[int, bool], ...]) -> None:
    for k, v in body.items():
        if not isinstance(k, int) or k < 0:
            raise Rejected(ErrorCode.BAD_KEY, repr(k))
        _check_value(k, v)
    for k, required in members:
        if required and k not in body:
            raise Rejected(ErrorCode.MISSING_FIELD, f"field {k}")


class PyReceiver:
    """Decode, verify, window-check and validate one device's frames."""

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self.highest = 0
        self.bitmap = 1

    def verify(self, frame: bytes) -> list[Any]:
        if len(frame) > MAX_FRAME:
            raise Rejected(ErrorCode.OVERSIZE, str(len(frame)))
        try:
            env = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise Rejected(ErrorCode.TRUNCATED, str(e)) from e
        if not isinstance(env, list) or len(env) != 9 or not isinstance(env[7], dict) or frame[-18:-16] != b"\xc4\x10":
            raise Rejected(ErrorCode.BAD_ENVELOPE, "shape")
        if env[0] != 1:
            raise Rejected(ErrorCode.BAD_VERSION, str(env[0]))
        mac = self._mac.copy()
        mac.update(frame[:-18])
        if not hmac.compare_digest(mac.digest()[:16], frame[-16:]):
            raise Rejected(ErrorCode.BAD_TAG, "tag")
        self._window(env[2])
        spec = MESSAGES.get(env[6])
        if spec is None:
            raise Rejected(ErrorCode.UNKNOWN_ACTION, str(env[6]))
        kind = env[1]
        if kind in (Kind.REQUEST, Kind.EVENT):
            if kind != spec.kind:
                raise Rejected(ErrorCode.BAD_KIND, str(kind))
            if env[4] > spec.priority:
                raise Rejected(ErrorCode.BAD_PRIORITY, str(env[4]))
            members = spec.fields
        elif kind == Kind.RESPONSE:
            members = spec.response
        elif kind == Kind.ERROR:
            members = ERROR_BODY
        else:
            members = ACK_BODY
        _check_body(env[7], members)
        return env

    def _window(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & 0xFFFFFFFFFFFFFFFF if shift < 64 else 1
            self.highest = seq
            return
        back = self.highest - seq
        if back >= 64 or self.bitmap >> back & 1:
            raise Rejected(ErrorCode.REPLAY, str(seq))
        self.bitmap |= 1 << back


class PyQueue:
    """heapq by (class, arrival): urgent first, FIFO within a class."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, int, bytes]] = []
        self._n = 0

    def push(self, prio: int, msg_id: int, frame: bytes) -> None:
        self._n += 1
        heapq.heappush(self._heap, (prio, self._n, msg_id, self._n, frame))

    def pop_batch(self, n: int) -> list[tuple[int, int, int, int, bytes]]:
        heap = self._heap
        return [heapq.heappop(heap) for _ in range(min(n, len(heap)))]

    def __len__(self) -> int:
        return len(self._heap)


def ingest(rx: PyReceiver, q: PyQueue, frames: list[bytes]) -> bytes:
    """One status byte per frame, like the core's `Receiver.ingest`."""
    out = bytearray(len(frames))
    for i, frame in enumerate(frames):
        try:
            env = rx.verify(frame)
        except Rejected as e:
            out[i] = e.code
            continue
        q.push(env[4], env[3], frame)
    return bytes(out)

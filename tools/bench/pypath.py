"""The pure-Python ingest path a user would write without the Rust core: the baseline of
`tools.bench.core`, which compares the core's `Receiver.ingest` with this on the same frames.

msgpack (msgpack-python, its C extension) decodes, `hmac` tags, `heapq` queues. The checks
are the core's (`rust_core/evcore/src/session.rs`, docs/protocol.md), in its precedence, and
a rejected frame gets the core's error name: `tests/test_bench_pypath.py` runs every golden
vector of `tests/vectors/frames.json` through both and compares. In order:

1. size: above MAX_FRAME → OVERSIZE;
2. msgpack structure, `msgpack.unpackb` with `max_array_len` / `max_map_len` = MAX_ITEMS and an
   `ext_hook` refusing ext types, then a walk of the decoded value in wire order:
   TRUNCATED (a value or a declared length past the end), INVALID_MSGPACK (marker c1, ext
   types), TOO_MANY_ITEMS, BAD_UTF8, TRAILING_BYTES; in the walk TOO_DEEP (a container deeper
   than MAX_DEPTH) and TOO_MANY_OBJECTS (the frame's budget of MAX_OBJECTS values, each
   container charged its items, a map's keys and values, when it is reached);
3. envelope shape → BAD_ENVELOPE: a 9-element array, elements 0–6 unsigned ints, a map as
   the body, a bin8 of TAG_LEN bytes ending the frame;
4. version → BAD_VERSION;
5. tag, HMAC-SHA256 truncated to 16 bytes → BAD_TAG;
6. replay window of 64 counters → REPLAY (a counter is marked seen only once the frame
   passed every check, as in the core);
7. header: kind above 4, or not valid for the action → BAD_KIND; action not in the schema →
   UNKNOWN_ACTION; priority above 3 or lower than the action's class → BAD_PRIORITY;
8. body against the members of the message (or the response, error or ack body): map keys
   unsigned ints (BAD_KEY), each once (DUPLICATE_KEY), the declared fields' types and bounds
   (BAD_TYPE, OUT_OF_RANGE: ints, floats and NaN, bools, str and bin lengths in UTF-8 bytes,
   list lengths and elements, struct members), required fields (MISSING_FIELD), the first
   problem in wire order winning. `ext` and keys the message does not declare are kept and
   not interpreted, but no map inside them may repeat a key either (DUPLICATE_KEY), as in
   the core. Keys are the same key when of the same type and equal: ints whatever their
   width, floats by value (NaN never repeats), str and bin byte for byte, arrays and maps
   item by item.

What it leaves out or does otherwise:
- two structural problems (step 2) in one frame: the core names the first in wire order;
  here msgpack-python stops at its first, and the depth is walked after decoding, so a frame
  both too deep and truncated is TOO_DEEP in the core and TRUNCATED here;
- TOO_MANY_ITEMS is raised by msgpack-python while it decodes, so it comes before a TOO_DEEP
  or TOO_MANY_OBJECTS earlier in the frame (the core: the first in wire order);
- the queue: the core's is bounded per class (QUEUE_FULL, backpressure, the frame's counter
  then not marked); `PyQueue` is an unbounded heap and never refuses;
- the error's reason text and the field at fault are not reproduced, only the name;
- `ingest` takes one device's frames (one window); the core's takes a device id too;
- upstream envelopes (above MAX_FRAME, their larger object budget) are not handled.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
from typing import Any

import msgpack

from gateway.schema import (
    ACK_BODY,
    ERROR_BODY,
    FIELDS,
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    MAX_OBJECTS,
    MESSAGES,
    PROTOCOL_VERSION,
    TAG_LEN,
    ErrorCode,
    Key,
    Kind,
)

_TAG_HEAD = bytes((0xC4, TAG_LEN))
_SUFFIX = TAG_LEN + 2


class Rejected(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code


class _Pairs(list[tuple[Any, Any]]):
    """A msgpack map whose keys repeat (or cannot be dict keys): its pairs in wire order."""


_CONTAINERS = (dict, list, _Pairs)


def _map(pairs: list[tuple[Any, Any]]) -> Any:
    try:
        d = dict(pairs)
    except TypeError:  # an unhashable key (a list or a map)
        return _Pairs(pairs)
    return d if len(d) == len(pairs) else _Pairs(pairs)


def _no_ext(code: int, data: bytes) -> Any:
    raise Rejected(ErrorCode.INVALID_MSGPACK, f"ext type {code}")


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=False,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            ext_hook=_no_ext,
            object_pairs_hook=_map,
        )
    except Rejected:
        raise
    except msgpack.ExtraData as e:
        raise Rejected(ErrorCode.TRAILING_BYTES, str(e)) from e
    except UnicodeDecodeError as e:
        raise Rejected(ErrorCode.BAD_UTF8, str(e)) from e
    except msgpack.FormatError as e:
        raise Rejected(ErrorCode.INVALID_MSGPACK, str(e)) from e
    except ValueError as e:
        text = str(e)
        if "max_array_len" in text or "max_map_len" in text:
            raise Rejected(ErrorCode.TOO_MANY_ITEMS, text) from e
        # "incomplete input", or a str/bin length above what the frame holds
        raise Rejected(ErrorCode.TRUNCATED, text) from e
    except Exception as e:  # msgpack raises a few more unrelated types for malformed input
        raise Rejected(ErrorCode.TRUNCATED, str(e)) from e


def _structure(v: Any, depth: int, left: int) -> int:
    """The walk of step 2, in wire order: TOO_DEEP for a container deeper than MAX_DEPTH (the
    outermost at depth 1), TOO_MANY_OBJECTS when a container's values (a map's keys and
    values) do not fit the `left` of the budget. Returns what is left."""
    t = type(v)
    if t is dict:
        n = 2 * len(v)
        items: Any = v.values()  # its keys are scalars (a container key makes it _Pairs)
    elif t is list:
        n = len(v)
        items = v
    elif t is _Pairs:
        n = 2 * len(v)
        items = [x for kv in v for x in kv]
    else:
        return left
    if depth > MAX_DEPTH:
        raise Rejected(ErrorCode.TOO_DEEP, f"container at depth {depth}")
    if n > left:
        raise Rejected(ErrorCode.TOO_MANY_OBJECTS, f"{n} values, {left} left")
    left -= n
    for x in items:
        if type(x) in _CONTAINERS:
            left = _structure(x, depth + 1, left)
    return left


def _same(k: Any) -> Any:
    """A map key as the core compares them: same type and equal (ints of any width alike,
    floats by value, NaN never equal to anything, arrays and maps item by item)."""
    if isinstance(k, bool):
        return ("b", k)
    if isinstance(k, int):
        return ("i", k)
    if isinstance(k, float):
        return ("f", object() if math.isnan(k) else k)
    if isinstance(k, str):
        return ("s", k)
    if isinstance(k, bytes):
        return ("y", k)
    if k is None:
        return ("n",)
    if isinstance(k, _Pairs):
        return ("m", tuple((_same(a), _same(b)) for a, b in k))
    if isinstance(k, dict):
        return ("m", tuple((_same(a), _same(b)) for a, b in k.items()))
    return ("a", tuple(_same(x) for x in k))


def _unique(v: Any) -> None:
    """DUPLICATE_KEY for the first map inside `v` (in wire order) that repeats a key."""
    if isinstance(v, _Pairs):
        seen = set()
        for k, x in v:
            _unique(k)
            n = _same(k)
            if n in seen:
                raise Rejected(ErrorCode.DUPLICATE_KEY, repr(k))
            seen.add(n)
            _unique(x)
    elif isinstance(v, dict):  # no two keys equal even for Python: none the same for the core
        for x in v.values():
            _unique(x)
    elif isinstance(v, list):
        for x in v:
            _unique(x)


def _check_value(key: int, v: Any, elem: bool = False) -> None:
    f = FIELDS[key]
    ty = f.elem if elem else f.type
    if ty == "uint" or ty == "int":  # noqa: PLR1714 — the common case first, two str compares
        if type(v) is not int:  # (a bool's type is bool)
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if not f.min <= v <= f.max:
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
    elif ty == "any":
        _unique(v)
    elif ty == "float":
        if type(v) is not float and type(v) is not int:
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
        if not isinstance(v, list) or isinstance(v, _Pairs):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        if len(v) > f.max_len:
            raise Rejected(ErrorCode.OUT_OF_RANGE, f"field {key}")
        for item in v:
            _check_value(key, item, elem=True)
    elif ty == "struct":
        if not isinstance(v, dict | _Pairs):
            raise Rejected(ErrorCode.BAD_TYPE, f"field {key}")
        _check_body(v, f.members)


_SHAPE: dict[tuple[tuple[int, bool], ...], tuple[frozenset[int], tuple[int, ...]]] = {}


def _check_body(body: dict[Any, Any] | _Pairs, members: tuple[tuple[int, bool], ...]) -> None:
    shape = _SHAPE.get(members)
    if shape is None:  # (the declared keys but ext, the required ones) of these members
        shape = _SHAPE[members] = (frozenset(k for k, _ in members if k != Key.EXT), tuple(k for k, r in members if r))
    known, required = shape
    seen: set[int] | dict[Any, Any]
    if isinstance(body, _Pairs):
        seen = set()
        for k, v in body:
            if type(k) is not int or k < 0:
                raise Rejected(ErrorCode.BAD_KEY, repr(k))
            if k in seen:
                raise Rejected(ErrorCode.DUPLICATE_KEY, f"key {k}")
            seen.add(k)
            if k in known:
                _check_value(k, v)
            else:  # ext, or a key the message does not declare: not interpreted
                _unique(v)
    else:  # a dict: no two keys equal for Python, so none the same for the core once all are uints
        seen = body
        for k, v in body.items():
            if type(k) is not int or k < 0:
                raise Rejected(ErrorCode.BAD_KEY, repr(k))
            if k in known:
                _check_value(k, v)
            elif type(v) in _CONTAINERS:
                _unique(v)
    for k in required:
        if k not in seen:
            raise Rejected(ErrorCode.MISSING_FIELD, f"field {k}")


class PyReceiver:
    """Decode, verify, window-check and validate one device's frames."""

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self.highest = 0
        self.bitmap = 1

    def verify(self, frame: bytes) -> list[Any]:
        """Every check; the frame's counter marked seen once it passed them all."""
        env = self.check(frame)
        self._accept(env[2])
        return env

    def check(self, frame: bytes, window: bool = True) -> list[Any]:
        """Every check in the core's order (without the replay window when `window` is false,
        as the core's `check_tagged`); the window is not changed. The decoded envelope."""
        if len(frame) > MAX_FRAME:
            raise Rejected(ErrorCode.OVERSIZE, str(len(frame)))
        env = _unpack(frame)
        _structure(env, 1, MAX_OBJECTS)
        if (
            not isinstance(env, list)
            or isinstance(env, _Pairs)
            or len(env) != 9
            or not all(type(x) is int and x >= 0 for x in env[:7])
            or not isinstance(env[7], dict | _Pairs)
            or frame[-_SUFFIX:-TAG_LEN] != _TAG_HEAD
        ):
            raise Rejected(ErrorCode.BAD_ENVELOPE, "shape")
        if env[0] != PROTOCOL_VERSION:
            raise Rejected(ErrorCode.BAD_VERSION, str(env[0]))
        mac = self._mac.copy()
        mac.update(frame[:-_SUFFIX])
        if not hmac.compare_digest(mac.digest()[:TAG_LEN], frame[-TAG_LEN:]):
            raise Rejected(ErrorCode.BAD_TAG, "tag")
        if window:
            self._check_window(env[2])
        kind, prio = env[1], env[4]
        if kind > Kind.ACK:
            raise Rejected(ErrorCode.BAD_KIND, str(kind))
        spec = MESSAGES.get(env[6])
        if spec is None:
            raise Rejected(ErrorCode.UNKNOWN_ACTION, str(env[6]))
        is_event = spec.kind == Kind.EVENT
        if kind in (Kind.REQUEST, Kind.EVENT):
            members = spec.fields if kind == spec.kind else None
        elif kind == Kind.RESPONSE:
            members = None if is_event else spec.response
        elif kind == Kind.ERROR:
            members = ERROR_BODY
        else:
            members = ACK_BODY if is_event else None
        if members is None:
            raise Rejected(ErrorCode.BAD_KIND, f"kind {kind} for action {env[6]}")
        if prio > 3 or (kind in (Kind.REQUEST, Kind.EVENT) and prio > spec.priority):
            raise Rejected(ErrorCode.BAD_PRIORITY, str(prio))
        _check_body(env[7], members)
        return env

    def _check_window(self, seq: int) -> None:
        if seq > self.highest:
            return
        back = self.highest - seq
        if back >= 64 or self.bitmap >> back & 1:
            raise Rejected(ErrorCode.REPLAY, str(seq))

    def _accept(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & 0xFFFFFFFFFFFFFFFF if shift < 64 else 1
            self.highest = seq
        else:
            self.bitmap |= 1 << (self.highest - seq)


class PyQueue:
    """heapq by (class, arrival): urgent first, FIFO within a class. Unbounded (the core's
    queue refuses with QUEUE_FULL when a class is full; this never does)."""

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
    """One status byte per frame (0 or the error code), like the core's `Receiver.ingest`."""
    out = bytearray(len(frames))
    for i, frame in enumerate(frames):
        try:
            env = rx.verify(frame)
        except Rejected as e:
            out[i] = e.code
            continue
        q.push(env[4], env[3], frame)
    return bytes(out)

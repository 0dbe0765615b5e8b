"""Property tests of gateway._core: valid frames round-trip, garbage only ever raises the
typed exception (never crashes, never another exception)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import _core

KEY = bytes(range(32))
EVENT, METER_VALUES = 3, 79

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
map_keys = st.integers(0, 2**32) | st.text(max_size=5)


def nested(depth: int) -> st.SearchStrategy[Any]:
    """Values whose containers nest at most `depth` deep."""
    if depth == 0:
        return scalars
    inner = nested(depth - 1)
    return scalars | st.lists(inner, max_size=4) | st.dictionaries(map_keys, inner, max_size=4)


# 6 deep at most: within the frame's depth limit (8) under the envelope and the body.
values = nested(6)

sample = st.fixed_dictionaries(
    {31: st.integers(0, 7), 32: st.floats(-1e12, 1e12, allow_nan=False)},
    optional={20: st.integers(0, 2**32 - 1), 65: st.integers(1, 3)},
)
meter_body = st.fixed_dictionaries(
    {1: st.integers(0, 255)},
    optional={
        7: st.integers(0, 2**53 - 1),
        8: st.integers(-10_000_000, 10_000_000),
        21: st.integers(0, 100),
        30: st.lists(sample, max_size=16),
        0: values,
        999: values,
    },
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b) and type(a) is type(b)


@SETTINGS
@given(
    body=meter_body,
    seq=st.integers(1, 2**32 - 1),
    msg_id=st.integers(0, 2**53 - 1),
    prio=st.integers(0, 2),
    ts=st.integers(0, 2**32 - 1),
)
def test_valid_frames_round_trip(body: dict[int, Any], seq: int, msg_id: int, prio: int, ts: int) -> None:
    frame = _core.encode(EVENT, seq, msg_id, prio, ts, METER_VALUES, body, KEY)
    if len(frame) > _core.MAX_FRAME:
        return
    got = _core.decode(frame, KEY)
    assert (got.seq, got.msg_id, got.prio, got.ts) == (seq, msg_id, prio, ts)
    assert same(got.body, body)
    assert _core.encode(EVENT, seq, msg_id, prio, ts, METER_VALUES, got.body, KEY) == frame
    # Python's msgpack reads the same envelope
    env = msgpack.unpackb(frame, strict_map_key=False, raw=False)
    assert env[:7] == [1, EVENT, seq, msg_id, prio, ts, METER_VALUES]
    r = _core.Receiver(KEY)
    assert r.ingest([frame, frame], _core.PriorityQueue(), 7) == b"\x00\x07"


@SETTINGS
@given(st.binary(max_size=600))
def test_garbage_only_raises_frame_error(data: bytes) -> None:
    for call in (lambda: _core.decode(data), lambda: _core.decode(data, KEY), lambda: _core.unpack(data)):
        try:
            call()
        except _core.FrameError as e:
            assert e.name == _core.error_name(e.code)
            assert e.reason
    r = _core.Receiver(KEY)
    statuses = r.ingest([data], _core.PriorityQueue(), 1)
    assert len(statuses) == 1
    try:
        frames, used = _core.split_frames(data)
        assert used <= len(data)
        assert sum(len(f) + 2 for f in frames) == used
    except _core.FrameError as e:
        assert e.name == "OVERSIZE"


@SETTINGS
@given(body=meter_body, at=st.integers(min_value=0), flip=st.integers(1, 255))
def test_mutated_frames_are_rejected(body: dict[int, Any], at: int, flip: int) -> None:
    frame = bytearray(_core.encode(EVENT, 1, 1, 2, 0, METER_VALUES, body, KEY))
    if len(frame) > _core.MAX_FRAME:
        return
    frame[at % len(frame)] ^= flip
    try:
        _core.decode(bytes(frame), KEY)
    except _core.FrameError:
        pass
    else:
        raise AssertionError("a mutated frame passed")


@SETTINGS
@given(values)
def test_pack_unpack_round_trip(v: Any) -> None:
    packed = _core.pack(v)
    assert same(_core.unpack(packed), v)
    assert _core.pack(_core.unpack(packed)) == packed
    assert same(msgpack.unpackb(packed, strict_map_key=False), _core.unpack(packed))

"""The firmware codec and the Rust core write the same bytes and accept each other's frames.

The golden vectors pin both to a third implementation; this checks the two against each
other directly on random envelopes and bodies, in both directions.
"""

from __future__ import annotations

from typing import Any

from csc import crypto, frame, msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _core

KEY = bytes(range(32))

scalars = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.integers(0, 300), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.integers(0, 2**16), values, max_size=6)
u32 = st.integers(0, 2**32 - 1)


def _firmware_encode(kind: int, seq: int, mid: int, prio: int, ts: int, action: int, body: dict[int, Any]) -> bytes:
    w = msgpack.Writer(size=frame.MAX_FRAME + 2)
    end = frame.encode(w, kind, seq, mid, prio, ts, action, body, mac=crypto.Hmac(KEY))
    return bytes(w.mv[2:end])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), u32, u32, st.integers(0, 3), u32, st.integers(0, 65535), bodies)
def test_same_bytes_from_both_encoders(
    kind: int, seq: int, mid: int, prio: int, ts: int, action: int, body: dict[int, Any]
) -> None:
    rust = _core.encode(kind, seq, mid, prio, ts, action, body, KEY)
    if len(rust) > frame.MAX_FRAME:
        return
    assert _firmware_encode(kind, seq, mid, prio, ts, action, body) == rust


def _sample_frames() -> list[tuple[int, int, int, dict[int, Any]]]:
    from gateway.schema import Action, Key, Kind, Priority

    return [
        (Kind.EVENT, Priority.TELEMETRY, Action.METER_VALUES, {Key.EVSE: 1, Key.ENERGY_WH: 123_456, 999: "kept"}),
        (
            Kind.EVENT,
            Priority.CONTROL,
            Action.TRANSACTION_EVENT,
            {Key.EVENT: 2, Key.TX_ID: 7, Key.SEQ_NO: 3, Key.TRIGGER: 3, Key.EVSE: 1, Key.STOP_REASON: 2},
        ),
        (Kind.REQUEST, Priority.URGENT, Action.DSO_LIMIT, {Key.LIMIT_W: 3680, Key.DEADLINE_MS: 500}),
        (
            Kind.REQUEST,
            Priority.CONTROL,
            Action.SET_CHARGING_PROFILE,
            {
                Key.EVSE: 1,
                Key.PROFILE_ID: 1,
                Key.STACK_LEVEL: 0,
                Key.PURPOSE: 1,
                Key.PERIODS: [{Key.START_S: 0, Key.LIMIT_W: -7400}],
            },
        ),
    ]


def test_each_side_decodes_the_other() -> None:
    for i, (kind, prio, action, body) in enumerate(_sample_frames(), start=1):
        rust = _core.encode(kind, i, 100 + i, prio, 5, action, body, KEY)
        fw = _firmware_encode(kind, i, 100 + i, prio, 5, action, body)
        assert rust == fw
        got = frame.decode(rust, mac=crypto.Hmac(KEY))
        assert (got.kind, got.seq, got.id, got.action) == (kind, i, 100 + i, action)
        assert dict(got.body) == body
        back = _core.decode(fw, KEY)
        assert back.body == body and back.msg_id == 100 + i

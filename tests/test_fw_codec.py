"""The firmware's link codec (firmware/csc/): msgpack, frames, tags, keys, secrets, window.

The golden vectors run twice, in CPython and on the MicroPython unix port, through the
same checks (tests/fw_vectors.py); hypothesis compares the codec with the `msgpack`,
`hmac` and `cryptography` packages and feeds it garbage.
"""

# The firmware is MicroPython and untyped by design (pyproject excludes firmware/ from mypy):
# mypy: disable-error-code="import-not-found,import-untyped,no-untyped-call"
from __future__ import annotations

import ast
import hashlib
import hmac
import json
import math
import os
import random
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import fw_vectors
import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from csc import crypto, frame, schema
from csc.frame import FrameSplitter, decode, encode, error_body
from csc.link import Link
from csc.msgpack import FrameError, Pairs, Writer, packb, unpackb
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from gateway.schema import ACK_BODY, ERROR_BODY, FIELDS, MESSAGES, FieldSpec
from tools import executables
from tools.board import build

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
VECTORS = ROOT / "tests" / "vectors" / "frames.json"
MODULES = sorted((FIRMWARE / "csc").glob("*.py"))
KEY = bytes(range(32))
MAC = crypto.Hmac(KEY)


def _window() -> Any:
    """A new replay window: the firmware's is the link's (Link.check/accept, which frame.decode
    calls), here a link that never connects."""
    return Link(None, "")


def _micropython() -> str:
    return executables.find("micropython")


def _mp_env() -> dict[str, str]:
    default = os.path.expanduser("~/.micropython/lib") + ":/usr/lib/micropython"
    return {**os.environ, "MICROPYPATH": f"{FIRMWARE}:{ROOT / 'tests'}:{default}"}


def _run_mp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_micropython(), *args], check=False, capture_output=True, text=True, env=_mp_env(), timeout=120
    )


# ---------------------------------------------------------------- golden vectors

needs_vectors = pytest.mark.skipif(not VECTORS.exists(), reason="tests/vectors/frames.json not generated yet")


@needs_vectors
def test_vectors_pass_in_cpython() -> None:
    lines: list[str] = []
    passed, failures = fw_vectors.run(str(VECTORS), out=lines.append)
    assert not failures, "\n".join(lines)
    assert passed > 100


@needs_vectors
def test_vectors_pass_in_micropython() -> None:
    r = _run_mp(str(ROOT / "tests" / "fw_vectors_runner.py"), str(VECTORS))
    assert "implementation: micropython" in r.stdout
    m = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert m, r.stdout + r.stderr
    assert r.returncode == 0 and m.group(2) == "0", r.stdout + r.stderr
    cpython_passed, _ = fw_vectors.run(str(VECTORS), out=lambda _s: None)
    assert int(m.group(1)) == cpython_passed


_BUDGET_SCRIPT = """
import gc, sys
from binascii import unhexlify
from csc import crypto, frame
from csc.msgpack import FrameError
code = int(sys.stdin.readline())
mac = crypto.Hmac(unhexlify(sys.stdin.readline().strip()))
attack = unhexlify(sys.stdin.readline().strip())
good = unhexlify(sys.stdin.readline().strip())
for _ in range(5):
    gc.collect()
    before = gc.mem_alloc()
    try:
        frame.decode(attack, mac)
        print("decoded")
    except FrameError as e:
        print("refused", e.code == code, gc.mem_alloc() - before)
f = frame.decode(good, mac)
print("survived", len(f.body[0][2]))
"""


def test_the_heap_attack_is_refused_by_name_on_a_small_heap() -> None:
    # The attacker's frame: a correctly tagged MeterValues whose ext holds 15 arrays of 256
    # empty arrays (277 KB of heap on this port without the object budget, then an untyped
    # MemoryError), on the build as a board runs it, with a heap of 96 KiB: refused with
    # TOO_MANY_OBJECTS before anything is built (the exception alone), again and again, and the
    # board decodes a frame at the budget afterwards.
    doc = json.loads(VECTORS.read_text())
    cases = {c["name"]: c for c in doc["cases"]}
    lines = [
        str(schema.E_TOO_MANY_OBJECTS),
        doc["keys"]["k_up"],
        cases["object budget: 15 arrays of 256 empty arrays in ext"]["frame"],
        cases["object budget: exactly MAX_OBJECTS values"]["frame"],
    ]
    r = subprocess.run(
        [_micropython(), "-X", "heapsize=96k", "-c", _BUDGET_SCRIPT],
        input="\n".join(lines) + "\n",
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "MICROPYPATH": str(build.built())},
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 6, r.stdout
    for line in out[:5]:
        refused, named, grew = line.split()
        assert (refused, named) == ("refused", "True"), line
        assert int(grew) < 1024, line  # the exception, nothing of the frame
    rest = schema.MAX_OBJECTS - 9 - 4 - 3 - 2 * 200
    assert out[5] == f"survived {rest}"


# ---------------------------------------------------------------- msgpack

INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False) | st.floats(width=32, allow_nan=False)
KEYS = st.none() | st.booleans() | INTS | st.text(max_size=8) | st.binary(max_size=8)


def _values(floats: bool) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | INTS | st.text(max_size=40) | st.binary(max_size=300)
    if floats:
        leaves = st.one_of(leaves, FLOATS)
    return st.recursive(leaves, lambda c: st.lists(c, max_size=6) | st.dictionaries(KEYS, c, max_size=6), max_leaves=25)


def _depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


def _hdr(n: int, fix: int, m16: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    return bytes([m16]) + struct.pack(">H", n) if n < 65536 else bytes([m16 + 1]) + struct.pack(">I", n)


def ref_pack(v: Any) -> bytes:
    """The protocol's canonical msgpack: msgpack-python's shortest forms, float32 when the
    value survives the round trip through float32 bit for bit (as the Rust core writes)."""
    if isinstance(v, float):
        try:
            if struct.pack(">d", struct.unpack(">f", struct.pack(">f", v))[0]) == struct.pack(">d", v):
                return b"\xca" + struct.pack(">f", v)
        except OverflowError:
            pass
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, list):
        return _hdr(len(v), 0x90, 0xDC) + b"".join(ref_pack(x) for x in v)
    if isinstance(v, dict):
        return _hdr(len(v), 0x80, 0xDE) + b"".join(ref_pack(k) + ref_pack(x) for k, x in v.items())
    out: bytes = msgpack.packb(v, use_bin_type=True)
    return out


@given(_values(floats=False))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_encoder_matches_msgpack_byte_for_byte(v: Any) -> None:
    assume(_depth(v) <= schema.MAX_DEPTH)
    data = packb(v)
    assert data == msgpack.packb(v, use_bin_type=True)
    assert unpackb(data) == v


@given(_values(floats=True))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_round_trip_with_floats(v: Any) -> None:
    assume(_depth(v) <= schema.MAX_DEPTH)
    data = packb(v)
    assert data == ref_pack(v)
    assert unpackb(data) == v == msgpack.unpackb(data, raw=False, strict_map_key=False)
    # and what msgpack-python writes (floats always as float64) decodes to the same value
    assert unpackb(msgpack.packb(v, use_bin_type=True)) == v


@given(INTS)
@settings(deadline=None)  # real work per example: no timing on a loaded machine
def test_every_int_width_decodes(v: int) -> None:
    forms = []
    for marker, fmt, lo, hi in (
        (0xCC, ">B", 0, 2**8 - 1),
        (0xCD, ">H", 0, 2**16 - 1),
        (0xCE, ">I", 0, 2**32 - 1),
        (0xCF, ">Q", 0, 2**64 - 1),
        (0xD0, ">b", -(2**7), 2**7 - 1),
        (0xD1, ">h", -(2**15), 2**15 - 1),
        (0xD2, ">i", -(2**31), 2**31 - 1),
        (0xD3, ">q", -(2**63), 2**63 - 1),
    ):
        if lo <= v <= hi:
            forms.append(bytes([marker]) + struct.pack(fmt, v))
    for f in forms:
        assert unpackb(f) == v


@pytest.mark.parametrize("n", [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536])
def test_every_length_width(n: int) -> None:
    s, b = "é" * (n // 2) + "x" * (n % 2), bytes(n)
    items = min(n, 256)
    for v in (s, b, [1] * items, {i: i for i in range(items)}):
        data = packb(v, size=1 << 18)
        assert data == msgpack.packb(v, use_bin_type=True)
        if not isinstance(v, list | dict) or len(v) <= schema.MAX_ITEMS:
            assert unpackb(data) == v


def test_floats_are_float32_only_when_exact() -> None:
    assert packb(1.5) == b"\xca" + struct.pack(">f", 1.5)
    assert packb(0.1) == b"\xcb" + struct.pack(">d", 0.1)
    assert packb(-0.0) == b"\xca\x80\x00\x00\x00"
    assert packb(1e300) == b"\xcb" + struct.pack(">d", 1e300)
    assert packb(math.inf) == b"\xca\x7f\x80\x00\x00"  # inf survives float32
    assert packb(math.nan) == b"\xca\x7f\xc0\x00\x00"  # the default NaN survives bit for bit
    assert packb(struct.unpack(">d", b"\x7f\xf8" + bytes(5) + b"\x01")[0])[0] == 0xCB  # a payload would not
    assert math.isnan(unpackb(b"\xca\x7f\xc0\x00\x00"))


def test_structural_errors() -> None:
    def code(data: bytes) -> int:
        with pytest.raises(FrameError) as e:
            unpackb(data)
        return int(e.value.code)

    assert code(b"") == schema.E_TRUNCATED
    assert code(b"\xdb\xff\xff\xff\xff") == schema.E_TRUNCATED  # never reserves 4 GiB
    assert code(b"\xdd\xff\xff\xff\xff") == schema.E_TOO_MANY_ITEMS
    assert code(b"\xdc\x00\x05\xc1") == schema.E_INVALID_MSGPACK  # first in byte order, not TRUNCATED
    assert code(b"\x92\xa1\xff\xc1") == schema.E_BAD_UTF8
    for bad in (b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"):  # surrogate, overlong, >U+10FFFF, cut
        assert code(bytes([0xA0 | len(bad)]) + bad) == schema.E_BAD_UTF8
    for m in (0xC1, 0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
        assert code(bytes([m, 1, 1, 1])) == schema.E_INVALID_MSGPACK
    assert unpackb(b"\x91" * 8 + b"\x01") == [[[[[[[[1]]]]]]]]  # 8 containers are allowed
    assert code(b"\x91" * 9 + b"\x01") == schema.E_TOO_DEEP
    assert code(b"\x91" * 8 + b"\xdc\x01\x01") == schema.E_TOO_DEEP  # depth is checked before the item count
    assert code(b"\xde\x01\x01") == schema.E_TOO_MANY_ITEMS
    assert len(unpackb(b"\xde\x01\x00" + b"".join(bytes([0xCC, i, 1]) for i in range(256)))) == 256  # the limit
    assert code(b"\x01\x02") == schema.E_TRAILING_BYTES


def test_maps_that_cannot_be_dicts_round_trip() -> None:
    data = b"\x84\x91\x01\x02\x01\x03\xc3\x04\xca\x3f\x80\x00\x00\x05"  # {[1]: 2, 1: 3, true: 4, 1.0: 5}
    v = unpackb(data)
    assert isinstance(v, Pairs) and list(v) == [([1], 2), (1, 3), (True, 4), (1.0, 5)]
    assert [type(k) for k, _ in v] == [list, int, bool, float]
    assert packb(v) == data


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\x01\x02\x01\x03",  # {1: 2, 1: 3}
        b"\x82\x05\xc0\xd0\x05\xc0",  # 5 as fixint and as int8
        b"\x82\xca\x3f\xc0\x00\x00\xc0\xcb" + struct.pack(">d", 1.5) + b"\xc0",  # 1.5 as float32 and float64
        b"\x83\x91\x01\xc0\x01\xc0\x91\x01\xc0",  # {[1], 1, [1]}: a repeat after the map became pairs
        b"\x82\x81\x01\x02\xc0\x81\x01\x02\xc0",  # a map key twice
        b"\x91\x91\x81\xa1k\x92\x82\xa1a\x01\xa1a\x02\xc0",  # deep inside
    ],
)
def test_a_repeated_map_key_is_refused_at_any_depth(data: bytes) -> None:
    with pytest.raises(FrameError) as e:
        unpackb(data)
    assert e.value.code == schema.E_DUPLICATE_KEY
    nan = b"\xcb" + struct.pack(">d", math.nan)
    assert len(unpackb(b"\x82" + nan + b"\xc0" + nan + b"\xc0")) == 2  # NaN: never a repeat


def test_the_encoder_refuses_a_value_nested_deeper_than_a_decoder_accepts() -> None:
    deep: Any = 1
    for _ in range(schema.MAX_DEPTH):
        deep = [deep]
    assert unpackb(packb(deep)) == deep  # 8 containers: written and read back
    for too_deep in ([deep], {1: deep}, Pairs([(1, deep)])):
        with pytest.raises(FrameError) as e:
            packb(too_deep)
        assert e.value.code == schema.E_TOO_DEEP
    loop: list[Any] = []
    loop.append(loop)  # no RecursionError: the depth limit comes first
    with pytest.raises(FrameError) as e:
        packb(loop)
    assert e.value.code == schema.E_TOO_DEEP
    # in a frame the envelope counts: a body value of 6 containers is the most (1 + 1 + 6)
    six = deep[0][0]
    w = Writer()
    end = encode(w, K.K_EVENT, 1, 1, K.P_TELEMETRY, 0, K.A_METER_VALUES, {K.F_EVSE: 1, K.F_EXT: six}, MAC)
    assert decode(bytes(w.mv[2:end]), MAC).body[K.F_EXT] == six
    with pytest.raises(FrameError) as e:
        encode(w, K.K_EVENT, 1, 1, K.P_TELEMETRY, 0, K.A_METER_VALUES, {K.F_EVSE: 1, K.F_EXT: [six]}, MAC)
    assert e.value.code == schema.E_TOO_DEEP


def test_writer_reports_a_full_buffer() -> None:
    w = Writer(size=4)
    with pytest.raises(FrameError) as e:
        w.value(b"12345")
    assert e.value.code == schema.E_OVERSIZE


@given(st.binary(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_garbage_values_raise_only_frame_errors(data: bytes) -> None:
    try:
        unpackb(data)
    except FrameError as e:
        assert e.code in fw_vectors.ERROR_NAMES


# ---------------------------------------------------------------- frames

K = schema


def _frame(kind: int, seq: int, mid: int, prio: int, action: int, body: Any, mac: Any = MAC) -> bytes:
    w = Writer()
    end = encode(w, kind, seq, mid, prio, 30_000_000, action, body, mac)
    assert w.buf[0] << 8 | w.buf[1] == end - 2
    return bytes(w.mv[2:end])


def _ref_frame(elems: list[Any], key: bytes = KEY) -> bytes:
    head = b"\x99" + b"".join(ref_pack(x) for x in elems)
    return head + b"\xc4\x10" + hmac.new(key, head, hashlib.sha256).digest()[:16]


def _code(data: bytes, mac: Any = MAC, win: Any = None) -> str:
    try:
        decode(data, mac, win)
    except FrameError as e:
        return str(fw_vectors.ERROR_NAMES[e.code])
    return "ok"


def test_encode_matches_an_independent_encoder_and_decodes() -> None:
    body = {K.F_EVSE: 2, K.F_ENERGY_WH: 2**40, K.F_SAMPLES: [{K.F_MEASURAND: 4, K.F_VALUE: 230.5}]}
    data = _frame(K.K_EVENT, 9, 2**53 - 1, K.P_TELEMETRY, K.A_METER_VALUES, body)
    assert data == _ref_frame([1, K.K_EVENT, 9, 2**53 - 1, K.P_TELEMETRY, 30_000_000, K.A_METER_VALUES, body])
    f = decode(data, MAC, _window())
    assert (f.ver, f.kind, f.seq, f.id, f.prio, f.ts, f.action) == (1, 3, 9, 2**53 - 1, 2, 30_000_000, 79)
    assert f.body == body and list(f.body) == list(body)
    assert f.tag == data[-16:]


def test_unknown_keys_and_ext_are_kept_and_relayed_unchanged() -> None:
    ext = Pairs([([1, 2], "list key"), ("a", 1), (b"a", 2)])
    body = {K.F_EVSE: 1, 200: {"vendor": [1.5, None]}, 0: ext, 70_000: b"\x00"}
    data = _frame(K.K_EVENT, 1, 1, K.P_TELEMETRY, K.A_METER_VALUES, body)
    f = decode(data, MAC)
    assert f.body[200] == {"vendor": [1.5, None]} and f.body[0] == ext and f.body[70_000] == b"\x00"
    assert _frame(f.kind, f.seq, f.id, f.prio, f.action, f.body) == data


def test_frame_size_limits() -> None:
    def chunk(n: int) -> bytes:
        return _frame(K.K_EVENT, 1, 1, K.P_BULK, K.A_LOG_CHUNK, {47: 1, 44: 0, 46: False, 45: bytes(n)})

    base = len(chunk(0)) - 2  # bin8 header of an empty bin
    # K.F_DATA allows 1024 bytes; a larger frame still encodes up to MAX_FRAME
    assert _code(chunk(1024)) == "ok"
    assert _code(chunk(1025)) == "OUT_OF_RANGE"
    big = schema.MAX_FRAME - base - 3  # bin16 header
    assert len(chunk(big)) == schema.MAX_FRAME
    with pytest.raises(FrameError) as e:
        chunk(big + 1)
    assert e.value.code == schema.E_OVERSIZE
    assert _code(chunk(big) + b"\x00") == "OVERSIZE"


def test_error_carries_id_action_and_field_for_the_answer() -> None:
    data = _frame(K.K_EVENT, 1, 77, K.P_TELEMETRY, K.A_METER_VALUES, {K.F_EVSE: 300})
    with pytest.raises(FrameError) as e:
        decode(data, MAC)
    err = e.value
    assert (err.code, err.id, err.action, err.field) == (K.E_OUT_OF_RANGE, 77, K.A_METER_VALUES, K.F_EVSE)
    body = error_body(err)
    reply = _frame(K.K_ERROR, 2, err.id, K.P_TELEMETRY, err.action, body)
    assert decode(reply, MAC).body == {12: K.E_OUT_OF_RANGE, 13: err.reason, 14: K.F_EVSE}
    with pytest.raises(FrameError) as e:
        decode(b"\xc1", MAC)
    assert (e.value.id, e.value.action) == (0, 0)


def test_precedence_inside_the_body() -> None:
    mv = K.A_METER_VALUES

    def body_code(body: Any) -> str:
        return _code(_ref_frame([1, K.K_EVENT, 5, 5, K.P_TELEMETRY, 30_000_000, mv, body]))

    # a struct is checked in full where it stands: its missing member precedes a later error
    assert body_code({K.F_EVSE: 1, K.F_SAMPLES: [{K.F_VALUE: 1.0}], K.F_POWER_W: "x"}) == "MISSING_FIELD"
    # a body's missing field comes after every entry
    assert body_code({K.F_SAMPLES: [{K.F_MEASURAND: 0, K.F_VALUE: 1}], K.F_ENERGY_WH: -1}) == "OUT_OF_RANGE"
    # an error inside a list of structs names the body key
    with pytest.raises(FrameError) as e:
        decode(_ref_frame([1, K.K_EVENT, 5, 5, 2, 0, mv, {1: 1, 30: [{31: 0, 32: 1}, {31: 0, 32: "x"}]}]), MAC)
    assert (e.value.code, e.value.field) == (K.E_BAD_TYPE, K.F_SAMPLES)
    # keys of the dictionary that this message (or struct) does not list are kept unchecked
    assert body_code({K.F_EVSE: 1, K.F_ERROR_CODE: "not checked here", K.F_REASON: 5}) == "ok"
    assert body_code({K.F_EVSE: 1, K.F_SAMPLES: [{K.F_MEASURAND: 0, K.F_VALUE: 1, K.F_EVSE: "x"}]}) == "ok"
    # unknown struct members are kept
    assert body_code({K.F_EVSE: 1, K.F_SAMPLES: [{K.F_MEASURAND: 0, K.F_VALUE: 1, 250: "x"}]}) == "ok"
    # a list's length is checked before its elements
    assert body_code({K.F_EVSE: 1, K.F_SAMPLES: ["x"] * 17}) == "OUT_OF_RANGE"
    # ints are accepted for floats, bool is never an int
    assert body_code({K.F_EVSE: 1, K.F_SAMPLES: [{K.F_MEASURAND: 0, K.F_VALUE: 2**60}]}) == "OUT_OF_RANGE"
    assert body_code({K.F_EVSE: True}) == "BAD_TYPE"
    # structure errors beat everything, even a bad tag
    assert _code(_ref_frame([1, 9, 5, 5, 9, 0, mv, {0: 1}])[:-18] + b"\xc4\x10" + bytes(15)) == "TRUNCATED"


def test_window_moves_only_for_valid_frames() -> None:
    win = _window()
    bad_body = _frame(K.K_EVENT, 5, 1, K.P_TELEMETRY, K.A_METER_VALUES, {})
    assert _code(bad_body, MAC, win) == "MISSING_FIELD"
    assert win.highest == 0
    good = _frame(K.K_EVENT, 5, 1, K.P_TELEMETRY, K.A_METER_VALUES, {K.F_EVSE: 1})
    assert _code(good, MAC, win) == "ok"
    assert _code(good, MAC, win) == "REPLAY"
    forged = _frame(K.K_EVENT, 9, 1, K.P_TELEMETRY, K.A_METER_VALUES, {K.F_EVSE: 1}, crypto.Hmac(bytes(32)))
    assert _code(forged, MAC, win) == "BAD_TAG"
    assert win.highest == 5


@given(
    st.lists(st.integers(min_value=0, max_value=400), max_size=60) | st.lists(st.integers(0, 2**32 - 1), max_size=20)
)
@settings(deadline=None)  # real work per example: no timing on a loaded machine
def test_window_matches_a_model(seqs: list[int]) -> None:
    win = _window()
    seen, highest = {0}, 0
    for s in seqs:
        if s in seen or highest - s >= 64:  # a replay: refused, and nothing recorded
            with pytest.raises(FrameError) as e:
                win.check(s)
            assert e.value.code == schema.E_REPLAY
        else:
            win.check(s)
            win.accept(s)
            seen.add(s)
            highest = max(highest, s)
        assert win.highest == highest


def _valid_frames() -> list[bytes]:
    return [
        _frame(K.K_EVENT, 3, 4, K.P_TELEMETRY, K.A_METER_VALUES, {K.F_EVSE: 1, K.F_SAMPLES: [{31: 2, 32: 0.5}]}),
        _frame(K.K_REQUEST, 1, 2, K.P_CONTROL, K.A_HELLO, {50: "DE*X", 51: bytes(16), 52: 1, 53: 1, 54: 1}),
        _frame(K.K_ACK, 4, 5, K.P_CONTROL, K.A_TRANSACTION_EVENT, {K.F_IDS: [1, 2, 3], 0: {"v": [1, {2: b""}]}}),
    ]


@given(st.data())
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_mutated_frames_raise_only_frame_errors(data: st.DataObject) -> None:
    buf = bytearray(data.draw(st.sampled_from(_valid_frames())))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i:]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    for mac in (None, MAC):
        try:
            f = decode(bytes(buf), mac, _window())
            assert isinstance(f, frame.Frame)
        except FrameError as e:
            assert e.code in fw_vectors.ERROR_NAMES


@given(st.binary(max_size=600), st.booleans())
@settings(max_examples=1000, deadline=None)
def test_garbage_frames_raise_only_frame_errors(data: bytes, with_mac: bool) -> None:
    try:
        f = decode(data, MAC if with_mac else None, _window())
    except FrameError as e:
        assert e.code in fw_vectors.ERROR_NAMES, e.code
        assert isinstance(e.reason, str) and e.reason
        return
    assert isinstance(f, frame.Frame)  # garbage that happens to be a valid frame is a Frame


LAN_MESSAGES = [m for m in MESSAGES.values() if m.origin in ("cs", "csms", "any")]
UNKNOWN_KEYS = (250, 70_000)  # in no LAN message: kept unchecked


def _field_value(f: FieldSpec, elem: bool = False) -> st.SearchStrategy[Any]:
    """A valid value of field f (of its list's element with `elem`), small."""
    t = f.elem if elem else f.type
    n = (f.item_len if elem else f.max_len) or schema.MAX_FRAME
    if t == "list":
        item = _valid_body(f.members) if f.elem == "struct" else _field_value(f, True)
        return st.lists(item, max_size=min(f.max_len, 3))
    if t in ("uint", "int"):
        return st.integers(int(f.min), int(f.max))
    if t == "float":
        lo, hi = f.min, f.max
        floats = st.floats(lo, hi, allow_nan=False)
        return floats | floats.map(lambda x: y if lo <= (y := _float32(x)) <= hi else x)  # float32 on the wire
    if t == "bool":
        return st.booleans()
    if t == "str":
        return st.text(max_size=min(n, 12)).map(lambda v: v.encode()[:n].decode("utf-8", "ignore"))
    if t in ("bin", "secret"):
        return st.binary(max_size=min(n, 12))
    return EXT_VALUES


def _float32(x: float) -> float:
    try:
        return float(struct.unpack(">f", struct.pack(">f", x))[0])
    except OverflowError:
        return x


EXT_VALUES = _values(floats=True).filter(lambda v: _depth(v) <= schema.MAX_DEPTH - 2)


def _valid_body(members: tuple[tuple[int, bool], ...], top: bool = False) -> st.SearchStrategy[dict[int, Any]]:
    """A body (or struct) of these members: the required ones, some optional ones, and at the
    top ext and unknown keys (kept by a receiver)."""
    required = {k: _field_value(FIELDS[k]) for k, req in members if req}
    optional = {k: _field_value(FIELDS[k]) for k, req in members if not req}
    if top:
        optional.update({k: EXT_VALUES for k in (K.F_EXT, *UNKNOWN_KEYS)})
    return st.fixed_dictionaries(required, optional=optional)


@st.composite
def _valid_frame_parts(draw: st.DrawFn) -> tuple[int, int, int, tuple[tuple[int, bool], ...], dict[int, Any]]:
    """(kind, action, prio, members, body) of a frame every check of the board accepts."""
    m = draw(st.sampled_from(LAN_MESSAGES))
    if m.kind == K.K_REQUEST:
        kind = draw(st.sampled_from([K.K_REQUEST, K.K_RESPONSE, K.K_ERROR]))
    else:
        kind = draw(st.sampled_from([K.K_EVENT, K.K_ACK]))
    members = {
        K.K_REQUEST: m.fields,
        K.K_EVENT: m.fields,
        K.K_RESPONSE: m.response,
        K.K_ERROR: ERROR_BODY,
        K.K_ACK: ACK_BODY,
    }[kind]
    prio = draw(st.integers(0, int(m.priority) if kind in (K.K_REQUEST, K.K_EVENT) else 3))
    return kind, m.code, prio, members, draw(_valid_body(members, top=True))


def _frame_of(kind: int, action: int, prio: int, body: Any) -> bytes:
    """The frame, its body given as a dict or as the (key, value-bytes) pairs of its map."""
    if isinstance(body, dict):
        return _ref_frame([1, kind, 3, 4, prio, 30_000_000, action, body])
    head = b"\x99" + b"".join(ref_pack(x) for x in (1, kind, 3, 4, prio, 30_000_000, action))
    head += _hdr(len(body), 0x80, 0xDE) + b"".join(ref_pack(k) + v for k, v in body)
    return head + b"\xc4\x10" + hmac.new(KEY, head, hashlib.sha256).digest()[:16]


@given(_valid_frame_parts())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_random_bodies_decode_and_re_encode_unchanged(fr: Any) -> None:
    # valid by construction (schema types and bounds, ext and unknown keys): every example
    # reaches the decoder's real check, and none may be refused
    kind, action, prio, _members, body = fr
    data = _frame_of(kind, action, prio, body)
    assume(len(data) <= schema.MAX_FRAME)  # small values: almost never above
    f = decode(data, MAC, _window())
    event(f"kind {kind}")
    assert (f.kind, f.seq, f.id, f.prio, f.action) == (kind, 3, 4, prio, action)
    assert f.body == body and list(f.body) == list(body)
    assert _frame(f.kind, f.seq, f.id, f.prio, f.action, f.body) == data  # canonical in, canonical out


def _defects(members: tuple[tuple[int, bool], ...], body: dict[int, Any]) -> list[tuple[str, int | None, Any]]:
    """(error, field, body as (key, value-bytes) pairs) for every single defect this body can
    be given; the rest of the body stays valid."""
    pairs = [(k, ref_pack(v)) for k, v in body.items()]
    out: list[tuple[str, int | None, Any]] = []

    def put(k: int, raw: bytes) -> list[tuple[int, bytes]]:
        return [(x, raw if x == k else v) for x, v in pairs]

    known = {k for k, _ in members}
    for k, v in body.items():
        out.append(("DUPLICATE_KEY", k if k <= 0xFFFF else None, [*pairs, (k, ref_pack(v))]))  # field: a uint16
        if k not in known:
            continue
        f = FIELDS[k]
        wrong = 1 if f.type in ("str", "bool") else "x"
        out.append(("BAD_TYPE", k, put(k, ref_pack(wrong))))
        over: Any = None
        if f.type in ("uint", "int") and f.max < 2**63 - 1:
            over = int(f.max) + 1
        elif f.type == "float":
            over = f.max * 2 if f.max > 0 else f.max + 1
        elif f.type in ("str", "bin", "secret") and f.max_len <= 300:
            over = "x" * (f.max_len + 1) if f.type == "str" else bytes(f.max_len + 1)
        elif f.type == "list" and v and f.max_len <= 16:
            over = [v[0]] * (f.max_len + 1)
        if over is not None:
            out.append(("OUT_OF_RANGE", k, put(k, ref_pack(over))))
    for k, req in members:
        if req:
            out.append(("MISSING_FIELD", k, [(x, v) for x, v in pairs if x != k]))
    repeat = b"\x91\x82\xa1k\x01\xa1k\x02"  # [{"k": 1, "k": 2}]
    out.append(("DUPLICATE_KEY", K.F_EXT, [(x, v) for x, v in pairs if x != K.F_EXT] + [(K.F_EXT, repeat)]))
    budget = ref_pack([[None] * schema.MAX_ITEMS] * 2)
    out.append(("TOO_MANY_OBJECTS", None, [(x, v) for x, v in pairs if x != K.F_EXT] + [(K.F_EXT, budget)]))
    return out


@given(_valid_frame_parts(), st.data())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_body_with_one_defect_is_refused_with_its_error(fr: Any, data: st.DataObject) -> None:
    # the invalid counterpart: a valid body given exactly one defect (a repeated key, a wrong
    # type, a bound crossed, a required field left out, a repeat inside ext, too many values)
    # is refused with the error that defect names, and the field at fault
    kind, action, prio, members, body = fr
    error, field, pairs = data.draw(st.sampled_from(_defects(members, body)))
    event(error)
    frame_bytes = _frame_of(kind, action, prio, pairs)
    assume(len(frame_bytes) <= schema.MAX_FRAME)
    win = _window()
    with pytest.raises(FrameError) as e:
        decode(frame_bytes, MAC, win)
    assert (fw_vectors.ERROR_NAMES[e.value.code], e.value.field) == (error, field)
    assert win.highest == 0  # a refused frame moves nothing


# ---------------------------------------------------------------- streams


def test_splitter_with_readinto() -> None:
    frames = _valid_frames()
    stream = b"".join(len(f).to_bytes(2, "big") + f for f in frames) * 40
    sp = FrameSplitter()
    got: list[bytes] = []
    pos = 0
    while pos < len(stream):
        room = sp.space()
        n = min(len(room), 13, len(stream) - pos)
        room[:n] = stream[pos : pos + n]
        pos += n
        sp.wrote(n)
        while (f := sp.next()) is not None:
            got.append(bytes(f))
    assert got == frames * 40


@given(st.lists(st.binary(min_size=1, max_size=4096), max_size=4), st.integers(1, 5000))
@settings(max_examples=100, deadline=None)
def test_splitter_any_chunking(payloads: list[bytes], step: int) -> None:
    stream = b"".join(len(p).to_bytes(2, "big") + p for p in payloads)
    sp = FrameSplitter()
    got = [bytes(f) for i in range(0, len(stream), step) for f in sp.feed(stream[i : i + step])]
    assert got == payloads


def test_splitter_fails_for_good_on_a_bad_prefix() -> None:
    sp = FrameSplitter()
    with pytest.raises(FrameError):
        list(sp.feed(b"\x10\x01" + bytes(10)))
    with pytest.raises(FrameError):
        sp.next()


# ---------------------------------------------------------------- crypto


@given(st.binary(max_size=150), st.binary(max_size=300))
@settings(deadline=None)  # real work per example: no timing on a loaded machine
def test_hmac_matches_the_standard_library(key: bytes, msg: bytes) -> None:
    m = crypto.Hmac(key)
    want = hmac.new(key, msg, hashlib.sha256).digest()
    assert m.digest(msg) == want
    framed = b"ab" + msg + b"cd"  # a region of a buffer, as the link tags and checks it
    out = bytearray(18)
    m.tag_into(framed, 2, 2 + len(msg), out, 2)  # the frame tag, written in place
    assert out[2:] == want[:16]
    assert m.verify(framed, 2, 2 + len(msg), b"x" + want, 1)
    for i in range(16):  # a wrong byte anywhere in the tag
        assert not m.verify(framed, 2, 2 + len(msg), bytes(a ^ (j == i) for j, a in enumerate(want)), 0)


_HMAC_SCRIPT = """
import sys, json, binascii
from csc import crypto
print("viper", crypto.sha256 is not None)
for k, m, a in json.loads(sys.stdin.read()):
    key = binascii.unhexlify(k)
    msg = binascii.unhexlify(m)
    buf = bytearray(a) + msg + bytearray(7)  # the message as a region of a larger buffer
    mac = crypto.Hmac(key)
    out = bytearray(17)
    mac.tag_into(buf, a, a + len(msg), out, 1)
    d = mac.digest(msg)
    ok = mac.verify(buf, a, a + len(msg), d, 0)
    bad = bytearray(d)
    bad[len(msg) % 16] ^= 1
    no = mac.verify(buf, a, a + len(msg), bad, 0)
    print(binascii.hexlify(d).decode(), binascii.hexlify(out[1:]).decode(), ok, no)
"""


def test_the_board_hmac_matches_the_standard_library_under_micropython() -> None:
    # the board's own SHA-256 (csc/sha256.py, viper): every padding case around the block
    # boundaries, keys below, at and above the block size, messages at any offset
    rng = random.Random(20261121)
    cases: list[tuple[str, str, int]] = []
    for size in [*range(130), 183, 184, 191, 192, 247, 248, 1000, 4096]:
        klen = rng.choice([0, 1, 16, 32, 63, 64, 65, 100])
        cases.append((rng.randbytes(klen).hex(), rng.randbytes(size).hex(), rng.randrange(0, 9)))
    r = subprocess.run(
        [_micropython(), "-c", _HMAC_SCRIPT],
        input=json.dumps(cases),
        check=False,
        capture_output=True,
        text=True,
        env=_mp_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "viper True", lines[0]  # the allocation-free path, not hashlib's
    assert len(lines) == len(cases) + 1
    for (k, m, _a), line in zip(cases, lines[1:], strict=True):
        want = hmac.new(bytes.fromhex(k), bytes.fromhex(m), hashlib.sha256).hexdigest()
        assert line == f"{want} {want[:32]} True False", (len(m) // 2, len(k) // 2)


def _root_bits(n: int, k: int) -> int:
    """The first 32 bits of the fractional part of n ** (1 / k), in integers: floor((n << 32k) ** (1/k))."""
    x = n << (32 * k)
    lo, hi = 0, 1 << (32 + 8)
    while lo < hi:  # the largest r with r ** k <= x
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if mid**k <= x else (lo, mid - 1)
    return lo & 0xFFFFFFFF


def test_the_board_sha256_constants_are_fips_180_4s() -> None:
    # csc/sha256.py keeps the round constants and the initial state as a bytes literal (in flash on a
    # board): big-endian words, checked here against their definition, computed again
    src = (Path(__file__).parents[1] / "firmware" / "csc" / "sha256.py").read_text()
    k = next(
        ast.literal_eval(n.value)
        for n in ast.parse(src).body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "_K"
    )
    primes = [p for p in range(2, 312) if all(p % d for d in range(2, int(p**0.5) + 1))][:64]
    want = [_root_bits(p, 3) for p in primes] + [_root_bits(p, 2) for p in primes[:8]]
    assert list(struct.unpack(">72I", k)) == want
    assert want[0] == 0x428A2F98 and want[64] == 0x6A09E667  # FIPS 180-4's first K and H(0)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))
@settings(max_examples=50, deadline=None)
def test_key_derivation(k_dev: bytes, nb: bytes, ng: bytes) -> None:
    def h(label: bytes) -> bytes:
        return hmac.new(k_dev, label + nb + ng, hashlib.sha256).digest()

    assert crypto.hello_key(k_dev) == hmac.new(k_dev, b"evlink/1 hello", hashlib.sha256).digest()
    assert crypto.derive(k_dev, nb, ng) == (
        h(b"evlink/1 up"),
        h(b"evlink/1 dn"),
        h(b"evlink/1 eu")[:16],
        h(b"evlink/1 ed")[:16],
    )


@given(
    st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=200)
)
@settings(deadline=None)  # real work per example: no timing on a loaded machine
def test_ctr_matches_cryptography(key: bytes, seq: int, field: int, plain: bytes) -> None:
    iv = struct.pack(">QII", seq, field, 0)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    want = enc.update(plain) + enc.finalize()
    assert crypto.ctr(key, seq, field, plain) == want
    assert crypto.ctr(key, seq, field, want) == plain


# ---------------------------------------------------------------- MicroPython: build and heap


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_mpy_cross_compiles(module: Path, tmp_path: Path) -> None:
    exe = executables.find("mpy-cross")
    out = tmp_path / (module.stem + ".mpy")
    cmd = [exe, "-march=host", "-o", str(out), str(module)]  # -march: sha256.py is viper
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_heap_use_per_frame_under_micropython() -> None:
    r = _run_mp(str(ROOT / "tests" / "fw_alloc.py"))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = re.findall(r"(\w+) len=(\d+) encode\+seal=(\d+) decode\+verify=(\d+)", r.stdout)
    assert len(rows) == 3, r.stdout
    for name, _n, enc, dec in rows:
        # the Frame and its decoded body (frame.decode without `into`; the link's own loops
        # allocate nothing: tests/fw_alloc_link.py)
        assert int(enc) <= 1200, (name, enc)
        assert int(dec) <= 1800, (name, dec)


def test_the_services_tick_allocates_nothing_on_an_idle_board(tmp_path: Path) -> None:
    # App.tick() runs every 50 ms: a service's tick that allocates (a `from … import` in it, a call
    # through `*args`) makes garbage twenty times a second (tests/fw_alloc_tick.py)
    env = _mp_env()
    env["MICROPYPATH"] += ":.frozen"  # the port's frozen asyncio, which csc.app imports
    r = subprocess.run(
        [_micropython(), str(ROOT / "tests" / "fw_alloc_tick.py"), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    per_tick = dict(line.split() for line in r.stdout.splitlines())
    assert {"Config", "Auth", "SmartCharging", "Transactions", "FirmwareUpdate", "Admin", "Station"} <= set(per_tick)
    assert {name: int(n) for name, n in per_tick.items() if int(n)} == {}

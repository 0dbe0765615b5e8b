"""The Python face of the Rust core (gateway._core): every function, class and error path."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest

import gateway
from gateway import _core

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "frames.json"

KEY = bytes(range(32))
OTHER = bytes(32)
REQUEST, RESPONSE, ERROR, EVENT, ACK = 0, 1, 2, 3, 4
HELLO, HEARTBEAT, DSO_LIMIT, METER_VALUES, TX_EVENT, SET_LOG, STATUS = 1, 3, 27, 79, 78, 53, 80


def meter(**extra: Any) -> dict[int, Any]:
    body: dict[int, Any] = {1: 1, 7: 123_456}
    body.update({int(k[1:]): v for k, v in extra.items()})
    return body


def frame(
    body: dict[Any, Any] | None = None,
    *,
    kind: int = EVENT,
    seq: int = 1,
    msg_id: int = 9,
    prio: int = 2,
    ts: int = 1000,
    action: int = METER_VALUES,
    key: bytes = KEY,
) -> bytes:
    return _core.encode(kind, seq, msg_id, prio, ts, action, meter() if body is None else body, key)


def raw_frame(elements: list[Any], key: bytes = KEY, body: bytes = b"") -> bytes:
    """An envelope built by hand with Python's msgpack (`body`: raw bytes appended after
    the elements), tagged like the protocol says."""
    unsealed = b"\x99" + b"".join(msgpack.packb(e) for e in elements) + body
    return unsealed + b"\xc4\x10" + hmac.new(key, unsealed, hashlib.sha256).digest()[:16]


HEAD = [1, EVENT, 1, 1, 2, 0, METER_VALUES]


def error_of(data: bytes, key: bytes | None = KEY) -> _core.FrameError:
    with pytest.raises(_core.FrameError) as info:
        _core.decode(data, key)
    return info.value


# ---------------------------------------------------------------- module


def test_package_reexports_the_core() -> None:
    assert gateway.__version__ == _core.__version__
    assert gateway.__version__.count(".") == 2
    for name in _core.__all__:
        assert getattr(gateway, name) is getattr(_core, name)
    assert _core.schema_rev() == _core.SCHEMA_REV >= 1
    assert _core.MAX_FRAME == 4096
    assert _core.PROTOCOL_VERSION == 1


def test_exception_hierarchy() -> None:
    assert issubclass(_core.FrameError, _core.CoreError)
    assert issubclass(_core.SignatureError, _core.CoreError)
    assert issubclass(_core.QueueFull, _core.CoreError)
    assert issubclass(_core.CoreError, Exception)


def test_error_names() -> None:
    assert _core.error_name(0) == "OK"
    assert _core.error_name(6) == "BAD_TAG"
    assert _core.error_name(19) == "QUEUE_FULL"
    with pytest.raises(ValueError):
        _core.error_name(999)


# ---------------------------------------------------------------- keys and secrets


def test_key_schedule_matches_the_protocol() -> None:
    nb, ng = bytes(16), bytes([1]) * 16

    def h(label: bytes) -> bytes:
        return hmac.new(KEY, label, hashlib.sha256).digest()

    assert _core.hello_key(KEY) == h(b"evlink/1 hello")
    k_up, k_dn, e_up, e_dn = _core.derive_keys(KEY, nb, ng)
    assert k_up == h(b"evlink/1 up" + nb + ng)
    assert k_dn == h(b"evlink/1 dn" + nb + ng)
    assert e_up == h(b"evlink/1 eu" + nb + ng)[:16]
    assert e_dn == h(b"evlink/1 ed" + nb + ng)[:16]


def test_aes_ctr_round_trips_and_uses_the_counter_block() -> None:
    key = bytes(range(16))
    plain = b"04A1B2C3D4E5F6 and more than one block of personal data"
    cipher = _core.aes_ctr(key, 7, 16, plain)
    assert cipher != plain and len(cipher) == len(plain)
    assert _core.aes_ctr(key, 7, 16, cipher) == plain
    assert _core.aes_ctr(key, 8, 16, plain) != cipher
    assert _core.aes_ctr(key, 7, 17, plain) != cipher
    with pytest.raises(ValueError):
        _core.aes_ctr(b"short", 7, 16, plain)


def test_aes_ctr_against_cryptography() -> None:
    modes = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
    key, plain = bytes(range(16)), bytes(range(50))
    block = (5).to_bytes(8, "big") + (57).to_bytes(4, "big") + bytes(4)
    enc = modes.Cipher(modes.algorithms.AES(key), modes.modes.CTR(block)).encryptor()
    assert _core.aes_ctr(key, 5, 57, plain) == enc.update(plain) + enc.finalize()


# ---------------------------------------------------------------- ed25519

# RFC 8032, test 2
PK = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
SIG = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def test_ed25519_single() -> None:
    assert _core.ed25519_verify(PK, b"\x72", SIG) is True
    assert _core.ed25519_verify(PK, b"\x73", SIG) is False
    with pytest.raises(_core.SignatureError) as info:
        _core.ed25519_verify(PK[:31], b"\x72", SIG)
    assert info.value.name == "BAD_SIGNATURE"
    assert info.value.code == 18
    with pytest.raises(_core.SignatureError):
        _core.ed25519_verify(PK, b"\x72", SIG[:63])


def test_ed25519_batch_reports_each_item() -> None:
    good = (PK, b"\x72", SIG)
    assert _core.ed25519_verify_batch([good] * 3) == [True, True, True]
    assert _core.ed25519_verify_batch([good, (PK, b"x", SIG), (PK[:3], b"\x72", SIG), good]) == [
        True,
        False,
        False,
        True,
    ]
    assert _core.ed25519_verify_batch([]) == []


# ---------------------------------------------------------------- codec


def test_pack_is_canonical_and_unpack_reads_every_width() -> None:
    for v in [0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -32, -33, -128, -129, -(2**63)]:
        assert _core.pack(v) == msgpack.packb(v)
        assert _core.unpack(msgpack.packb(v)) == v
    assert _core.pack("é" * 40) == msgpack.packb("é" * 40)
    assert _core.pack(b"\x00" * 300) == msgpack.packb(b"\x00" * 300)
    assert _core.pack([1, [2, None], {3: True}]) == msgpack.packb([1, [2, None], {3: True}])
    assert _core.pack(1.5) == b"\xca\x3f\xc0\x00\x00"  # exact in float32
    assert _core.pack(0.1) == msgpack.packb(0.1)  # float64
    assert _core.unpack(b"\xd0\x05") == 5
    assert _core.unpack(b"\xcb" + msgpack.packb(0.1)[1:]) == 0.1
    assert _core.unpack(b"\xdf\x00\x00\x00\x01\x01\xa1a") == {1: "a"}
    assert _core.unpack(b"\x81\x92\x01\x02\xc0") == {(1, 2): None}
    with pytest.raises(OverflowError):
        _core.pack(2**64)
    with pytest.raises(TypeError):
        _core.pack(object())


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"", "TRUNCATED"),
        (b"\xc1", "INVALID_MSGPACK"),
        (b"\xd4\x01\x02", "INVALID_MSGPACK"),
        (b"\xa2\xff\xfe", "BAD_UTF8"),
        (b"\x91" * 9 + b"\xc0", "TOO_DEEP"),
        (b"\xdc\x01\x01" + b"\xc0" * 257, "TOO_MANY_ITEMS"),
        (b"\xdb\xff\xff\xff\xff", "TRUNCATED"),
        (b"\xc0\xc0", "TRAILING_BYTES"),
    ],
)
def test_unpack_errors(data: bytes, name: str) -> None:
    with pytest.raises(_core.FrameError) as info:
        _core.unpack(data)
    assert info.value.name == name


def test_encode_is_canonical_and_decode_returns_everything() -> None:
    body = {1: 2, 8: -7360, 30: [{31: 4, 32: 230.5}, {31: 2, 32: 0.1, 65: 3}], 0: {"v": b"\x01"}, 900: "kept"}
    f = _core.encode(EVENT, 5, 77, 2, 123, METER_VALUES, body, KEY)
    assert f[:8] == b"\x99" + b"".join(msgpack.packb(x) for x in [1, EVENT, 5, 77, 2, 123, METER_VALUES])
    assert f[8:-18] == _core.pack(body)
    assert f[-18:-16] == b"\xc4\x10"
    assert f[-16:] == hmac.new(KEY, f[:-18], hashlib.sha256).digest()[:16]
    fr = _core.decode(f, KEY)
    assert (fr.ver, fr.kind, fr.seq, fr.msg_id, fr.prio, fr.ts, fr.action) == (1, EVENT, 5, 77, 2, 123, METER_VALUES)
    assert fr.body == body
    assert list(fr.body) == [1, 8, 30, 0, 900]  # wire order
    assert fr.tag == f[-16:]
    assert "Frame(" in repr(fr)
    assert _core.decode(f).body == body  # no key: no tag check
    assert error_of(f, OTHER).name == "BAD_TAG"


def test_python_msgpack_reads_our_frames() -> None:
    f = frame(meter(_13="x", _41=b"sig"))
    env = msgpack.unpackb(f, strict_map_key=False)
    assert env[:7] == [1, EVENT, 1, 9, 2, 1000, METER_VALUES]
    assert env[7] == {1: 1, 7: 123_456, 13: "x", 41: b"sig"}


# ---------------------------------------------------------------- every error path

ERROR_CASES: list[tuple[str, bytes, str]] = [
    ("oversize", b"\xc0" * 4097, "OVERSIZE"),
    ("empty", b"", "TRUNCATED"),
    ("truncated", frame()[:-1], "TRUNCATED"),
    ("reserved marker", b"\x99\xc1", "INVALID_MSGPACK"),
    ("too deep", raw_frame([1, EVENT, 1, 1, 2, 0, METER_VALUES, {0: [[[[[[[[1]]]]]]]]}]), "TOO_DEEP"),
    ("too many", raw_frame([1, EVENT, 1, 1, 2, 0, METER_VALUES, {0: list(range(257))}]), "TOO_MANY_ITEMS"),
    ("bad utf8", raw_frame(HEAD, body=b"\x82\x01\x01\x02\xa1\xff"), "BAD_UTF8"),
    ("trailing", frame() + b"\x00", "TRAILING_BYTES"),
    ("envelope of 8", msgpack.packb([1, EVENT, 1, 1, 2, 0, METER_VALUES, {1: 1}]), "BAD_ENVELOPE"),
    ("negative seq", raw_frame([1, EVENT, -1, 1, 2, 0, METER_VALUES, {1: 1}]), "BAD_ENVELOPE"),
    ("body not a map", raw_frame([1, EVENT, 1, 1, 2, 0, METER_VALUES, [1]]), "BAD_ENVELOPE"),
    ("version 2", frame().replace(b"\x99\x01", b"\x99\x02", 1), "BAD_VERSION"),
    ("tag flipped", frame()[:-1] + bytes([frame()[-1] ^ 1]), "BAD_TAG"),
    ("other key", frame(key=OTHER), "BAD_TAG"),
    ("kind 5", frame(kind=5), "BAD_KIND"),
    ("unknown action", frame(action=999), "UNKNOWN_ACTION"),
    ("event as request", frame(kind=REQUEST), "BAD_KIND"),
    ("request as event", frame({}, kind=EVENT, action=HEARTBEAT), "BAD_KIND"),
    ("response to event", frame(kind=RESPONSE), "BAD_KIND"),
    ("ack of request", frame({}, kind=ACK, action=HEARTBEAT), "BAD_KIND"),
    ("priority 4", frame({}, kind=RESPONSE, action=HEARTBEAT, prio=4), "BAD_PRIORITY"),
    ("priority lowered", frame(prio=3), "BAD_PRIORITY"),
    ("string key", frame({"a": 1, 1: 1}), "BAD_KEY"),
    ("negative key", frame({-1: 1, 1: 1}), "BAD_KEY"),
    ("duplicate key", raw_frame(HEAD, body=b"\x82\x01\x01\x01\x02"), "DUPLICATE_KEY"),
    ("int8 width accepted, then checked", raw_frame(HEAD, body=b"\x81\x01\xd1\x01\x00"), "OUT_OF_RANGE"),
    ("evse as str", frame({1: "1"}), "BAD_TYPE"),
    ("uint given float", frame({1: 1.0}), "BAD_TYPE"),
    ("bool given int", frame({1: 1, 19: 1}, action=TX_EVENT, prio=1), "BAD_TYPE"),
    ("nil value", frame({1: None}), "BAD_TYPE"),
    ("uint negative", frame({1: -1}), "OUT_OF_RANGE"),
    ("evse 256", frame({1: 256}), "OUT_OF_RANGE"),
    ("energy 2^60", frame({1: 1, 7: 2**60}), "OUT_OF_RANGE"),
    ("power below min", frame({1: 1, 8: -10_000_001}), "OUT_OF_RANGE"),
    ("float NaN", frame({1: 1, 30: [{31: 0, 32: math.nan}]}), "OUT_OF_RANGE"),
    ("list too long", frame({1: 1, 30: [{31: 0, 32: 1.0}] * 17}), "OUT_OF_RANGE"),
    ("list item too long", frame({102: 1, 105: ["x" * 33]}, kind=REQUEST, action=SET_LOG, prio=1), "OUT_OF_RANGE"),
    ("struct wrong type", frame({1: 1, 30: [{31: "x", 32: 1.0}]}), "BAD_TYPE"),
    ("missing evse", frame({7: 1}), "MISSING_FIELD"),
    ("struct member missing", frame({1: 1, 30: [{31: 0}]}), "MISSING_FIELD"),
    ("error without reason", frame({12: 6}, kind=ERROR), "MISSING_FIELD"),
]


@pytest.mark.parametrize(("data", "name"), [(d, n) for _, d, n in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_decode_error_paths(data: bytes, name: str) -> None:
    e = error_of(data)
    assert e.name == name, e.reason
    assert e.code == next(c for c in range(1, 29) if _core.error_name(c) == name)
    assert e.reason
    assert str(e).startswith(name)


def test_errors_name_the_field() -> None:
    e = error_of(frame({1: 1, 7: 2**60}))
    assert e.field == 7
    assert "energy_wh" in e.reason and str(2**60) in e.reason
    assert error_of(frame({7: 1})).field == 1
    assert error_of(frame()[:-1]).field is None


def test_precedence() -> None:
    # a structural problem beats a bad tag and a bad body
    assert error_of(frame({1: "x"}, key=OTHER) + b"\x00").name == "TRAILING_BYTES"
    # the tag is checked before kind and body
    assert error_of(frame({1: "x"}, kind=9, key=OTHER)).name == "BAD_TAG"
    # body: first problem in wire order, then missing fields
    assert error_of(frame({8: "x", 1: -1})).name == "BAD_TYPE"
    assert error_of(frame({8: 1, 7: "x"})).name == "BAD_TYPE"


def test_split_frames() -> None:
    a, b = frame(), frame(seq=2)
    stream = len(a).to_bytes(2, "big") + a + len(b).to_bytes(2, "big") + b
    assert _core.split_frames(stream) == ([a, b], len(stream))
    assert _core.split_frames(bytearray(stream[:-3])) == ([a], len(a) + 2)
    assert _core.split_frames(b"") == ([], 0)
    for bad in (b"\x00\x00" + a, b"\x10\x01"):
        with pytest.raises(_core.FrameError) as info:
            _core.split_frames(bad)
        assert info.value.name == "OVERSIZE"


# ---------------------------------------------------------------- queue


def test_queue_urgent_first_and_fifo() -> None:
    q = _core.PriorityQueue()
    q.push(3, 1, 10, 5, b"bulk")
    q.push(0, 2, 11, 85, b"urgent")
    q.push(2, 3, 12, 79, b"telemetry")
    assert len(q) == 3
    assert (q.len_class(2), q.bytes_class(2)) == (1, 9)
    assert q.pop_batch(10) == [(0, 2, 11, 85, b"urgent"), (2, 3, 12, 79, b"telemetry"), (3, 1, 10, 5, b"bulk")]
    assert len(q) == 0
    assert q.pop_batch(10) == []


def test_queue_drr_shares_by_weight() -> None:
    q = _core.PriorityQueue(quantum=100)
    for i in range(200):
        for p in (1, 2, 3):
            q.push(p, 0, i, 1, bytes(100))
    got = q.pop_batch(130)
    assert [sum(1 for x in got if x[0] == p) for p in (1, 2, 3)] == [80, 40, 10]
    assert len(q.pop_batch(10, max_bytes=250)) == 2


def test_queue_backpressure() -> None:
    q = _core.PriorityQueue(max_items=2, max_bytes=1000)
    q.push(1, 0, 1, 1, b"a")
    q.push(1, 0, 2, 1, b"b")
    with pytest.raises(_core.QueueFull) as info:
        q.push(1, 0, 3, 1, b"c")
    assert info.value.name == "QUEUE_FULL" and info.value.code == 19
    with pytest.raises(_core.QueueFull):
        q.push(2, 0, 3, 1, bytes(1001))
    q.push(2, 0, 3, 1, bytes(1000))
    assert len(q) == 3
    with pytest.raises(ValueError):
        q.push(4, 0, 3, 1, b"x")
    with pytest.raises(ValueError):
        _core.PriorityQueue(quantum=0)


# ---------------------------------------------------------------- receiver and sender


def test_sender_numbers_and_receiver_checks() -> None:
    s, r = _core.Sender(KEY), _core.Receiver(KEY)
    assert s.seq == 1
    f1 = s.seal(EVENT, 100, 2, 5, METER_VALUES, meter())
    f2 = s.seal(EVENT, 101, 2, 5, METER_VALUES, meter())
    assert s.seq == 3
    assert r.verify(f2) == (EVENT, 2, 101, 2, 5, METER_VALUES)
    assert r.highest == 2
    fr = r.receive(f1)
    assert (fr.seq, fr.body) == (1, meter())
    with pytest.raises(_core.FrameError) as info:
        r.verify(f1)
    assert info.value.name == "REPLAY"
    with pytest.raises(_core.FrameError) as info:
        r.verify(frame(seq=3, key=OTHER))
    assert info.value.name == "BAD_TAG"
    assert r.highest == 2  # a forged frame does not move the window


def test_receiver_window_size() -> None:
    r = _core.Receiver(KEY, window=4)
    r.verify(frame(seq=10))
    with pytest.raises(_core.FrameError) as info:
        r.verify(frame(seq=6))
    assert info.value.name == "REPLAY"
    r.verify(frame(seq=7))
    with pytest.raises(ValueError):
        _core.Receiver(KEY, window=65)


def test_ingest_batch_statuses_and_reasons() -> None:
    s, r = _core.Sender(KEY), _core.Receiver(KEY)
    q = _core.PriorityQueue(max_items=3)
    good = [s.seal(EVENT, i, 2, 0, METER_VALUES, meter()) for i in range(4)]
    bad_tag = frame(seq=50, key=OTHER)
    urgent = s.seal(REQUEST, 99, 0, 0, DSO_LIMIT, {24: -5000, 35: 100})
    statuses = r.ingest([good[0], b"\xc1", good[1], good[1], bad_tag, good[2], good[3], urgent], q, 42)
    assert isinstance(statuses, bytes)
    assert list(statuses) == [0, 16, 0, 7, 6, 0, 19, 0]
    assert [(i, _core.error_name(c)) for i, c, _ in r.last_errors()] == [
        (1, "INVALID_MSGPACK"),
        (3, "REPLAY"),
        (4, "BAD_TAG"),
        (6, "QUEUE_FULL"),
    ]
    assert all(reason for _, _, reason in r.last_errors())
    out = q.pop_batch(100)
    assert out[0] == (0, 42, 99, DSO_LIMIT, urgent)
    assert [(p, d, m, a) for p, d, m, a, _ in out[1:]] == [(2, 42, i, METER_VALUES) for i in range(3)]
    assert out[1][4] == good[0]
    # the frame refused for backpressure can come again: its seq was not marked seen
    assert list(r.ingest((good[3],), q, 42)) == [0]
    assert r.last_errors() == []
    assert r.ingest([], q, 42) == b""
    with pytest.raises(TypeError):
        r.ingest(["not bytes"], q, 42)  # type: ignore[list-item]


def test_encode_accepts_all_value_types_and_ver() -> None:
    body = {0: {"n": None, "b": True, "l": [1, -2, 2.5], "t": (1, 2), "ba": bytearray(b"xy")}, 1: 1}
    fr = _core.decode(frame(body))
    assert fr.body[0] == {"n": None, "b": True, "l": [1, -2, 2.5], "t": [1, 2], "ba": b"xy"}
    v2 = _core.encode(EVENT, 1, 1, 2, 0, METER_VALUES, meter(), KEY, ver=2)
    assert error_of(v2).name == "BAD_VERSION"
    with pytest.raises(ValueError):
        _core.encode(EVENT, 1, 1, 2, 0, METER_VALUES, {0: _deep(100)}, KEY)


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


# ---------------------------------------------------------------- golden vectors


def _vectors() -> dict[str, Any]:
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} missing (python -m tools.make_vectors)")
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def _typed(j: Any) -> Any:
    if isinstance(j, list):
        return [_typed(x) for x in j]
    if isinstance(j, dict):
        if "$float" in j:
            return float(j["$float"])
        if "$bin" in j:
            return bytes.fromhex(j["$bin"])
        if "$map" in j:
            return {_typed(k): _typed(v) for k, v in j["$map"]}
    return j


def test_golden_frame_cases() -> None:
    doc = _vectors()
    keys = {k: bytes.fromhex(v) for k, v in doc["keys"].items()}
    for case in doc["cases"]:
        data = bytes.fromhex(case["frame"])
        key = keys[case["key"]] if case["key"] else None
        if "error" in case["expect"]:
            assert error_of(data, key).name == case["expect"]["error"], case["name"]
            continue
        ok = case["expect"]["ok"]
        fr = _core.decode(data, key)
        assert [fr.ver, fr.kind, fr.seq, fr.msg_id, fr.prio, fr.ts, fr.action] == [
            ok[n] for n in ("ver", "kind", "seq", "id", "prio", "ts", "action")
        ], case["name"]
        assert fr.body == _typed(ok["body"]), case["name"]
        assert fr.tag.hex() == ok["tag"]
        if case["canonical"]:
            assert key is not None
            again = _core.encode(fr.kind, fr.seq, fr.msg_id, fr.prio, fr.ts, fr.action, fr.body, key)
            assert again == data, case["name"]


def test_golden_sequences_streams_and_crypto() -> None:
    doc = _vectors()
    keys = {k: bytes.fromhex(v) for k, v in doc["keys"].items()}
    for seq in doc["sequences"]:
        r = _core.Receiver(keys[seq["key"]])
        q = _core.PriorityQueue()
        statuses = r.ingest([bytes.fromhex(f) for f in seq["frames"]], q, 1)
        assert [_core.error_name(s).replace("OK", "ok") for s in statuses] == seq["expect"], seq["name"]
    for st in doc["streams"]:
        data = bytes.fromhex(st["bytes"])
        if "error" in st["expect"]:
            with pytest.raises(_core.FrameError) as info:
                _core.split_frames(data)
            assert info.value.name == st["expect"]["error"]
        else:
            assert [f.hex() for f in _core.split_frames(data)[0]] == st["expect"]["frames"]
    for s in doc["secrets"]:
        assert (
            _core.aes_ctr(bytes.fromhex(s["key"]), s["seq"], s["field"], bytes.fromhex(s["plain"])).hex() == s["cipher"]
        )
    items = [
        (bytes.fromhex(e["public"]), bytes.fromhex(e["message"]), bytes.fromhex(e["signature"])) for e in doc["ed25519"]
    ]
    assert _core.ed25519_verify_batch(items) == [e["valid"] for e in doc["ed25519"]]
    for v in doc["values"]:
        got = _core.unpack(bytes.fromhex(v["msgpack"]))
        want = _typed(v["value"])
        assert got == want, v["name"]
        if isinstance(want, float):
            assert math.copysign(1, got) == math.copysign(1, want), v["name"]


def test_decode_takes_a_larger_limit_for_upstream_envelopes() -> None:
    from gateway.schema import Action, Key, Kind, Priority

    big = [{Key.DEVICE_ID: f"DE*EVE*E{i}", Key.FRAME: bytes(100)} for i in range(60)]
    frame = _core.encode(
        Kind.EVENT, 1, 1, Priority.TELEMETRY, 0, Action.RELAY, {Key.SITE_ID: "s", Key.FRAMES: big}, bytes(32)
    )
    assert len(frame) > _core.MAX_FRAME
    with pytest.raises(_core.FrameError) as e:
        _core.decode(frame)
    assert e.value.name == "OVERSIZE"
    assert len(_core.decode(frame, max_frame=_core.MAX_UP_FRAME).body[Key.FRAMES]) == 60
    with pytest.raises(ValueError, match="max_frame"):
        _core.decode(frame, max_frame=_core.MAX_UP_FRAME + 1)


RELAY, SITE_ID, FRAMES, DEVICE_ID, FRAME, TOKEN_UID = 101, 136, 138, 50, 137, 167


def relay_of(items: list[dict[int, Any]], action: int = RELAY, site: str = "DE*EVE*LSITE1") -> bytes:
    return _core.encode(EVENT, 9, 77, 2, 5, action, {SITE_ID: site, FRAMES: items}, KEY)


def test_relay_rows_match_decode_and_unpack() -> None:
    s = _core.Sender(KEY)
    inner = [s.seal(EVENT, i, 2, 0, METER_VALUES, meter(k7=i)) for i in (3, 4)]
    items: list[dict[int, Any]] = [
        {DEVICE_ID: "ev-1", FRAME: inner[0]},
        {DEVICE_ID: "ev-2", FRAME: inner[1], TOKEN_UID: "DE*ABC*1"},
    ]
    raw = relay_of(items)
    header, site, rows = _core.relay_rows(raw, KEY)
    f = _core.decode(raw, KEY, max_frame=_core.MAX_UP_FRAME)
    assert header == (f.kind, f.seq, f.msg_id, f.prio, f.ts, f.action)
    assert site == f.body[SITE_ID]
    expected = []
    for item in f.body[FRAMES]:
        env = _core.unpack(item[FRAME])
        expected.append((item[DEVICE_ID], env[3], env[4], env[6], item[FRAME], item.get(TOKEN_UID)))
    assert rows == expected
    assert rows[1][1] == 4 and rows[1][5] == "DE*ABC*1"


def test_relay_rows_refuse_what_decode_refuses_and_other_actions() -> None:
    raw = relay_of([{DEVICE_ID: "ev-1", FRAME: b"\x99"}])
    with pytest.raises(_core.FrameError):  # a bad tag, as decode
        _core.relay_rows(raw, OTHER)
    with pytest.raises(_core.FrameError):  # the inner frame is no envelope
        _core.relay_rows(raw, KEY)
    hb = _core.encode(REQUEST, 1, 1, 2, 0, HEARTBEAT, {}, KEY)
    with pytest.raises(ValueError, match="not a Relay"):
        _core.relay_rows(hb, KEY)
    with pytest.raises(ValueError, match="max_frame"):
        _core.relay_rows(raw, KEY, max_frame=0)

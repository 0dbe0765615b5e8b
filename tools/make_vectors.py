"""Write the shared golden vectors, tests/vectors/frames.json.

The vectors are built here from independent parts — the `msgpack` package, `hmac`,
`cryptography` — and not from either codec under test, so the Rust core and the firmware
codec are both checked against a third implementation. Each invalid case is built to
break exactly one rule of docs/protocol.md and names the error that rule gives.

    python -m tools.make_vectors           # rewrite the file
    python -m tools.make_vectors --check   # exit 1 when the committed file is stale
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.schema import MAX_ITEMS, MAX_OBJECTS, Action, Key, Kind, Priority

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "frames.json"

K_DEV = bytes(range(32))
NONCE_B = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE_G = bytes.fromhex("f0e0d0c0b0a090807060504030201000")


def _h(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


KEYS = {
    "k_dev": K_DEV,
    "nonce_board": NONCE_B,
    "nonce_gateway": NONCE_G,
    "k_hello": _h(K_DEV, b"evlink/1 hello"),
    "k_up": _h(K_DEV, b"evlink/1 up" + NONCE_B + NONCE_G),
    "k_dn": _h(K_DEV, b"evlink/1 dn" + NONCE_B + NONCE_G),
    "e_up": _h(K_DEV, b"evlink/1 eu" + NONCE_B + NONCE_G)[:16],
    "e_dn": _h(K_DEV, b"evlink/1 ed" + NONCE_B + NONCE_G)[:16],
}


# ---------------------------------------------------------------- canonical packing
def _float(v: float) -> bytes:
    """float32 when the value survives the round trip through float32 bit for bit, else float64."""
    try:
        f32 = struct.pack(">f", v)
    except OverflowError:
        return b"\xcb" + struct.pack(">d", v)
    if struct.pack(">d", struct.unpack(">f", f32)[0]) == struct.pack(">d", v):
        return b"\xca" + f32
    return b"\xcb" + struct.pack(">d", v)


def pack(v: Any) -> bytes:
    """Canonical msgpack: the `msgpack` package's shortest forms, floats as float32 when exact."""
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, list):
        return _hdr(len(v), 0x90, 0xDC) + b"".join(pack(x) for x in v)
    if isinstance(v, dict):
        return _hdr(len(v), 0x80, 0xDE) + b"".join(pack(k) + pack(x) for k, x in v.items())
    return bytes(msgpack.packb(v, use_bin_type=True))


def _hdr(n: int, fix: int, b16: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    if n < 65536:
        return bytes([b16]) + struct.pack(">H", n)
    return bytes([b16 + 1]) + struct.pack(">I", n)


class Raw:
    """Bytes spliced into a frame as they are: for non-canonical or broken encodings."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def pack_any(v: Any) -> bytes:
    if isinstance(v, Raw):
        return v.data
    if isinstance(v, list):
        return _hdr(len(v), 0x90, 0xDC) + b"".join(pack_any(x) for x in v)
    if isinstance(v, dict):
        return _hdr(len(v), 0x80, 0xDE) + b"".join(pack_any(k) + pack_any(x) for k, x in v.items())
    return pack(v)


def seal(elems: list[Any], key: str | None) -> bytes:
    """Pack the first 8 envelope elements and append the tag under KEYS[key]."""
    head = _hdr(9, 0x90, 0xDC) + b"".join(pack_any(x) for x in elems)
    tag = _h(KEYS[key], head)[:16] if key else bytes(16)
    return head + b"\xc4\x10" + tag


def typed(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, int | str):
        return v
    if isinstance(v, float):
        return {"$float": v}
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, list):
        return [typed(x) for x in v]
    if isinstance(v, dict):
        return {"$map": [[typed(k), typed(x)] for k, x in v.items()]}
    raise TypeError(type(v))


def ctr(key: bytes, seq: int, field: int, data: bytes) -> bytes:
    iv = struct.pack(">QII", seq, field, 0)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


# ---------------------------------------------------------------- cases
TS = 30_000_000  # about 2024-12-14 in the protocol's epoch
REQ, RES, ERR, EVT, ACK = (int(k) for k in (Kind.REQUEST, Kind.RESPONSE, Kind.ERROR, Kind.EVENT, Kind.ACK))
URG, CTL, TEL, BLK = (int(p) for p in Priority)
K = Key


def env(kind: int, seq: int, mid: int, prio: int, action: int, body: dict[Any, Any], ts: int = TS) -> list[Any]:
    return [1, kind, seq, mid, prio, ts, action, body]


def ok(name: str, elems: list[Any], key: str | None = "k_up", canonical: bool = True) -> dict[str, Any]:
    frame = seal(elems, key)
    decoded = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    body = elems[7]
    want = dict(zip(("ver", "kind", "seq", "id", "prio", "ts", "action"), decoded[:7], strict=True))
    want["body"] = typed(body) if canonical else typed(decoded[7])
    want["tag"] = frame[-16:].hex()
    if canonical:
        assert frame == seal(elems, key)
        assert [*decoded[:7]] == [*elems[:7]], name
    return {"name": name, "frame": frame.hex(), "key": key, "canonical": canonical, "expect": {"ok": want}}


def bad(name: str, frame: bytes, error: str, key: str | None = "k_up") -> dict[str, Any]:
    return {"name": name, "frame": frame.hex(), "key": key, "canonical": False, "expect": {"error": error}}


def valid_cases() -> list[dict[str, Any]]:
    token = b"04A2B3C4D5E6F7"
    seq = 7
    started = {
        K.EVENT: 0,
        K.TX_ID: 4242,
        K.SEQ_NO: 0,
        K.TRIGGER: 0,
        K.EVSE: 1,
        K.ENERGY_WH: 1_234_567,
        K.ID_TOKEN: ctr(KEYS["e_up"], seq, K.ID_TOKEN, token),
        K.TOKEN_TYPE: 0,
        K.TIME: TS,
    }
    sample_body = {
        K.EVSE: 2,
        K.SAMPLES: [
            {K.MEASURAND: 4, K.VALUE: 230.5},
            {K.MEASURAND: 2, K.VALUE: 0.1, K.PHASES: 3},
            {K.MEASURAND: 5, K.VALUE: 80},
        ],
    }
    return [
        ok(
            "hello",
            env(
                REQ,
                0,
                1,
                CTL,
                Action.HELLO,
                {K.DEVICE_ID: "DE*EVE*E0001", K.NONCE: NONCE_B, K.VER_MIN: 1, K.VER_MAX: 1, K.SCHEMA_REV: 1},
            ),
            key="k_hello",
        ),
        ok(
            "hello response",
            env(RES, 1, 1, CTL, Action.HELLO, {K.NONCE: NONCE_G, K.VER: 1, K.TIME: TS, K.TIME_MS: 250}),
            key="k_dn",
        ),
        ok("heartbeat", env(REQ, 1, 2, TEL, Action.HEARTBEAT, {})),
        ok("transaction started, secret token", env(EVT, seq, 100, CTL, Action.TRANSACTION_EVENT, started)),
        ok(
            "transaction updated",
            env(
                EVT,
                8,
                101,
                CTL,
                Action.TRANSACTION_EVENT,
                {
                    K.EVENT: 1,
                    K.TX_ID: 4242,
                    K.SEQ_NO: 1,
                    K.TRIGGER: 5,
                    K.EVSE: 1,
                    K.ENERGY_WH: 1_240_000,
                    K.POWER_W: 11_000,
                },
            ),
        ),
        ok(
            "meter values minimal", env(EVT, 300, 70_000, TEL, Action.METER_VALUES, {K.EVSE: 1, K.ENERGY_WH: 1_240_000})
        ),
        ok("meter values, float samples", env(EVT, 9, 102, TEL, Action.METER_VALUES, sample_body)),
        ok("meter values raised to urgent", env(EVT, 10, 103, URG, Action.METER_VALUES, {K.EVSE: 1})),
        ok(
            "status notification",
            env(EVT, 11, 104, TEL, Action.STATUS_NOTIFICATION, {K.EVSE: 1, K.STATE: 1, K.CONNECTOR: 1, K.CP_STATE: 2}),
        ),
        ok(
            "unknown keys kept, extension",
            env(
                EVT,
                12,
                105,
                TEL,
                Action.METER_VALUES,
                {K.EVSE: 1, 250: "vendor", 0: {1: "x", 2: [1, 2]}, 4000: b"\x01"},
            ),
        ),
        ok("response to profile", env(RES, 13, 900, CTL, Action.SET_CHARGING_PROFILE, {K.STATUS: 0})),
        ok(
            "error frame",
            env(
                ERR,
                14,
                901,
                CTL,
                Action.SET_CHARGING_PROFILE,
                {K.ERROR_CODE: 10, K.REASON: "limit above the hardware rating", K.FIELD: 24},
            ),
        ),
        ok("batched ack", env(ACK, 2, 100, CTL, Action.TRANSACTION_EVENT, {K.IDS: [101, 102, 70_000]}), key="k_dn"),
        ok("ack, empty body", env(ACK, 3, 103, URG, Action.METER_VALUES, {}), key="k_dn"),
        ok(
            "v2g profile downlink",
            env(
                REQ,
                4,
                500,
                CTL,
                Action.SET_CHARGING_PROFILE,
                {
                    K.EVSE: 1,
                    K.PROFILE_ID: 9,
                    K.STACK_LEVEL: 2,
                    K.PURPOSE: 1,
                    K.PERIODS: [{K.START_S: 0, K.LIMIT_W: -7400}, {K.START_S: 900, K.LIMIT_W: 11000, K.PHASES: 3}],
                },
            ),
            key="k_dn",
        ),
        ok(
            "dso limit urgent",
            env(REQ, 5, 501, URG, Action.DSO_LIMIT, {K.LIMIT_W: 3680, K.DEADLINE_MS: 500, K.ZONE: 2}),
            key="k_dn",
        ),
        ok(
            "log chunk 1024 bytes",
            env(
                EVT,
                15,
                106,
                BLK,
                Action.LOG_CHUNK,
                {K.REQUEST_ID: 3, K.OFFSET: 0, K.DATA: bytes(i % 251 for i in range(1024)), K.LAST: False},
            ),
        ),
        ok(
            "int field negative widths",
            env(
                EVT,
                16,
                107,
                TEL,
                Action.MEASURED_VALUES,
                {K.EVSE: 1, K.POWER_W: -40000, K.SETPOINT_W: -100, K.FREQ_MHZ: 49950},
            ),
        ),
        ok(
            "float field given an int",
            env(EVT, 17, 108, TEL, Action.METER_VALUES, {K.EVSE: 1, K.SAMPLES: [{K.MEASURAND: 0, K.VALUE: 12}]}),
        ),
        ok(
            "max envelope integers",
            env(EVT, 2**32 - 1, 2**53 - 1, TEL, Action.METER_VALUES, {K.EVSE: 255}, ts=2**32 - 1),
        ),
        ok(
            "non-canonical widths",
            [
                Raw(b"\xcf" + (1).to_bytes(8, "big")),
                Raw(b"\xcc\x03"),
                Raw(b"\xce" + (18).to_bytes(4, "big")),
                Raw(b"\xcd\x00\x6d"),
                Raw(b"\xd0\x02"),
                Raw(b"\xd2" + TS.to_bytes(4, "big")),
                Raw(b"\xcd\x00\x4f"),
                Raw(b"\xdf\x00\x00\x00\x02" + b"\xd0\x01" + b"\xcc\x01" + b"\x07" + b"\xcf" + (500).to_bytes(8, "big")),
            ],
            "k_up",
            canonical=False,
        ),
    ]


def ok_raw(name: str, elems: list[Any], body: Any) -> dict[str, Any]:
    """A valid frame whose body (Raw bytes among its values) no Python dict can hold: its
    decoded body given as TYPED JSON, `body`."""
    frame = seal(elems, "k_up")
    want = dict(zip(("ver", "kind", "seq", "id", "prio", "ts", "action"), elems[:7], strict=True))
    want["body"] = body
    want["tag"] = frame[-16:].hex()
    return {"name": name, "frame": frame.hex(), "key": "k_up", "canonical": False, "expect": {"ok": want}}


def budget_cases() -> list[dict[str, Any]]:
    """The object budget (MAX_OBJECTS values below the envelope array) and the one rule for
    repeated map keys, at every depth of the body."""
    mv = Action.METER_VALUES

    def ext(value: Any, body: dict[Any, Any] | None = None) -> list[Any]:
        return env(EVT, 50, 9100, TEL, mv, {K.EVSE: 1, **(body or {}), K.EXT: value})

    # 9 envelope elements + 4 for {evse: 1, ext: [...]} + the ext list's 3 items: the rest
    # in the last of three lists of nils
    rest = MAX_OBJECTS - 9 - 4 - 3 - 2 * 200
    at_limit = [[None] * 200, [None] * 200, [None] * rest]
    above = [[None] * 200, [None] * 200, [None] * (rest + 1)]
    attack = ext([[[] for _ in range(MAX_ITEMS)] for _ in range(15)])  # the attacker's frame
    assert 3900 < len(seal(attack, "k_up")) <= 4096  # 3,922 bytes, valid but for the budget
    repeated = Raw(b"\x82\xa1k\x01\xa1k\x02")  # {"k": 1, "k": 2}
    not_repeated = b"\x85\x01\xa1a\xc3\xa1b\xca\x3f\x80\x00\x00\xa1c\xa11\xa1d\xc4\x011\xa1e"
    assert msgpack.unpackb(not_repeated, strict_map_key=False) == {1: "c", "1": "d", b"1": "e"}  # merged by a dict
    return [
        ok("object budget: exactly MAX_OBJECTS values", ext(at_limit)),
        bad("object budget: one value above", seal(ext(above), "k_up"), "TOO_MANY_OBJECTS"),
        bad("object budget: 15 arrays of 256 empty arrays in ext", seal(attack, "k_up"), "TOO_MANY_OBJECTS"),
        bad("object budget before the tag", seal(attack, None), "TOO_MANY_OBJECTS"),
        bad(
            "object budget: map entries count twice",
            seal(ext({i: None for i in range(MAX_ITEMS)}), "k_up"),  # 256 entries: 512 values
            "TOO_MANY_OBJECTS",
        ),
        _body_case(
            "repeated key in a struct",
            {K.EVSE: 1, K.SAMPLES: [Raw(b"\x83\x1f\x00\x20\x01\x1f\x01")]},  # {measurand, value, measurand}
            "DUPLICATE_KEY",
        ),
        bad("repeated key in ext", seal(ext(repeated), "k_up"), "DUPLICATE_KEY"),
        bad("repeated key deep in ext", seal(ext([{"a": 1}, {"x": [repeated]}]), "k_up"), "DUPLICATE_KEY"),
        bad(
            "repeated key in an unknown key's value",
            seal(env(EVT, 50, 9100, TEL, mv, {K.EVSE: 1, 250: repeated}), "k_up"),
            "DUPLICATE_KEY",
        ),
        bad("repeated int key in two widths", seal(ext(Raw(b"\x82\x05\xc0\xd0\x05\xc0")), "k_up"), "DUPLICATE_KEY"),
        bad(
            "repeated float key in two widths",
            seal(ext(Raw(b"\x82\xca\x3f\xc0\x00\x00\xc0\xcb" + struct.pack(">d", 1.5) + b"\xc0")), "k_up"),
            "DUPLICATE_KEY",
        ),
        bad("repeated array key", seal(ext(Raw(b"\x82\x91\x01\xc0\x91\x01\xc0")), "k_up"), "DUPLICATE_KEY"),
        _body_case(
            "repeated key before a later type error",
            Raw(b"\x83\x01\x01\x00\x82\x01\x01\x01\x02\x07\xa1x"),
            "DUPLICATE_KEY",
        ),
        ok_raw(
            "keys of different types are not repeats",
            [*ext(None)[:7], {K.EVSE: 1, K.EXT: Raw(not_repeated)}],
            {
                "$map": [
                    [int(K.EVSE), 1],
                    [
                        int(K.EXT),
                        {
                            "$map": [
                                [1, "a"],
                                [True, "b"],
                                [{"$float": 1.0}, "c"],
                                ["1", "d"],
                                [{"$bin": "31"}, "e"],
                            ]
                        },
                    ],
                ]
            },
        ),
    ]


def _body_case(
    name: str,
    body: dict[Any, Any] | Raw,
    error: str,
    action: int = Action.METER_VALUES,
    kind: int = EVT,
    prio: int = TEL,
) -> dict[str, Any]:
    return bad(
        name,
        seal([*env(kind, 40, 9000, prio, action, body if isinstance(body, dict) else {})[:7], body], "k_up"),
        error,
    )


def invalid_cases() -> list[dict[str, Any]]:
    good = seal(env(EVT, 30, 5000, TEL, Action.METER_VALUES, {K.EVSE: 1, K.ENERGY_WH: 99}), "k_up")
    flipped_tag = good[:-1] + bytes([good[-1] ^ 1])
    flipped_body = bytearray(good)
    flipped_body[-19] ^= 1  # the energy value, just before the tag
    deep: Any = 1
    for _ in range(7):
        deep = [deep]
    many = Raw(b"\xdc" + (300).to_bytes(2, "big") + b"\x01" * 10)
    cases = [
        bad("oversize frame", b"\xc5" + (4094).to_bytes(2, "big") + bytes(4094), "OVERSIZE"),
        bad("truncated by one byte", good[:-1], "TRUNCATED"),
        bad("truncated header", good[:5], "TRUNCATED"),
        bad("empty frame", b"", "TRUNCATED"),
        bad(
            "str32 declaring 4 GiB",
            seal([*env(EVT, 31, 5001, TEL, Action.METER_VALUES, {})[:7], Raw(b"\x81\r\xdb\xff\xff\xff\xff")], "k_up")[
                :30
            ],
            "TRUNCATED",
        ),
        bad(
            "array16 of 300 items",
            seal([*env(EVT, 31, 5001, TEL, Action.METER_VALUES, {})[:7], {K.EXT: many}], "k_up"),
            "TOO_MANY_ITEMS",
        ),
        bad(
            "reserved marker c1",
            seal([*env(EVT, 31, 5001, TEL, Action.METER_VALUES, {})[:7], {K.EXT: Raw(b"\xc1")}], "k_up"),
            "INVALID_MSGPACK",
        ),
        bad(
            "ext type",
            seal([*env(EVT, 31, 5001, TEL, Action.METER_VALUES, {})[:7], {K.EXT: Raw(b"\xd4\x01\x02")}], "k_up"),
            "INVALID_MSGPACK",
        ),
        bad(
            "nesting depth 9",
            seal(env(EVT, 31, 5001, TEL, Action.METER_VALUES, {K.EVSE: 1, K.EXT: deep}), "k_up"),
            "TOO_DEEP",
        ),
        bad(
            "invalid utf-8",
            seal(
                [*env(ERR, 31, 5001, CTL, Action.METER_VALUES, {})[:7], {K.ERROR_CODE: 1, K.REASON: Raw(b"\xa2\xc3(")}],
                "k_up",
            ),
            "BAD_UTF8",
        ),
        bad("trailing byte", good + b"\x00", "TRAILING_BYTES"),
        bad(
            "envelope of 8",
            _hdr(8, 0x90, 0xDC) + b"".join(pack(x) for x in env(EVT, 31, 5001, TEL, Action.METER_VALUES, {})),
            "BAD_ENVELOPE",
        ),
        bad("envelope is a map", b"\x81\x01\x02", "BAD_ENVELOPE"),
        bad(
            "tag of 15 bytes",
            seal(env(EVT, 31, 5001, TEL, Action.METER_VALUES, {}), "k_up")[:-18] + b"\xc4\x0f" + bytes(15),
            "BAD_ENVELOPE",
        ),
        bad(
            "tag as bin16",
            seal(env(EVT, 31, 5001, TEL, Action.METER_VALUES, {}), "k_up")[:-18] + b"\xc5\x00\x10" + bytes(16),
            "BAD_ENVELOPE",
        ),
        bad(
            "negative seq",
            seal([1, EVT, Raw(b"\xff"), 5001, TEL, TS, Action.METER_VALUES, {K.EVSE: 1}], "k_up"),
            "BAD_ENVELOPE",
        ),
        bad("body is an array", seal([1, EVT, 31, 5001, TEL, TS, Action.METER_VALUES, [1]], "k_up"), "BAD_ENVELOPE"),
        bad("float as seq", seal([1, EVT, 1.5, 5001, TEL, TS, Action.METER_VALUES, {}], "k_up"), "BAD_ENVELOPE"),
        bad(
            "version 2",
            seal([2, *env(EVT, 31, 5001, TEL, Action.METER_VALUES, {K.EVSE: 1})[1:]], "k_up"),
            "BAD_VERSION",
        ),
        bad("tag bit flipped", flipped_tag, "BAD_TAG"),
        bad("body bit flipped", bytes(flipped_body), "BAD_TAG"),
        bad(
            "downlink key on uplink", seal(env(EVT, 31, 5001, TEL, Action.METER_VALUES, {K.EVSE: 1}), "k_dn"), "BAD_TAG"
        ),
        bad("zero tag", seal(env(EVT, 31, 5001, TEL, Action.METER_VALUES, {K.EVSE: 1}), None), "BAD_TAG"),
        bad("kind 5", seal([1, 5, 31, 5001, TEL, TS, Action.METER_VALUES, {}], "k_up"), "BAD_KIND"),
        bad("unknown action 999", seal(env(EVT, 31, 5001, TEL, 999, {}), "k_up"), "UNKNOWN_ACTION"),
        bad("action 0", seal(env(EVT, 31, 5001, TEL, 0, {}), "k_up"), "UNKNOWN_ACTION"),
        bad(
            "event sent as request", seal(env(REQ, 31, 5001, TEL, Action.METER_VALUES, {K.EVSE: 1}), "k_up"), "BAD_KIND"
        ),
        bad("request sent as event", seal(env(EVT, 31, 5001, TEL, Action.HEARTBEAT, {}), "k_up"), "BAD_KIND"),
        bad("response to an event", seal(env(RES, 31, 5001, TEL, Action.METER_VALUES, {}), "k_up"), "BAD_KIND"),
        bad("ack of a request", seal(env(ACK, 31, 5001, TEL, Action.HEARTBEAT, {}), "k_up"), "BAD_KIND"),
        bad("priority 4", seal(env(EVT, 31, 5001, 4, Action.METER_VALUES, {K.EVSE: 1}), "k_up"), "BAD_PRIORITY"),
        bad(
            "priority lowered", seal(env(EVT, 31, 5001, BLK, Action.METER_VALUES, {K.EVSE: 1}), "k_up"), "BAD_PRIORITY"
        ),
        bad(
            "urgent lowered",
            seal(env(REQ, 31, 5001, CTL, Action.EMERGENCY_STOP, {K.REASON: "x"}), "k_up"),
            "BAD_PRIORITY",
        ),
        _body_case("string key", {"1": 1}, "BAD_KEY"),
        _body_case("negative key", {-1: 1, K.EVSE: 1}, "BAD_KEY"),
        _body_case("duplicate key", Raw(b"\x82\x01\x01\x01\x02"), "DUPLICATE_KEY"),
        _body_case("evse as string", {K.EVSE: "1"}, "BAD_TYPE"),
        _body_case("uint given a float", {K.EVSE: 1, K.ENERGY_WH: 1.5}, "BAD_TYPE"),
        _body_case("uint given a negative", {K.EVSE: -1}, "OUT_OF_RANGE"),
        _body_case(
            "bool given an int",
            {K.LAST: 1, K.REQUEST_ID: 1, K.OFFSET: 0, K.DATA: b""},
            "BAD_TYPE",
            Action.LOG_CHUNK,
            prio=BLK,
        ),
        _body_case("nil value", {K.EVSE: None}, "BAD_TYPE"),
        _body_case("evse 256", {K.EVSE: 256}, "OUT_OF_RANGE"),
        _body_case("energy above 2^53", {K.EVSE: 1, K.ENERGY_WH: 2**60}, "OUT_OF_RANGE"),
        _body_case("power below min", {K.EVSE: 1, K.POWER_W: -10_000_001}, "OUT_OF_RANGE"),
        _body_case("enum out of range", {K.EVSE: 1, K.STATE: 5}, "OUT_OF_RANGE", Action.STATUS_NOTIFICATION),
        _body_case("reason too long", {K.ERROR_CODE: 1, K.REASON: "x" * 121}, "OUT_OF_RANGE", kind=ERR),
        _body_case("list too long", {K.EVSE: 1, K.SAMPLES: [{K.MEASURAND: 0, K.VALUE: 1.0}] * 17}, "OUT_OF_RANGE"),
        _body_case(
            "float NaN",
            {K.EVSE: 1, K.SAMPLES: [{K.MEASURAND: 0, K.VALUE: Raw(b"\xcb" + struct.pack(">d", math.nan))}]},
            "OUT_OF_RANGE",
        ),
        _body_case(
            "frequency below min", {K.EVSE: 1, K.POWER_W: 0, K.FREQ_MHZ: 39_999}, "OUT_OF_RANGE", Action.MEASURED_VALUES
        ),
        _body_case("list element type", {K.IDS: [1, "2"]}, "BAD_TYPE", Action.METER_VALUES, kind=ACK),
        _body_case("samples not a list", {K.EVSE: 1, K.SAMPLES: {1: 2}}, "BAD_TYPE"),
        _body_case("missing evse", {K.ENERGY_WH: 5}, "MISSING_FIELD"),
        _body_case(
            "missing tx_id",
            {K.EVENT: 0, K.SEQ_NO: 0, K.TRIGGER: 0, K.EVSE: 1},
            "MISSING_FIELD",
            Action.TRANSACTION_EVENT,
            prio=CTL,
        ),
        _body_case("struct member missing", {K.EVSE: 1, K.SAMPLES: [{K.VALUE: 1.0}]}, "MISSING_FIELD"),
        _body_case("struct member wrong type", {K.EVSE: 1, K.SAMPLES: [{K.MEASURAND: 0, K.VALUE: "1"}]}, "BAD_TYPE"),
        _body_case("error frame without reason", {K.ERROR_CODE: 3}, "MISSING_FIELD", kind=ERR),
        _body_case("first problem in wire order wins", {K.EVSE: "x", K.POWER_W: 1.5}, "BAD_TYPE"),
        _body_case("type error before missing field", {K.ENERGY_WH: "x"}, "BAD_TYPE"),
    ]
    return cases


def sequences() -> list[dict[str, Any]]:
    def f(seq: int, key: str = "k_up") -> str:
        return seal(env(EVT, seq, 6000 + seq, TEL, Action.METER_VALUES, {K.EVSE: 1}), key).hex()

    order = [1, 2, 3, 2, 5, 4, 4, 100, 36, 37, 37, 0]
    want = ["ok", "ok", "ok", "REPLAY", "ok", "ok", "REPLAY", "ok", "REPLAY", "ok", "REPLAY", "REPLAY"]
    forged = [f(200, "k_dn"), f(101), f(150), f(87), f(86)]
    return [
        {"name": "replay window", "key": "k_up", "frames": [f(s) for s in order], "expect": want},
        {
            "name": "forged frame does not move the window",
            "key": "k_up",
            "frames": forged,
            "expect": ["BAD_TAG", "ok", "ok", "ok", "REPLAY"],
        },
    ]


def streams() -> list[dict[str, Any]]:
    a = seal(env(REQ, 1, 2, TEL, Action.HEARTBEAT, {}), "k_up")
    b = seal(env(EVT, 2, 3, TEL, Action.METER_VALUES, {K.EVSE: 1}), "k_up")

    def pre(x: bytes) -> bytes:
        return len(x).to_bytes(2, "big") + x

    return [
        {"name": "two frames", "bytes": (pre(a) + pre(b)).hex(), "expect": {"frames": [a.hex(), b.hex()]}},
        {"name": "partial second frame", "bytes": (pre(a) + pre(b)[:10]).hex(), "expect": {"frames": [a.hex()]}},
        {"name": "partial prefix", "bytes": (pre(a) + b"\x00").hex(), "expect": {"frames": [a.hex()]}},
        {"name": "zero length prefix", "bytes": (b"\x00\x00" + a).hex(), "expect": {"error": "OVERSIZE"}},
        {"name": "prefix above max", "bytes": (b"\x10\x01" + a).hex(), "expect": {"error": "OVERSIZE"}},
    ]


def secrets() -> list[dict[str, Any]]:
    out = []
    for seq, field, n in (
        (1, K.ID_TOKEN, 0),
        (7, K.ID_TOKEN, 14),
        (2**32 - 1, K.DEVICE_KEY, 32),
        (9, K.ENTRIES, 17),
        (2**40, K.PRIVATE_KEY, 64),
    ):
        plain = bytes((i * 7 + 3) % 256 for i in range(n))
        out.append(
            {
                "key": KEYS["e_up"].hex(),
                "seq": seq,
                "field": int(field),
                "plain": plain.hex(),
                "cipher": ctr(KEYS["e_up"], seq, field, plain).hex(),
            }
        )
    return out


def ed25519() -> list[dict[str, Any]]:
    sk = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
    pk = sk.public_key().public_bytes_raw()
    out = []
    for i, msg in enumerate((b"", b"firmware manifest v1.2.3", bytes(range(256)))):
        sig = sk.sign(msg)
        out.append({"public": pk.hex(), "message": msg.hex(), "signature": sig.hex(), "valid": True})
        bad_sig = bytearray(sig)
        bad_sig[i] ^= 0x40
        out.append({"public": pk.hex(), "message": msg.hex(), "signature": bytes(bad_sig).hex(), "valid": False})
    out.append({"public": pk.hex(), "message": b"other".hex(), "signature": sk.sign(b"another").hex(), "valid": False})
    return out


def values() -> list[dict[str, Any]]:
    """Bare msgpack values in every width a decoder must accept."""
    v: list[tuple[str, bytes, Any]] = [
        ("nil", b"\xc0", None),
        ("false", b"\xc2", False),
        ("true", b"\xc3", True),
        ("fixint 0", b"\x00", 0),
        ("fixint 127", b"\x7f", 127),
        ("negative fixint -1", b"\xff", -1),
        ("negative fixint -32", b"\xe0", -32),
        ("uint8 255", b"\xcc\xff", 255),
        ("uint16 65535", b"\xcd\xff\xff", 65535),
        ("uint32 max", b"\xce\xff\xff\xff\xff", 2**32 - 1),
        ("uint64 max", b"\xcf" + b"\xff" * 8, 2**64 - 1),
        ("uint8 holding 1", b"\xcc\x01", 1),
        ("uint16 holding 1", b"\xcd\x00\x01", 1),
        ("uint32 holding 1", b"\xce\x00\x00\x00\x01", 1),
        ("uint64 holding 1", b"\xcf" + (1).to_bytes(8, "big"), 1),
        ("int8 -128", b"\xd0\x80", -128),
        ("int8 holding 5", b"\xd0\x05", 5),
        ("int16 -32768", b"\xd1\x80\x00", -32768),
        ("int32 min", b"\xd2\x80\x00\x00\x00", -(2**31)),
        ("int64 min", b"\xd3\x80" + bytes(7), -(2**63)),
        ("int64 holding -1", b"\xd3" + b"\xff" * 8, -1),
        ("float32 1.5", b"\xca" + struct.pack(">f", 1.5), 1.5),
        ("float64 0.1", b"\xcb" + struct.pack(">d", 0.1), 0.1),
        ("float64 -0.0", b"\xcb" + struct.pack(">d", -0.0), -0.0),
        ("float64 holding 2.0", b"\xcb" + struct.pack(">d", 2.0), 2.0),
        ("fixstr empty", b"\xa0", ""),
        ("fixstr utf-8", b"\xa3\xe2\x82\xac", "€"),
        ("str8", b"\xd9\x03abc", "abc"),
        ("str16", b"\xda\x00\x03abc", "abc"),
        ("str32", b"\xdb\x00\x00\x00\x03abc", "abc"),
        ("str8 of 40", b"\xd9\x28" + b"z" * 40, "z" * 40),
        ("bin8 empty", b"\xc4\x00", b""),
        ("bin16", b"\xc5\x00\x02\x01\x02", b"\x01\x02"),
        ("bin32", b"\xc6\x00\x00\x00\x02\x01\x02", b"\x01\x02"),
        ("fixarray", b"\x93\x01\xa1a\xc0", [1, "a", None]),
        ("array16", b"\xdc\x00\x02\x01\x02", [1, 2]),
        ("array32", b"\xdd\x00\x00\x00\x02\x01\x02", [1, 2]),
        ("fixmap", b"\x82\x01\xa1a\x02\xc3", {1: "a", 2: True}),
        ("map16", b"\xde\x00\x01\x01\x02", {1: 2}),
        ("map32", b"\xdf\x00\x00\x00\x01\x01\x02", {1: 2}),
        ("nested", b"\x81\x01\x92\x81\x02\xc4\x01\xff\x90", {1: [{2: b"\xff"}, []]}),
        ("array16 of 20", b"\xdc\x00\x14" + b"\x07" * 20, [7] * 20),
        ("map16 of 16", b"\xde\x00\x10" + b"".join(bytes([i, i]) for i in range(16)), {i: i for i in range(16)}),
    ]
    for name, data, want in v:
        assert msgpack.unpackb(data, raw=False, strict_map_key=False) == want, name
    return [{"name": n, "msgpack": d.hex(), "value": typed(w)} for n, d, w in v]


def render() -> str:
    data = {
        "about": "Golden frames for docs/protocol.md. Generated by `python -m tools.make_vectors`; do not edit.",
        "keys": {k: v.hex() for k, v in KEYS.items()},
        "cases": valid_cases() + invalid_cases() + budget_cases(),
        "sequences": sequences(),
        "streams": streams(),
        "secrets": secrets(),
        "kdf": {k: v.hex() for k, v in KEYS.items()},
        "ed25519": ed25519(),
        "values": values(),
    }
    return json.dumps(data, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.make_vectors", description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"stale: {OUT} (run python -m tools.make_vectors)", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

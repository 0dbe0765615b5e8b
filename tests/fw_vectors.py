"""The golden-vector checks of the firmware codec, shared by CPython and MicroPython.

tests/test_fw_codec.py runs `run(path)` in CPython and spawns `micropython
tests/fw_vectors_runner.py <path>`, which runs the same function on the unix port; so
this module keeps to the subset both understand (no f-strings, no typing, `json`,
`binascii`).
"""

import json
import math
from binascii import hexlify, unhexlify

from csc import crypto, frame, link, schema
from csc.msgpack import FrameError, Pairs, Writer, unpackb

ERROR_NAMES = {}
for _name in dir(schema):
    if _name.startswith("E_"):
        ERROR_NAMES[getattr(schema, _name)] = _name[2:]


def load_error_names(path):
    """Error names from the schema's source, for a built firmware (tools/board/build.py
    inlines the E_ constants: its csc.schema keeps only the tables)."""
    with open(path) as f:
        for line in f:
            if line.startswith("E_") and "= const(" in line:
                name, rest = line.split(" = const(")
                ERROR_NAMES[int(rest.split(")")[0])] = name[2:]


def _hex(b):
    return hexlify(bytes(b)).decode()


def match(value, want):
    """True when the decoded `value` is the TYPED JSON `want` (types included)."""
    if want is None:
        return value is None
    if want is True or want is False:
        return value is want
    if isinstance(want, int):
        return isinstance(value, int) and value is not True and value is not False and value == want
    if isinstance(want, str):
        return isinstance(value, str) and value == want
    if isinstance(want, list):
        if not isinstance(value, list) or isinstance(value, Pairs) or len(value) != len(want):
            return False
        return all(match(value[i], want[i]) for i in range(len(want)))
    if "$float" in want:
        f = float(want["$float"])
        if not isinstance(value, float):
            return False
        if math.isnan(f):
            return math.isnan(value)
        if f == 0.0:
            return value == 0.0 and str(value)[0] == str(f)[0]
        return value == f
    if "$bin" in want:
        return isinstance(value, bytes) and _hex(value) == want["$bin"]
    if "$map" in want:
        pairs = list(value) if isinstance(value, Pairs) else list(value.items()) if isinstance(value, dict) else None
        if pairs is None or len(pairs) != len(want["$map"]):
            return False
        for i in range(len(pairs)):
            if not (match(pairs[i][0], want["$map"][i][0]) and match(pairs[i][1], want["$map"][i][1])):
                return False
        return True
    return False


def _err_name(e):
    return ERROR_NAMES.get(e.code, str(e.code))


def check_case(c, keys):
    """None when the case passes, else a message."""
    data = unhexlify(c["frame"])
    mac = crypto.Hmac(keys[c["key"]]) if c["key"] else None
    exp = c["expect"]
    try:
        f = frame.decode(data, mac)
    except FrameError as e:
        if "error" in exp and _err_name(e) == exp["error"]:
            return None
        return f"raised {_err_name(e)} ({e.reason}), expected {exp}"
    if "error" in exp:
        return "decoded, expected " + exp["error"]
    ok = exp["ok"]
    for name in ("ver", "kind", "seq", "id", "prio", "ts", "action"):
        if not match(getattr(f, name), ok[name]):
            return f"{name} is {getattr(f, name)!r}, expected {ok[name]!r}"
    if not match(f.body, ok["body"]):
        return f"body {f.body!r}, expected {ok['body']!r}"
    if _hex(f.tag) != ok["tag"]:
        return "tag differs"
    if c["canonical"]:
        w = Writer()
        end = frame.encode(w, f.kind, f.seq, f.id, f.prio, f.ts, f.action, f.body, mac, f.tag, f.ver)
        if bytes(w.mv[2:end]) != data:
            return "re-encoding differs: " + _hex(w.mv[2:end])
        if (w.buf[0] << 8 | w.buf[1]) != len(data):
            return "length prefix differs"
    return None


def check_sequence(s, keys):
    mac = crypto.Hmac(keys[s["key"]])
    win = link.Link(None, "")  # a replay window: the link's (Link.check/accept)
    for i in range(len(s["frames"])):
        try:
            frame.decode(unhexlify(s["frames"][i]), mac, win)
            got = "ok"
        except FrameError as e:
            got = _err_name(e)
        if got != s["expect"][i]:
            return f"frame {i}: {got}, expected {s['expect'][i]}"
    return None


def _split(data, step):
    sp = frame.FrameSplitter()
    out = []
    try:
        for i in range(0, len(data), step):
            for f in sp.feed(data[i : i + step]):
                out.append(_hex(f))
    except FrameError as e:
        return {"error": _err_name(e)}, out
    return {"frames": out}, out


def check_stream(s):
    data = unhexlify(s["bytes"])
    exp = s["expect"]
    for step in (len(data) or 1, 1, 7):
        got, out = _split(data, step)
        if "error" in exp:
            if got != exp:
                return f"step {step}: {got!r}, expected {exp!r}"
        elif got != exp:
            return f"step {step}: frames {out!r}, expected {exp['frames']!r}"
    return None


def check_secret(s):
    key = unhexlify(s["key"])
    plain = unhexlify(s["plain"])
    cipher = crypto.ctr(key, s["seq"], s["field"], plain)
    if _hex(cipher) != s["cipher"]:
        return "cipher " + _hex(cipher)
    if crypto.ctr(key, s["seq"], s["field"], cipher) != plain:
        return "decryption differs"
    return None


def check_keys(keys):
    kd = keys["k_dev"]
    if crypto.hello_key(kd) != keys["k_hello"]:
        return "k_hello differs"
    got = crypto.derive(kd, keys["nonce_board"], keys["nonce_gateway"])
    names = ("k_up", "k_dn", "e_up", "e_dn")
    for i in range(4):
        if got[i] != keys[names[i]]:
            return names[i] + " differs"
    return None


def check_value(v):
    try:
        got = unpackb(unhexlify(v["msgpack"]))
    except FrameError as e:
        return "raised " + _err_name(e)
    if not match(got, v["value"]):
        return f"decoded {got!r}"
    return None


def run(path, out=print):
    """Run every firmware-relevant check of the vectors file; return (passed, failures)."""
    with open(path) as fh:
        vec = json.load(fh)
    keys = {}
    for k in vec["keys"]:
        keys[k] = unhexlify(vec["keys"][k])
    results = [("keys", check_keys(keys))]
    for c in vec["cases"]:
        results.append(("case " + c["name"], check_case(c, keys)))
    for s in vec.get("sequences", ()):
        results.append(("sequence " + s["name"], check_sequence(s, keys)))
    for s in vec.get("streams", ()):
        results.append(("stream " + s["name"], check_stream(s)))
    for i, s in enumerate(vec.get("secrets", ())):
        results.append((f"secret {i}", check_secret(s)))
    for v in vec.get("values", ()):
        results.append(("value " + v["name"], check_value(v)))
    failures = []
    for name, problem in results:
        if problem is not None:
            failures.append(name + ": " + problem)
            out("FAIL " + name + ": " + problem)
    passed = len(results) - len(failures)
    out(f"{passed} passed, {len(failures)} failed")
    return passed, failures

"""msgpack for the link (docs/protocol.md): canonical encoder, hardened decoder.

Encoding writes into a preallocated buffer (`Writer`): the shortest form of every int,
str, bin, array and map (byte for byte what CPython's `msgpack.packb(v,
use_bin_type=True)` writes), float32 when the value survives a round trip through
float32 bit for bit (so ±inf and the default NaN too, as in the Rust core) and float64
otherwise, maps in insertion order. A value nested deeper than a decoder accepts (more than
MAX_DEPTH containers, the envelope included when the frame's body is written at depth 1) is
refused with TOO_DEEP before any byte of that container is written.

Decoding reads a memoryview in two passes and never trusts a declared length:
- `check` walks the bytes without allocating and raises the first structural error in
  byte order: TRUNCATED, INVALID_MSGPACK (0xc1, ext types), TOO_DEEP (more than
  MAX_DEPTH nested containers, the outermost counting 1), TOO_MANY_ITEMS (a container of
  more than MAX_ITEMS items; a map's items are its entries), TOO_MANY_OBJECTS (more than
  MAX_OBJECTS values below the outermost container: each container's declared items — a
  map's keys and values — are charged when its header is read, before anything is built),
  BAD_UTF8 (strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF);
- `Reader` builds values from bytes that `check` accepted, and refuses a map that holds a
  key twice (DUPLICATE_KEY), at any depth.
Every error is a `FrameError(code, reason)` with a code from `schema.E_*`.

Two map keys are the same key when they are the same value: same type (nil, bool, int,
float, str, bin, array, map) and equal, ints whatever their width, floats by value whatever
their width (so NaN is never a repeat), arrays and maps item by item in wire order
(docs/protocol.md, "Limits"). Decoded maps are dicts (OrderedDict under MicroPython, whose
dicts are unordered) in wire order; a map whose keys cannot make a dict (a list or map as
key, or keys that differ only in type: 1, 1.0 and true) decodes as `Pairs`, a list of
(key, value) tuples that the encoder writes back as a map.
"""

# ruff: noqa: PLR1714, SIM109, PLR0124
# Marker tests are written as chained int compares (the hot path on MicroPython); `v != v`
# is the NaN test.

import struct
import sys

from .schema import (
    E_BAD_TYPE,
    E_BAD_UTF8,
    E_DUPLICATE_KEY,
    E_INVALID_MSGPACK,
    E_OUT_OF_RANGE,
    E_OVERSIZE,
    E_TOO_DEEP,
    E_TOO_MANY_ITEMS,
    E_TOO_MANY_OBJECTS,
    E_TRAILING_BYTES,
    E_TRUNCATED,
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    MAX_OBJECTS,
)

try:
    from micropython import const
except ImportError:  # CPython without the firmware/ shim on its path

    def const(x):
        return x


if sys.implementation.name == "micropython":
    from collections import OrderedDict as Map
else:
    Map = dict  # type: ignore[misc,assignment]  # CPython's dict keeps insertion order

# value classes returned by Reader.head()
NIL = const(0)
BOOL = const(1)
INT = const(2)
FLOAT = const(3)
STR = const(4)
BIN = const(5)
ARRAY = const(6)
MAP = const(7)

# widths of the fixed-size scalars 0xca..0xd3: float32/64, uint8..64, int8..64
_FIXED = b"\x04\x08\x01\x02\x04\x08\x01\x02\x04\x08"


class FrameError(Exception):
    """A frame or value the codec rejects: `code` from schema.E_*, a short `reason`, and
    the body key at fault (`field`) when there is one. frame.decode also sets `id` and
    `action` to the rejected frame's once its envelope could be read (else they stay 0),
    so that the error frame can answer it."""

    def __init__(self, code, reason, field=None):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.field = field
        # set here rather than as class attributes: entries of the class's table are heap for
        # the board's life, an error's attributes only while it is handled
        self.id = 0
        self.action = 0


class Pairs(list):
    """A msgpack map kept as a list of (key, value) tuples, in wire order, because its
    keys cannot make a dict (a list or map as key, or keys equal in Python that differ in
    type: 1, 1.0, True)."""


# ---------------------------------------------------------------- encoder


class Writer:
    """Encodes into a preallocated bytearray: `buf`, `mv` (a memoryview of it) and `pos`
    (the next byte to write). Running out of room raises FrameError(E_OVERSIZE)."""

    def __init__(self, buf=None, size=MAX_FRAME + 2):
        if buf is None:
            buf = bytearray(size)
        self.buf = buf
        self.mv = memoryview(buf)
        self.end = len(buf)
        self.pos = 0
        self._scratch = bytearray(4)

    def _room(self, n):
        p = self.pos
        if p + n > self.end:
            raise FrameError(E_OVERSIZE, "encoder buffer full")
        return p

    def byte(self, x):
        p = self._room(1)
        self.buf[p] = x
        self.pos = p + 1

    def _head(self, t, v, n):
        # marker t, then v as n bytes big-endian (two's complement when v < 0)
        p = self._room(n + 1)
        b = self.buf
        b[p] = t
        q = p + n
        self.pos = q + 1
        while q > p:
            b[q] = v & 0xFF
            v >>= 8
            q -= 1

    def raw(self, data):
        n = len(data)
        p = self._room(n)
        self.mv[p : p + n] = data
        self.pos = p + n

    def integer(self, v):
        if v >= 0:
            if v < 0x80:
                self.byte(v)
            elif v < 0x100:
                self._head(0xCC, v, 1)
            elif v < 0x10000:
                self._head(0xCD, v, 2)
            elif v < 0x100000000:
                self._head(0xCE, v, 4)
            elif v < 0x10000000000000000:
                self._head(0xCF, v, 8)
            else:
                raise FrameError(E_OUT_OF_RANGE, "int above 2**64-1")
        elif v >= -32:
            self.byte(v & 0xFF)
        elif v >= -0x80:
            self._head(0xD0, v, 1)
        elif v >= -0x8000:
            self._head(0xD1, v, 2)
        elif v >= -0x80000000:
            self._head(0xD2, v, 4)
        elif v >= -0x8000000000000000:
            self._head(0xD3, v, 8)
        else:
            raise FrameError(E_OUT_OF_RANGE, "int below -2**63")

    def real(self, v):
        s = self._scratch
        try:
            struct.pack_into(">f", s, 0, v)
            r = struct.unpack_from(">f", s, 0)[0]
            single = r == v or (v != v and struct.pack(">d", r) == struct.pack(">d", v))
        except OverflowError:  # CPython refuses to round a large double to float32
            single = False
        if single:
            p = self._room(5)
            self.buf[p] = 0xCA
            self.mv[p + 1 : p + 5] = s
            self.pos = p + 5
        else:
            p = self._room(9)
            self.buf[p] = 0xCB
            struct.pack_into(">d", self.buf, p + 1, v)
            self.pos = p + 9

    def _len(self, n, fix, fixmax, m8, m16, m32):
        if n <= fixmax:
            self.byte(fix | n)
        elif m8 and n < 0x100:
            self._head(m8, n, 1)
        elif n < 0x10000:
            self._head(m16, n, 2)
        elif n < 0x100000000:
            self._head(m32, n, 4)
        else:
            raise FrameError(E_OVERSIZE, "length above 2**32-1")

    def value(self, v, depth=0):
        # one method for every type (MicroPython: each method costs heap of its own, so bin and
        # map heads are written here too); `depth` counts the containers around v, as check() does
        if v is None:
            self.byte(0xC0)
        elif v is True or v is False:
            self.byte(0xC3 if v else 0xC2)
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, float):
            self.real(v)
        elif isinstance(v, str):
            e = v.encode()
            self._len(len(e), 0xA0, 31, 0xD9, 0xDA, 0xDB)
            self.raw(e)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            self._len(len(v), 0, -1, 0xC4, 0xC5, 0xC6)  # bin 8/16/32 (no fix form)
            self.raw(v)
        elif isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise FrameError(E_TOO_DEEP, "value nested deeper than MAX_DEPTH")
            depth += 1
            if isinstance(v, dict):
                self._len(len(v), 0x80, 15, 0, 0xDE, 0xDF)
                for k in v:  # v.items() would allocate a tuple per entry under MicroPython
                    self.value(k, depth)
                    self.value(v[k], depth)
            elif isinstance(v, Pairs):
                self._len(len(v), 0x80, 15, 0, 0xDE, 0xDF)
                for k, x in v:
                    self.value(k, depth)
                    self.value(x, depth)
            else:
                self._len(len(v), 0x90, 15, 0, 0xDC, 0xDD)
                for x in v:
                    self.value(x, depth)
        else:
            raise FrameError(E_BAD_TYPE, "no msgpack form for this value")


def packb(v, size=1 << 16):
    """Encode one value into new bytes (tooling; the firmware encodes into a Writer)."""
    w = Writer(size=size)
    w.value(v)
    return bytes(w.mv[: w.pos])


# ---------------------------------------------------------------- decoder, pass 1


def _be(b, p, w):
    v = 0
    e = p + w
    while p < e:
        v = (v << 8) | b[p]
        p += 1
    return v


def utf8_ok(b, p, e):
    """True when b[p:e] is strict UTF-8 (what CPython's decoder accepts)."""
    while p < e:
        c = b[p]
        if c < 0x80:
            p += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            n = 1
        elif c < 0xF0 and c >= 0xE0:
            n = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            n = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if p + n >= e:
            return False
        c = b[p + 1]
        if c < lo or c > hi:
            return False
        q = p + 2
        p += n + 1
        while q < p:
            c = b[q]
            if c < 0x80 or c > 0xBF:
                return False
            q += 1
    return True


_left = 0  # values left in the budget of the check() under way (not reentrant, like decode)


def check(b, p, end, depth=0, marks=None, objects=MAX_OBJECTS):
    """Validate the structure of the value at b[p:end]; return where it ends.

    `depth` counts the containers around the value; a call at depth 0 starts a budget of
    `objects` values (MAX_OBJECTS: a frame's), charged with each container's declared items
    before they are read, in a counter (nothing allocated). When `marks` (a list) is given
    and the value is a container, marks[i] receives the offset of item i (for a map: of the
    i-th key or value) for every i < len(marks).
    """
    global _left
    if not depth:
        _left = objects
    if p >= end:
        raise FrameError(E_TRUNCATED, "value missing")
    t = b[p]
    p += 1
    if t < 0x80 or t >= 0xE0 or t == 0xC0 or t == 0xC2 or t == 0xC3:
        return p
    w = 0
    n = 0
    if t < 0x90:
        kind = MAP
        n = t & 15
    elif t < 0xA0:
        kind = ARRAY
        n = t & 15
    elif t < 0xC0:
        kind = STR
        n = t & 31
    elif 0xC4 <= t <= 0xC6:
        kind = BIN
        w = 1 << (t - 0xC4)
    elif 0xCA <= t <= 0xD3:
        if p + _FIXED[t - 0xCA] > end:
            raise FrameError(E_TRUNCATED, "number cut short")
        return p + _FIXED[t - 0xCA]
    elif 0xD9 <= t <= 0xDB:
        kind = STR
        w = 1 << (t - 0xD9)
    elif t == 0xDC or t == 0xDD:
        kind = ARRAY
        w = 2 << (t - 0xDC)
    elif t == 0xDE or t == 0xDF:
        kind = MAP
        w = 2 << (t - 0xDE)
    else:  # 0xc1 (never used) and the ext types
        raise FrameError(E_INVALID_MSGPACK, "reserved or ext marker")
    if w:
        if p + w > end:
            raise FrameError(E_TRUNCATED, "length cut short")
        n = _be(b, p, w)
        p += w
    if kind == STR or kind == BIN:
        if n > end - p:
            raise FrameError(E_TRUNCATED, "declared length beyond the frame")
        if kind == STR and not utf8_ok(b, p, p + n):
            raise FrameError(E_BAD_UTF8, "string is not valid UTF-8")
        return p + n
    if depth >= MAX_DEPTH:
        raise FrameError(E_TOO_DEEP, "nesting deeper than MAX_DEPTH")
    if n > MAX_ITEMS:
        raise FrameError(E_TOO_MANY_ITEMS, "container above MAX_ITEMS")
    depth += 1
    if kind == MAP:
        n += n
    if n > _left:
        raise FrameError(E_TOO_MANY_OBJECTS, "frame above MAX_OBJECTS values")
    _left -= n
    i = 0
    if marks is not None:
        m = len(marks)
        while i < n:
            if i < m:
                marks[i] = p
            p = check(b, p, end, depth)
            i += 1
        return p
    while i < n:
        p = check(b, p, end, depth)
        i += 1
    return p


# ---------------------------------------------------------------- decoder, pass 2


class Reader:
    """Reads values from a memoryview `b` at `p`, after `check` accepted the bytes.

    `head()` consumes one marker and its length field and returns the value class
    (NIL … MAP); scalars land in `v`, lengths and item counts in `n`. `finish(cls)`
    builds the value whose head was just read (a str or bytes too: no method of their own,
    each would cost heap on a board); `value()` does both.
    """

    def __init__(self, b):
        self.b = b
        self.p = 0  # (set by the caller to read from elsewhere: frame.decode)
        self.v = None
        self.n = 0

    def head(self):
        b = self.b
        p = self.p
        t = b[p]
        p += 1
        self.p = p
        if t < 0x80:
            self.v = t
            return INT
        if t >= 0xE0:
            self.v = t - 0x100
            return INT
        if t < 0x90:
            self.n = t & 15
            return MAP
        if t < 0xA0:
            self.n = t & 15
            return ARRAY
        if t < 0xC0:
            self.n = t & 31
            return STR
        if t == 0xC0:
            self.v = None
            return NIL
        if t == 0xC2 or t == 0xC3:
            self.v = t == 0xC3
            return BOOL
        if 0xC4 <= t <= 0xC6:
            w = 1 << (t - 0xC4)
            self.n = _be(b, p, w)
            self.p = p + w
            return BIN
        if t == 0xCA:
            self.v = struct.unpack_from(">f", b, p)[0]
            self.p = p + 4
            return FLOAT
        if t == 0xCB:
            self.v = struct.unpack_from(">d", b, p)[0]
            self.p = p + 8
            return FLOAT
        if 0xCC <= t <= 0xCF:
            w = 1 << (t - 0xCC)
            self.v = _be(b, p, w)
            self.p = p + w
            return INT
        if 0xD0 <= t <= 0xD3:
            w = 1 << (t - 0xD0)
            v = _be(b, p, w)
            if b[p] & 0x80:
                v -= 1 << (w * 8)
            self.v = v
            self.p = p + w
            return INT
        if 0xD9 <= t <= 0xDB:
            w = 1 << (t - 0xD9)
        elif t == 0xDC or t == 0xDD:
            w = 2 << (t - 0xDC)
        elif t == 0xDE or t == 0xDF:
            w = 2 << (t - 0xDE)
        else:
            raise FrameError(E_INVALID_MSGPACK, "reserved or ext marker")
        self.n = _be(b, p, w)
        self.p = p + w
        if t < 0xDC:
            return STR
        if t < 0xDE:
            return ARRAY
        return MAP

    def finish(self, cls):
        if cls <= FLOAT:
            return self.v
        n = self.n
        if cls == STR or cls == BIN:
            p = self.p
            self.p = p + n
            return str(self.b[p : p + n], "utf-8") if cls == STR else bytes(self.b[p : p + n])
        if cls == ARRAY:
            a = []
            for _ in range(n):
                a.append(self.value())
            return a
        d = Map()
        out = None
        for _ in range(n):
            k = self.value()
            if out is None:
                if not isinstance(k, (list, dict)) and k not in d:
                    d[k] = self.value()
                    continue
                out = Pairs(d.items())  # a key a dict cannot tell apart: pairs from here on
            for x in out:
                if same_key(x[0], k):
                    raise FrameError(E_DUPLICATE_KEY, "map holds a key twice")
            out.append((k, self.value()))
        return d if out is None else out

    def value(self):
        return self.finish(self.head())


def same_key(a, b):
    """Whether two decoded map keys are the same key (the module's docstring): same type and
    equal, maps and arrays item by item in wire order."""
    if isinstance(a, (dict, Pairs)):
        if not isinstance(b, (dict, Pairs)) or len(a) != len(b):
            return False
        pa = list(a.items()) if isinstance(a, dict) else a
        pb = list(b.items()) if isinstance(b, dict) else b
        return all(same_key(pa[i][0], pb[i][0]) and same_key(pa[i][1], pb[i][1]) for i in range(len(pa)))
    if isinstance(a, list):
        if not isinstance(b, list) or isinstance(b, Pairs) or len(a) != len(b):
            return False
        return all(same_key(a[i], b[i]) for i in range(len(a)))
    return type(a) is type(b) and a == b


def unpackb(data):
    """Decode exactly one msgpack value (tooling and tests; frames go through frame.decode)."""
    b = memoryview(data)
    n = len(b)
    if check(b, 0, n) != n:
        raise FrameError(E_TRAILING_BYTES, "bytes after the value")
    return Reader(b).value()

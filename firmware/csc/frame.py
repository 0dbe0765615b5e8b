"""Frames of the link (docs/protocol.md): the 9-element envelope, its tag, validation
against the generated schema tables, and splitting a byte stream into frames.

    [ver, kind, seq, id, prio, ts, action, body, tag]

`encode` writes a frame into a caller's `Writer` (u16 BE length prefix, envelope, then
`c4 10` + the 16-byte tag). `decode` checks a received frame in the protocol's order of
precedence and raises the first error as a `FrameError`:

1. length above MAX_FRAME → OVERSIZE
2. structure (msgpack.check): TRUNCATED, INVALID_MSGPACK, TOO_DEEP, TOO_MANY_ITEMS,
   TOO_MANY_OBJECTS, BAD_UTF8, whichever comes first in byte order; then TRAILING_BYTES
3. envelope shape → BAD_ENVELOPE; 4. ver → BAD_VERSION; 5. tag → BAD_TAG;
6. replay window → REPLAY
7. kind > 4 → BAD_KIND; action unknown to the board → UNKNOWN_ACTION; kind not valid
   for the action → BAD_KIND; prio > 3, or a request/event below its default class →
   BAD_PRIORITY
8. body, entries in wire order (structs inside lists the same way, recursively, each
   struct in full where it stands): BAD_KEY, DUPLICATE_KEY, BAD_TYPE, OUT_OF_RANGE;
   then MISSING_FIELD for the first required key missing, in table order. Only the
   message's own fields (struct's own members) are checked against the field tables;
   every other key, ext (0) included, is kept as it is, like the Rust core does, except
   that no map inside it may hold a key twice (DUPLICATE_KEY, `field` the body key
   holding it, as for any fault inside a struct or list).
"""

# ruff: noqa: PLR1714, SIM109, PLR0124
# The envelope is positional, so encode/Frame take its fields positionally; `a == x or a == y`
# compiles to two int compares on MicroPython; `v != v` is the NaN test.

# the schema's tables are read through the module (`schema.FTYPE`): each name imported from it
# would be an entry of this module's globals (heap on a board; its int constants cost nothing)
from . import schema
from .msgpack import ARRAY, BIN, BOOL, FLOAT, INT, MAP, STR, FrameError, Map, Reader, check
from .schema import (
    ACK_KEYS,
    ACT_KEYS,
    E_BAD_ENVELOPE,
    E_BAD_KEY,
    E_BAD_KIND,
    E_BAD_PRIORITY,
    E_BAD_TAG,
    E_BAD_TYPE,
    E_BAD_VERSION,
    E_DUPLICATE_KEY,
    E_MISSING_FIELD,
    E_OUT_OF_RANGE,
    E_OVERSIZE,
    E_TRAILING_BYTES,
    E_UNKNOWN_ACTION,
    ERR_KEYS,
    F_ERROR_CODE,
    F_FIELD,
    F_IDS,
    F_REASON,
    K_ACK,
    K_ERROR,
    K_EVENT,
    K_REQUEST,
    K_RESPONSE,
    MAX_FRAME,
    PROTOCOL_VERSION,
    T_ANY,
    T_BIN,
    T_BOOL,
    T_FLOAT,
    T_INT,
    T_LIST,
    T_SECRET,
    T_STR,
    T_STRUCT,
    T_UINT,
    TAG_LEN,
)

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_TAIL = const(18)  # c4 10 + 16-byte tag
_NONE = const(255)

_marks = [0] * 9  # item offsets of the envelope, filled by check(); decode is not reentrant
_R = Reader(None)  # decode's reader, reused for the same reason


def _at(j):
    # where the schema's key list j starts in schema.KEYS (it ends where list j + 1 starts)
    return schema.KEYS_AT[2 * j] << 8 | schema.KEYS_AT[2 * j + 1]


class Frame:
    """A decoded frame: the envelope's fields, `body` (a dict in wire order, OrderedDict
    under MicroPython) and the 16-byte `tag`. Decoded into an existing Frame (the link's
    receive loop), an ack's body may be None: then `ids` is where its id list starts in
    the frame's buffer (-1: no list), for `ack_ids`."""

    def __init__(self, ver=0, kind=0, seq=0, mid=0, prio=0, ts=0, action=0, body=None, tag=None):
        self.ids = -1
        self.ver = ver
        self.kind = kind
        self.seq = seq
        self.id = mid
        self.prio = prio
        self.ts = ts
        self.action = action
        self.body = body
        self.tag = tag


# ---------------------------------------------------------------- encoding


def encode(w, kind, seq, mid, prio, ts, action, body, mac=None, tag=None, ver=PROTOCOL_VERSION):
    """Write one length-prefixed frame into the Writer `w` from offset 0; return its end.

    The frame itself is w.mv[2:end]. `mac` (a crypto.Hmac) computes the tag; without it
    `tag` (16 bytes) is written as given, or zeros. `body` is a dict (written in its
    iteration order) or msgpack.Pairs. Raises FrameError(E_OVERSIZE) when the frame
    would exceed MAX_FRAME or the buffer, FrameError(E_TOO_DEEP) when a value of the body
    nests deeper than a receiver accepts (MAX_DEPTH containers, the envelope included).
    """
    w.pos = 2
    w.byte(0x99)
    w.integer(ver)
    w.integer(kind)
    w.integer(seq)
    w.integer(mid)
    w.integer(prio)
    w.integer(ts)
    w.integer(action)
    w.value(body, 1)  # inside the envelope
    p = w.pos
    end = p + _TAIL
    if end - 2 > MAX_FRAME:
        raise FrameError(E_OVERSIZE, "frame above MAX_FRAME")
    w._room(_TAIL)
    b = w.buf
    b[p] = 0xC4
    b[p + 1] = TAG_LEN
    if mac is not None:
        mac.tag_into(b, 2, p, b, p + 2)
    else:
        for i in range(TAG_LEN):
            b[p + 2 + i] = tag[i] if tag is not None else 0
    n = end - 2
    b[0] = n >> 8
    b[1] = n & 0xFF
    w.pos = end
    return end


def error_body(e):
    """The body of the error frame that answers FrameError `e`."""
    body = Map()
    body[F_ERROR_CODE] = e.code
    body[F_REASON] = e.reason
    if e.field is not None:
        body[F_FIELD] = e.field
    return body


# ---------------------------------------------------------------- decoding


def _scalar(r, cls, ft, k, maxlen):
    # the value whose head `cls` was just read, for a field (or list element) of type ft
    if ft == T_UINT or ft == T_INT:
        if cls != INT:
            raise FrameError(E_BAD_TYPE, "integer expected", k)
        v = r.v
        if v < schema.LIMITS[schema.FMIN[k]] or v > schema.LIMITS[schema.FMAX[k]]:
            raise FrameError(E_OUT_OF_RANGE, "integer out of bounds", k)
        return v
    if ft == T_FLOAT:
        if cls != FLOAT and cls != INT:
            raise FrameError(E_BAD_TYPE, "number expected", k)
        v = r.v
        if v != v or v < schema.LIMITS[schema.FMIN[k]] or v > schema.LIMITS[schema.FMAX[k]]:
            raise FrameError(E_OUT_OF_RANGE, "number out of bounds", k)
        return v
    if ft == T_BOOL:
        if cls != BOOL:
            raise FrameError(E_BAD_TYPE, "bool expected", k)
        return r.v
    if ft == T_STR:
        if cls != STR:
            raise FrameError(E_BAD_TYPE, "str expected", k)
        if r.n > maxlen:
            raise FrameError(E_OUT_OF_RANGE, "str too long", k)
        return r.finish(cls)
    if ft == T_BIN or ft == T_SECRET:
        if cls != BIN:
            raise FrameError(E_BAD_TYPE, "bin expected", k)
        if r.n > maxlen:
            raise FrameError(E_OUT_OF_RANGE, "bin too long", k)
        return r.finish(cls)
    if ft == T_STRUCT:
        if cls != MAP:
            raise FrameError(E_BAD_TYPE, "map expected", k)
        return _entries(r, r.n, schema.FSUB[k])
    if ft == T_ANY:
        return r.finish(cls)
    raise FrameError(E_BAD_TYPE, "type not allowed here", k)


def _field(r, k, a, c, check):
    # the value of key k in a body or struct whose member keys are schema.KEYS[a:c]; a list field is
    # only checked with `check` (its items are then read again in place: ack_ids; no default:
    # a function with defaults costs twice the heap)
    cls = r.head()
    known = False
    if k < 256:
        keys = schema.KEYS
        for i in range(a, c):
            if keys[i] == k:
                known = True
                break
    ft = schema.FTYPE[k] if known else T_ANY  # a key this message does not know: kept as it is
    if ft == _NONE or ft == T_ANY:
        try:
            return r.finish(cls)
        except FrameError as e:  # a map inside holds a key twice: the error names this key
            e.field = k if k <= 0xFFFF else None
            raise
    if ft != T_LIST:
        return _scalar(r, cls, ft, k, schema.LIMITS[schema.FLEN[k]])
    if cls != ARRAY:
        raise FrameError(E_BAD_TYPE, "list expected", k)
    n = r.n
    if n > schema.LIMITS[schema.FLEN[k]]:
        raise FrameError(E_OUT_OF_RANGE, "list too long", k)
    et = schema.FELEM[k]
    item = schema.LIMITS[schema.FITEM[k]] or MAX_FRAME
    out: list | None = None if check else []
    try:
        for _ in range(n):
            v = _scalar(r, r.head(), et, k, item)
            if out is not None:
                out.append(v)
    except FrameError as e:
        e.field = k  # the error names the body key at fault, as the Rust core does
        raise
    return out


def _entries(r, n, j):
    # a body or struct map of n entries (head already read); its member keys are the
    # schema's key lists j (required) and j + 1 (optional), read in place (no slices)
    a = _at(j)
    b = _at(j + 1)
    c = _at(j + 2)
    d = Map()
    for _ in range(n):
        if r.head() != INT or r.v < 0:
            raise FrameError(E_BAD_KEY, "map key is not an unsigned int")
        k = r.v
        if k in d:
            raise FrameError(E_DUPLICATE_KEY, "key appears twice", k if k <= 0xFFFF else None)
        d[k] = _field(r, k, a, c, False)
    for i in range(a, b):
        if schema.KEYS[i] not in d:
            raise FrameError(E_MISSING_FIELD, "required field missing", schema.KEYS[i])
    return d


def _uint(r, name):
    """The next envelope element, which must be an unsigned int."""
    if r.head() != INT or r.v < 0:
        raise FrameError(E_BAD_ENVELOPE, name + " is not an unsigned int")
    return r.v


def decode(frame, mac=None, window=None, out=None, start=0, end=-1):
    """Check and decode one frame: frame[start:end] (bytes/bytearray/memoryview, no length
    prefix; end -1: to the end).

    `mac` (a crypto.Hmac) verifies the tag; None skips the check. `window` (the link's
    replay window: a link.Link) rejects replays and records `seq` once the frame is valid.
    Returns a Frame, or fills `out` (then its `tag` is None: checked in place): with
    `out`, an ack whose body is {} or {ids: [...]} (the acks a gateway sends) is checked
    without building the body, so that the link's receive loop allocates nothing for it
    (body None, `ids` for ack_ids). Raises FrameError, with `id` and `action` set to the
    frame's when the envelope could be read (else 0).
    """
    b = frame if isinstance(frame, memoryview) else memoryview(frame)
    if end < 0:
        end = len(b)
    if end - start > MAX_FRAME:
        raise FrameError(E_OVERSIZE, "frame above MAX_FRAME")
    marks = _marks
    marks[8] = -1
    if check(b, start, end, 0, marks) != end:
        raise FrameError(E_TRAILING_BYTES, "bytes after the envelope")

    r = _R
    r.b = b
    r.p = start
    if r.head() != ARRAY or r.n != 9:
        raise FrameError(E_BAD_ENVELOPE, "not an array of 9")
    ver = _uint(r, "ver")
    kind = _uint(r, "kind")
    seq = _uint(r, "seq")
    mid = _uint(r, "id")
    prio = _uint(r, "prio")
    ts = _uint(r, "ts")
    action = _uint(r, "action")
    if r.head() != MAP:
        raise FrameError(E_BAD_ENVELOPE, "body is not a map")
    t = end - _TAIL
    if marks[8] != t or b[t] != 0xC4 or b[t + 1] != TAG_LEN:
        raise FrameError(E_BAD_ENVELOPE, "tag is not bin8 of 16 at the end")
    try:
        if ver != PROTOCOL_VERSION:
            raise FrameError(E_BAD_VERSION, "unsupported protocol version")
        if mac is not None and not mac.verify(b, start, t, b, t + 2):
            raise FrameError(E_BAD_TAG, "tag does not verify")
        if window is not None:
            window.check(seq)

        if kind > K_ACK:
            raise FrameError(E_BAD_KIND, "kind above 4")
        ai = schema.ACT_INDEX[action] if action < len(schema.ACT_INDEX) else _NONE
        if ai == _NONE:
            raise FrameError(E_UNKNOWN_ACTION, "action not known to this board")
        if schema.ACT_KIND[ai] == K_EVENT:
            if kind == K_REQUEST or kind == K_RESPONSE:
                raise FrameError(E_BAD_KIND, "kind not valid for an event")
        elif kind == K_EVENT or kind == K_ACK:
            raise FrameError(E_BAD_KIND, "kind not valid for a request")
        if prio > 3:
            raise FrameError(E_BAD_PRIORITY, "priority above 3")
        if (kind == K_REQUEST or kind == K_EVENT) and prio > schema.ACT_PRIO[ai]:
            raise FrameError(E_BAD_PRIORITY, "priority below the action's default")

        if kind == K_RESPONSE:
            j = ACT_KEYS + 4 * ai + 2
        elif kind == K_ERROR:
            j = ERR_KEYS
        elif kind == K_ACK:
            j = ACK_KEYS
        else:
            j = ACT_KEYS + 4 * ai
        ids = -1
        n = r.n
        # {} or {ids: [...]} (a fixint key) with no required ack field: checked in place
        if out is not None and j == ACK_KEYS and (n == 0 or (n == 1 and b[r.p] == F_IDS)) and _at(j) == _at(j + 1):
            body = None
            if n:
                r.p += 1
                ids = r.p
                _field(r, F_IDS, _at(j), _at(j + 2), True)
        else:
            body = _entries(r, n, j)
        if window is not None:
            window.accept(seq)
    except FrameError as e:
        e.id = mid
        e.action = action
        raise
    if out is None:
        return Frame(ver, kind, seq, mid, prio, ts, action, body, bytes(b[t + 2 : end]))
    f = out
    f.ver = ver
    f.kind = kind
    f.seq = seq
    f.id = mid
    f.prio = prio
    f.ts = ts
    f.action = action
    f.body = body
    f.tag = None
    f.ids = ids
    return f


def ack_ids(f, data):
    """The id list of the ack `f`, decoded from `data` with body None and f.ids >= 0: a reader
    on its first item, `n` of them; read each with head(), then its value is `v` (in place,
    nothing allocated; valid until the next decode)."""
    r = _R
    r.b = data
    r.p = f.ids
    r.head()
    return r


# ---------------------------------------------------------------- stream splitting


class FrameSplitter:
    """Splits a byte stream of `u16 BE length || frame` records into frames.

    Either `feed(data)` (a generator yielding each complete frame), or read straight into
    the splitter with `sock.readinto(s.space())`, `s.wrote(n)` and `next()` until None (or
    `take()` until 0, which makes no view).
    A yielded frame is a memoryview into the splitter's buffer, valid until more bytes
    are added. A prefix of 0 or above the buffer's room (MAX_FRAME without `buf`; on a board
    sendq.RX_MAX, which its Hello states) raises FrameError(E_OVERSIZE), and so does every later
    call: the stream cannot be re-synchronised.

    On the board the buffer is part of the send queue's (sendq.py: `buf` = its buffer after URGENT,
    RX_MAX + 2 bytes, `own` = sendq.RX, `lend` = SendQueue.lend): the splitter uses
    buf[:own] and, for a frame longer than that, the rest once `lend(True)` says it is free
    (space() returns None until then: ask again a little later); it reads no further than
    that frame's end and gives the room back (`lend(False)`) in release(), which the caller
    calls once the frame is decoded.
    """

    def __init__(self, buf=None, own=0, lend=None):
        self.mv = memoryview(bytearray(MAX_FRAME + 2)) if buf is None else buf
        self.own = own or len(self.mv)
        self.lim = self.own  # the room in use: own, or all of it while lent
        self.lend = lend
        self.start = 0
        self.end = 0
        self.at = 0
        self.failed = False

    def take(self):
        """The next complete frame, left at mv[at:end]: its end, or 0 when more bytes are
        needed (nothing allocated: the board's receive loop)."""
        if self.failed:
            raise FrameError(E_OVERSIZE, "stream already failed")
        s = self.start
        if self.end - s < 2:
            return 0
        b = self.mv
        n = (b[s] << 8) | b[s + 1]
        if n == 0 or n + 2 > len(b):
            self.failed = True
            raise FrameError(E_OVERSIZE, "length prefix 0 or above the frames this board receives")
        if self.end - s < n + 2:
            return 0
        self.at = s + 2
        self.start = s + 2 + n
        return s + 2 + n

    def next(self):
        """The next complete frame (a view), or None when more bytes are needed."""
        e = self.take()
        return self.mv[self.at : e] if e else None

    def space(self):
        """Free space at the end of the buffer (after moving pending bytes to the front);
        None while a frame longer than the own part waits for the lent room."""
        s = self.start
        b = self.mv
        if s:
            k = self.end - s
            b[0:k] = b[s : self.end]
            self.start = 0
            self.end = k
        e = self.end
        if e >= 2:
            n = ((b[0] << 8) | b[1]) + 2  # the pending frame, prefix included
            if self.lim < n <= len(b):
                if not self.lend(True):
                    return None
                self.lim = len(b)
            if self.lim > self.own:
                return b[e:n]  # no further than this frame: the room goes back after it
        return b[e : self.lim]

    def release(self):
        """After the frame just returned was decoded: give lent room back."""
        if self.lim > self.own and self.start == self.end:
            self.start = self.end = 0
            self.lim = self.own
            self.lend(False)

    def reset(self):
        """A new connection: no bytes pending, no room lent nor asked for."""
        self.start = self.end = 0
        self.failed = False
        self.lim = self.own
        if self.lend is not None:
            self.lend(False)

    def wrote(self, n):
        """Record that n bytes were written into space()."""
        self.end += n

    def feed(self, data):
        """Add `data` and yield every frame it completes."""
        src = memoryview(data)
        i = 0
        n = len(src)
        while True:
            f = self.next()
            while f is not None:
                yield f
                f = self.next()
            if i >= n:
                return
            room = self.space()
            k = min(len(room), n - i)
            room[0:k] = src[i : i + k]
            self.end += k
            i += k

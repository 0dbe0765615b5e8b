"""The board's send queue (DESIGN.md "Priorities", protocol link behaviour 7).

Four classes (0 urgent … 3 bulk), each a FIFO of at most SLOTS[c] messages whose bodies
are encoded in msgpack straight into one preallocated buffer: a slot is the envelope fields
plus (offset, length) in the buffer, so queueing, taking a message out and sealing it
(link.py) allocate nothing. Each body has HEAD bytes of room before it and TAIL after it:
the link seals the frame there, in place (envelope before the body, tag after it), and
needs no buffer of its own.

One buffer of 3 458 bytes (`w.buf`) holds
    [urgent: URGENT bytes][receive: RX bytes][shared: SHARED bytes]
- urgent frames have a region of their own, so they never wait for room behind the others
  (two worst-case answers: status + 120-byte reason, ~190 bytes a frame);
- control, telemetry and bulk share one region (2 816 bytes, where each used to have its
  own: 3 584 in all); a class never holds more than CAP[c] bytes of it (what its own region
  held: bulk one 1 KiB chunk, admin.CHUNKS_IN_FLIGHT), and each cap and the region take one
  MAX_BODY frame, so any body a class may carry fits once the region has drained (a refused
  message is never one that can never be sent). A body goes into the largest free gap of
  the region (classes leave it out of order, deficit round robin). A class refused for the
  region's room waits (`waiting`: the classes in the order they were refused); while one
  waits the others queue one frame at most and leave the first waiting class the room it
  needs (learnt from its refusals), so the room the sender frees goes to it and every class
  still has a frame queued for the round robin; a region found empty has nobody waiting (a
  class that never comes back blocks nobody);
- the receive part is the frame splitter's (app.py, frame.FrameSplitter): the frames the
  gateway sends most (acks, answers, limits, most commands) fit its RX bytes; a longer one (a
  firmware chunk, a certificate, a tariff …, up to RX_MAX) also takes the shared region, lent to
  it once drained (`lend()`: classes 1–3 refuse puts from the request until the frame is
  decoded, link.py), which the bytes of that frame wait for in the socket meanwhile.
  The two are RX_MAX + 2 bytes. RX_MAX (3 072) is the largest frame this board receives: its
  Hello states it (`rx_max`) and the gateway sends nothing larger, as OCPP 2.0.1's
  BytesPerMessage… settings make a CSMS split its requests (docs/protocol.md, "Frame size"): a
  firmware chunk makes ~1 100 bytes, a 2 KiB certificate or local list ~2 100; what the schema
  allows above 3 072 (a SetVariables of 32 long values, a long fault table) is refused to its
  sender, naming the sizes. The protocol's MAX_FRAME (4 096) would cost the board 1 KiB more heap.
Regions are sized from the bodies measured (high-water marks of the test suite and the
footprint scenario: 35 / 382 / 515 / 1 044 bytes). A refused message is not lost: the link's
timer queues a refused request or durable event again 50 ms later, a refused answer is sent
again when the gateway repeats the command (link.py keeps the last answers), a refused ack is
asked for again by the gateway's resend of its event. Urgent always goes first; classes 1–3
share the link by deficit round robin with byte quanta (8 : 4 : 1), so telemetry and bulk are
never starved. Bulk payloads come in chunks of at most MAX_CHUNK (the services chunk them), so
an urgent frame waits for at most one chunk on the wire. A full class refuses (put() returns
False: backpressure); nothing accepted is dropped.

`secret` fields are written in clear in the slot: the link encrypts them in the outgoing
frame under that frame's `seq` (`secrets()` finds them at the body's top level; AES-CTR keeps
the length), so a retransmission with a new `seq` re-encrypts correctly.
"""

# ruff: noqa: PLR1714
# `a == x or a == y` compiles to two int compares on MicroPython (a tuple or set would be built)

# ruff: noqa: PLC0415
# Every module-level name is an entry of this module's globals (heap on a board): what only the
# constructor uses is imported there, the regions' bounds and quanta are written where used.

from micropython import const

from .crypto import ctr
from .msgpack import FrameError, check
from .schema import FTYPE, T_SECRET

SLOTS = (3, 6, 6, 3)  # messages per class
URGENT = const(384)  # the urgent region: buf[0:URGENT]
RX = const(258)  # the receiver's own part: buf[URGENT:URGENT + RX]
SHARED = const(2816)  # control, telemetry and bulk: buf[URGENT + RX:]; RX + SHARED = RX_MAX + 2
RX_MAX = const(3072)  # the largest frame this board receives (its Hello's rx_max)
CAP = (URGENT, 1280, 1152, 1152)  # bytes a class may hold (urgent: its region)
_SIZE = const(URGENT + RX + SHARED)  # the whole buffer: 3 458 bytes
_BASE = (0, 3, 9, 15)  # each class's first slot
_NSLOT = const(18)
# Room kept around each body, so that the link seals the frame where the body lies (no buffer of
# its own): before it the length prefix (2) and the envelope (array head 1, ver 1, kind 1, seq ≤ 9,
# id ≤ 9, prio 1, ts ≤ 9, action ≤ 3), after it the tag (c4 10 + 16 bytes).
HEAD = const(36)
TAIL = const(18)
MAX_BODY = const(1098)  # one body: with HEAD and TAIL a frame of 1152 bytes
_FRAME = const(1152)  # HEAD + MAX_BODY + TAIL


# The queue's helpers are functions of the module rather than methods: a method takes an entry
# of SendQueue's method table too (heap on a board).
def _gap(q, c):
    # the largest free gap of class c's region, as start << 16 | end; frames are not in
    # offset order (classes leave out of order), so from each gap's start the nearest frame
    # after it is looked for (at most 15 frames: a few hundred steps when the region is full)
    lo = 0 if c == 0 else URGENT + RX  # class c's region: urgent's own, or the shared one
    hi = URGENT if c == 0 else _SIZE
    n = q.n
    off = q.off
    cs = (0,) if c == 0 else (1, 2, 3)
    best = lo << 16 | lo
    a = lo
    while True:
        e = hi  # where the nearest frame at or after a starts …
        f = hi  # … and ends
        for d in cs:
            b0 = _BASE[d]
            for i in range(n[d]):
                s = b0 + (q.head[d] + i) % SLOTS[d]
                st = off[s] - HEAD
                if a <= st < e:
                    e = st
                    f = off[s] + q.ln[s] + TAIL
        if e - a > (best & 0xFFFF) - (best >> 16):
            best = a << 16 | e
        if e == hi:
            return best
        a = f


def _wait(sq, c, ok):
    # sq.waiting: the classes refused for room in the shared region, in the order they
    # were, two bits each; the first keeps a frame's room (put()) until it is served
    q = sq.waiting
    if ok and q & 3 == c:
        sq.need = 0  # the first one was served: what the next one needs is learnt at its next try
    r = 0
    k = 0
    while q:  # the list without c
        if q & 3 == c:
            if not ok:
                return  # refused again: it keeps its place
        else:
            r |= (q & 3) << k
            k += 2
        q >>= 2
    sq.waiting = r if ok else r | c << k


class SendQueue:
    def __init__(self, ticks=None):
        from array import array

        from .msgpack import Writer

        self.head = [0, 0, 0, 0]
        self.n = [0, 0, 0, 0]
        self.deficit = [0, 0, 0, 0]
        # slot tables as arrays (1, 2 or 4 bytes an entry, not a list's 8 and a boxed int); a
        # slot's class is its priority (prio), so it is not stored
        self.kind = bytearray(_NSLOT)
        self.mid = [0] * _NSLOT  # message ids: no bound below the protocol's u64
        self.action = array("H", bytes(2 * _NSLOT))
        self.off = array("H", bytes(2 * _NSLOT))  # body offset in the buffer
        self.ln = array("H", bytes(2 * _NSLOT))  # body length
        self.t = array("I", bytes(4 * SLOTS[0]))  # enqueue tick of the urgent ones (latency; ticks < 2**30)
        self.w = Writer(bytearray(_SIZE))  # one encoder over the whole buffer
        self.ticks = ticks
        self.full = 0  # puts refused
        self.last = 0  # slot of the last message queued
        self.waiting = 0  # the classes (1–3) refused for room in the shared region, first one first
        self.need = 0  # the room the first of them needs, at least
        self.lent = False  # the shared region is the receiver's (or will be, once drained)

    def __len__(self):
        return self.n[0] + self.n[1] + self.n[2] + self.n[3]

    def clear(self):
        """Empty (the link opens or closes a connection): nothing queued, nobody waiting, and no
        room lent to a receiver, whose connection is gone too (else the next Hello is refused)."""
        for c in range(4):
            self.head[c] = 0
            self.n[c] = 0
            self.deficit[c] = 0
        self.waiting = self.need = 0
        self.lent = False

    def lend(self, on):
        """Lend the shared region to the receiver for one frame longer than RX (on=True; True
        once no message of classes 1–3 is queued: until then, and until lend(False) gives it
        back, those classes refuse puts, so it drains)."""
        self.lent = on
        return on and not (self.n[1] or self.n[2] or self.n[3])

    def put(self, kind, prio, mid, action, body):
        """Queue a message in class `prio`; False when the class is full (its slots, its cap,
        its region's room) or the body is too big."""
        c = prio
        n = self.n
        k = n[c]
        if k >= SLOTS[c] or (c and self.lent):
            self.full += 1
            return False
        b0 = _BASE[c]
        room = CAP[c]  # what class c may still take (a frame: HEAD + body + TAIL)
        for i in range(k):
            room -= self.ln[b0 + (self.head[c] + i) % SLOTS[c]] + HEAD + TAIL
        if c and not (n[1] or n[2] or n[3]):
            self.waiting = self.need = 0  # an empty region: nobody waits (one that never comes back blocks nobody)
        g = _gap(self, c)
        at = g >> 16
        gap = (g & 0xFFFF) - at
        s = b0 + (self.head[c] + k) % SLOTS[c]
        w = self.w
        h = self.waiting & 3  # the class waiting first
        w.pos = at + HEAD
        w.end = at + min(gap, room, _FRAME) - TAIL
        try:
            if isinstance(body, bytes):  # already encoded (a remembered answer, no secret field)
                w.raw(body)
            else:
                w.value(body, 1)  # inside the envelope: depth as a receiver counts it
        except FrameError:
            if c and gap < room and gap < _FRAME:  # refused for the region's room: it waits
                if h == 0 or h == c:
                    self.need = max(self.need, gap + 1)  # its frame is larger than this gap
                _wait(self, c, False)
            self.full += 1
            return False
        if c and h and h != c and (k or at + gap - w.pos - TAIL < self.need):
            self.full += 1  # class h waits for room: the others queue one frame at most, and leave
            return False  # it the room it needs, so that it gets in at one of its next tries
        if c:
            _wait(self, c, True)
        self.off[s] = at + HEAD
        self.ln[s] = w.pos - at - HEAD
        self.kind[s] = kind
        self.mid[s] = mid
        self.action[s] = action
        if c == 0 and self.ticks is not None:
            self.t[s] = self.ticks()
        n[c] = k + 1
        self.last = s
        return True

    def secrets(self, s, key, seq):
        """The number of secret fields in the body of slot s; with `key` (not None: the link's AES
        keys, the uplink's first 16 bytes), each is encrypted in place (AES-CTR under that key and
        the frame's `seq`, same length), as the link does when it seals the frame. They lie at the
        body's top level (docs/protocol.md), so they are found by walking its keys rather than
        recorded per slot."""
        mv = self.w.mv
        x = self.off[s]
        end = x + self.ln[s]
        n = mv[x] & 15
        if mv[x] == 0xDE:  # a map of more than 15 fields
            n = mv[x + 1] << 8 | mv[x + 2]
            x += 2
        x += 1
        found = 0
        while n:
            n -= 1
            k = mv[x]  # the key: an unsigned int
            if k < 0x80:
                x += 1
            elif k == 0xCC:
                k = mv[x + 1]
                x += 2
            else:
                k = 0
                x = check(mv, x, end)
            t = mv[x]
            if k and k < len(FTYPE) and FTYPE[k] == T_SECRET and (t == 0xC4 or t == 0xC5):
                x += 2 if t == 0xC4 else 3
                m = mv[x - 1] if t == 0xC4 else mv[x - 2] << 8 | mv[x - 1]
                if key is not None:
                    mv[x : x + m] = ctr(key[:16], seq, k, mv[x : x + m])
                x += m
                found += 1
            else:
                x = check(mv, x, end)
        return found

    def next(self):
        """The class whose head goes next (urgent first, then deficit round robin), or -1."""
        n = self.n
        if n[0]:
            return 0
        if not (n[1] or n[2] or n[3]):
            return -1
        d = self.deficit
        while True:
            for c in (1, 2, 3):
                if n[c]:
                    k = self.ln[_BASE[c] + self.head[c]]  # the length of its head
                    if d[c] >= k:
                        d[c] -= k
                        return c
            for c in (1, 2, 3):
                d[c] = d[c] + (0, 4096, 2048, 512)[c] if n[c] else 0  # the classes' quanta

    def slot(self, c):
        """Global slot index of class c's head (its fields: kind[s], mid[s], …)."""
        return _BASE[c] + self.head[c]

    def encoded(self, s):
        """The body of slot s as bytes (to keep), or None when it has secret fields: those
        are encrypted per frame, so it must be encoded again from its fields."""
        if self.secrets(s, None, 0):
            return None
        o = self.off[s]
        return bytes(self.w.mv[o : o + self.ln[s]])

    def pop(self, c):
        self.head[c] = (self.head[c] + 1) % SLOTS[c]
        self.n[c] -= 1

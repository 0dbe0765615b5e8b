"""The board's send queue (DESIGN.md "Priorities", protocol link behaviour 7).

Four classes (0 urgent … 3 bulk), each a FIFO of at most SLOTS[c] messages whose bodies
are encoded in msgpack straight into the class's region of one preallocated buffer, used
as a ring (a body that does not fit before the region's end goes to its start when the
oldest bodies have left): a slot is the envelope fields plus (offset, length) in the
buffer, so queueing, taking a message out and sealing it (link.py) allocate nothing. Each
body has HEAD bytes of room before it and TAIL after it: the link seals the frame there,
in place (envelope before the body, tag after it), and needs no buffer of its own.
Regions are sized from the bodies measured (high-water marks of the test suite and the
footprint scenario: 35 / 382 / 515 / 1 044 bytes) with room for the largest legal one:
urgent answers ≤ ~140 bytes (status + 120-byte reason), so two worst-case frames; every other
region holds at least one MAX_BODY frame, so any body a class may carry fits once the region has
drained (a refused message is never one that can never be sent). Bulk is one LogChunk in
flight (admin.CHUNKS_IN_FLIGHT). A refused message is not lost: the link's timer queues a
refused request or durable event again 50 ms later, a refused answer is sent again when the
gateway repeats the command (link.py keeps the last answers), a refused ack is asked for
again by the gateway's resend of its event. Urgent
always goes first; classes 1–3 share the rest by deficit round robin with byte quanta
(8 : 4 : 1), so telemetry and bulk are never starved. Bulk payloads come in chunks of at
most MAX_CHUNK (the services chunk them), so an urgent frame waits for at most one chunk
on the wire. A full class refuses (put() returns False: backpressure); nothing accepted
is dropped.

`secret` fields are written in clear in the slot and their (key, offset, length) kept:
the link encrypts them in the outgoing frame under that frame's `seq` (AES-CTR keeps the
length), so a retransmission with a new `seq` re-encrypts correctly.
"""

from array import array

from micropython import const

from .msgpack import FrameError, Writer
from .schema import FTYPE, T_SECRET

SLOTS = (3, 6, 6, 3)  # messages per class
ARENA = (384, 1280, 1152, 1152)  # bytes per class (its region of the buffer): frames, sealed in place
_LO = (0, 384, 1664, 2816)  # each region's start in the buffer
_BASE = (0, 3, 9, 15)  # each class's first slot
_NSLOT = const(18)
_SIZE = const(3968)  # the whole buffer
_QUANTUM = (0, 4096, 2048, 512)
_NSEC = const(2)  # secret fields per body
# Room kept around each body, so that the link seals the frame where the body lies (no buffer of
# its own): before it the length prefix (2) and the envelope (array head 1, ver 1, kind 1, seq ≤ 9,
# id ≤ 9, prio 1, ts ≤ 9, action ≤ 3), after it the tag (c4 10 + 16 bytes).
HEAD = const(36)
TAIL = const(18)
MAX_BODY = const(1098)  # one body: with HEAD and TAIL it fills a region of 1152 bytes


class SendQueue:
    def __init__(self, ticks=None):
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
        self.sec = array("H", bytes(2 * _NSLOT * _NSEC * 3))  # (key, offset in the body, length) per secret
        self.w = Writer(bytearray(_SIZE))  # one encoder over the four regions
        self.ticks = ticks
        self.full = 0  # puts refused
        self.last = 0  # slot of the last message queued

    def __len__(self):
        return self.n[0] + self.n[1] + self.n[2] + self.n[3]

    def clear(self):
        for c in range(4):
            self.head[c] = 0
            self.n[c] = 0
            self.deficit[c] = 0

    def put(self, kind, prio, mid, action, body):
        """Queue a message in class `prio`; False when the class is full or too big."""
        c = prio
        n = self.n[c]
        if n >= SLOTS[c]:
            self.full += 1
            return False
        b0 = _BASE[c]
        s = b0 + (self.head[c] + n) % SLOTS[c]
        lo = _LO[c]
        hi = lo + ARENA[c]
        h = lo  # where the oldest frame starts
        if n == 0:
            at = lo
            end = hi
        else:
            h = self.off[b0 + self.head[c]] - HEAD
            last = b0 + (self.head[c] + n - 1) % SLOTS[c]
            at = self.off[last] + self.ln[last] + TAIL
            end = hi if at > h else h
        w = self.w
        ok = self._encode(w, s, at + HEAD, min(end - TAIL, at + HEAD + MAX_BODY), body)
        if not ok and n and end == hi and h > lo:  # wrap to the region's start
            at = lo
            ok = self._encode(w, s, lo + HEAD, min(h - TAIL, lo + HEAD + MAX_BODY), body)
        if not ok:
            self.full += 1
            return False
        self.off[s] = at + HEAD
        self.ln[s] = w.pos - at - HEAD
        self.kind[s] = kind
        self.mid[s] = mid
        self.action[s] = action
        if c == 0 and self.ticks is not None:
            self.t[s] = self.ticks()
        self.n[c] = n + 1
        self.last = s
        return True

    def _encode(self, w, s, at, end, body):
        w.pos = at
        w.end = end
        sec = self.sec
        j = s * _NSEC * 3
        for x in range(_NSEC * 3):
            sec[j + x] = 0
        try:
            if isinstance(body, bytes):  # already encoded (a remembered answer, no secret field)
                w.raw(body)
                return True
            w.map(len(body))
            for k in body:
                v = body[k]
                w.integer(k)
                if 0 < k < len(FTYPE) and FTYPE[k] == T_SECRET and j < (s + 1) * _NSEC * 3:
                    w.binary(v)
                    sec[j] = k
                    sec[j + 1] = w.pos - len(v) - at
                    sec[j + 2] = len(v)
                    j += 3
                else:
                    w.value(v)
        except FrameError:
            return False
        return True

    def _len(self, c):
        return self.ln[_BASE[c] + self.head[c]]

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
                if n[c] and d[c] >= self._len(c):
                    d[c] -= self._len(c)
                    return c
            for c in (1, 2, 3):
                d[c] = d[c] + _QUANTUM[c] if n[c] else 0

    def slot(self, c):
        """Global slot index of class c's head (its fields: kind[s], mid[s], …)."""
        return _BASE[c] + self.head[c]

    def body(self, c):
        s = _BASE[c] + self.head[c]
        o = self.off[s]
        return self.w.mv[o : o + self.ln[s]]

    def encoded(self, s):
        """The body of slot s as bytes (to keep), or None when it has secret fields: those
        are encrypted per frame, so it must be encoded again from its fields."""
        if self.sec[s * _NSEC * 3]:
            return None
        o = self.off[s]
        return bytes(self.w.mv[o : o + self.ln[s]])

    def pop(self, c):
        self.head[c] = (self.head[c] + 1) % SLOTS[c]
        self.n[c] -= 1

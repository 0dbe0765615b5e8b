"""The board's send queue (DESIGN.md "Priorities", protocol link behaviour 7).

Four classes (0 urgent … 3 bulk), each a FIFO ring of preallocated slots: a queued
message is its envelope fields plus its body already encoded in msgpack in the slot's own
bytearray, so taking a message out and sealing it (link.py) allocates nothing. Urgent
always goes first; classes 1–3 share the rest by deficit round robin with byte quanta
(8 : 4 : 1), so telemetry and bulk are never starved. Bulk payloads come in chunks of at
most MAX_CHUNK (the services chunk them), so an urgent frame waits for at most one chunk
on the wire. A full class refuses (put() returns False: backpressure); nothing accepted
is dropped.

`secret` fields are written in clear in the slot and their (key, offset, length) kept:
the link encrypts them in the outgoing frame under that frame's `seq` (AES-CTR keeps the
length), so a retransmission with a new `seq` re-encrypts correctly.
"""

from micropython import const

from .msgpack import FrameError, Writer
from .schema import FTYPE, T_SECRET

SLOTS = (3, 6, 6, 3)  # slots per class
SIZE = (256, 640, 384, 1152)  # body bytes per slot, per class
_QUANTUM = (0, 4096, 2048, 512)
_NSEC = const(2)  # secret fields per body


class SendQueue:
    def __init__(self, ticks=None):
        self.w = []  # per class: list of Writers over the slot buffers
        self.head = [0, 0, 0, 0]
        self.n = [0, 0, 0, 0]
        self.deficit = [0, 0, 0, 0]
        total = sum(SLOTS)
        self.kind = bytearray(total)
        self.prio = bytearray(total)
        self.mid = [0] * total
        self.action = [0] * total
        self.t = [0] * total  # enqueue tick (urgent latency)
        self.sec = [0] * (total * _NSEC * 3)  # (key, offset, length) per secret
        self.base = [0, 0, 0, 0]
        b = 0
        for c in range(4):
            self.base[c] = b
            self.w.append([Writer(size=SIZE[c]) for _ in range(SLOTS[c])])
            b += SLOTS[c]
        self.ticks = ticks
        self.full = 0  # puts refused

    def __len__(self):
        return self.n[0] + self.n[1] + self.n[2] + self.n[3]

    def clear(self):
        for c in range(4):
            self.head[c] = 0
            self.n[c] = 0
            self.deficit[c] = 0

    def room(self, c):
        return SLOTS[c] - self.n[c]

    def put(self, kind, prio, mid, action, body):
        """Queue a message in class `prio`; False when the class is full or too big."""
        c = prio
        if self.n[c] >= SLOTS[c]:
            self.full += 1
            return False
        i = (self.head[c] + self.n[c]) % SLOTS[c]
        s = self.base[c] + i
        w = self.w[c][i]
        w.pos = 0
        sec = self.sec
        j = s * _NSEC * 3
        for x in range(_NSEC * 3):
            sec[j + x] = 0
        try:
            w.map(len(body))
            for k in body:
                v = body[k]
                w.integer(k)
                if 0 < k < len(FTYPE) and FTYPE[k] == T_SECRET and j < (s + 1) * _NSEC * 3:
                    w.binary(v)
                    sec[j] = k
                    sec[j + 1] = w.pos - len(v)
                    sec[j + 2] = len(v)
                    j += 3
                else:
                    w.value(v)
        except FrameError:
            self.full += 1
            return False
        self.kind[s] = kind
        self.prio[s] = prio
        self.mid[s] = mid
        self.action[s] = action
        if self.ticks is not None:
            self.t[s] = self.ticks()
        self.n[c] += 1
        return True

    def _len(self, c):
        return self.w[c][self.head[c]].pos

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
        return self.base[c] + self.head[c]

    def body(self, c):
        w = self.w[c][self.head[c]]
        return w.mv[: w.pos]

    def pop(self, c):
        self.head[c] = (self.head[c] + 1) % SLOTS[c]
        self.n[c] -= 1

"""The persistent outbox (DESIGN.md "Delivery"): what the board must deliver —
transaction events, billing meter values, security events, and telemetry worth keeping —
is written to flash before it is sent and removed only when the gateway acknowledges it.

One small file per message, `ob/<id in hex>`: 4 header bytes (action u16 BE, priority,
value class) then the msgpack body. Files are written to a temporary name and renamed, so
a power cut at any instant leaves the record whole or absent; a record is only "accepted"
(put() returned True) once renamed, and its id is never reused (below), so a resend after
a power cut carries the same id and the receiver deduplicates it.

Bounded: at most MAX_RECORDS records and MAX_BYTES bytes. When full, the policy is
- room is made by shedding the lowest-value records: the oldest TELEMETRY first (monitor
  events, frequency responses, reports); TX, SECURITY and BILLING records are never shed;
- when nothing can be shed, BILLING records may use a reserve of RESERVE more records,
  transaction and security events are taken as long as the flash has room;
- what cannot be stored is refused (put() returns False) and counted; nothing already
  stored is ever touched by a failed write (flash full included).
`shed` counts the records dropped since the owner last reported them (the app reports
them with a SecurityEvent "OutboxShed").

The outbox also hands out the message ids (`next()`, as `app.outbox.next()`), unique for the device's
life (docs/protocol.md, link behaviour 3), which key its records and every other message, session
and transaction. The counter lives on flash (`ids`) as the start of the next unreserved block: at
boot the board reserves a block of `BLOCK` ids with one write, hands them out from RAM, and
reserves the next block when it runs out. A power cut skips the rest of a block but never
repeats an id, because an id is only handed out after its block was written. (Here rather than
in a class and module of their own: each costs heap on a board.)
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from micropython import const

from . import store

TX = const(0)
SECURITY = const(1)
BILLING = const(2)
TELEMETRY = const(3)

MAX_RECORDS = const(48)
RESERVE = const(16)
MAX_BYTES = const(24576)
BLOCK = const(64)  # message ids reserved on flash at a time


class Outbox:
    def __init__(self):
        import os  # only here: no entry in this module's globals (heap on a board)

        self._ids = store.path("ids")
        b = store.read(self._ids)
        self._next = self._end = int(b) if b else 1  # the next message id, the end of its block
        _reserve(self)
        self._dir = store.path("ob")
        store.mkdir(self._dir)
        self.index = []  # (mid, action, prio, cls, size), ascending mid: tuples, 32 bytes fewer than lists
        self.bytes = 0
        self.shed = 0
        self.refused = 0
        for fn in os.listdir(self._dir):
            p = self._dir + "/" + fn
            if fn.endswith(".t"):
                store.remove(p)  # a write the power cut interrupted: never accepted
                continue
            b = store.read(p)
            try:
                mid = int(fn, 16)
            except ValueError:
                mid = 0
            if not b or len(b) < 5 or mid <= 0:
                store.remove(p)
                continue
            self.index.append((mid, (b[0] << 8) | b[1], b[2], b[3], len(b)))
            self.bytes += len(b)
        self.index.sort(key=lambda r: r[0])

    def next(self):
        """A new message id."""
        if self._next >= self._end:
            _reserve(self)
        n = self._next
        self._next = n + 1
        return n

    def raise_to(self, floor):
        """Number ids from `floor` on (a newly keyed board: the site saw ids below it from this device)."""
        if floor > self._next:
            self._next = floor
            _reserve(self)

    def __len__(self):
        return len(self.index)

    def _file(self, mid):
        return "%s/%x" % (self._dir, mid)

    def _shed(self):
        # drop the oldest telemetry record, the only class that may be shed; False: none left
        for r in self.index:
            if r[3] == TELEMETRY:
                store.remove(self._file(r[0]))
                self.index.remove(r)
                self.bytes -= r[4]
                self.shed += 1
                return True
        return False

    def put(self, mid, action, prio, cls, body):
        """Persist a message; True once it is on flash, False when refused (counted)."""
        data = store.encode(body, bytes((action >> 8, action & 0xFF, prio, cls)))
        n = len(data)
        while len(self.index) >= MAX_RECORDS or self.bytes + n > MAX_BYTES:
            if not self._shed():
                break
        full = len(self.index) >= MAX_RECORDS or self.bytes + n > MAX_BYTES
        # nothing more to shed: only the valuable classes may go beyond the bounds
        if full and (cls == TELEMETRY or (cls == BILLING and len(self.index) >= MAX_RECORDS + RESERVE)):
            self.refused += 1
            return False
        for _ in range(3):
            try:
                store.write_atomic(self._file(mid), data)
                break
            except OSError:  # flash full: shed what may be shed, try again
                if not self._shed():
                    self.refused += 1
                    return False
        else:
            self.refused += 1
            return False
        self.index.append((mid, action, prio, cls, n))
        self.bytes += n
        return True

    def load(self, mid):
        """The body of record `mid` (a dict), or None."""
        b = store.read(self._file(mid))
        if not b:
            return None
        from .msgpack import unpackb

        return unpackb(memoryview(b)[4:])

    def remove(self, mid):
        """Retire an acknowledged record (absent ids are ignored: acks may repeat)."""
        for r in self.index:
            if r[0] == mid:
                store.remove(self._file(mid))
                self.index.remove(r)
                self.bytes -= r[4]
                return True
        return False

    def records(self, action):
        """(mid, action, prio, cls) of stored records in id order, of one action (None: all)."""
        return [r for r in self.index if action is None or r[1] == action]


def _reserve(ob):
    # the next block of ids, from ob._next, on flash before any of them is handed out
    end = ob._next + BLOCK
    store.write_atomic(ob._ids, str(end).encode())
    ob._end = end

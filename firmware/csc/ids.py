"""Message ids unique for the device's life (docs/protocol.md, link behaviour 3).

The counter lives on flash as the start of the next unreserved block: at boot the board
reserves a block of `BLOCK` ids with one write, hands them out from RAM, and reserves the
next block when it runs out. A power cut skips the rest of a block but never repeats an
id, because an id is only handed out after its block was written.
"""

from micropython import const

from . import store

BLOCK = const(64)


class Ids:
    def __init__(self):
        self._p = store.path("ids")
        b = store.read(self._p)
        start = int(b) if b else 1
        self._next = start
        self._end = start
        self._reserve()

    def _reserve(self):
        end = self._next + BLOCK
        store.write_atomic(self._p, str(end).encode())
        self._end = end

    def raise_to(self, floor):
        """Number from `floor` on (a newly keyed board: the site saw ids below it from this device)."""
        if floor > self._next:
            self._next = floor
            self._reserve()

    def next(self):
        if self._next >= self._end:
            self._reserve()
        n = self._next
        self._next = n + 1
        return n

"""Replay window (docs/protocol.md, "Counters and the replay window").

The receiver keeps the highest `seq` it accepted and a 64-bit bitmap: bit d set means
`highest - d` was seen (bit 0 is `highest` itself). It starts at highest = 0 with bit 0
set. A seq above `highest` slides the window; a seq 64 or more below it, or one whose
bit is set, is a replay.

The bitmap is a bytearray of 8 bytes (byte 0 holds bits 0-7) rather than a 64-bit int:
on a 32-bit board a small int has 30 bits, so an int bitmap would allocate a long int on
every update, while the bytearray is shifted in place. `seq` itself is up to 2**32-1 and
becomes a long int above 2**30 on such a board; that is the protocol's range.

`check` never changes state; `accept` records a seq that `check` passed. The frame
decoder checks at its step (6), after the tag, and accepts only once the whole frame is
valid, so neither a forged nor a rejected frame moves the window.
"""

from micropython import const

from .msgpack import FrameError
from .schema import E_REPLAY

_BITS = const(64)  # the bitmap's width (a constant: no entry in the module's globals)


class ReplayWindow:
    def __init__(self):
        self.highest = 0
        self.bits = bytearray(8)
        self.bits[0] = 1

    def seen(self, seq):
        """True when `seq` must be rejected as a replay."""
        if seq > self.highest:
            return False
        d = self.highest - seq
        if d >= _BITS:
            return True
        return bool(self.bits[d >> 3] & (1 << (d & 7)))

    def check(self, seq):
        """Raise FrameError(E_REPLAY) when `seq` is a replay; change nothing."""
        if self.seen(seq):
            raise FrameError(E_REPLAY, "counter already seen or below the window")

    def accept(self, seq):
        """Record `seq` (which `check` passed)."""
        b = self.bits
        if seq > self.highest:
            s = seq - self.highest
            self.highest = seq
            if s >= _BITS:
                for i in range(8):
                    b[i] = 0
            else:
                q = s >> 3
                r = s & 7
                i = 7
                while i >= 0:
                    j = i - q
                    v = 0
                    if j >= 0:
                        v = (b[j] << r) & 0xFF
                        if r and j > 0:
                            v |= b[j - 1] >> (8 - r)
                    b[i] = v
                    i -= 1
            b[0] |= 1
        else:
            d = self.highest - seq
            b[d >> 3] |= 1 << (d & 7)

    def check_accept(self, seq):
        """check, then accept: the single step for callers that validated the rest."""
        self.check(seq)
        self.accept(seq)

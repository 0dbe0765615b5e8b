"""The grid frequency from a mains zero-crossing detector on a Pin: one rising edge per period.

The IRQ handler (hard, for µs accuracy) counts the edges and stamps the first and the last
(ticks_us), nothing else; `ZeroCross.poll(now)` turns ≥ 0.5 s of whole periods into mHz in small
ints (`mhz`). No crossings for 2 s reads as the nominal 50 000 mHz, so that a missing detector
never looks like a grid event.
"""

# ruff: noqa: PLC0415
# `time` and `machine` are imported when the driver is built (the board's, or a test's fakes), so
# the module imports anywhere.

from micropython import const

NOMINAL_MHZ = const(50000)


def freq_mhz(periods, dt_us):
    """Frequency (mHz, rounded) of `periods` whole periods in `dt_us` µs (dt_us < 1.07 s), in
    small ints only: 10⁹ · periods / dt_us as a quotient and a remainder step."""
    a = periods * 1000000
    q = a // dt_us
    return q * 1000 + ((a - q * dt_us) * 1000 + dt_us // 2) // dt_us


class ZeroCross:
    """The detector on `pin` (a machine.Pin input)."""

    def __init__(self, pin):
        import time

        import machine

        self._m = machine
        self._t = time
        self._n = 0
        self._t0 = 0
        self._t1 = 0
        self._last = time.ticks_ms()
        self.mhz = NOMINAL_MHZ
        pin.irq(handler=self._on_edge, trigger=pin.IRQ_RISING, hard=True)  # µs stamps: no scheduler delay

    def _on_edge(self, pin):  # a hard IRQ: small ints only, no allocation
        t = self._t.ticks_us()
        if self._n == 0:
            self._t0 = t
        self._t1 = t
        self._n += 1

    def poll(self, now):
        t = self._t
        if self._n < 2 or t.ticks_diff(self._t1, self._t0) < 500000:
            if t.ticks_diff(now, self._last) > 2000:
                self.mhz = NOMINAL_MHZ  # no zero crossings: nominal, so no frequency response
            return
        m = self._m
        s = m.disable_irq()
        n = self._n
        dt = t.ticks_diff(self._t1, self._t0)
        self._n = 0
        m.enable_irq(s)
        self._last = now
        if dt < 1000000:
            self.mhz = freq_mhz(n - 1, dt)

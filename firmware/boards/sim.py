"""The simulated board's hardware: the `Hal` interface, whose inputs a test or the demo drives (plug in an
EV, present a card, change the grid frequency, step the clock) and whose outputs it records.
The emulated board (boards/unix.py) runs the firmware on it; a real board never freezes it
(firmware/manifest.py freezes `csc` and its own board's modules only).

The meter integrates power over the simulated clock: with the contactor closed and the EV
in state C, the power is the EV's demand clipped by the limit the firmware set (a
negative limit discharges, when the EV allows it). Signed readings are HMAC-SHA256 over
the register, standing for an eichrecht meter's signature.

SimHal implements every input and output of `csc.hal.Hal` itself (and the base's `flags`, `card`,
`plugged`, `take_card`, `reboot`) rather than subclassing it: the base's defaults, all overridden
here, would cost the emulated board 0.9 KiB of heap (the class and its 20 function objects) that a
real board spends on its own HAL instead. `tests/test_fw_layout.py` checks it has all of Hal's names.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

import hashlib

from csc.hal import FLAG_CARD, FLAG_CP
from csc.schema import CP_STATE_A, CP_STATE_B, CP_STATE_C

_METER_KEY = b"sim-meter-key"


class SimHal:
    rating_w = 11000
    rating_discharge_w = 7000
    evses = 1
    model = "SIM-1"
    vendor = "evedge"
    serial = "SIM0001"

    def __init__(self):
        self.flags = 0  # Hal.flags: FLAG_* set by the interrupt-like inputs
        self.card = None
        import time

        self._t = time
        self.skew_ms = 0  # clock steps from the control channel
        self.ev_plugged = False
        self.ev_ready = False  # the EV wants to charge: it closes S2 (state C) once offered PWM
        self.ev_max_w = 11000
        self.ev_v2g = False
        self.contactor = False
        self.limit_w = 0
        self.locked = False
        self.text = ""
        self.freq = 50000
        self.temp = 250
        self.wh_in = 0.0  # energy registers, Wh (float: sub-Wh steps accumulate)
        self.wh_out = 0.0
        self.last = self.ticks_ms()
        self.exi = None
        self.needs = None  # (energy_wh, departure_s, soc) the EV announces over ISO 15118
        self.se_key = None  # a private key delivered from outside (M18), held by the secure element
        self.se_csr = None  # the secure element's certificate request (M16), from its own key pair

    def ticks_ms(self):
        return self._t.ticks_add(self._t.ticks_ms(), self.skew_ms)

    def step(self, ms):
        self.skew_ms += ms
        self.update()

    # ---- what the control channel does
    def plug(self, ready=True, max_w=11000, v2g=False, needs=None):
        self.ev_plugged = True
        self.ev_ready = ready
        self.ev_max_w = max_w
        self.ev_v2g = v2g
        self.needs = needs
        self.flags |= FLAG_CP

    def unplug(self):
        self.update()
        self.ev_plugged = False
        self.flags |= FLAG_CP

    def ready(self, on):
        self.update()
        self.ev_ready = on
        self.flags |= FLAG_CP

    def present(self, token, token_type=0):
        self.card = (token, token_type)
        self.flags |= FLAG_CARD

    # ---- physics
    def power(self):
        if not self.contactor or self.cp_state() != CP_STATE_C:
            return 0
        lim = self.limit_w
        if lim < 0:
            return max(lim, -self.rating_discharge_w) if self.ev_v2g else 0
        return min(lim, self.ev_max_w, self.rating_w)

    def update(self):
        now = self.ticks_ms()
        dt = self._t.ticks_diff(now, self.last)
        self.last = now
        if dt > 0:
            p = self.power()
            if p >= 0:
                self.wh_in += p * dt / 3600000
            else:
                self.wh_out -= p * dt / 3600000

    # ---- inputs (Hal's)
    def plugged(self, evse=1):
        return self.ev_plugged

    def take_card(self):
        c = self.card
        self.card = None
        self.flags &= ~FLAG_CARD
        return c

    def cp_state(self, evse=1):
        # IEC 61851: a ready EV moves from B to C only while the EVSE offers current (PWM),
        # which the firmware does by setting a limit; without an offer it stays in B.
        if not self.ev_plugged:
            return CP_STATE_A
        return CP_STATE_C if self.ev_ready and self.limit_w else CP_STATE_B

    def meter(self, evse=1):
        self.update()
        p = self.power()
        return (int(self.wh_in), int(self.wh_out), p, p * 10000 // 2300, 2300)

    def signed_meter(self, evse=1):
        wh = int(self.wh_in)
        h = hashlib.sha256(_METER_KEY)
        h.update(str(wh).encode())
        return b"SIM1" + wh.to_bytes(8, "big") + h.digest()

    def temperature_dc(self):
        return self.temp

    def freq_mhz(self):
        return self.freq

    def ev_needs(self, evse=1):
        return self.needs if self.ev_plugged else None

    def csr(self):
        # the secure element made the key pair and keeps the private key; the board holds only
        # the PKCS#10 request (on the emulated board the host runner is the chip and hands the
        # request over on the control channel: `se`). None: no secure element attached.
        return self.se_csr

    def install_key(self, key):
        self.se_key = bytes(key)

    def ev_discharge_ok(self, evse=1):
        return self.ev_v2g and self.ev_plugged

    # ---- outputs
    def set_contactor(self, on, evse=1):
        self.update()
        self.contactor = on

    def set_limit_w(self, watts, evse=1):
        self.update()
        self.limit_w = watts

    def set_lock(self, locked, evse=1):
        self.locked = locked

    def display(self, text):
        self.text = text

    def ev_exi(self, exi):
        self.exi = exi

    def led(self, color):
        pass

    def reboot(self):
        import sys

        sys.exit(3)

    def status(self):
        e_in, e_out, p, _, _ = self.meter()
        return {
            "cp": self.cp_state(),
            "contactor": self.contactor,
            "limit_w": self.limit_w,
            "power_w": p,
            "wh_in": e_in,
            "wh_out": e_out,
            "locked": self.locked,
            "text": self.text,
            "freq": self.freq,
        }

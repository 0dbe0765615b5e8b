"""The hardware seam (MicroOcpp's inputs and outputs): everything the firmware knows of the
board goes through one `Hal` object, so the same services run on a real EVSE
(boards/esp32.py), on the emulated board (boards/sim.py) and in tests.

Inputs are polled by the services' tick; interrupt-like inputs (card read, button, a
control-pilot edge) only set a bit in `flags` from their handler, as an ISR would, and the
tick consumes it. Outputs are plain calls; none of them blocks.

Units follow the schema: energy Wh, power W (negative = discharging), current mA,
voltage dV, temperature d°C, frequency mHz.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from micropython import const

from .schema import CP_STATE_A

# The control-pilot states are the schema's CpState (CP_STATE_A no EV, B EV connected not ready,
# C EV ready: charging allowed, D with ventilation, E error, F EVSE not available): `cp_state()`
# returns them and the transaction service reports them as they are (StatusNotification cp_state).

# bits of Hal.flags, set by interrupt-like inputs
FLAG_CARD = const(1)
FLAG_CP = const(2)
FLAG_BUTTON = const(4)
FLAG_FAULT = const(8)


class Hal:
    """Base class of a board: override the inputs and outputs that exist on it. The firmware passes
    the EVSE's number (from 1) to every per-EVSE input and output: no default (a function with a
    default argument takes twice the heap of one without on a board)."""

    rating_w = 11000  # hardware rating (charging), W
    rating_discharge_w = 0  # largest discharge power, W (0: no V2G)
    evses = 1
    model = "CSC"
    vendor = "evedge"
    serial = "0"

    def __init__(self):
        self.flags = 0
        self.card = None  # (token bytes, token type) set by the reader's handler

    # ---- clock (monotonic ms; wraps like time.ticks_ms on a board)
    def ticks_ms(self):
        import time

        return time.ticks_ms()

    # ---- inputs
    def cp_state(self, evse):
        return CP_STATE_A

    def plugged(self, evse):
        return self.cp_state(evse) != CP_STATE_A

    def meter(self, evse):
        """(energy_import_wh, energy_export_wh, power_w, current_ma, voltage_dv)."""
        return (0, 0, 0, 0, 2300)

    def signed_meter(self, evse):
        """A signed reading (bytes, ≤ 512) from an eichrecht meter, or None."""
        return None

    def temperature_dc(self):
        return 250

    def freq_mhz(self):
        return 50000

    def ev_needs(self, evse):
        """The EV's needs from ISO 15118 (energy_wh, departure in s from now, soc %), or None."""
        return None

    def csr(self):
        """A new key pair in the secure element and its CSR (DER bytes), or None (M16).
        MicroPython has no RSA/ECDSA key generation: the key is made and kept by the
        hardware, never by the firmware."""
        return None

    def install_key(self, key):
        """Put a private key delivered from outside (M18) into the secure element."""

    def ev_discharge_ok(self, evse):
        """True when the connected EV accepts discharging (ISO 15118-20 BPT)."""
        return False

    def take_card(self):
        """The last card read (token, type) and clear it; None when there is none."""
        c = self.card
        self.card = None
        self.flags &= ~FLAG_CARD
        return c

    # ---- outputs
    def set_contactor(self, on, evse):
        pass

    def set_limit_w(self, watts, evse):
        """Power the EVSE may transfer: ≥ 0 charge limit, < 0 discharge setpoint."""

    def set_lock(self, locked, evse):
        pass

    def display(self, text):
        pass

    def led(self, color):
        pass

    def ev_exi(self, exi):
        """Hand an ISO 15118 EXI message (certificate response) to the EV."""

    def ev_ocsp(self, resp):
        """Hand the EV the OCSP response it asked for (M15), or None: none fresh to give."""

    def reboot(self):
        import sys

        sys.exit(3)

"""The simulated board's hardware: the `Hal` interface, whose inputs a test or the demo drives (plug in an
EV, present a card, change the grid frequency, step the clock: boards/unix.py's control channel sets
them here) and whose outputs it records. The emulated board (boards/unix.py) runs the firmware on it;
a real board never freezes it (firmware/manifest.py freezes `csc` and its own board's modules only).

The board has `evses` EVSEs (1 unless the runner says otherwise: `--evses`), each with its own
EV, contactor, limit, cable lock and meter (`_Ev`); the inputs and outputs take the EVSE's number
as `Hal`'s do. Each meter integrates power over the simulated clock: with the contactor closed and
the EV in state C, the power is the EV's demand clipped by the limit the firmware set (a negative
limit discharges, when the EV allows it). Each meter seals its readings as an eichrecht meter does,
with its own key: Ed25519 over the register, the EVSE and the meter's clock, in the `EDM1` format
(docs/roaming.md, "Signed meter readings"). The keys' seeds are the host runner's (the
`--meter-keys` file, a line per EVSE: the meters' chips, read only to seal, never by the firmware);
the operator records each public key from the meter's label (`Csms.set_connector(meter_key=…)`), and
the home CSP checks the seals of the readings an SDR carries (its meter start's and stop's) with it.

SimHal implements every input and output of `csc.hal.Hal` itself (and the base's `flags`, `card`,
`plugged`, `take_card`, `reboot`) rather than subclassing it: the base's defaults, all overridden
here, would cost the emulated board 0.9 KiB of heap (the class and its 20 function objects) that a
real board spends on its own HAL instead. `tests/test_fw_layout.py` checks it has all of Hal's names.
Its class holds those names and nothing else (29 with `__init__`, `__module__` and `__qualname__`:
a method table of 29 slots, where one more name takes 37, +64 B): the meters' integration is the
module's `update()`, an EVSE's power its `_Ev.power()`, and what the rarer features hand the board
(`exi`, `ocsp`, `se_key`; `se`, the host file in which the secure element keeps its certificate
request, as the meters' keys are kept) an attribute of the instance that has seen them. The EVSE's
number has no default here (Hal's is 1): the firmware always names it, and a function object with
a default takes 32 B, not 16.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from csc.hal import FLAG_CARD
from csc.schema import CP_STATE_A, CP_STATE_B, CP_STATE_C


class _Ev:
    """One EVSE: the EV plugged into it, its contactor, limit and lock, its meter's registers."""

    def __init__(self):
        self.plugged = False
        self.ready = False  # the EV wants to charge: it closes S2 (state C) once offered PWM
        self.max_w = 11000
        self.v2g = False
        self.needs = None  # (energy_wh, departure_s, soc) the EV announces over ISO 15118
        self.contactor = False
        self.limit_w = 0
        self.locked = False
        self.wh_in = 0.0  # energy registers, Wh (float: sub-Wh steps accumulate)
        self.wh_out = 0.0

    def power(self):
        """The power (W) this EVSE transfers now: with the contactor closed and the EV in state C
        (SimHal.cp_state), the EV's demand clipped by the limit the firmware set and the rating."""
        lim = self.limit_w
        if not (self.contactor and self.plugged and self.ready and lim):
            return 0
        if lim < 0:
            return max(lim, -SimHal.rating_discharge_w) if self.v2g else 0
        return min(lim, self.max_w, SimHal.rating_w)


def update(hal):
    """The meters integrate the power up to now: before anything that changes it. (A function
    of the module, not a method: SimHal's method table is full; see above.)"""
    import time

    now = hal.ticks_ms()
    dt = time.ticks_diff(now, hal.last)
    hal.last = now
    if dt > 0:
        for e in hal.e:
            p = e.power()
            if p >= 0:
                e.wh_in += p * dt / 3600000
            else:
                e.wh_out -= p * dt / 3600000


class SimHal:
    rating_w = 11000  # per EVSE
    rating_discharge_w = 7000
    evses = 1
    model = "SIM-1"
    vendor = "evedge"
    serial = "SIM0001"

    def __init__(self, evses):
        # The control channel (boards/unix.py `do`) is the test's hands on this hardware: it
        # plugs the EVs in, presents the cards and steps the clock by setting these directly.
        self.flags = 0  # Hal.flags: FLAG_* set by the interrupt-like inputs
        self.card = None
        self.skew_ms = 0  # clock steps from the control channel
        if evses != 1:  # else the class's 1: an attribute less (the instance's table: 80 B, not 96)
            self.evses = evses
        self.e = [_Ev() for _ in range(evses)]  # EVSE n is e[n - 1]
        self.text = ""
        self.freq = 50000
        self.temp = 250
        self.last = self.ticks_ms()
        self.meter_keys = None  # the file of the meters' keys (`--meter-keys`): their chips

    def ticks_ms(self):
        import time

        return time.ticks_add(time.ticks_ms(), self.skew_ms)

    # ---- inputs (Hal's)
    def plugged(self, evse):
        return self.e[evse - 1].plugged

    def take_card(self):
        c = self.card
        self.card = None
        self.flags &= ~FLAG_CARD
        return c

    def cp_state(self, evse):
        # IEC 61851: a ready EV moves from B to C only while the EVSE offers current (PWM),
        # which the firmware does by setting a limit; without an offer it stays in B.
        e = self.e[evse - 1]
        if not e.plugged:
            return CP_STATE_A
        return CP_STATE_C if e.ready and e.limit_w else CP_STATE_B

    def meter(self, evse):
        update(self)
        e = self.e[evse - 1]
        p = e.power()
        return (int(e.wh_in), int(e.wh_out), p, p * 10000 // 2300, 2300)

    def signed_meter(self, evse):
        try:  # the meter's chip holds its key: read when it seals, never kept in the board's heap
            with open(self.meter_keys) as f:
                seed = bytes.fromhex(f.read().split()[evse - 1])
        except (TypeError, OSError, IndexError, ValueError):
            return None  # a meter without a key signs nothing
        import sys
        import time

        # `EDM1`: the tag, the register (Wh, 8 bytes big endian), the EVSE (1 byte), the meter's
        # clock (Unix s, 4 bytes big endian), then the Ed25519 signature (64 bytes) of those 17 bytes.
        wh = int(self.e[evse - 1].wh_in)
        msg = b"EDM1" + wh.to_bytes(8, "big") + bytes((evse,)) + (int(time.time()) & 0xFFFFFFFF).to_bytes(4, "big")
        # The signature (RFC 8032, 5.1.6) by the key whose 32-byte seed is `seed`: the meter's chip.
        # It borrows the board's curve arithmetic (csc.ed25519, which only verifies: the board itself
        # never signs), loaded for the seal and dropped after, as the firmware does; the code of the
        # seal is here, in the one method that seals, so that it takes no heap between seals.
        ed = __import__("csc.ed25519", None, None, ("sha512",))

        def times_base(n):  # n·B
            q = ed._ZERO
            for i in range(254, -1, -1):
                q = ed._double(q)
                if (n >> i) & 1:
                    q = ed._add(q, ed._B)
            return q

        try:
            h = ed.sha512(seed)
            a = (int.from_bytes(h[:32], "little") & ((1 << 254) - 8)) | (1 << 254)
            r = int.from_bytes(ed.sha512(h[32:], msg), "little") % ed._L
            big_r = ed._encode(times_base(r))
            k = int.from_bytes(ed.sha512(big_r, ed._encode(times_base(a)), msg), "little") % ed._L
            return msg + big_r + ((r + k * a) % ed._L).to_bytes(32, "little")
        finally:
            ed = None
            sys.modules.pop("csc.ed25519", None)
            pkg = sys.modules["csc"]
            if hasattr(pkg, "ed25519"):
                delattr(pkg, "ed25519")

    def temperature_dc(self):
        return self.temp

    def freq_mhz(self):
        return self.freq

    def ev_needs(self, evse):
        e = self.e[evse - 1]
        return e.needs if e.plugged else None

    def csr(self):
        # the secure element made the key pair and keeps the private key; the board holds only
        # the PKCS#10 request, read from the chip when asked (on the emulated board the host
        # runner is the chip and hands the request over on the control channel, `se`, which
        # keeps it in the file `se` names). None: no secure element attached.
        p = getattr(self, "se", None)
        if p is None:
            return None
        with open(p, "rb") as f:
            return f.read()

    def install_key(self, key):
        self.se_key = bytes(key)

    def ev_discharge_ok(self, evse):
        e = self.e[evse - 1]
        return e.v2g and e.plugged

    # ---- outputs
    def set_contactor(self, on, evse):
        update(self)
        self.e[evse - 1].contactor = on

    def set_limit_w(self, watts, evse):
        update(self)
        self.e[evse - 1].limit_w = watts

    def set_lock(self, locked, evse):
        self.e[evse - 1].locked = locked

    def display(self, text):
        self.text = text

    def ev_exi(self, exi):
        self.exi = exi

    def ev_ocsp(self, resp):
        self.ocsp = resp

    def led(self, color):
        pass

    def reboot(self):
        import sys

        sys.exit(3)

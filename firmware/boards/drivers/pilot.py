"""The control pilot (IEC 61851-1 annex A): the 1 kHz PWM that offers a current to the EV, and
the pilot voltage read back through a divider on an ADC pin.

Steady +12 V (`DUTY_OFF`, 100 %) while no current may be drawn, duty = I / 0.6 % for 6–51 A
(I / 2.5 + 64 % above, 96 % at most), steady −12 V (`DUTY_F`) in state F. `Pilot.state()`
samples the pilot over one PWM period: the highest sample is the high phase (12 / 9 / 6 / 3 V →
A / B / C / D, thresholds half-way, ≤ 1.5 V → E), the lowest the low phase, which the EV's diode
must hold at −12 V (else E). States are the schema's CpState, as `Hal.cp_state()` returns them.
The front end's calibration (ADC mV at −12 V and +12 V, the ADC's full scale) is the board's.
"""

# ruff: noqa: PLR1730
# `if v > hi: hi = v` is an int compare on MicroPython, not a call.

from csc.schema import CP_STATE_A, CP_STATE_B, CP_STATE_C, CP_STATE_D, CP_STATE_E, CP_STATE_F
from micropython import const

DUTY_OFF = const(65535)  # steady +12 V: the EV may not charge (states A, B1, C1)
DUTY_F = const(0)  # steady −12 V: state F, the EVSE is not available
_SAMPLES = const(100)  # samples per read: over one 1 kHz period (~15 µs a read)


def pilot_mv(adc_mv, mv_n12, mv_p12):
    """The pilot voltage (mV, −12 000…+12 000) from the ADC pin's mV, for a linear front end
    that gives `mv_n12` at −12 V and `mv_p12` at +12 V."""
    return -12000 + (adc_mv - mv_n12) * 24000 // (mv_p12 - mv_n12)


def cp_state(high_mv, low_mv=None):
    """The CP state from the pilot's high phase (and low phase while the PWM runs: `None`
    for a steady +12 V). Nominal levels 12 / 9 / 6 / 3 V for A / B / C / D, thresholds
    half-way; 0 V or less is E (short, or the pilot pulled down); in B–D the EV's diode
    must hold the low phase at −12 V (≤ −10.5 V), else E."""
    if high_mv >= 10500:
        return CP_STATE_A
    if high_mv < 1500:
        return CP_STATE_E
    if low_mv is not None and low_mv > -10500:
        return CP_STATE_E  # no diode
    if high_mv >= 7500:
        return CP_STATE_B
    if high_mv >= 4500:
        return CP_STATE_C
    return CP_STATE_D


def duty_u16(current_ma):
    """The PWM duty (0…65535) that offers `current_ma` per phase: below 6 A nothing (steady
    +12 V), 6–51 A: I / 0.6 %, 51–80 A: I / 2.5 + 64 %, capped at 80 A (96 %)."""
    if current_ma < 6000:
        return DUTY_OFF
    pm = current_ma // 60 if current_ma <= 51000 else min(current_ma, 80000) // 250 + 640  # ‰
    return pm * 65535 // 1000


def current_ma(watts, phases=3, volts=230):
    """The current per phase (mA) that carries `watts` (no discharge over the pilot)."""
    if watts <= 0:
        return 0
    return watts * 1000 // (volts * phases)


class Pilot:
    """The pilot's output (`pwm`: a machine.PWM at 1 kHz, started at DUTY_OFF) and its input
    (`adc`: a machine.ADC on the divider, `full_mv` at read_u16() = 65535)."""

    def __init__(self, pwm, adc, mv_n12, mv_p12, full_mv):
        self.pwm = pwm
        self.adc = adc
        self.duty = DUTY_OFF
        self.cal = (mv_n12, mv_p12, full_mv)

    def offer(self, duty):
        """Set the duty (duty_u16(), DUTY_OFF or DUTY_F); the PWM is written on a change only."""
        if duty != self.duty:
            self.duty = duty
            self.pwm.duty_u16(duty)

    def state(self):
        """The state the pilot shows now (one read, not debounced): F while the EVSE holds
        −12 V; the low phase is checked only while the PWM runs."""
        d = self.duty
        if d == DUTY_F:
            return CP_STATE_F
        adc = self.adc
        lo = 65535
        hi = 0
        for _ in range(_SAMPLES):
            v = adc.read_u16()
            if v > hi:
                hi = v
            if v < lo:
                lo = v
        n12, p12, full = self.cal
        high = pilot_mv(hi * full // 65535, n12, p12)
        low = None if d == DUTY_OFF else pilot_mv(lo * full // 65535, n12, p12)
        return cp_state(high, low)

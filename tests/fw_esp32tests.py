"""Tests of the ESP32 board (firmware/boards/esp32.py) and its drivers (firmware/boards/drivers/),
shared by CPython and MicroPython.

The drivers' pure pieces (pilot voltage → CP state, current → PWM duty, Modbus RTU CRC and frames,
NTC, frequency, PN532 frames) against values from their standards and datasheets; then `Esp32Hal`
itself, wired to the drivers, on a fake `machine` module (pins, PWM, ADC, UART, I2C in memory) with an EV, a Modbus
meter and a PN532 played by the test. tests/test_fw_esp32.py runs every `test_*` here under
CPython and spawns `micropython tests/fw_linktests_runner.py --module fw_esp32tests`.
Kept to the subset both interpreters understand (no typing, no pytest).
"""

import sys

from boards import esp32 as E  # noqa: N812
from boards.drivers import modbus_meter as MB  # noqa: N812
from boards.drivers import ntc
from boards.drivers import pilot as P  # noqa: N812
from boards.drivers import pn532 as NFC  # noqa: N812
from boards.drivers import zero_cross as ZC  # noqa: N812
from csc.hal import FLAG_BUTTON, FLAG_CARD, FLAG_CP, FLAG_FAULT
from csc.schema import CP_STATE_A as CP_A
from csc.schema import CP_STATE_B as CP_B
from csc.schema import CP_STATE_C as CP_C
from csc.schema import CP_STATE_D as CP_D
from csc.schema import CP_STATE_E as CP_E
from csc.schema import CP_STATE_F as CP_F

# ---------------------------------------------------------------- pilot


def test_pilot_voltage_from_the_adc_front_end():
    cal = (E.CP_ADC_MV_N12, E.CP_ADC_MV_P12)  # the board's calibration
    assert P.pilot_mv(E.CP_ADC_MV_N12, *cal) == -12000
    assert P.pilot_mv(E.CP_ADC_MV_P12, *cal) == 12000
    assert P.pilot_mv((E.CP_ADC_MV_N12 + E.CP_ADC_MV_P12) // 2, *cal) == 0


def test_cp_states_from_the_pilot_levels_iec61851():
    # nominal high-phase levels; the EV's diode holds the low phase at −12 V
    for volts, state in ((12, CP_A), (9, CP_B), (6, CP_C), (3, CP_D), (0, CP_E), (-12, CP_E)):
        assert P.cp_state(volts * 1000, -12000) == state, volts
    # ±1 V tolerances of the standard, thresholds half-way
    assert P.cp_state(11000) == CP_A and P.cp_state(10000) == CP_B
    assert P.cp_state(8000) == CP_B and P.cp_state(7000) == CP_C
    assert P.cp_state(5000) == CP_C and P.cp_state(4000) == CP_D
    assert P.cp_state(2000) == CP_D and P.cp_state(1000) == CP_E
    # no diode: the low phase does not reach −12 V
    assert P.cp_state(6000, -6000) == CP_E and P.cp_state(9000, 0) == CP_E
    assert P.cp_state(6000, -11500) == CP_C
    assert P.cp_state(9000, None) == CP_B  # steady +12 V: no low phase to check
    assert P.cp_state(12000, 0) == CP_A  # no EV: nothing to check


def test_duty_from_the_current_iec61851():
    def u16(pm):  # ‰ of the PWM period
        return pm * 65535 // 1000

    # I / 0.6 % from 6 to 51 A
    assert P.duty_u16(6000) == u16(100) == 6553  # 10 %
    assert P.duty_u16(16000) == u16(266)  # 26.67 %
    assert P.duty_u16(32000) == u16(533)  # 53.33 %
    assert P.duty_u16(51000) == u16(850)  # 85 %
    # I / 2.5 + 64 % above 51 A, 80 A at most
    assert P.duty_u16(63000) == u16(892)  # 89.2 %
    assert P.duty_u16(80000) == u16(960) and P.duty_u16(100000) == u16(960)  # 96 %
    # below 6 A: no current can be offered: steady +12 V
    assert P.duty_u16(5999) == P.DUTY_OFF == 65535 and P.duty_u16(0) == 65535
    assert P.DUTY_F == 0


def test_current_from_the_power_limit():
    assert P.current_ma(11040) == 16000  # 3 × 230 V
    assert P.current_ma(3680, 1) == 16000
    assert P.current_ma(0) == 0 and P.current_ma(-5000) == 0  # no discharge over the pilot


# ---------------------------------------------------------------- Modbus RTU


def test_modbus_crc_of_the_specifications_examples():
    # "MODBUS over serial line" specification: 11 03 00 6B 00 03 → CRC 76 87 (low byte first)
    b = bytearray(8)
    assert MB.mb_request(b, 0x11, 3, 0x006B, 3) == 8
    assert bytes(b) == b"\x11\x03\x00\x6b\x00\x03\x76\x87"
    assert MB.mb_request(b, 1, 3, 0, 10) == 8
    assert bytes(b) == b"\x01\x03\x00\x00\x00\x0a\xc5\xcd"
    assert MB.crc16(b, 8) == 0  # a frame with its CRC checks to zero


def _answer(slave, func, regs):
    b = bytearray(5 + 2 * len(regs))
    b[0] = slave
    b[1] = func
    b[2] = 2 * len(regs)
    for i in range(len(regs)):
        b[3 + 2 * i] = regs[i] >> 8
        b[4 + 2 * i] = regs[i] & 0xFF
    c = MB.crc16(b, len(b) - 2)
    b[-2] = c & 0xFF
    b[-1] = c >> 8
    return b


def test_modbus_answer_checked_and_registers_read():
    b = _answer(1, 3, [0x0001, 0xE240, 0xFFFF, 0xFF9C])
    assert MB.mb_check(b, len(b), 1, 3, 4) == MB.MB_OK
    assert MB.mb_u32(b, 0) == 123456
    assert MB.mb_s32(b, 2) == -100 and MB.mb_u32(b, 2) == 0xFFFFFF9C
    assert MB.mb_check(b, len(b) - 1, 1, 3, 4) == MB.MB_SHORT
    assert MB.mb_check(b, len(b), 2, 3, 4) == MB.MB_FRAME  # another slave
    assert MB.mb_check(b, len(b), 1, 4, 4) == MB.MB_FRAME  # another function
    assert MB.mb_check(b, len(b), 1, 3, 3) == MB.MB_CRC  # a shorter read: the CRC is elsewhere
    b[4] ^= 1
    assert MB.mb_check(b, len(b), 1, 3, 4) == MB.MB_CRC
    exc = bytearray(b"\x01\x83\x02\x00\x00")
    c = MB.crc16(exc, 3)
    exc[3] = c & 0xFF
    exc[4] = c >> 8
    assert MB.mb_check(exc, 5, 1, 3, 2) == MB.MB_EXCEPTION + 2  # illegal data address
    exc[4] ^= 1
    assert MB.mb_check(exc, 5, 1, 3, 2) == MB.MB_CRC


# ---------------------------------------------------------------- NTC, frequency


def test_ntc_temperature_beta_model():
    assert ntc.ntc_dc(1650) == 250  # R = R25 at mid-scale
    # 50 °C: R = 10 kΩ · e^(3950 (1/323.15 − 1/298.15)) = 3588 Ω → 3300 · R / (R + 10 kΩ) = 871 mV
    assert 497 <= ntc.ntc_dc(871) <= 503
    assert ntc.ntc_dc(2800) < 0  # colder: higher resistance, higher voltage
    assert ntc.ntc_dc(0) is None and ntc.ntc_dc(3300) is None  # shorted, open


def test_grid_frequency_from_counted_periods():
    assert ZC.freq_mhz(50, 1000000) == 50000
    assert ZC.freq_mhz(49, 980000) == 50000
    assert ZC.freq_mhz(50, 1001000) == 49950  # 49.95005 Hz
    assert ZC.freq_mhz(25, 502008) == 49800
    assert ZC.freq_mhz(53, 1060000) == 50000  # the longest window (below 1.07 s) in small ints


# ---------------------------------------------------------------- PN532

SAM_CONFIGURATION = b"\x00\x00\xff\x05\xfb\xd4\x14\x01\x14\x01\x02\x00"
IN_LIST_PASSIVE_TARGET = b"\x00\x00\xff\x04\xfc\xd4\x4a\x01\x00\xe1\x00"
ACK = b"\x01\x00\x00\xff\x00\xff\x00"


def _target(uid):
    """A read InListPassiveTarget answer (status byte first) for an ISO 14443-A card."""
    data = b"\xd5\x4b\x01\x01\x00\x44\x00" + bytes([len(uid)]) + uid
    n = len(data)
    return b"\x01\x00\x00\xff" + bytes([n, -n & 0xFF]) + data + bytes([-sum(data) & 0xFF]) + b"\x00"


def test_pn532_frames_of_the_user_manual():
    b = bytearray(16)
    assert NFC.pn532_frame(b, b"\x14\x01\x14\x01") == len(SAM_CONFIGURATION)
    assert bytes(b[: len(SAM_CONFIGURATION)]) == SAM_CONFIGURATION
    assert NFC.pn532_frame(b, b"\x4a\x01\x00") == len(IN_LIST_PASSIVE_TARGET)
    assert bytes(b[: len(IN_LIST_PASSIVE_TARGET)]) == IN_LIST_PASSIVE_TARGET
    assert NFC.pn532_ack(ACK) and not NFC.pn532_ack(b"\x00\x00\x00\xff\x00\xff\x00")


def test_pn532_uid_of_a_target():
    for uid in (b"\x92\x2e\x58\x32", b"\x04\xa1\xb2\xc3\xd4\xe5\x80"):
        a = bytearray(32)
        t = _target(uid)
        a[: len(t)] = t
        n = NFC.pn532_uid_len(a, len(a))
        assert n == len(uid) and bytes(a[NFC.NFC_UID_AT : NFC.NFC_UID_AT + n]) == uid
    bad = bytearray(_target(b"\x92\x2e\x58\x32"))
    bad[-2] ^= 1  # DCS
    assert NFC.pn532_uid_len(bad, len(bad)) == 0
    bad = bytearray(_target(b"\x92\x2e\x58\x32"))
    bad[5] ^= 1  # LCS
    assert NFC.pn532_uid_len(bad, len(bad)) == 0
    assert NFC.pn532_uid_len(bytearray(32), 32) == 0  # not ready (status 0)


# ---------------------------------------------------------------- the board on a fake `machine`


class _Clock:
    """time for the HAL: ticks the test sets."""

    def __init__(self):
        self.ms = 1000
        self.us = 0

    def ticks_ms(self):
        return self.ms

    def ticks_us(self):
        return self.us

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, b):
        return a + b

    def sleep_ms(self, ms):
        self.ms += ms


class _Fake:
    """A fake `machine` module and the world around the board: the EV on the pilot, the
    meter on the UART, the card reader on I2C."""

    def __init__(self):
        fake = self
        self.pins = {}
        self.ev = None  # None: no EV; else (pilot volts of the EV's resistors, diode)
        self.ntc_u16 = 32767
        self.uart = None
        self.i2c_writes = []
        self.i2c_reads = []

        class Pin:
            OUT = 3
            IN = 1
            PULL_UP = 2
            IRQ_FALLING = 2
            IRQ_RISING = 1

            def __init__(self, n, mode=-1, pull=-1, value=None):
                self.n = n
                self.v = 1 if pull == 2 else 0
                if value is not None:
                    self.v = 1 if value else 0
                self.handler = None
                fake.pins[n] = self

            def value(self, v=None):
                if v is None:
                    return self.v
                self.v = 1 if v else 0
                return None

            def irq(self, handler=None, trigger=0, hard=False):
                self.handler = handler

        class PWM:
            def __init__(self, pin, freq=0, duty_u16=0):
                assert freq == 1000
                self.d = duty_u16
                fake.pwm = self

            def duty_u16(self, d=None):
                if d is None:
                    return self.d
                self.d = d
                return None

        class ADC:
            ATTN_11DB = 3

            def __init__(self, pin):
                self.n = pin.n
                self.i = 0

            def atten(self, a):
                assert a == 3

            def read_u16(self):
                if self.n == E.PIN_NTC:
                    return fake.ntc_u16
                self.i += 1
                return fake.pilot_u16(self.i % 2 == 0)

        class UART:
            def __init__(self, uid, baud, tx=None, rx=None, timeout=None):
                assert (uid, baud) == (E.METER_UART, E.METER_BAUD)
                self.sent = bytearray()
                self.rx = bytearray()
                self.de_when_written = []
                self.de_when_flushed = []
                fake.uart = self

            def any(self):
                return len(self.rx)

            def readinto(self, buf, n=None):
                n = min(len(buf), len(self.rx)) if n is None else min(n, len(self.rx))
                buf[:n] = self.rx[:n]
                self.rx = self.rx[n:]
                return n

            def write(self, b):
                self.de_when_written.append(fake.pins[E.PIN_RS485_DE].v)
                self.sent += b
                return len(b)

            def flush(self):  # returns once the last byte left
                self.de_when_flushed.append(fake.pins[E.PIN_RS485_DE].v)

        class I2C:
            def __init__(self, uid, scl=None, sda=None, freq=0):
                pass

            def writeto(self, addr, buf):
                assert addr == E.NFC_ADDR
                fake.i2c_writes.append(bytes(buf))
                return 1

            def readfrom_into(self, addr, buf):
                r = fake.i2c_reads.pop(0) if fake.i2c_reads else b"\x00"
                for i in range(len(buf)):
                    buf[i] = r[i] if i < len(r) else 0

        class WDT:
            def __init__(self, timeout=0):
                pass

            def feed(self):
                pass

        class Machine:
            pass

        m = Machine()
        m.Pin = Pin
        m.PWM = PWM
        m.ADC = ADC
        m.UART = UART
        m.I2C = I2C
        m.WDT = WDT
        m.unique_id = lambda: b"\x24\x6f\x28\x01\x02\x03"
        m.disable_irq = lambda: 1
        m.enable_irq = lambda s=1: None
        self.machine = m
        self.clock = _Clock()

    def pilot_u16(self, low_phase):
        d = self.pwm.d
        if d == 0:
            v = -12000  # state F: the EVSE holds −12 V
        elif low_phase and d != 65535:
            v = -12000 if self.ev is None or self.ev[1] else -6000  # without the diode
        else:
            v = 12000 if self.ev is None else self.ev[0] * 1000
        mv = E.CP_ADC_MV_N12 + (v + 12000) * (E.CP_ADC_MV_P12 - E.CP_ADC_MV_N12) // 24000
        return mv * 65535 // E.ADC_FULL_MV

    def board(self):
        saved = {}
        for name, mod in (("machine", self.machine), ("time", self.clock)):
            saved[name] = sys.modules.get(name)
            sys.modules[name] = mod
        try:
            hal = E.Esp32Hal()
        finally:
            for name, mod in saved.items():
                if mod is None:
                    del sys.modules[name]
                else:
                    sys.modules[name] = mod
        return hal

    def step(self, hal, n=2, ms=20):
        for _ in range(n):
            self.clock.ms += ms
            hal.poll(self.clock.ms)


def _rgb(f):
    return (f.pins[E.PIN_LED_R].v, f.pins[E.PIN_LED_G].v, f.pins[E.PIN_LED_B].v)


def test_board_charges_an_ev_through_pilot_lock_and_contactor():
    f = _Fake()
    hal = f.board()
    contactor = f.pins[E.PIN_CONTACTOR]
    lock = f.pins[E.PIN_LOCK]
    fb = f.pins[E.PIN_LOCK_FB]
    assert hal.serial == "246f28010203" and hal.rating_w == 22080
    assert f.pwm.d == P.DUTY_OFF and contactor.v == 0  # safe from the start
    f.step(hal)
    assert hal.cp_state(1) == CP_A and not hal.plugged(1) and _rgb(f) == (0, 1, 0)
    f.ev = (9, True)
    f.step(hal, 1)
    assert hal.cp_state(1) == CP_A  # one sample is not a state (debounce)
    f.step(hal, 1)
    assert hal.cp_state(1) == CP_B and hal.flags & FLAG_CP
    assert f.pwm.d == P.DUTY_OFF  # nothing offered before the firmware gives a limit
    hal.set_limit_w(11040, 1)  # a transaction started: the offer, in state B
    assert f.pwm.d == P.duty_u16(16000)
    f.ev = (6, True)  # the EV saw it and closes S2
    f.step(hal)
    assert hal.cp_state(1) == CP_C and contactor.v == 0  # not asked for
    hal.set_contactor(True, 1)
    assert lock.v == 1  # locking first
    f.step(hal)
    assert contactor.v == 0  # not before the lock reports locked
    fb.v = 0
    f.step(hal, 1)
    assert contactor.v == 1 and f.pwm.d == P.duty_u16(16000) and _rgb(f) == (0, 0, 1)
    hal.set_limit_w(7360, 1)
    assert f.pwm.d == P.duty_u16(10666)  # at once
    hal.set_limit_w(0, 1)  # a pause: steady +12 V, and the contactor opens
    f.step(hal, 1)
    assert f.pwm.d == P.DUTY_OFF and contactor.v == 0
    hal.set_limit_w(11040, 1)
    f.step(hal, 1)
    assert contactor.v == 1
    f.ev = (9, True)  # the EV stops by itself
    f.step(hal)
    assert hal.cp_state(1) == CP_B and contactor.v == 0
    f.ev = (6, True)
    f.step(hal)
    assert contactor.v == 1
    hal.set_contactor(False, 1)
    assert contactor.v == 0  # at once, not at the next poll
    f.ev = None
    f.step(hal)
    assert hal.cp_state(1) == CP_A and lock.v == 0 and f.pwm.d == P.DUTY_OFF
    fb.v = 1
    f.step(hal, 50)
    assert not hal.fault and not hal.flags & FLAG_FAULT


def test_board_lock_failure_is_a_fault_and_state_f():
    f = _Fake()
    hal = f.board()
    f.ev = (6, True)
    f.step(hal)
    hal.set_limit_w(11040, 1)
    hal.set_contactor(True, 1)
    f.step(hal, E.LOCK_MS // 20 + 2)  # the feedback never says locked
    assert hal.fault == "lock" and hal.flags & FLAG_FAULT
    assert f.pins[E.PIN_CONTACTOR].v == 0 and f.pwm.d == P.DUTY_F
    f.step(hal)
    assert hal.cp_state(1) == CP_F and _rgb(f) == (1, 0, 0)
    hal.set_lock(False, 1)  # UnlockConnector: the lock is where it is asked to be again
    f.step(hal)
    assert not hal.fault and not hal.flags & FLAG_FAULT
    f.step(hal)
    assert hal.cp_state(1) == CP_C


def test_board_ev_without_diode_is_state_e():
    f = _Fake()
    hal = f.board()
    f.ev = (6, False)
    f.step(hal)
    assert hal.cp_state(1) == CP_C  # steady +12 V (nothing offered): the diode cannot be seen …
    hal.set_limit_w(11040, 1)  # a transaction offers current
    f.step(hal)
    assert hal.cp_state(1) == CP_E  # … once the PWM runs, the low phase gives it away
    hal.set_contactor(True, 1)
    f.pins[E.PIN_LOCK_FB].v = 0
    f.step(hal, 10)
    assert hal.cp_state(1) == CP_E and f.pins[E.PIN_CONTACTOR].v == 0  # stays E, never charges
    assert f.pwm.d != P.DUTY_OFF and _rgb(f) == (1, 0, 0)
    f.ev = None
    f.step(hal)
    assert hal.cp_state(1) == CP_A and f.pwm.d == P.DUTY_OFF


def test_board_reads_the_meter_over_modbus_rtu():
    f = _Fake()
    hal = f.board()
    u = f.uart
    f.step(hal, 1)
    assert bytes(u.sent) == b"\x01\x03\x50\x00\x00\x08" + bytes(u.sent[6:8]) and MB.crc16(u.sent, 8) == 0
    # the driver on to send, off once the request has left (the meter answers on the same pair)
    assert u.de_when_written == [1] and u.de_when_flushed == [1] and f.pins[E.PIN_RS485_DE].v == 0
    u.sent = bytearray()
    f.step(hal, 1)
    assert u.sent == b""  # waiting for the answer
    # import 12 345.60 kWh, export 78.90 kWh (u64, 0.01 kWh)
    u.rx += _answer(1, 3, [0, 0, 0x0012, 0xD680, 0, 0, 0, 7890])[:10]
    f.step(hal, 1)
    assert hal.meter(1) == (0, 0, 0, 0, 0)  # half an answer: wait
    u.rx += _answer(1, 3, [0, 0, 0x0012, 0xD680, 0, 0, 0, 7890])[10:]
    f.step(hal, 1)
    assert u.sent == b""
    f.step(hal, 1)
    assert bytes(u.sent[:6]) == b"\x01\x03\x5b\x00\x00\x16"  # then the instantaneous values
    regs = [0] * 22
    regs[1] = 2301  # L1-N 230.1 V
    regs[13] = 1600  # L1 16.00 A
    regs[20] = 1104000 >> 16  # total 11 040.00 W (s32, 0.01 W)
    regs[21] = 1104000 & 0xFFFF
    u.rx += _answer(1, 3, regs)
    f.step(hal, 1)
    assert hal.meter(1) == (12345600, 78900, 11040, 16000, 2301)
    assert hal.emeter.errors == 0
    u.sent = bytearray()
    f.step(hal, 1)
    assert u.sent == b""  # the next reading one second later
    f.step(hal, 1, E.METER_MS)
    assert len(u.sent) == 8
    bad = _answer(1, 3, [0, 0, 0, 1, 0, 0, 0, 2])
    bad[-1] ^= 0xFF
    u.rx += bad
    f.step(hal, 1)
    assert hal.emeter.errors == 1 and hal.meter(1)[0] == 12345600  # kept
    f.step(hal, 1, E.METER_MS)
    exc = bytearray(b"\x01\x83\x02\x00\x00")
    c = MB.crc16(exc, 3)
    exc[3] = c & 0xFF
    exc[4] = c >> 8
    u.rx += exc
    f.step(hal, 1)
    assert hal.emeter.errors == 1  # a short answer: one more poll of silence first
    f.step(hal, 1)
    assert hal.emeter.errors == 2
    f.step(hal, 1, E.METER_MS)
    f.step(hal, 1, 301)  # nothing at all: a timeout
    assert hal.emeter.errors == 3


def test_board_reads_a_card_from_the_pn532():
    f = _Fake()
    hal = f.board()
    assert f.i2c_writes == [SAM_CONFIGURATION]
    f.step(hal, 1)
    assert f.i2c_writes[1:] == [IN_LIST_PASSIVE_TARGET]
    irq = f.pins[E.PIN_NFC_IRQ]
    f.i2c_reads.append(ACK)
    irq.handler(irq)  # the reader's IRQ: a flag only
    assert not hal.flags & FLAG_CARD
    f.step(hal, 1)
    uid = b"\x04\xa1\xb2\xc3"
    f.step(hal, 5)
    assert not hal.flags & FLAG_CARD  # no card yet: the command waits in the reader
    f.i2c_reads.append(_target(uid))
    irq.handler(irq)
    f.step(hal, 1)
    assert hal.flags & FLAG_CARD
    assert hal.take_card() == (uid, 0) and not hal.flags & FLAG_CARD  # token type rfid
    n = len(f.i2c_writes)
    f.step(hal, 25)  # re-armed 0.5 s later
    assert f.i2c_writes[n:] == [IN_LIST_PASSIVE_TARGET]
    f.i2c_reads.append(ACK)
    irq.handler(irq)
    f.step(hal, 1)
    f.i2c_reads.append(_target(uid))  # the same card, still on the reader: not a new read
    irq.handler(irq)
    f.step(hal, 1)
    assert not hal.flags & FLAG_CARD
    f.step(hal, 25)
    f.i2c_reads.append(ACK)
    irq.handler(irq)
    f.step(hal, 1)
    other = b"\x04\x11\x22\x33\x44\x55\x66"
    f.i2c_reads.append(_target(other))
    irq.handler(irq)
    f.step(hal, 1)
    assert hal.take_card() == (other, 0)


def test_board_button_frequency_temperature_and_leds():
    f = _Fake()
    hal = f.board()
    b = f.pins[E.PIN_ESTOP]
    b.handler(b)
    assert hal.flags & FLAG_BUTTON  # the handler only sets the flag
    zc = f.pins[E.PIN_ZC]
    for i in range(26):  # 25 periods of 49.8 Hz
        f.clock.us = 5000000 + (i * 20080320 + 500) // 1000
        zc.handler(zc)
    f.step(hal, 1)
    assert hal.freq_mhz() == 49800
    for i in range(51):  # 50 periods of 50.1 Hz
        f.clock.us = 7000000 + (i * 19960080 + 500) // 1000
        zc.handler(zc)
    f.step(hal, 1)
    assert hal.freq_mhz() == 50100
    f.step(hal, 110)  # no zero crossing for 2 s: nominal, so no frequency response
    assert hal.freq_mhz() == 50000
    f.ntc_u16 = 871 * 65535 // 3300
    f.step(hal, 1, 1000)
    assert 495 <= hal.temperature_dc() <= 505
    f.ntc_u16 = 0  # shorted sensor
    f.step(hal, 1, 1000)
    assert hal.temperature_dc() == 999
    hal.led(0xFF00FF)
    assert _rgb(f) == (1, 0, 1)
    f.step(hal, 1)
    assert _rgb(f) == (1, 0, 1)  # kept until led(-1)
    hal.led(-1)
    assert _rgb(f) == (0, 1, 0)

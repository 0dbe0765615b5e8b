"""The ESP32 EVSE board: the `Hal` on machine.PWM / ADC / Pin / UART / I2C, and `main()`.

One AC charge point (IEC 61851-1 mode 3, one connector, three phases):

- control pilot: 1 kHz PWM (machine.PWM) through the ±12 V pilot driver; steady +12 V (100 %) while
  charging is not allowed, duty = I / 0.6 % for 6–51 A (I / 2.5 + 64 % above, up to 80 A), steady
  −12 V in state F. The pilot voltage comes back through a divider to an ADC pin: each poll samples
  it over a whole PWM period, the highest sample is the high phase (→ state A–E, `cp_state`), the
  lowest the low phase (the EV's diode must pull it to −12 V, else state E). The duty is the
  firmware's limit only: the services give it when a transaction starts, in state B, and an EV
  closes S2 (state C) only once it sees that offer; no current is offered before;
- contactor: a Pin output, closed only while the firmware asks for it, the EV is in C (this board
  has no ventilation for D), the cable lock reports locked and at least 6 A are offered; opened at
  once otherwise (the services open it first too);
- cable lock: a Pin output (motor driver or solenoid) with a feedback Pin; locked while charging is
  asked for, unlocked when the firmware says so or the EV is gone; no feedback within LOCK_MS →
  FLAG_FAULT and the pilot goes to state F;
- meter: Modbus RTU over RS-485 on machine.UART (ABB B23-style register map: energy as 0.01 kWh,
  voltage 0.1 V, current 0.01 A, power 0.01 W), polled without blocking: a request is written,
  the answer read once it is complete; preallocated buffers, no allocation per poll;
- RFID: a PN532 on machine.I2C (InListPassiveTarget, ISO 14443-A): the command waits in the
  reader until a card comes; the reader's IRQ pin handler only sets a flag, the poll reads the
  UID and sets `card` and FLAG_CARD;
- emergency stop button: a Pin IRQ whose handler only sets FLAG_BUTTON;
- grid frequency: a zero-crossing detector on a Pin IRQ whose handler counts rising edges and
  stamps the last one (ticks_us, a hard IRQ for µs accuracy); the poll turns the count over ≥ 0.5 s
  into mHz;
- temperature: an NTC divider on an ADC pin (β model);
- LEDs: three Pins (red, green, blue), showing the state unless `led()` set a colour.

The inputs the services call (`cp_state`, `meter`, `freq_mhz`, `temperature_dc`) return what the
last poll measured; `run()` is the poll task (every POLL_MS, feeds the watchdog). The pure pieces
(pilot voltage → state, current → duty, Modbus CRC and frames, NTC, frequency, PN532 frames) are
plain functions, tested under CPython and MicroPython (tests/test_fw_esp32.py); `machine` is
imported only when the board is built, so this module imports on the unix port too.
"""

# ruff: noqa: PLC0415, PLR1714, PLR1730, SIM109
# Imports inside functions are deliberate: `machine`, `esp32`, `network` exist on the board only;
# `a == x or a == y` and `if v > hi: hi = v` are two int compares on MicroPython, not a tuple or a call.

from csc.hal import CP_A, CP_B, CP_C, CP_D, CP_E, CP_F, FLAG_BUTTON, FLAG_CARD, FLAG_CP, FLAG_FAULT, Hal
from micropython import const

# ---------------------------------------------------------------- the board's wiring (one table)
PIN_CP_PWM = const(25)  # pilot driver input (high = +12 V)
PIN_CP_ADC = const(34)  # pilot voltage through the divider (ADC1: usable with Wi-Fi on)
PIN_CONTACTOR = const(26)  # contactor relay driver (high = closed)
PIN_LOCK = const(27)  # cable lock driver (high = locking)
PIN_LOCK_FB = const(35)  # cable lock feedback (low = locked)
PIN_ESTOP = const(39)  # emergency stop button (low = pressed)
PIN_ZC = const(36)  # mains zero-crossing detector (one rising edge per period)
PIN_NTC = const(32)  # NTC divider (NTC to ground)
PIN_METER_TX = const(17)  # UART2 to the RS-485 transceiver
PIN_METER_RX = const(16)
PIN_RS485_DE = const(4)  # transceiver driver enable (high = transmit)
PIN_I2C_SCL = const(22)  # PN532 (I2C mode)
PIN_I2C_SDA = const(21)
PIN_NFC_IRQ = const(5)  # PN532 P70_IRQ (low = answer ready)
PIN_LED_R = const(13)
PIN_LED_G = const(12)
PIN_LED_B = const(14)

# ---------------------------------------------------------------- the board's parameters
RATED_A = const(32)  # per phase: the cable, contactor and supply rating
PHASES = const(3)
VOLTS = const(230)
METER_UART = const(2)
METER_BAUD = const(9600)
METER_ADDR = const(1)  # Modbus slave address
METER_MS = const(1000)  # a full meter reading (two requests) every second
REG_ENERGY = const(0x5000)  # import (u64) and export (u64) active energy, 0.01 kWh
REG_INSTANT = const(0x5B00)  # voltages, currents, power …: 22 registers from here
NFC_ADDR = const(0x24)
CP_ADC_MV_N12 = const(180)  # ADC mV at −12 V and +12 V on the pilot (calibrate per board)
CP_ADC_MV_P12 = const(2980)
ADC_FULL_MV = const(3300)  # read_u16 full scale at 11 dB attenuation (linear approximation)
NTC_R_FIXED = const(10000)  # Ω, from the 3.3 V rail to the NTC
NTC_R25 = const(10000)  # Ω at 25 °C
NTC_BETA = const(3950)
POLL_MS = const(20)
LOCK_MS = const(800)  # the lock must report its state within this time
WDT_MS = const(8000)  # watchdog: the poll task feeds it

# ---------------------------------------------------------------- pilot (IEC 61851-1 annex A)
DUTY_OFF = const(65535)  # steady +12 V: the EV may not charge (states A, B1, C1)
DUTY_F = const(0)  # steady −12 V: state F, the EVSE is not available


def pilot_mv(adc_mv):
    """The pilot voltage (mV, −12 000…+12 000) from the ADC pin's mV (linear front end)."""
    return -12000 + (adc_mv - CP_ADC_MV_N12) * 24000 // (CP_ADC_MV_P12 - CP_ADC_MV_N12)


def cp_state(high_mv, low_mv=None):
    """The CP state from the pilot's high phase (and low phase while the PWM runs: `None`
    for a steady +12 V). Nominal levels 12 / 9 / 6 / 3 V for A / B / C / D, thresholds
    half-way; 0 V or less is E (short, or the pilot pulled down); in B–D the EV's diode
    must hold the low phase at −12 V (≤ −10.5 V), else E."""
    if high_mv >= 10500:
        return CP_A
    if high_mv < 1500:
        return CP_E
    if low_mv is not None and low_mv > -10500:
        return CP_E  # no diode
    if high_mv >= 7500:
        return CP_B
    if high_mv >= 4500:
        return CP_C
    return CP_D


def duty_u16(current_ma):
    """The PWM duty (0…65535) that offers `current_ma` per phase: below 6 A nothing (steady
    +12 V), 6–51 A: I / 0.6 %, 51–80 A: I / 2.5 + 64 %, capped at 80 A (96 %)."""
    if current_ma < 6000:
        return DUTY_OFF
    pm = current_ma // 60 if current_ma <= 51000 else min(current_ma, 80000) // 250 + 640  # ‰
    return pm * 65535 // 1000


def current_ma(watts, phases=PHASES, volts=VOLTS):
    """The current per phase (mA) that carries `watts` (no discharge over the pilot)."""
    if watts <= 0:
        return 0
    return watts * 1000 // (volts * phases)


# ---------------------------------------------------------------- Modbus RTU


def crc16(buf, n):
    """Modbus CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF) of buf[0:n]."""
    crc = 0xFFFF
    for i in range(n):
        crc ^= buf[i]
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def mb_request(buf, slave, func, reg, count):
    """Write a read request (function 3 or 4: `count` registers from `reg`) into buf[0:8]."""
    buf[0] = slave
    buf[1] = func
    buf[2] = reg >> 8
    buf[3] = reg & 0xFF
    buf[4] = count >> 8
    buf[5] = count & 0xFF
    c = crc16(buf, 6)
    buf[6] = c & 0xFF  # CRC low byte first
    buf[7] = c >> 8
    return 8


MB_OK = const(0)
MB_SHORT = const(1)  # fewer bytes than the answer needs
MB_CRC = const(2)
MB_FRAME = const(3)  # another slave, function or byte count
MB_EXCEPTION = const(0x100)  # + the exception code the slave answered


def mb_check(buf, n, slave, func, count):
    """Check the answer buf[0:n] to a read of `count` registers; MB_OK or an error code.
    The registers are then buf[3 + 2 i], buf[4 + 2 i] (big-endian)."""
    if n >= 5 and buf[0] == slave and buf[1] == (func | 0x80):
        if crc16(buf, 3) != buf[3] | buf[4] << 8:
            return MB_CRC
        return MB_EXCEPTION + buf[2]
    m = 5 + 2 * count
    if n < m:
        return MB_SHORT
    if crc16(buf, m - 2) != buf[m - 2] | buf[m - 1] << 8:
        return MB_CRC
    if buf[0] != slave or buf[1] != func or buf[2] != 2 * count:
        return MB_FRAME
    return MB_OK


def mb_u32(buf, r):
    """Registers r, r + 1 of an answer as an unsigned 32-bit value (high word first)."""
    p = 3 + 2 * r
    return (buf[p] << 8 | buf[p + 1]) * 65536 + (buf[p + 2] << 8 | buf[p + 3])


def mb_s32(buf, r):
    """Registers r, r + 1 as a signed 32-bit value (a small int for small values)."""
    p = 3 + 2 * r
    hi = buf[p] << 8 | buf[p + 1]
    if hi >= 0x8000:
        hi -= 0x10000
    return hi * 65536 + (buf[p + 2] << 8 | buf[p + 3])


# ---------------------------------------------------------------- NTC, frequency


def ntc_dc(adc_mv, vref_mv=ADC_FULL_MV, r_fixed=NTC_R_FIXED, r25=NTC_R25, beta=NTC_BETA):
    """Temperature (d°C) of an NTC to ground under `r_fixed` from `vref_mv`, β model;
    None when the reading is at a rail (open or shorted sensor)."""
    import math

    if adc_mv <= 0 or adc_mv >= vref_mv:
        return None
    r = r_fixed * adc_mv / (vref_mv - adc_mv)
    t = 1 / (1 / 298.15 + math.log(r / r25) / beta)
    return round((t - 273.15) * 10)


def freq_mhz(periods, dt_us):
    """Frequency (mHz, rounded) of `periods` whole periods in `dt_us` µs (dt_us < 1.07 s), in
    small ints only: 10⁹ · periods / dt_us as a quotient and a remainder step."""
    a = periods * 1000000
    q = a // dt_us
    return q * 1000 + ((a - q * dt_us) * 1000 + dt_us // 2) // dt_us


# ---------------------------------------------------------------- PN532 (I2C)
NFC_UID_AT = const(14)  # where the UID starts in a read InListPassiveTarget answer


def pn532_frame(out, data):
    """Write the PN532 information frame carrying `data` (command and parameters) into
    `out`: preamble, start code, LEN, LCS, TFI D4, data, DCS, postamble. Its length."""
    n = len(data) + 1
    out[0] = 0
    out[1] = 0
    out[2] = 0xFF
    out[3] = n
    out[4] = -n & 0xFF
    out[5] = 0xD4
    s = 0xD4
    for i in range(len(data)):
        out[6 + i] = data[i]
        s += data[i]
    out[5 + n] = -s & 0xFF
    out[6 + n] = 0
    return 7 + n


def pn532_ack(buf):
    """True when buf (status byte + 6) is the PN532's ACK frame."""
    return buf[0] == 1 and buf[1] == 0 and buf[2] == 0 and buf[3] == 0xFF and buf[4] == 0 and buf[5] == 0xFF


def pn532_uid_len(buf, n):
    """The UID length of a read InListPassiveTarget answer buf[0:n] (status byte, frame:
    D5 4B NbTg Tg SENS_RES SEL_RES NFCIDLength NFCID1…), 0 when it holds no valid target.
    The UID is buf[NFC_UID_AT : NFC_UID_AT + length]."""
    if n < NFC_UID_AT or buf[0] != 1 or buf[1] != 0 or buf[2] != 0 or buf[3] != 0xFF:
        return 0
    ln = buf[4]
    if (ln + buf[5]) & 0xFF or 6 + ln >= n or buf[6] != 0xD5 or buf[7] != 0x4B or buf[8] < 1:
        return 0
    s = 0
    for i in range(6, 7 + ln):
        s += buf[i]
    if s & 0xFF:
        return 0  # DCS
    u = buf[13]
    if u == 0 or NFC_UID_AT + u > 6 + ln:
        return 0
    return u


# ---------------------------------------------------------------- the board

_SAMPLES = const(100)  # pilot samples per poll: over one 1 kHz period (~15 µs a read)
_NFC_IDLE = const(0)
_NFC_ACK = const(1)
_NFC_WAIT = const(2)
_MB_IDLE = const(0)
_MB_WAIT = const(1)


class Esp32Hal(Hal):
    model = "CSC-ESP32"
    rating_w = RATED_A * PHASES * VOLTS

    def __init__(self):
        super().__init__()
        import time

        import machine

        self._m = machine
        self._t = time
        pin = machine.Pin
        self.serial = machine.unique_id().hex()
        # pilot
        self.pwm = machine.PWM(pin(PIN_CP_PWM), freq=1000, duty_u16=DUTY_OFF)
        self.cp_adc = machine.ADC(pin(PIN_CP_ADC))
        self.cp_adc.atten(machine.ADC.ATTN_11DB)
        self.duty = DUTY_OFF
        self.cp = CP_A  # debounced state
        self._cp_seen = CP_A
        self.limit_ma = 0
        # contactor and lock
        self.contactor = pin(PIN_CONTACTOR, pin.OUT, value=0)
        self.lock_out = pin(PIN_LOCK, pin.OUT, value=0)
        self.lock_fb = pin(PIN_LOCK_FB, pin.IN, pin.PULL_UP)
        self.want_on = False
        self.want_lock = False
        self._lock_t = 0  # when the lock was last commanded
        self.fault = ""
        # inputs that interrupt: handlers only set a flag or stamp a tick
        self.estop = pin(PIN_ESTOP, pin.IN, pin.PULL_UP)
        self.estop.irq(handler=self._on_button, trigger=pin.IRQ_FALLING)
        self._zc_n = 0
        self._zc_t0 = 0
        self._zc_t1 = 0
        self._zc_last = time.ticks_ms()
        self.freq = 50000
        self.zc = pin(PIN_ZC, pin.IN)
        self.zc.irq(handler=self._on_zc, trigger=pin.IRQ_RISING, hard=True)  # µs stamps: no scheduler delay
        # meter: Modbus RTU, preallocated request and answer
        self.uart = machine.UART(METER_UART, METER_BAUD, tx=PIN_METER_TX, rx=PIN_METER_RX, timeout=0)
        self.de = pin(PIN_RS485_DE, pin.OUT, value=0)
        self._req = bytearray(8)
        self._rsp = bytearray(64)
        self._mb = _MB_IDLE
        self._mb_block = 0  # 0: energy, 1: instantaneous values
        self._mb_t = 0
        self._mb_n = 0  # bytes waiting at the last poll
        self._mb_due = 0
        self.meter_errors = 0
        self._wh_in = 0
        self._wh_out = 0
        self._reading = (0, 0, 0, 0, 0)
        # RFID
        self.i2c = machine.I2C(0, scl=pin(PIN_I2C_SCL), sda=pin(PIN_I2C_SDA), freq=400000)
        self._nfc_cmd = bytearray(11)  # InListPassiveTarget (1 target, 106 kbps type A): 11 bytes exactly
        pn532_frame(self._nfc_cmd, b"\x4a\x01\x00")
        self._nfc_buf = bytearray(32)
        self._nfc = _NFC_IDLE
        self._nfc_ready = False
        self._nfc_t = 0
        self._uid = bytearray(10)
        self._uid_n = 0
        self._uid_t = 0
        self.nfc_irq = pin(PIN_NFC_IRQ, pin.IN, pin.PULL_UP)
        self.nfc_irq.irq(handler=self._on_nfc, trigger=pin.IRQ_FALLING)
        self.nfc_ok = True
        self._nfc_init()
        # temperature, LEDs
        self.ntc = machine.ADC(pin(PIN_NTC))
        self.ntc.atten(machine.ADC.ATTN_11DB)
        self.temp = 250
        self._temp_due = 0
        self.leds = (pin(PIN_LED_R, pin.OUT, value=0), pin(PIN_LED_G, pin.OUT, value=0), pin(PIN_LED_B, pin.OUT))
        self.color = -1  # -1: the LEDs show the state
        self.text = ""

    def ticks_ms(self):
        return self._t.ticks_ms()

    # ---- interrupt handlers: a flag or a tick, nothing else
    def _on_button(self, pin):
        self.flags |= FLAG_BUTTON

    def _on_nfc(self, pin):
        self._nfc_ready = True

    def _on_zc(self, pin):  # a hard IRQ: small ints only, no allocation
        t = self._t.ticks_us()
        if self._zc_n == 0:
            self._zc_t0 = t
        self._zc_t1 = t
        self._zc_n += 1

    # ---- the poll task
    async def run(self):
        import asyncio

        wdt = self._m.WDT(timeout=WDT_MS)
        while True:
            try:
                self.poll(self.ticks_ms())
            except OSError as e:  # a bus error must not stop the safety checks of the next poll
                print("hal:", repr(e))
            wdt.feed()
            await asyncio.sleep_ms(POLL_MS)

    def poll(self, now):
        self._poll_cp()
        self._poll_power(now)
        self._poll_meter(now)
        self._poll_nfc(now)
        self._poll_freq(now)
        if self._t.ticks_diff(now, self._temp_due) >= 0:
            self._temp_due = now + 1000
            t = ntc_dc(self.ntc.read_u16() * ADC_FULL_MV // 65535)
            self.temp = t if t is not None else 999  # open/shorted sensor reads as too hot
        self._show()

    def _poll_cp(self):
        if self.duty == DUTY_F:
            s = CP_F
        else:
            adc = self.cp_adc
            lo = 65535
            hi = 0
            for _ in range(_SAMPLES):
                v = adc.read_u16()
                if v > hi:
                    hi = v
                if v < lo:
                    lo = v
            high = pilot_mv(hi * ADC_FULL_MV // 65535)
            low = None if self.duty == DUTY_OFF else pilot_mv(lo * ADC_FULL_MV // 65535)
            s = cp_state(high, low)
        if s == self._cp_seen and s != self.cp:  # the same twice in a row: debounced
            self.cp = s
            self.flags |= FLAG_CP
            if s == CP_A and self.want_lock:  # the EV is gone: unlock
                self.want_lock = False
                self._lock_t = self.ticks_ms()
                self.lock_out.value(0)
        self._cp_seen = s

    def _locked(self):
        return self.lock_fb.value() == 0

    def _poll_power(self, now):
        # the lock follows what is asked; a lock that does not get there is a fault (cleared
        # once it does, e.g. after an UnlockConnector)
        locked = self._locked()
        if locked != self.want_lock:
            if self._t.ticks_diff(now, self._lock_t) > LOCK_MS and not self.fault:
                self.fault = "lock"
                self.flags |= FLAG_FAULT
        elif self.fault == "lock":
            self.fault = ""
            self.flags &= ~FLAG_FAULT
        # closed only in C (no ventilation for D on this board), locked, with a current to offer
        ok = self.want_on and self.cp == CP_C and locked and not self.fault and self.limit_ma >= 6000
        if self.contactor.value() != ok:
            self.contactor.value(ok)
        self._pilot()

    def _pilot(self):
        cp = self.cp
        if self.fault:
            d = DUTY_F
        elif cp == CP_E:
            return  # keep the pilot as it is: a missing diode shows only while the PWM runs
        elif cp == CP_A or cp == CP_F:
            d = DUTY_OFF
        else:
            d = duty_u16(self.limit_ma)  # the firmware's limit (below 6 A: a pause, steady +12 V)
        if d != self.duty:
            self.duty = d
            self.pwm.duty_u16(d)

    def _poll_meter(self, now):
        u = self.uart
        b = self._rsp
        if self._mb == _MB_IDLE:
            if self._t.ticks_diff(now, self._mb_due) < 0:
                return
            while u.any():  # stale bytes
                u.readinto(b)
            reg = REG_ENERGY if self._mb_block == 0 else REG_INSTANT
            mb_request(self._req, METER_ADDR, 3, reg, 8 if self._mb_block == 0 else 22)
            self.de.value(1)
            u.write(self._req)
            u.flush()  # ~8 ms at 9600 Bd: the driver must be off before the meter answers
            self.de.value(0)
            self._mb = _MB_WAIT
            self._mb_t = now
            return
        count = 8 if self._mb_block == 0 else 22
        n = u.any()
        # the whole answer; or a shorter one (an exception) once the line is silent for a poll
        # (20 ms: far above Modbus RTU's 3.5 characters); or what came within 300 ms
        if n < 5 + 2 * count and (n == 0 or n != self._mb_n) and self._t.ticks_diff(now, self._mb_t) < 300:
            self._mb_n = n
            return
        self._mb_n = 0
        if n:
            n = u.readinto(b, min(n, len(b))) or 0
        self._mb = _MB_IDLE
        r = mb_check(b, n, METER_ADDR, 3, count)
        if r != MB_OK:
            self.meter_errors += 1
            self._mb_due = now + METER_MS
            return
        if self._mb_block == 0:
            # u64 registers: the low 32 bits hold up to 42 GWh in 0.01 kWh
            self._wh_in = mb_u32(b, 2) * 10
            self._wh_out = mb_u32(b, 6) * 10
            self._mb_block = 1
            self._mb_due = now
        else:
            volt = mb_u32(b, 0)  # L1-N, 0.1 V
            amp = mb_u32(b, 12)  # L1, 0.01 A
            watt = mb_s32(b, 20)  # total, 0.01 W
            self._reading = (self._wh_in, self._wh_out, watt // 100, amp * 10, volt)
            self._mb_block = 0
            self._mb_due = now + METER_MS

    def _nfc_init(self):
        # SAMConfiguration: normal mode, IRQ pin used; answered within a few ms at boot
        buf = bytearray(12)
        n = pn532_frame(buf, b"\x14\x01\x14\x01")
        try:
            self.i2c.writeto(NFC_ADDR, memoryview(buf)[:n])
            self._t.sleep_ms(20)
            self.i2c.readfrom_into(NFC_ADDR, self._nfc_buf)
        except OSError:
            self.nfc_ok = False  # no reader answering: the poll keeps trying

    def _poll_nfc(self, now):
        st = self._nfc
        if st == _NFC_IDLE:
            if self._t.ticks_diff(now, self._nfc_t) < 0:
                return
            self._nfc_ready = False
            try:
                self.i2c.writeto(NFC_ADDR, self._nfc_cmd)
            except OSError:
                self._nfc_t = now + 1000  # no reader: try again later
                return
            self._nfc = _NFC_ACK
            self._nfc_t = now
            return
        if not self._nfc_ready and self.nfc_irq.value():  # the edge's flag, or the level (IRQ low: ready)
            if st == _NFC_ACK and self._t.ticks_diff(now, self._nfc_t) > 100:
                self._nfc = _NFC_IDLE  # no ACK: send again
            return
        self._nfc_ready = False
        b = self._nfc_buf
        try:
            self.i2c.readfrom_into(NFC_ADDR, b)
        except OSError:
            self._nfc = _NFC_IDLE
            self._nfc_t = now + 1000
            return
        self.nfc_ok = True
        if st == _NFC_ACK:
            self._nfc = _NFC_WAIT if pn532_ack(b) else _NFC_IDLE
            return
        self._nfc = _NFC_IDLE
        self._nfc_t = now + 500  # re-armed half a second later
        n = pn532_uid_len(b, len(b))
        if not n:
            return
        same = n == self._uid_n and self._t.ticks_diff(now, self._uid_t) < 3000
        if same:
            for i in range(n):
                if self._uid[i] != b[NFC_UID_AT + i]:
                    same = False
                    break
        self._uid_t = now
        if same:
            return  # the card still on the reader
        for i in range(n):
            self._uid[i] = b[NFC_UID_AT + i]
        self._uid_n = n
        self.card = (bytes(self._uid[:n]), 0)  # token type rfid
        self.flags |= FLAG_CARD

    def _poll_freq(self, now):
        if self._zc_n < 2 or self._t.ticks_diff(self._zc_t1, self._zc_t0) < 500000:
            if self._t.ticks_diff(now, self._zc_last) > 2000:
                self.freq = 50000  # no zero crossings: nominal, so no frequency response
            return
        m = self._m
        s = m.disable_irq()
        n = self._zc_n
        dt = self._t.ticks_diff(self._zc_t1, self._zc_t0)
        self._zc_n = 0
        m.enable_irq(s)
        self._zc_last = now
        if dt < 1000000:
            self.freq = freq_mhz(n - 1, dt)

    def _show(self):
        c = self.color
        if c < 0:
            if self.fault or self.cp == CP_E:
                c = 0xFF0000
            elif self.contactor.value():
                c = 0x0000FF
            elif self.cp == CP_B or self.cp == CP_C:
                c = 0x00FFFF
            else:
                c = 0x00FF00
        r, g, b = self.leds
        r.value(c >> 16 & 0x80)
        g.value(c >> 8 & 0x80)
        b.value(c & 0x80)

    # ---- inputs
    def cp_state(self, evse=1):
        return self.cp

    def meter(self, evse=1):
        return self._reading

    def temperature_dc(self):
        return self.temp

    def freq_mhz(self):
        return self.freq

    # ---- outputs
    def set_contactor(self, on, evse=1):
        self.want_on = on
        if on:
            if not self.want_lock:
                self.want_lock = True
                self._lock_t = self.ticks_ms()
                self.lock_out.value(1)
        else:
            self.contactor.value(0)  # at once; the poll closes it only when all is well

    def set_limit_w(self, watts, evse=1):
        self.limit_ma = min(current_ma(watts), RATED_A * 1000)
        self._pilot()

    def set_lock(self, locked, evse=1):
        if not locked:
            self.want_on = False
            self.contactor.value(0)
        self.want_lock = locked
        self._lock_t = self.ticks_ms()
        self.lock_out.value(1 if locked else 0)

    def display(self, text):
        self.text = text
        print("display:", text)  # no display on this board: the serial console

    def led(self, color):
        """`color`: 0xRRGGBB (each channel on from 0x80), or -1 to show the state again."""
        self.color = color
        self._show()

    def reboot(self):
        self.contactor.value(0)
        self.pwm.duty_u16(DUTY_F)
        self._m.reset()


# ---------------------------------------------------------------- boot


def mount_flash():
    """The data file system: a LittleFS2 partition labelled "evdata" mounted at /flash
    (formatted on first use), else a /flash folder on the port's own file system (the
    "vfs" partition that the ESP32 port's _boot.py has mounted at /)."""
    import os

    import esp32
    import vfs

    parts = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="evdata")
    if parts:
        p = parts[0]
        try:
            vfs.mount(vfs.VfsLfs2(p), "/flash")
        except OSError:
            vfs.VfsLfs2.mkfs(p)
            vfs.mount(vfs.VfsLfs2(p), "/flash")
        return "/flash"
    try:
        os.mkdir("/flash")
    except OSError:
        pass
    return "/flash"


def settings():
    """(device id, factory key, (gateway host, port), Wi-Fi ssid, Wi-Fi key) from the NVS
    namespace "evedge", written at provisioning (`id`, `fkey` 32 bytes, `gw` "host:port",
    `ssid`, `psk`)."""
    import esp32

    nvs = esp32.NVS("evedge")
    buf = bytearray(64)

    def get(key):
        try:
            n = nvs.get_blob(key, buf)
        except OSError:
            return b""
        return bytes(buf[:n])

    host, port = get("gw").decode().split(":")
    return get("id").decode(), get("fkey"), (host, int(port)), get("ssid").decode(), get("psk").decode()


def network_up(ssid, psk, timeout_ms=20000):
    import time

    import network

    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(ssid, psk)
        t0 = time.ticks_ms()
        while not wlan.isconnected() and time.ticks_diff(time.ticks_ms(), t0) < timeout_ms:
            time.sleep_ms(100)
    return wlan.isconnected()  # if not yet: the app retries the gateway with back-off


def note(kind, data=None):
    print(kind, data if data else "")


def main():
    """Mount the flash, build the HAL (outputs safe first), join the network, run the app."""
    import asyncio

    from csc import store
    from csc.app import App

    store.ROOT = mount_flash()
    hal = Esp32Hal()
    device_id, fkey, gw, ssid, psk = settings()
    network_up(ssid, psk)
    app = App(hal, device_id, fkey, gw, note)
    asyncio.run(app.main((hal.run(),)))

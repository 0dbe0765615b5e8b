"""An energy meter over Modbus RTU (RS-485): the frames (CRC-16, read requests, answers checked)
and `Meter`, which reads an ABB B23-style register map without blocking.

The register map (check it against the meter's manual): import and export active energy
(u64, 0.01 kWh) from REG_ENERGY; from REG_INSTANT voltage L1-N (0.1 V), current L1 at +12
(0.01 A), total power at +20 (s32, 0.01 W). A reading is two requests (function 3): energy, then
the instantaneous values, one reading every `period_ms`. `Meter.poll(now)` writes a request with
the transceiver's driver enabled, then reads the answer once it is complete (or once the line is
silent for a poll, or after 300 ms), checks it (slave, function, byte count, CRC, exception
answers) and converts it. Request and answer buffers are preallocated: a poll allocates nothing
but the new reading's tuple. `errors` counts failed reads; the last good reading is kept.
"""

# ruff: noqa: PLC0415
# `time` is imported when the driver is built (the board's, or a test's fake clock), so
# the module imports anywhere.

from micropython import const

REG_ENERGY = const(0x5000)  # import (u64) and export (u64) active energy, 0.01 kWh
REG_INSTANT = const(0x5B00)  # voltages, currents, power …: 22 registers from here
_TIMEOUT_MS = const(300)


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


_IDLE = const(0)
_WAIT = const(1)


class Meter:
    """The meter at Modbus address `slave` on `uart` (a machine.UART, timeout 0), `de` the
    transceiver's driver-enable Pin (high = transmit)."""

    def __init__(self, uart, de, slave, period_ms):
        import time

        self._t = time
        self.uart = uart
        self.de = de
        self.slave = slave
        self.period = period_ms
        self._req = bytearray(8)
        self._rsp = bytearray(64)
        self._st = _IDLE
        self._block = 0  # 0: energy, 1: instantaneous values
        self._t0 = 0  # when the request left
        self._n = 0  # bytes waiting at the last poll
        self._due = 0
        self.errors = 0
        self._wh_in = 0
        self._wh_out = 0
        # (energy_import_wh, energy_export_wh, power_w, current_ma, voltage_dv): Hal.meter()
        self.reading = (0, 0, 0, 0, 0)

    def poll(self, now):
        u = self.uart
        b = self._rsp
        t = self._t
        if self._st == _IDLE:
            if t.ticks_diff(now, self._due) < 0:
                return
            while u.any():  # stale bytes
                u.readinto(b)
            reg = REG_ENERGY if self._block == 0 else REG_INSTANT
            mb_request(self._req, self.slave, 3, reg, 8 if self._block == 0 else 22)
            self.de.value(1)
            u.write(self._req)
            u.flush()  # ~8 ms at 9600 Bd: the driver must be off before the meter answers
            self.de.value(0)
            self._st = _WAIT
            self._t0 = now
            return
        count = 8 if self._block == 0 else 22
        n = u.any()
        # the whole answer; or a shorter one (an exception) once the line is silent for a poll
        # (20 ms: far above Modbus RTU's 3.5 characters); or what came within _TIMEOUT_MS
        if n < 5 + 2 * count and (n == 0 or n != self._n) and t.ticks_diff(now, self._t0) < _TIMEOUT_MS:
            self._n = n
            return
        self._n = 0
        if n:
            n = u.readinto(b, min(n, len(b))) or 0
        self._st = _IDLE
        r = mb_check(b, n, self.slave, 3, count)
        if r != MB_OK:
            self.errors += 1
            self._due = now + self.period
            return
        if self._block == 0:
            # u64 registers: the low 32 bits hold up to 42 GWh in 0.01 kWh
            self._wh_in = mb_u32(b, 2) * 10
            self._wh_out = mb_u32(b, 6) * 10
            self._block = 1
            self._due = now
        else:
            volt = mb_u32(b, 0)  # L1-N, 0.1 V
            amp = mb_u32(b, 12)  # L1, 0.01 A
            watt = mb_s32(b, 20)  # total, 0.01 W
            self.reading = (self._wh_in, self._wh_out, watt // 100, amp * 10, volt)
            self._block = 0
            self._due = now + self.period

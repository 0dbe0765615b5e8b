"""An ISO 14443-A card reader: a PN532 on I2C (address 0x24), chosen over a UART reader because
its IRQ pin tells when an answer is there.

SAMConfiguration at start, then InListPassiveTarget (one target, 106 kbps type A), which waits
in the reader until a card comes: the IRQ handler only sets a flag; `PN532.poll(now)` reads the
ACK, then the target, and returns the UID of a new card. A card left on the reader is reported
once (the same UID within 3 s); the command is sent again half a second after a read, and a
second after a bus error (no reader answering: `ok` is False until one answers).
"""

# ruff: noqa: PLC0415
# `time` is imported when the driver is built (the board's, or a test's fake clock), so
# the module imports anywhere.

from micropython import const

NFC_UID_AT = const(14)  # where the UID starts in a read InListPassiveTarget answer
_IDLE = const(0)  # the next InListPassiveTarget is due at _t0
_ACK = const(1)  # sent at _t0, its ACK awaited
_WAIT = const(2)  # acknowledged: waiting in the reader for a card


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


class PN532:
    """The reader at `addr` on `i2c` (a machine.I2C); `irq` its P70_IRQ Pin (an input with
    pull-up, low = answer ready)."""

    def __init__(self, i2c, irq, addr):
        import time

        self._t = time
        self.i2c = i2c
        self.addr = addr
        self._cmd = bytearray(11)  # InListPassiveTarget (1 target, 106 kbps type A): 11 bytes exactly
        pn532_frame(self._cmd, b"\x4a\x01\x00")
        self._buf = bytearray(32)
        self._st = _IDLE
        self._ready = False
        self._t0 = 0
        self._uid = bytearray(10)
        self._uid_n = 0
        self._uid_t = 0
        self.irq = irq
        irq.irq(handler=self._on_irq, trigger=irq.IRQ_FALLING)
        self.ok = True
        # SAMConfiguration: normal mode, IRQ pin used; answered within a few ms at start
        buf = bytearray(12)
        n = pn532_frame(buf, b"\x14\x01\x14\x01")
        try:
            i2c.writeto(addr, memoryview(buf)[:n])
            time.sleep_ms(20)
            i2c.readfrom_into(addr, self._buf)
        except OSError:
            self.ok = False  # no reader answering: the poll keeps trying

    def _on_irq(self, pin):  # a flag, nothing else
        self._ready = True

    def poll(self, now):
        """The UID (bytes) of a card just presented, else None."""
        t = self._t
        st = self._st
        if st == _IDLE:
            if t.ticks_diff(now, self._t0) < 0:
                return None
            self._ready = False
            try:
                self.i2c.writeto(self.addr, self._cmd)
            except OSError:
                self._t0 = now + 1000  # no reader: try again later
                return None
            self._st = _ACK
            self._t0 = now
            return None
        if not self._ready and self.irq.value():  # the edge's flag, or the level (IRQ low: ready)
            if st == _ACK and t.ticks_diff(now, self._t0) > 100:
                self._st = _IDLE  # no ACK: send again
            return None
        self._ready = False
        b = self._buf
        try:
            self.i2c.readfrom_into(self.addr, b)
        except OSError:
            self._st = _IDLE
            self._t0 = now + 1000
            return None
        self.ok = True
        if st == _ACK:
            self._st = _WAIT if pn532_ack(b) else _IDLE
            return None
        self._st = _IDLE
        self._t0 = now + 500  # re-armed half a second later
        n = pn532_uid_len(b, len(b))
        if not n:
            return None
        same = n == self._uid_n and t.ticks_diff(now, self._uid_t) < 3000
        if same:
            for i in range(n):
                if self._uid[i] != b[NFC_UID_AT + i]:
                    same = False
                    break
        self._uid_t = now
        if same:
            return None  # the card still on the reader
        for i in range(n):
            self._uid[i] = b[NFC_UID_AT + i]
        self._uid_n = n
        return bytes(self._uid[:n])

"""The ESP32 EVSE board: the wiring (one table of pins, the board's parameters), the `Hal` built on
machine.PWM / ADC / Pin / UART / I2C and the drivers of boards/drivers/, and `main()`.

One AC charge point (IEC 61851-1 mode 3, one connector, three phases):

- control pilot (drivers/pilot.py): 1 kHz PWM through the ±12 V pilot driver, read back through
  a divider on an ADC pin. The duty is the firmware's limit only: the services give it when a
  transaction starts, in state B, and an EV closes S2 (state C) only once it sees that offer; no
  current is offered before. A state counts once seen twice in a row (FLAG_CP);
- contactor: a Pin output, closed only while the firmware asks for it, the EV is in C (this board
  has no ventilation for D), the cable lock reports locked and at least 6 A are offered; opened at
  once otherwise (the services open it first too);
- cable lock: a Pin output (motor driver or solenoid) with a feedback Pin; locked while charging is
  asked for, unlocked when the firmware says so or the EV is gone; no feedback within LOCK_MS →
  FLAG_FAULT and the pilot goes to state F;
- meter (drivers/modbus_meter.py): Modbus RTU over RS-485 on machine.UART, polled without
  blocking;
- RFID (drivers/pn532.py): a PN532 on machine.I2C; its IRQ handler only sets a flag, the poll
  reads the UID and the board sets `card` and FLAG_CARD;
- emergency stop button: a Pin IRQ whose handler only sets FLAG_BUTTON;
- grid frequency (drivers/zero_cross.py): a zero-crossing detector on a Pin IRQ;
- temperature (drivers/ntc.py): an NTC divider on an ADC pin;
- LEDs: three Pins (red, green, blue), showing the state unless `led()` set a colour.

The inputs the services call (`cp_state`, `meter`, `freq_mhz`, `temperature_dc`) return what the
last poll measured; `run()` is the poll task (every POLL_MS, feeds the watchdog). The drivers'
pure pieces and this board on a fake `machine` are tested under CPython and MicroPython
(tests/test_fw_esp32.py); `machine` is imported only when the board is built, so this module and
the drivers import on the unix port too.
"""

# ruff: noqa: PLC0415, PLR1714, SIM109
# Imports inside functions are deliberate: `machine`, `esp32`, `network` exist on the board only;
# `a == x or a == y` is two int compares on MicroPython, not a tuple.

import json

from boards.drivers.modbus_meter import Meter
from boards.drivers.ntc import ntc_dc
from boards.drivers.pilot import DUTY_F, DUTY_OFF, Pilot, current_ma, duty_u16
from boards.drivers.pn532 import PN532
from boards.drivers.zero_cross import ZeroCross
from csc.hal import FLAG_BUTTON, FLAG_CARD, FLAG_CP, FLAG_FAULT, Hal
from csc.schema import CP_STATE_A, CP_STATE_B, CP_STATE_C, CP_STATE_E, CP_STATE_F
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

# ---------------------------------------------------------------- the board


class Esp32Hal(Hal):
    model = "CSC-ESP32"
    rating_w = RATED_A * PHASES * VOLTS

    def __init__(self):
        Hal.__init__(self)  # not super(): a closure and a cell of heap on a board
        import time

        import machine

        self._m = machine
        self._t = time
        pin = machine.Pin
        adc = machine.ADC
        self.serial = machine.unique_id().hex()
        # pilot: safe from the start (steady +12 V, nothing offered)
        pwm = machine.PWM(pin(PIN_CP_PWM), freq=1000, duty_u16=DUTY_OFF)
        cp_adc = adc(pin(PIN_CP_ADC))
        cp_adc.atten(adc.ATTN_11DB)
        self.pilot = Pilot(pwm, cp_adc, CP_ADC_MV_N12, CP_ADC_MV_P12, ADC_FULL_MV)
        self.cp = CP_STATE_A  # debounced state
        self._cp_seen = CP_STATE_A
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
        self.mains = ZeroCross(pin(PIN_ZC, pin.IN))
        # meter: Modbus RTU over RS-485
        uart = machine.UART(METER_UART, METER_BAUD, tx=PIN_METER_TX, rx=PIN_METER_RX, timeout=0)
        self.emeter = Meter(uart, pin(PIN_RS485_DE, pin.OUT, value=0), METER_ADDR, METER_MS)
        # RFID
        i2c = machine.I2C(0, scl=pin(PIN_I2C_SCL), sda=pin(PIN_I2C_SDA), freq=400000)
        self.nfc = PN532(i2c, pin(PIN_NFC_IRQ, pin.IN, pin.PULL_UP), NFC_ADDR)
        # temperature, LEDs
        self.ntc = adc(pin(PIN_NTC))
        self.ntc.atten(adc.ATTN_11DB)
        self.temp = 250
        self._temp_due = 0
        self.leds = (pin(PIN_LED_R, pin.OUT, value=0), pin(PIN_LED_G, pin.OUT, value=0), pin(PIN_LED_B, pin.OUT))
        self.color = -1  # -1: the LEDs show the state
        self.text = ""

    def ticks_ms(self):
        return self._t.ticks_ms()

    # ---- interrupt handlers: a flag, nothing else (the drivers' own: the same)
    def _on_button(self, pin):
        self.flags |= FLAG_BUTTON

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
        self.emeter.poll(now)
        uid = self.nfc.poll(now)
        if uid is not None:
            self.card = (uid, 0)  # token type rfid
            self.flags |= FLAG_CARD
        self.mains.poll(now)
        if self._t.ticks_diff(now, self._temp_due) >= 0:
            self._temp_due = now + 1000
            t = ntc_dc(self.ntc.read_u16() * ADC_FULL_MV // 65535, ADC_FULL_MV, NTC_R_FIXED, NTC_R25, NTC_BETA)
            self.temp = t if t is not None else 999  # open/shorted sensor reads as too hot
        self._show()

    def _poll_cp(self):
        s = self.pilot.state()
        if s == self._cp_seen and s != self.cp:  # the same twice in a row: debounced
            self.cp = s
            self.flags |= FLAG_CP
            if s == CP_STATE_A and self.want_lock:  # the EV is gone: unlock
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
        ok = self.want_on and self.cp == CP_STATE_C and locked and not self.fault and self.limit_ma >= 6000
        if self.contactor.value() != ok:
            self.contactor.value(ok)
        self._pilot()

    def _pilot(self):
        cp = self.cp
        if self.fault:
            d = DUTY_F
        elif cp == CP_STATE_E:
            return  # keep the pilot as it is: a missing diode shows only while the PWM runs
        elif cp == CP_STATE_A or cp == CP_STATE_F:
            d = DUTY_OFF
        else:
            d = duty_u16(self.limit_ma)  # the firmware's limit (below 6 A: a pause, steady +12 V)
        self.pilot.offer(d)

    def _show(self):
        c = self.color
        if c < 0:
            if self.fault or self.cp == CP_STATE_E:
                c = 0xFF0000
            elif self.contactor.value():
                c = 0x0000FF
            elif self.cp == CP_STATE_B or self.cp == CP_STATE_C:
                c = 0x00FFFF
            else:
                c = 0x00FF00
        r, g, b = self.leds
        r.value(c >> 16 & 0x80)
        g.value(c >> 8 & 0x80)
        b.value(c & 0x80)

    # ---- inputs
    def cp_state(self, evse):
        return self.cp

    def meter(self, evse):
        return self.emeter.reading

    def temperature_dc(self):
        return self.temp

    def freq_mhz(self):
        return self.mains.mhz

    # ---- outputs
    def set_contactor(self, on, evse):
        self.want_on = on
        if on:
            if not self.want_lock:
                self.want_lock = True
                self._lock_t = self.ticks_ms()
                self.lock_out.value(1)
        else:
            self.contactor.value(0)  # at once; the poll closes it only when all is well

    def set_limit_w(self, watts, evse):
        self.limit_ma = min(current_ma(watts, PHASES, VOLTS), RATED_A * 1000)
        self._pilot()

    def set_lock(self, locked, evse):
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
        self.pilot.offer(DUTY_F)
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


class Ota:
    """The firmware slots on OTA partitions (M4; docs/firmware.md "Firmware update"): the update
    service's loader interface (boards/unix.py `Slots` on the emulated board) on ESP-IDF's
    bootloader built with app rollback (MicroPython's OTA board variant, CONFIG_BOOTLOADER_APP_
    ROLLBACK_ENABLE): slot n is partition "ota_n", the image is a whole MicroPython app image
    (the firmware frozen in), written block by block into the slot the board does not run;
    `set_boot` makes the bootloader start it once, pending verification; the self-test's
    `mark_app_valid_cancel_rollback` keeps it; a reset before that makes the bootloader go back to
    the slot that ran before. `otastate.json` on the data flash keeps which slot is on trial and why
    a trial was given up, for the FirmwareStatus the old code reports."""

    BLOCK = 4096

    def __init__(self, root, signers):
        import esp32

        self.e = esp32
        self.root = root
        self.signers = signers  # signer name -> Ed25519 public key, from NVS (provisioned at the factory)
        # the stubs type the id as a label only; the port takes RUNNING (and BOOT) too
        self.run = esp32.Partition(esp32.Partition.RUNNING)  # type: ignore[arg-type]
        self.running = self._slot(self.run)  # None: the factory app
        self.max_image = self.run.get_next_update().info()[3]
        try:
            with open(root + "/otastate.json") as f:
                self.d = json.loads(f.read())
        except (OSError, ValueError):
            self.d = {}

    @staticmethod
    def _slot(p):
        label = p.info()[4]
        return int(label[4:]) if label.startswith("ota_") else None

    def _part(self, slot):
        return self.e.Partition.find(self.e.Partition.TYPE_APP, label="ota_%d" % slot)[0]

    def _save(self):
        import os

        t = self.root + "/otastate.t"
        with open(t, "w") as f:
            f.write(json.dumps(self.d))
        os.rename(t, self.root + "/otastate.json")

    def inactive(self):
        return self._slot(self.run.get_next_update())

    def install(self, slot, path, size):
        """The app image at `path` into partition ota_<slot>: whole blocks (writeblocks without
        an offset erases each first), then its first byte checked (an ESP app image: 0xE9)."""
        p = self._part(slot)
        if size > p.info()[3]:
            raise ValueError("image of %d bytes, partition ota_%d holds %d" % (size, slot, p.info()[3]))
        buf = bytearray(self.BLOCK)
        with open(path, "rb") as f:
            if f.read(1) != b"\xe9":
                raise ValueError("not an ESP32 app image")
            f.seek(0)
            block = 0
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                for i in range(n, self.BLOCK):
                    buf[i] = 0xFF  # erased flash
                p.writeblocks(block, buf)
                block += 1

    def set_trial(self, slot):
        self.d["trial"] = slot
        self.d.pop("rb", None)
        self._save()
        self._part(slot).set_boot()

    def on_trial(self):
        return self.running is not None and self.running == self.d.get("trial")

    def confirm(self):
        self.e.Partition.mark_app_valid_cancel_rollback()
        self.d["trial"] = None
        self._save()

    def abort(self, reason):
        # the bootloader goes back at the next reset: the app is still pending verification
        self.d["rb"] = reason
        self._save()

    def rolled_back(self):
        t = self.d.get("trial")
        if t is not None and t != self.running:
            return self.d.get("rb") or "the bootloader went back: the new app did not confirm itself"
        return self.d.get("rb")

    def forget(self):
        self.d = {}
        self._save()


def settings():
    """(device id, factory key, (gateway host, port), Wi-Fi ssid, Wi-Fi key) from the NVS
    namespace "evedge", written at provisioning (`id`, `fkey` 32 bytes, `gw` "host:port",
    `ssid`, `psk`; the firmware signer's name `fwsn` and Ed25519 public key `fwpk`) and the
    signers the board trusts."""
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
    signers = {get("fwsn").decode(): get("fwpk")} if get("fwpk") else {}  # the firmware signer (M4)
    return get("id").decode(), get("fkey"), (host, int(port)), get("ssid").decode(), get("psk").decode(), signers


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
    device_id, fkey, gw, ssid, psk, signers = settings()
    network_up(ssid, psk)
    app = App(hal, device_id, fkey, gw, note, Ota(store.ROOT, signers))
    asyncio.run(app.main((hal.run(),)))

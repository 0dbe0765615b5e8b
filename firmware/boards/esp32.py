"""ESP32 board skeleton: where machine.Pin / ADC / UART go. Documented, not yet wired.

- control pilot: the 1 kHz PWM on a LEDC channel (machine.PWM), the pilot voltage read by
  machine.ADC at the PWM's high phase → CP state A–F; an edge IRQ only sets FLAG_CP;
- contactor and cable lock: machine.Pin outputs (with the lock's feedback Pin as input);
- meter: machine.UART to a Modbus/SML meter (energy, power, current, voltage, signed reading);
- RFID/NFC: a PN532 on machine.I2C; its IRQ pin handler stores the UID and sets FLAG_CARD;
- temperature: machine.ADC on an NTC; grid frequency: zero-crossing Pin IRQ stamping ticks;
- display/LEDs: an I2C OLED and a neopixel.
"""

from csc.hal import Hal


class Esp32Hal(Hal):
    model = "CSC-ESP32"

    def __init__(self):
        super().__init__()
        # import machine
        # self.pwm = machine.PWM(machine.Pin(25), freq=1000, duty_u16=...)
        # self.cp_adc = machine.ADC(machine.Pin(34))
        # self.contactor_pin = machine.Pin(26, machine.Pin.OUT)
        # self.meter_uart = machine.UART(2, 9600, tx=17, rx=16)


def main():
    """Mount the internal flash (vfs.VfsLfs2 on esp32.Partition), then run csc.app.App."""
    raise NotImplementedError("wire the pins above, then: asyncio.run(App(Esp32Hal(), ...).main())")

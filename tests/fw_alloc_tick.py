# The services' tick allocates nothing on an idle board (run by tests/test_fw_codec.py):
#
#     MICROPYPATH=firmware:tests micropython tests/fw_alloc_tick.py FLASH_DIR
#
# App.tick() runs every 50 ms: whatever a service's tick allocates is garbage 20 times a second (a
# `from … import` inside it, a call through `*args`). Prints "<service> <bytes per tick>" for each.
import gc
import sys

from boards.sim import SimHal
from csc import store
from csc.app import App

store.ROOT = sys.argv[1]
hal = SimHal(1)


def note(kind, data=None):
    pass


app = App(hal, "evse-1", bytes(32), ("127.0.0.1", 1), note, None)
for s in app.services:
    s.boot()
app.registered = True
for _ in range(5):
    app.tick()
for s in app.services:
    now = hal.ticks_ms()
    s.tick(now)
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    for _ in range(20):
        s.tick(now)
    n = gc.mem_alloc() - a
    gc.enable()
    print(type(s).__name__, n // 20)

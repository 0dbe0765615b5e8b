# Heap bytes allocated by one encode+seal and one decode+verify, under MicroPython:
#
#     micropython tests/fw_alloc.py
#
# Prints one line per frame: "<name> encode+seal=<bytes> decode+verify=<bytes>".
# gc is disabled around each measured call, so the gc.mem_alloc() delta is everything the
# call allocated (including what it dropped before returning).
import gc
import sys

_here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, _here + "/../firmware")

from csc import crypto, frame, link  # noqa: E402
from csc.msgpack import Map, Writer  # noqa: E402
from csc.schema import (  # noqa: E402
    A_HEARTBEAT,
    A_METER_VALUES,
    A_TRANSACTION_EVENT,
    F_ENERGY_WH,
    F_EVENT,
    F_EVSE,
    F_MEASURAND,
    F_POWER_W,
    F_SAMPLES,
    F_SEQ_NO,
    F_TRIGGER,
    F_TX_ID,
    F_VALUE,
    K_EVENT,
    K_REQUEST,
    P_CONTROL,
    P_TELEMETRY,
)


def _map(*kv):
    m = Map()
    for i in range(0, len(kv), 2):
        m[kv[i]] = kv[i + 1]
    return m


def measure(name, kind, prio, action, body, w, mac):
    frame.encode(w, kind, 1, 100, prio, 30000000, action, body, mac)  # warm up
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    end = frame.encode(w, kind, 2, 101, prio, 30000000, action, body, mac)
    enc = gc.mem_alloc() - a
    gc.enable()
    data = bytes(w.mv[2:end])
    win = link.Link(None, "")  # a replay window: the link's (Link.check/accept)
    frame.decode(data, mac, win)  # warm up (seq 2 recorded)
    end = frame.encode(w, kind, 3, 102, prio, 30000000, action, body, mac)
    data = bytes(w.mv[2:end])
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    frame.decode(data, mac, win)
    dec = gc.mem_alloc() - a
    gc.enable()
    print(f"{name} len={len(data)} encode+seal={enc} decode+verify={dec}")


def main():
    mac = crypto.Hmac(bytes(range(32)))
    w = Writer()
    measure("heartbeat", K_REQUEST, P_TELEMETRY, A_HEARTBEAT, _map(), w, mac)
    tx = _map(F_EVENT, 1, F_TX_ID, 4242, F_SEQ_NO, 1, F_TRIGGER, 5, F_EVSE, 1, F_ENERGY_WH, 1240000, F_POWER_W, 11000)
    measure("transaction_event", K_EVENT, P_CONTROL, A_TRANSACTION_EVENT, tx, w, mac)
    samples = [
        _map(F_MEASURAND, 4, F_VALUE, 230.5),
        _map(F_MEASURAND, 2, F_VALUE, 0.1),
        _map(F_MEASURAND, 5, F_VALUE, 80),
    ]
    mv = _map(F_EVSE, 2, F_ENERGY_WH, 1240000, F_SAMPLES, samples)
    measure("meter_values_3_samples", K_EVENT, P_TELEMETRY, A_METER_VALUES, mv, w, mac)


main()

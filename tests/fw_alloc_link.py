# Heap bytes the link allocates per frame in its send and receive loops, under MicroPython:
#
#     MICROPYPATH=firmware:tests micropython tests/fw_alloc_link.py
#
# One MeterValues queued, then measured: `Link.transmit` (sealed in place in the send queue,
# tagged) and `Link.receive` of the gateway's ack (verified, decoded, the message retired).
# gc is disabled around each measured call, so the gc.mem_alloc() delta is all it allocated.
import gc

import fw_linktests as T  # noqa: N812
from csc import schema as S  # noqa: N812

link, gw = T.opened()
body = T._meter(1)
for i in range(3):  # warm up: first-use allocations are not per frame
    link.event(100 + i, S.A_METER_VALUES, body, 0)
    T.frames(link, 0)
for i in range(5):
    link.event(200 + i, S.A_METER_VALUES, body, 0)
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    end = link.transmit(0, T.TS)
    sent = gc.mem_alloc() - a
    gc.enable()
    ack = gw.seal(S.K_ACK, 200 + i, S.P_TELEMETRY, S.A_METER_VALUES, {})
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    link.receive(ack, 0)
    got = gc.mem_alloc() - a
    gc.enable()
    T.events(link)
    assert end
    print(f"transmit={sent} receive={got}")

# The link's send and receive loops allocate nothing, under MicroPython:
#
#     MICROPYPATH=firmware:tests micropython tests/fw_alloc_link.py
#     MICROPYPATH=BUILD:tests micropython tests/fw_alloc_link.py firmware   # on a build
#
# Each step runs with the heap locked (`micropython.heap_lock()`: any allocation raises
# MemoryError) and is measured with gc.mem_alloc() too:
# - transmit: `Link.transmit` seals a queued MeterValues in place in the send queue and tags it;
# - receive: the gateway's ack, in the receive buffer as a socket's readinto leaves it, is
#   split off (`FrameSplitter.take`), verified and checked (`Link.receive`: tag, replay
#   window, envelope, body), and its ids come out of `next_acked` — a single ack ({}) and an
#   ack of several ids ({ids: [...]}, as the gateway batches them).
# What is not in these loops: the socket calls themselves (MicroPython's asyncio makes a few
# objects per I/O wait) and what the app does with an acked id (the outbox removes a file).
import gc
import sys

import fw_linktests as T  # noqa: N812
import micropython
from csc.frame import FrameSplitter

if len(sys.argv) > 1:  # a build: its constants are inlined, read them from the source
    T.use_source(sys.argv[1])
S = T.S
link, gw = T.opened()
split = FrameSplitter()
body = T._meter(1)
mid = [100]


def put_events(n):
    out = []
    for _ in range(n):
        mid[0] += 1
        link.event(mid[0], S.A_METER_VALUES, body, 0)
        out.append(mid[0])
    return out


def into_buffer(frame):
    # what a socket's readinto does: the bytes land in the splitter's room
    room = split.space()
    n = len(frame)
    room[0] = n >> 8
    room[1] = n & 0xFF
    room[2 : 2 + n] = frame
    split.wrote(n + 2)


def locked(fn):
    """Run fn() with the heap locked; return (its result, bytes allocated)."""
    gc.collect()
    a = gc.mem_alloc()
    micropython.heap_lock()
    try:
        r = fn()
    finally:
        micropython.heap_unlock()
    return r, gc.mem_alloc() - a


def receive_all():
    got = 0
    e = split.take()
    while e:
        link.receive(split.mv, 0, split.at, e)
        split.release()
        e = split.take()
    m = link.next_acked()
    while m >= 0:
        got += 1
        m = link.next_acked()
    return got


def sent_ids():
    n = 0
    e = link.transmit(0, T.TS)
    while e:
        n += 1
        e = link.transmit(0, T.TS)
    return n


for round in range(6):
    ids = put_events(3)
    if round < 2:  # warm up, unlocked: first-use allocations (dict growth) are not per frame
        assert sent_ids() == 3
        for i in ids:
            into_buffer(gw.seal(S.K_ACK, i, S.P_TELEMETRY, S.A_METER_VALUES, {}))
        receive_all()
        continue
    n, tx_bytes = locked(sent_ids)
    assert n == 3, n
    into_buffer(gw.seal(S.K_ACK, ids[0], S.P_TELEMETRY, S.A_METER_VALUES, {}))
    got1, rx1 = locked(receive_all)
    into_buffer(gw.seal(S.K_ACK, ids[1], S.P_TELEMETRY, S.A_METER_VALUES, {S.F_IDS: [ids[2]]}))
    got2, rx2 = locked(receive_all)
    assert (got1, got2) == (1, 2), (got1, got2)
    assert len(link.inflight) == 0
    print(f"transmit={tx_bytes} receive_ack={rx1} receive_ack_of_2={rx2} (heap locked)")
print(f"bad={sum(link.errors.values())}")

"""The flight bound of the uplink's lower classes (gateway/pacing.py), sans I/O: on its own,
and driving a simulated path whose receiver drains at a fixed rate."""

from __future__ import annotations

import heapq
import statistics

import pytest

from gateway.pacing import FlightBound


def test_unmeasured_path_gets_the_floor() -> None:
    fb = FlightBound(floor=32 << 10)
    assert fb.rate(0.0) == 0.0
    assert fb.bound(0.0) == 32 << 10


def test_bound_is_gain_times_rate_times_rtt_plus_queue() -> None:
    fb = FlightBound(floor=1, queue_s=0.001, gain=1.25, sample_s=0.01)
    fb.delivered(0, 10_000, 0.0, 0.004)  # starts the sample
    fb.delivered(100_000, 100_000, 0.010, 0.004)  # 100 kB in 10 ms: 10 MB/s
    assert fb.rate(0.010) == pytest.approx(10e6)
    assert fb.bound(0.010) == int(1.25 * 10e6 * (0.004 + 0.001))


def test_best_rate_of_the_window_wins_and_expires() -> None:
    fb = FlightBound(floor=1, window_s=1.0, sample_s=0.01)
    fb.delivered(0, 1, 0.0, 0.001)
    fb.delivered(200_000, 1, 0.01, 0.001)  # 20 MB/s
    fb.delivered(50_000, 1, 0.02, 0.001)  # 5 MB/s, kept behind the best
    assert fb.rate(0.5) == pytest.approx(20e6)
    assert fb.rate(1.015) == pytest.approx(5e6)  # the best is older than the window
    assert fb.rate(1.03) == 0.0


def test_an_idle_pause_does_not_count_as_a_slow_sample() -> None:
    fb = FlightBound(floor=1, sample_s=0.01)
    fb.delivered(0, 1, 0.0, 0.001)
    fb.delivered(100_000, 1, 0.01, 0.001)  # 10 MB/s
    fb.delivered(0, 0, 5.0, 0.001)  # nothing was in flight: idle until now
    fb.delivered(200_000, 1, 5.02, 0.001)
    assert fb.rate(5.02) == pytest.approx(10e6)  # not 200 kB over 5 s


def simulate(rate: float, one_way_s: float, packet: int, seconds: float, bound: FlightBound | None,
             cwnd: int = 64 << 20) -> tuple[float, list[float]]:  # fmt: skip
    """A sender that keeps `min(cwnd, bound)` bytes in flight towards a receiver draining
    `rate` bytes/s, acks `one_way_s` later. Returns (delivered bytes/s over the second half,
    the waits of packets in the receiver's queue during the second half)."""
    now, in_flight = 0.0, 0
    receiver_free_at = 0.0
    events: list[tuple[float, int, int, float]] = []  # (time, seq, kind 0=arrive 1=ack, sent)
    seq = 0
    waits: list[float] = []
    delivered_late = 0
    rtt_min = 0.0

    def send_what_fits() -> None:
        nonlocal in_flight, seq
        limit = cwnd if bound is None else min(cwnd, bound.bound(now))
        while in_flight + packet <= limit or in_flight == 0:
            in_flight += packet
            seq += 1
            heapq.heappush(events, (now + one_way_s, seq, 0, now))

    send_what_fits()
    while events:
        now, _, kind, sent = heapq.heappop(events)
        if now > seconds:
            break
        if kind == 0:  # arrives at the receiver's queue
            start = max(now, receiver_free_at)
            receiver_free_at = start + packet / rate
            if now > seconds / 2:
                waits.append(start - now)
            seq += 1
            heapq.heappush(events, (receiver_free_at + one_way_s, seq, 1, sent))
        else:  # its ack is back
            rtt = now - sent
            rtt_min = rtt if not rtt_min else min(rtt_min, rtt)
            before = in_flight
            in_flight -= packet
            if now > seconds / 2:
                delivered_late += packet
            if bound is not None:
                bound.delivered(packet, before, now, rtt_min)
            send_what_fits()
    return delivered_late / (seconds / 2), waits


@pytest.mark.parametrize(
    ("rate", "one_way_s", "packet"),
    [
        (25e6, 0.0002, 16 << 10),  # loopback: a Python receiver taking ~25 MB/s, 16 KiB datagrams
        (10e6, 0.025, 1200),  # a WAN: 10 MB/s, 50 ms RTT, 1200-byte datagrams
        (2.5e6, 0.0001, 1200),  # a 20 Mbit/s site uplink, LAN-short delay
    ],
)
def test_the_bound_keeps_the_path_busy_and_the_queue_short(rate: float, one_way_s: float, packet: int) -> None:
    queue_s = 0.001
    base_rtt = 2 * one_way_s + packet / rate
    free_rate, free_waits = simulate(rate, one_way_s, packet, 6.0, None)
    fb = FlightBound(floor=max(2 * packet, 4 * 1200), queue_s=queue_s)  # as the uplink makes it
    got_rate, waits = simulate(rate, one_way_s, packet, 6.0, fb)
    # Unbounded, the queue grows to what the window allows (seconds here); bounded, the path
    # stays as busy and the queue stays near gain x (the base RTT's quarter + queue_s).
    assert got_rate >= 0.95 * free_rate
    assert max(free_waits) > 0.5
    expected = 1.25 * (base_rtt + queue_s) - 2 * one_way_s
    print(f"rate {got_rate / rate:.3f} of the path; queue wait median {statistics.median(waits) * 1000:.2f} ms,"
          f" max {max(waits) * 1000:.2f} ms (expected <= {expected * 1000:.2f} ms)")  # fmt: skip
    assert statistics.median(waits) <= expected
    assert max(waits) <= expected + packet / rate

"""The bound on what the lower classes keep in flight on the uplink (docs/design/priorities.md).

An urgent relay leaves the gateway at once, but on its way it queues behind every byte sent
before it and not yet taken in by the receiver: in the network's buffers and in the
receiver's socket buffer. A loss-based congestion controller (aioquic's NewReno) lets that
queue grow until a buffer overflows, so with bulk saturating the uplink an urgent frame
waits for a full buffer to drain. The lower classes are therefore held to about one
bandwidth-delay product plus a small queue allowance, the way BBR bounds its in-flight data:

    bound = gain × (best delivery rate of the last second) × (minimum RTT + queue_s)

The delivery rate is measured from the bytes that left flight; the gain (> 1) lets the rate
grow while the path has room (each round may deliver `gain` times more: the floor must be a
few datagrams for that), and once the receiver is the bottleneck the queue it holds stays
near `(gain - 1) × rate × RTT + gain × rate × queue_s` bytes:
an urgent frame waits about `queue_s` behind bulk data on a short path, plus a quarter of
the RTT on a long one (BBR caps its flight at twice that; urgent latency is the point here).
Sans I/O: times and the path's figures are given, nothing is read from a clock or a connection.
`FlightBound` is the bound; `Pacer` applies it, with the congestion window, to the uplink.
"""

from __future__ import annotations

from collections import deque


class FlightBound:
    """Bytes the control, telemetry and bulk classes may have in flight together."""

    def __init__(self, floor: int, queue_s: float = 0.001, gain: float = 1.25, window_s: float = 1.0,
                 sample_s: float = 0.01) -> None:  # fmt: skip
        self.floor = floor
        """Never less: a path not measured yet, or idle, starts from here."""
        self.queue_s = queue_s
        self.gain = gain
        self.window_s = window_s
        self.sample_s = sample_s
        self.rtt_min = 0.0
        self._t0 = -1.0
        self._acc = 0
        self._best: deque[tuple[float, float]] = deque()
        """(time, rate) samples of the last `window_s`, rates decreasing: the head is the best."""

    def delivered(self, nbytes: int, in_flight_before: int, now: float, rtt_min: float) -> None:
        """`nbytes` left flight at `now` (acknowledged or declared lost); `in_flight_before`
        were in flight just before. `rtt_min` is the path's minimum RTT (0 while unknown)."""
        self.rtt_min = rtt_min
        if not in_flight_before:  # idle until now: the next sample starts here
            self._t0, self._acc = now, 0
            return
        if self._t0 < 0:
            self._t0 = now
        self._acc += nbytes
        elapsed = now - self._t0
        if elapsed < max(self.sample_s, rtt_min):
            return
        rate = self._acc / elapsed
        best = self._best
        while best and best[-1][1] <= rate:
            best.pop()
        best.append((now, rate))
        self._t0, self._acc = now, 0

    def rate(self, now: float) -> float:
        """The best delivery rate of the last `window_s`, bytes/s (0 when none)."""
        best = self._best
        while best and now - best[0][0] > self.window_s:
            best.popleft()
        return best[0][1] if best else 0.0

    def bound(self, now: float) -> int:
        return max(self.floor, int(self.gain * self.rate(now) * (self.rtt_min + self.queue_s)))


class Pacer:
    """What the control, telemetry and bulk classes may hand the QUIC stack now, from the
    path's figures: the caller reads them from its connection (gateway/uplink/quic_internals.py,
    the one reader of aioquic's internals) and passes them in, so this stays sans I/O.

    Two limits. The *room*: the bytes in flight and unsent stay below the congestion window
    less a reserve of 4 datagrams (so an urgent relay never waits for acks of bulk packets)
    and below the flight bound. The *cap* of a class: the bytes it may leave in the stack
    unsent, at most what the path delivers in `queue_s` (and at least one datagram), since
    the stack paces its packets and unsent bulk ahead of an urgent relay is time on a slow
    link. `bounded = False` (queue allowance 0, or the FIFO baseline): the window alone."""

    def __init__(self, datagram_size: int, caps: list[int], queue_s: float, bounded: bool) -> None:
        self.caps = caps
        """Per class, the most it may leave unsent whatever the path (urgent first)."""
        self.datagram_size = datagram_size
        self.reserve = 4 * datagram_size
        """Congestion window bytes the lower classes leave free for urgent relays."""
        # Floor: two datagrams, and at least four of the smallest QUIC size, so that the bound
        # can grow by a quarter per round from it; no more, or a slow link queues the floor.
        self.flight = FlightBound(floor=max(2 * datagram_size, 4 * 1200), queue_s=queue_s)
        self.bounded = bounded

    def room(self, now: float, in_flight: int, cwnd: int, held: int) -> int:
        """Bytes the lower classes may still hand over: the smaller of the congestion window
        (less the reserve) and the flight bound, less what is in flight and what is `held`
        (handed over, not yet sent). Nothing in flight: no limit (the window cannot be below
        one datagram's reserve forever)."""
        if not in_flight:
            return 1 << 30
        window = cwnd - self.reserve
        if self.bounded:
            window = min(window, self.flight.bound(now))
        return int(window - in_flight - held)

    def cap(self, prio: int, now: float) -> int:
        """Bytes class `prio` may leave handed over and unsent (16 KiB of bulk is 6.5 ms at
        20 Mbit/s: the same allowance as the flight bound's)."""
        static = self.caps[prio]
        if not prio or not self.bounded:  # urgent: its own cap only
            return static
        timed = int(self.flight.rate(now) * self.flight.queue_s)
        return max(self.datagram_size, min(static, timed))

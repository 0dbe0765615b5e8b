"""The only place the gateway reads aioquic's internals (the uplink's path figures).

aioquic reports neither its congestion figures nor how much of a stream it has put on the
wire, and the uplink's scheduling (gateway/pacing.py) needs both: bytes in flight, the
congestion window, the minimum and smoothed RTT, the datagram size, and per stream the
end of what was sent. They are read here and nowhere else, through the private `_loss`,
`_streams` and `_max_datagram_size` of a `QuicConnection` and `_rtt_*` of its recovery.
pyproject.toml pins aioquic below the next minor release, admitted once
tests/test_gw_upstream.py (`test_bulk_is_held_to_the_flight_bound_and_the_path_is_reported`,
which reads every figure through this module) passes on it. (gateway/protocol/mtls.py
reads aioquic's TLS internals, for the server side's client certificates: another matter.)
"""

from __future__ import annotations

from aioquic.quic.connection import QuicConnection


class QuicInternals:
    """Read-only figures of one connection. The recovery and the stream table are objects
    the connection keeps for its whole life, so they are looked up once, here."""

    __slots__ = ("_loss", "_streams", "datagram_size")

    def __init__(self, quic: QuicConnection) -> None:
        self._loss = quic._loss
        self._streams = quic._streams
        self.datagram_size: int = quic._max_datagram_size
        """The connection's UDP payload size (fixed by its configuration)."""

    def in_flight(self) -> int:
        """Bytes sent and neither acknowledged nor declared lost."""
        return int(self._loss.bytes_in_flight)

    def cwnd(self) -> int:
        return int(self._loss.congestion_window)

    def rtt_min(self) -> float:
        """The path's minimum RTT, 0 while not measured."""
        loss = self._loss
        return float(loss._rtt_min) if loss._rtt_initialized else 0.0

    def rtt_smoothed(self) -> float:
        return float(self._loss._rtt_smoothed)

    def sent(self, sid: int) -> int:
        """The end of what stream `sid` has put on the wire (`highest_offset` of its sender);
        0 for a stream not created yet."""
        stream = self._streams.get(sid)
        return 0 if stream is None else int(stream.sender.highest_offset)

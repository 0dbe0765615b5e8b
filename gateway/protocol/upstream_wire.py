"""Wire constants and stream framing of the upstream protocol (docs/upstream.md), sans I/O.

Shared by the gateway's QUIC client and the CSMS peer so that both frame streams the
same way.
"""

from __future__ import annotations

import hashlib
from typing import Final

from gateway.schema import MAX_UP_FRAME, Priority

ALPN: Final = "evedge-up/1"
K_UP: Final = hashlib.sha256(b"evedge-up/1").digest()
"""Public tag key of upstream envelopes: a checksum; TLS authenticates the connection."""

CLASS_ORDER: Final = (Priority.URGENT, Priority.CONTROL, Priority.TELEMETRY, Priority.BULK)
"""The gateway opens one bidirectional stream per class, in this order."""


class UpstreamFrameError(ValueError):
    """A stream carried a length prefix of 0 or above MAX_UP_FRAME."""


def prefix(frame: bytes) -> bytes:
    """The frame with its u32 big-endian length prefix."""
    if not 0 < len(frame) <= MAX_UP_FRAME:
        raise UpstreamFrameError(f"frame of {len(frame)} bytes: upstream frames are 1..{MAX_UP_FRAME} bytes")
    return len(frame).to_bytes(4, "big") + frame


class StreamReader:
    """Reassembles u32-prefixed frames from the chunks a QUIC stream delivers."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if not 0 < n <= MAX_UP_FRAME:
                raise UpstreamFrameError(f"length prefix {n}: upstream frames are 1..{MAX_UP_FRAME} bytes")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

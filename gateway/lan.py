"""Thin asyncio glue of the LAN side: many board links on one TCP server.

Each read is cut into frames (`split_frames`) and handed to the Rust core in one
`Receiver.ingest` call, which queues the good frames in the shared PriorityQueue; the
site (`LanSite`, `gateway.service.Gateway`) pops that queue urgent-first. Everything protocol-shaped lives in
`gateway.link`; this module only moves bytes, pauses reading for backpressure and throttling,
and closes links.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from gateway import _core
from gateway.devices import Devices
from gateway.link import FloodPolicy, Link, State, Verdict, error_body, proto_ts
from gateway.schema import Action, ErrorCode, Kind, Priority


class LanSite(Protocol):
    """What the LAN glue needs of the site (gateway.service.Gateway is one): where frames
    go, who is told of links opening and closing, and the counters it keeps."""

    devices: Devices
    flood: FloodPolicy
    heartbeat_s: int
    """The heartbeat interval a link's Hello answer gives its board."""
    queue: _core.PriorityQueue
    """The shared queue `Receiver.ingest` fills."""
    queue_high: int
    """Frames queued before a connection stops reading (backpressure)."""
    connections: set[BoardConnection]
    frames_in: int
    throttled: int

    def link_opened(self, conn: BoardConnection) -> None: ...

    def link_closed(self, conn: BoardConnection) -> None: ...

    def count_rejections(self, link: Link) -> None:
        """Adds the link's rejection counts to the site's and clears them."""

    def count_name(self, name: str) -> None: ...

    def dispatch_now(self) -> None:
        """Dispatches the urgent frames queued, in this callback."""

    def wake(self) -> None:
        """Schedules a dispatch round."""

    def pause(self, conn: BoardConnection) -> None:
        """Stops reading `conn` until the queue drained (backpressure)."""


def _prefixed(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(2, "big") + f for f in frames)


class BoardConnection(asyncio.Protocol):
    """One board's TCP connection."""

    def __init__(self, gw: LanSite) -> None:
        self.gw = gw
        self.link = Link(gw.devices, gw.flood, interval_s=gw.heartbeat_s)
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.throttled = False
        self.read_wall = 0.0
        self.read_pc = 0.0
        """time.time() and time.perf_counter() of the last read: the ingress of its frames."""

    # -------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gw.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.link.state = State.CLOSED
        self.gw.connections.discard(self)
        self.gw.link_closed(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.read_pc = time.perf_counter()
        self.read_wall = now = time.time()
        buf = self.buf
        buf += data
        try:
            frames, used = _core.split_frames(buf)
        except _core.FrameError as e:
            self.fail(e.code, f"{e.reason}: stream cannot be resynchronised, link closed")
            return
        del buf[:used]
        if not frames:
            return
        link = self.link
        if link.state is State.AWAIT_HELLO:
            out = link.receive_hello(frames[0], now)
            self.gw.count_rejections(link)
            self.write(out.frames)
            if out.close:
                self.close()
                return
            self.gw.link_opened(self)
            frames = frames[1:]
            if not frames:
                return
        rx = link.rx
        assert rx is not None
        status = rx.ingest(frames, self.gw.queue, link.idx)
        self.gw.frames_in += len(frames)
        if any(status):
            out = link.rejected_frames(frames, rx.last_rejections(), now)
            self.gw.count_rejections(link)
            self.write(out.frames)
            if out.close:
                self.close()
                return
            if out.verdict is Verdict.THROTTLE and not self.throttled:
                self.throttle(self.gw.flood.throttle_s)
        if self.gw.queue.len_class(Priority.URGENT):
            self.gw.dispatch_now()  # urgent frames leave in this callback, before other links' reads
        else:
            self.gw.wake()
        if len(self.gw.queue) > self.gw.queue_high:
            self.gw.pause(self)

    # -------------------------------------------------------------- helpers

    def write(self, frames: list[bytes]) -> None:
        if frames and self.transport is not None and not self.closed:
            self.transport.write(_prefixed(frames))

    def send_one(self, frame: bytes) -> None:
        self.write([frame])

    def fail(self, code: int, reason: str) -> None:
        """Framing is lost: answer with an error frame (sealed when the session exists) and close."""
        link = self.link
        self.gw.count_name(_core.error_name(code))
        if link.state is State.OPEN:
            self.write([link.error(code, reason, 0, Priority.CONTROL, Action.CLOSE, time.time())])
        else:
            body = error_body(code, reason)
            f = _core.encode(Kind.ERROR, 0, 0, Priority.CONTROL, proto_ts(time.time()), Action.HELLO, body, bytes(32))
            self.write([f[:-16] + bytes(16)])
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def throttle(self, seconds: float) -> None:
        """A flooding peer is read no faster than once per `seconds`; the flood policy
        closes it if it keeps going."""
        if self.transport is None or self.closed:
            return
        self.throttled = True
        self.gw.throttled += 1
        self.transport.pause_reading()

        def resume() -> None:
            self.throttled = False
            if not self.closed and not self.paused and self.transport is not None:
                self.transport.resume_reading()

        asyncio.get_running_loop().call_later(seconds, resume)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            if not self.throttled:
                self.transport.resume_reading()


async def serve(gw: LanSite, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory: Callable[[], BoardConnection] = lambda: BoardConnection(gw)  # noqa: E731
    return await loop.create_server(factory, host, port, backlog=1024)


__all__ = ["BoardConnection", "ErrorCode", "serve"]

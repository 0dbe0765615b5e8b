"""Thin asyncio glue of the LAN side: many board links on one TCP server.

Each read is cut into frames (`split_frames`) and handed to the Rust core by
`Receiver.ingest`, which queues the good frames in the shared PriorityQueue; the site
(`LanSite`, `gateway.service.Gateway`) pops that queue urgent-first. Everything
protocol-shaped lives in `gateway.link`, every bound in `gateway.languard`; this module
accepts (its own accept loop, so that a connection over a cap is closed before anything is
built for it and an accept() error pauses accepting instead of logging in a loop), moves
bytes, pauses reading for backpressure and throttling, enforces the deadlines and closes
links, naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from gateway import _core
from gateway.devices import Devices
from gateway.languard import LanGuard
from gateway.link import FloodPolicy, Link, Output, State, Verdict, error_body, proto_ts
from gateway.localcsms.hellokey import HelloSigner
from gateway.ratelog import AsyncioFilter
from gateway.schema import Action, ErrorCode, Kind, Priority

ACCEPT_BATCH = 32
"""Connections accepted per readiness of the listening socket (then the loop reads the links)."""
ACCEPT_PAUSE_S = 0.25
"""Accepting pauses this long after an accept() error (EMFILE, ENFILE, ENOBUFS, …)."""
BACKLOG = 1024


class LanSite(Protocol):
    """What the LAN glue needs of the site (gateway.service.Gateway is one): where frames
    go, who is told of links opening and closing, and the counters it keeps."""

    devices: Devices
    flood: FloodPolicy
    guard: LanGuard
    heartbeat_s: int
    """The heartbeat interval a link's Hello answer gives its board."""
    hello_signer: HelloSigner | None
    """Signs the Hello answers with the local-CSMS certificate's key (M14/M17)."""
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

    def security_event(self, device_id: str, event: str, reason: str) -> None:
        """A Hello refused for security (gateway.security.SiteSecurity.event)."""

    def dispatch_now(self) -> None:
        """Dispatches the urgent frames queued, in this callback."""

    def wake(self) -> None:
        """Schedules a dispatch round."""

    def pause(self, conn: BoardConnection) -> None:
        """Stops reading `conn` until the queue drained (backpressure)."""

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        """Runs `fn` on the writer thread (a Hello's device-table write)."""

    def id_floor(self, device_id: str) -> int:
        """On the writer thread: above every message id the site accepted from `device_id`."""


def _prefixed(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(2, "big") + f for f in frames)


class BoardConnection(asyncio.Protocol):
    """One board's TCP connection."""

    def __init__(self, gw: LanSite, host: str = "") -> None:
        self.gw = gw
        self.host = host
        self.link = Link(gw.devices, gw.flood, interval_s=gw.heartbeat_s, memory=gw.guard.flood, id_floor=gw.id_floor,
                         signer=gw.hello_signer)  # fmt: skip
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        """Not read for backpressure (the shared queue is full)."""
        self.throttled = False
        self.registering = False
        """Not read while its Hello's device row is committed."""
        self.write_paused = False
        """Not read while the peer does not read what it is sent (asyncio's high-water mark)."""
        self.pre_hello = True
        self.released = False
        self.held: list[bytes] = []
        """Frames read behind a Hello whose row is being committed."""
        self.read_wall = 0.0
        self.read_pc = 0.0
        """time.time() and time.perf_counter() of the last read: the ingress of its frames."""
        self.opened_pc = self.active_pc = time.perf_counter()
        self.partial_since = 0.0

    @property
    def reading_held(self) -> bool:
        return self.paused or self.throttled or self.registering

    @property
    def live(self) -> bool:
        return self.link.state is State.OPEN

    # -------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gw.connections.add(self)
        self.gw.guard.made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release("peer_closed", str(exc) if exc else "")
        self.closed = True
        self.link.state = State.CLOSED
        self.gw.connections.discard(self)
        self.gw.link_closed(self)

    def pause_writing(self) -> None:
        # The peer does not read: nothing more is read from it (its requests would only add
        # answers it does not take); the idle deadline runs from its last read.
        self.write_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading(fresh=False)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.read_pc = self.active_pc = pc = time.perf_counter()
        self.read_wall = now = time.time()
        buf = self.buf
        buf += data
        try:
            frames, used = _core.split_frames(buf)
        except _core.FrameError as e:
            self.fail(e.code, f"{e.reason}: stream cannot be resynchronised, link closed")
            return
        if used:
            del buf[:used]
            self.partial_since = pc if buf else 0.0
        elif not self.partial_since:
            self.partial_since = pc  # the first bytes of a frame: its deadline starts
        if not frames:
            return
        link = self.link
        if link.state is not State.OPEN:
            if self.registering:  # not read meanwhile; kept for when the Hello is answered
                self.held += frames
                return
            self.gw.guard.hello_read(self)
            out = link.receive_hello(frames[0], now)
            self.gw.count_rejections(link)
            if out.event is not None:  # M13, M19: refused for security: reported upstream
                self.gw.security_event(out.event[0], out.event[1], link.refusal)
            if out.store is not None:
                self._store(out, frames[1:])
                return
            if not self._answer_hello(out, now):
                return
            frames = frames[1:]
            if not frames:
                return
        self.ingest(frames, now)

    def ingest(self, frames: list[bytes], now: float) -> None:
        """Hands the frames to the core at most `Link.bad_budget` at a time, so that a flood
        is stopped at the frame that reaches the limit: the rest of the read is dropped."""
        gw, link = self.gw, self.link
        rx = link.rx
        assert rx is not None
        queue, idx = gw.queue, link.idx
        n = len(frames)
        budget = link.bad_budget(now)
        i = 0
        verdict = Verdict.OK
        while i < n:
            chunk = frames if i == 0 and n <= budget else frames[i : i + budget]
            i += len(chunk)
            gw.frames_in += len(chunk)
            status = rx.ingest(chunk, queue, idx)
            if any(status):
                out = link.rejected_frames(chunk, rx.last_rejections(), now)
                gw.count_rejections(link)
                self.write(out.frames)
                if out.close:
                    self.close(out.cause, f"{link.device_id}: {link.policy.close_at} bad frames")
                    break
                verdict = out.verdict
                budget = link.bad_budget(now)
        if verdict is Verdict.THROTTLE and not self.throttled and not self.closed:
            self.throttle(gw.flood.throttle_s)
        if gw.queue.len_class(Priority.URGENT):
            gw.dispatch_now()  # urgent frames leave in this callback, before other links' reads
        else:
            gw.wake()
        if len(gw.queue) > gw.queue_high and not self.closed:
            gw.pause(self)

    # -------------------------------------------------------------- Hello

    def _store(self, out: Output, rest: list[bytes]) -> None:
        """The Hello verified and must write the device table first: on the writer thread,
        not read meanwhile; answered (and the frames behind it ingested) once committed."""
        assert out.store is not None and self.transport is not None
        self.held = rest
        self.registering = True
        self.transport.pause_reading()
        try:
            fut = self.gw.run_sync(out.store)
        except RuntimeError:  # the writer thread is gone: the gateway is stopping
            self.close("shutdown")
            return
        fut.add_done_callback(self._stored)

    def _stored(self, fut: asyncio.Future[object]) -> None:
        self.registering = False
        if self.closed:
            return
        if fut.cancelled():
            self.close("shutdown")
            return
        now = time.time()
        exc = fut.exception()
        if exc is not None:
            out = self.link.hello_failed(f"device table not written ({type(exc).__name__})", now)
        else:
            res = fut.result()
            out = self.link.hello_stored(res if isinstance(res, bytes) else None, now)
        self.gw.count_rejections(self.link)
        if not self._answer_hello(out, now):
            return
        held, self.held = self.held, []
        if held:
            self.ingest(held, now)
        self._resume_reading()

    def _answer_hello(self, out: Output, now: float) -> bool:
        """Writes the Hello's answer; False when it refused the link (then closed)."""
        self.write(out.frames)
        if out.close:
            self.close(out.cause or "bad_hello", self.link.refusal)
            return False
        self.gw.link_opened(self)
        if self.link.verdict(now) is Verdict.THROTTLE:  # the device's bad frames of its last links
            self.throttle(self.gw.flood.throttle_s)
        return True

    # -------------------------------------------------------------- helpers

    def write(self, frames: list[bytes]) -> None:
        if frames and self.transport is not None and not self.closed:
            self.transport.write(_prefixed(frames))

    def send_one(self, frame: bytes) -> None:
        self.write([frame])

    def fail(self, code: int, reason: str, cause: str = "framing") -> None:
        """Answers with an error frame naming `reason` (sealed when the session exists) and
        closes: the stream is lost (framing) or a deadline passed."""
        link = self.link
        self.gw.count_name(_core.error_name(code))
        if link.state is State.OPEN:
            self.write([link.error(code, reason, 0, Priority.CONTROL, Action.CLOSE, time.time())])
        else:
            body = error_body(code, reason)
            f = _core.encode(Kind.ERROR, 0, 0, Priority.CONTROL, proto_ts(time.time()), Action.HELLO, body, bytes(32))
            self.write([f[:-16] + bytes(16)])
        self.close(cause, reason)

    def expire(self, cause: str, reason: str) -> None:
        """A deadline passed (gateway.languard): TIMEOUT naming it, then closed."""
        self.fail(ErrorCode.TIMEOUT, f"{reason}: link closed", cause)

    def close(self, cause: str = "site", reason: str = "") -> None:
        """Closes the connection, counted under `cause` (gateway.languard.CAUSES). What the
        peer does not take at once is dropped: a peer that does not read holds nothing."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self._release(cause, reason)
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self.transport.abort()

    def _release(self, cause: str, reason: str) -> None:
        if not self.released:
            self.released = True
            self.gw.guard.release(self, cause, reason)

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
            self._resume_reading()

        asyncio.get_running_loop().call_later(seconds, resume)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._resume_reading()

    def _resume_reading(self, fresh: bool = True) -> None:
        """Reads again unless another hold remains; `fresh`: the hold was the gateway's, so
        the peer's deadlines start again from now."""
        if self.closed or self.transport is None:
            return
        if fresh:
            self.active_pc = time.perf_counter()
            if self.partial_since:
                self.partial_since = self.active_pc
        if not (self.paused or self.throttled or self.registering or self.write_paused):
            self.transport.resume_reading()


class LanServer:
    """The listening sockets, their accept loop and the deadline sweep."""

    def __init__(self, gw: LanSite, sockets: list[socket.socket]) -> None:
        self.gw = gw
        self.sockets = sockets
        self.loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[None]] = set()
        self._accept_paused: dict[int, asyncio.TimerHandle] = {}
        self._filter = AsyncioFilter(gw.guard.limit)
        logging.getLogger("asyncio").addFilter(self._filter)
        for s in sockets:
            self.loop.add_reader(s.fileno(), self._accept, s)
        self._sweep_handle = self.loop.call_later(gw.guard.tick_s, self._sweep)

    def close(self) -> None:
        self._sweep_handle.cancel()
        for h in self._accept_paused.values():
            h.cancel()
        self._accept_paused.clear()
        for s in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(s.fileno())
            s.close()
        logging.getLogger("asyncio").removeFilter(self._filter)

    def _accept(self, sock: socket.socket) -> None:
        guard = self.gw.guard
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: out of something
                guard.accept_error(e)
                if guard.pre:  # a connection without Hello gives its descriptor back
                    next(iter(guard.pre)).close("evicted", f"accept() failed: {e.strerror or e}")
                self._pause_accept(sock)
                return
            host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            cause, victim = guard.admit(host)
            if cause:
                conn.close()
                continue
            if victim is not None:
                victim.close("evicted", f"room for a connection from {host} ({guard.max_connections} reached)")
            conn.setblocking(False)
            task = self.loop.create_task(self._start(conn, host))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket, host: str) -> None:
        proto = BoardConnection(self.gw, host)
        try:
            await self.loop.connect_accepted_socket(lambda: proto, conn)
        except OSError:
            conn.close()
            if proto.transport is None:  # else its connection_lost gives the slot back
                self.gw.guard.aborted(host)

    def _pause_accept(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd in self._accept_paused:
            return
        self.loop.remove_reader(fd)

        def again() -> None:
            del self._accept_paused[fd]
            if sock.fileno() >= 0:
                self.loop.add_reader(fd, self._accept, sock)

        self._accept_paused[fd] = self.loop.call_later(ACCEPT_PAUSE_S, again)

    def _sweep(self) -> None:
        """Closes the connections past a deadline (gateway.languard.LanGuard.expired)."""
        guard = self.gw.guard
        for conn, cause, reason in list(guard.expired(self.gw.connections, time.perf_counter())):
            if isinstance(conn, BoardConnection) and not conn.closed:
                conn.expire(cause, reason)
        guard.tick(time.time())
        self._sweep_handle = self.loop.call_later(guard.tick_s, self._sweep)


def listen(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets on every address `host` resolves to (non-blocking)."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(infos):
            s = socket.socket(family, kind, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def serve(gw: LanSite, host: str, port: int) -> LanServer:
    return LanServer(gw, listen(host, port))


__all__ = ["BoardConnection", "ErrorCode", "LanServer", "listen", "serve"]

"""The uplink to the CSMS (docs/upstream.md): relay scheduling sans I/O, and its aioquic glue.

`Uplink` holds what waits to be relayed (rows of the outbox, one queue per class, in
acceptance order) and what is in flight (relays sent, not yet acked); it knows nothing of
QUIC. `UpstreamProtocol` drives one aioquic connection: four streams, urgent first.

aioquic has no stream priorities and takes any amount of data into its send buffers, so
priority is enforced above it: a class may only hand aioquic more data while the bytes it
already handed and aioquic has not yet sent are under that class's cap (one chunk for bulk).
An urgent relay therefore never waits behind more than one chunk of any lower class, and
each `transmit` builds few packets so the event loop returns quickly to the LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived

from gateway import _core
from gateway.link import proto_ts
from gateway.localcsms.firmware import Rollouts
from gateway.metrics import UrgentTrace
from gateway.outbox import Row
from gateway.pacing import FlightBound
from gateway.protocol.upstream_wire import ALPN, CLASS_ORDER, K_UP, StreamReader, prefix
from gateway.schema import (
    FIELDS,
    MESSAGES,
    PROTOCOL_VERSION,
    SCHEMA_REV,
    Action,
    CertType,
    ErrorCode,
    Key,
    Kind,
    Priority,
    Status,
)

log = logging.getLogger("gateway.upstream")

RELAY_DEFAULT_PRIO = MESSAGES[Action.RELAY].priority
RELAY_HEAD = 64
"""Envelope, tag and site id overhead of a Relay, in bytes, beside the site id (upper bound)."""
MAX_RELAY_BYTES = 256 << 10
"""Default bound of one Relay's envelope (the core decodes up to MAX_UP_FRAME = 1 MiB)."""
MAX_RELAY_FRAMES = 256
"""The schema's bound of `frames` in one Relay."""
_BIN_HEAD = [bytes((0xC4, n)) for n in range(256)]


def _bin_head(n: int) -> bytes:
    return _BIN_HEAD[n] if n < 256 else b"\xc5" + n.to_bytes(2, "big")


def _array_head(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def encode_relay(seq: int, relay_id: int, prio: int, ts: int, site_id: str, items: bytes, count: int) -> bytes:
    """The Relay envelope around `count` already encoded `relayed` items, byte for byte what
    `_core.encode` makes of the same body, without decoding or re-encoding the frames."""
    head = _core.pack([PROTOCOL_VERSION, Kind.EVENT, seq, relay_id, prio, ts, Action.RELAY])
    data = b"".join(
        (
            b"\x99",
            head[1:],
            b"\x82",
            _core.pack(Key.SITE_ID),
            _core.pack(site_id),
            _core.pack(Key.FRAMES),
            _array_head(count),
            items,
        )
    )
    return data + b"\xc4\x10" + hmac.digest(K_UP, data, "sha256")[:16]


@dataclass
class Relay:
    relay_id: int
    prio: int
    rows: list[Row]
    nbytes: int
    items: bytes = b""
    """The encoded `relayed` items of `rows`, in order (see `Uplink.take`)."""


class Uplink:
    """Relay bookkeeping, sans I/O. Rows of one class leave in acceptance order; after a
    lost connection, relays in flight go back to the front of their class."""

    def __init__(self, site_id: str, max_frames: int = 256, fifo: bool = False) -> None:
        self.site_id = site_id
        self.fifo = fifo  # benchmark baseline only: one queue, one stream, no priority
        self.max_frames = max_frames
        self.unsent: list[deque[Row]] = [deque() for _ in range(4)]
        self.unsent_bytes = [0, 0, 0, 0]
        self.inflight: dict[int, Relay] = {}
        self.inflight_bytes = 0
        self.relayed = 0
        self.acked_frames = 0
        self._item_heads: dict[str, bytes] = {}
        self._map_heads: dict[str, bytes] = {}
        """The same, after the item's map head (two entries: no token uid)."""
        self.token_uids: dict[tuple[str, int], str] = {}
        """(device, msg_id) → plaintext id token of an accepted frame (filled by CommandPath)."""
        self.trace: UrgentTrace | None = None
        """Timings of urgent rows (set by the gateway): the pump notes when their Relay is
        handed to aioquic and sent."""

    def add(self, rows: list[Row]) -> None:
        unsent, nbytes = self.unsent, self.unsent_bytes
        if self.fifo:
            unsent[Priority.TELEMETRY].extend(rows)
            nbytes[Priority.TELEMETRY] += sum(len(r[4]) for r in rows)
            return
        for r in rows:
            p = r[3]
            unsent[p].append(r)
            nbytes[p] += len(r[4])

    def backlog(self) -> int:
        return sum(len(q) for q in self.unsent) + sum(len(r.rows) for r in self.inflight.values())

    def depth(self, prio: int) -> int:
        return len(self.unsent[prio])

    def _head(self, device: str) -> bytes:
        """`device_id`, its value and the `frame` key of a `relayed` item (after its map head)."""
        head = self._item_heads.get(device)
        if head is None:
            head = self._item_heads[device] = _core.pack(Key.DEVICE_ID) + _core.pack(device) + _core.pack(Key.FRAME)
        return head

    def take(self, prio: int, max_bytes: int) -> Relay | None:
        """The next relay of class `prio`: up to `max_frames` rows and about `max_bytes`
        bytes of frames (the first row always comes)."""
        q = self.unsent[prio]
        if not q:
            return None
        rows: list[Row] = []
        parts: list[bytes] = []
        n = 0
        budget = max_bytes - RELAY_HEAD - len(self.site_id)
        tokens = self.token_uids
        limit = min(self.max_frames, MAX_RELAY_FRAMES, len(q))
        if tokens:
            for _ in range(limit):
                r = q[0]
                f = r.frame
                head = self._head(r.device)
                uid = tokens.get((r.device, r.msg_id))
                tail = b"" if uid is None else _core.pack(Key.TOKEN_UID) + _core.pack(uid)
                cost = len(head) + len(f) + len(tail) + 4
                if rows and cost > budget:
                    break
                q.popleft()
                rows.append(r)
                parts += (b"\x82" if uid is None else b"\x83", head, _bin_head(len(f)), f, tail)
                n += len(f)
                budget -= cost
        else:
            # The common case, per row: one dict lookup, no tuple, no call but the deque's.
            heads = self._map_heads
            bin_head = _BIN_HEAD
            popleft = q.popleft
            add_row = rows.append
            add = parts.append
            for _ in range(limit):
                r = q[0]
                f = r[4]
                h = heads.get(r[1])
                if h is None:
                    h = heads[r[1]] = b"\x82" + self._head(r[1])
                lf = len(f)
                cost = len(h) + lf + 3
                if cost > budget and rows:
                    break
                popleft()
                add_row(r)
                add(h)
                add(bin_head[lf] if lf < 256 else b"\xc5" + lf.to_bytes(2, "big"))
                add(f)
                n += lf
                budget -= cost
        self.unsent_bytes[prio] -= n
        relay = Relay(rows[0].seq, prio, rows, n, b"".join(parts))
        self.inflight[relay.relay_id] = relay
        self.inflight_bytes += n
        self.relayed += len(rows)
        return relay

    def acked(self, relay_id: int) -> list[int]:
        """Seqs of the rows the CSMS now holds (to retire); [] for an unknown relay id."""
        relay = self.inflight.pop(relay_id, None)
        if relay is None:
            return []
        self.inflight_bytes -= relay.nbytes
        self.acked_frames += len(relay.rows)
        return [r.seq for r in relay.rows]

    def reset(self) -> None:
        """The connection is gone: everything in flight is owed again, in order."""
        back: list[list[Row]] = [[], [], [], []]
        for relay in self.inflight.values():
            back[relay.prio].extend(relay.rows)
        for prio, rows in enumerate(back):
            rows.sort(key=lambda r: r.seq)
            self.unsent[prio].extendleft(reversed(rows))
            self.unsent_bytes[prio] += sum(len(r.frame) for r in rows)
        self.inflight.clear()
        self.inflight_bytes = 0

    def relay_body(self, relay: Relay) -> dict[int, Any]:
        frames: list[dict[int, Any]] = [{Key.DEVICE_ID: r.device, Key.FRAME: r.frame} for r in relay.rows]
        if self.token_uids:  # the plaintext id tokens (docs/upstream.md, `relayed.token_uid`)
            for item, r in zip(frames, relay.rows, strict=True):
                uid = self.token_uids.get((r.device, r.msg_id))
                if uid is not None:
                    item[Key.TOKEN_UID] = uid
        return {Key.SITE_ID: self.site_id, Key.FRAMES: frames}


@dataclass(frozen=True)
class UplinkSettings:
    host: str
    port: int
    server_name: str
    ca_file: str
    cert_file: str
    key_file: str
    bulk_unsent_max: int = 16384
    inflight_max_bytes: int = 4 << 20
    backoff_min_s: float = 0.1
    backoff_max_s: float = 30.0
    idle_timeout_s: float = 10.0
    relay_max_bytes: int = MAX_RELAY_BYTES
    urgent_relay_max_bytes: int = 16 << 10
    bulk_relay_max_bytes: int = 32 << 10
    """Bulk Relays stay small too: each is built in one loop turn and decoded at once by the
    CSMS, so an urgent relay that arrives meanwhile waits for at most one of them."""
    connect_timeout_s: float = 5.0
    max_datagram_size: int = 0
    """0: 16 KiB on a loopback address (no path MTU to respect), else aioquic's default."""
    bulk_queue_ms: float = 1.0
    """Queue allowance of the lower classes' flight bound (gateway/pacing.py): about how long an
    urgent relay may wait behind them at the receiver."""

    def quic(self) -> QuicConfiguration:
        qc = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=self.server_name,
            verify_mode=ssl.CERT_REQUIRED,
            idle_timeout=self.idle_timeout_s,
            max_datagram_frame_size=None,
        )
        size = self.max_datagram_size
        if not size and (self.host.startswith("127.") or self.host in ("::1", "localhost")):
            size = 16 << 10  # fewer, larger packets: aioquic's cost is per packet
        if size:
            qc.max_datagram_size = size
        qc.load_verify_locations(cafile=self.ca_file)
        qc.load_cert_chain(self.cert_file, self.key_file)
        return qc


RequestHandler = Callable[[_core.Frame], Awaitable[tuple[int, dict[int, Any]]]]
"""Answers an upstream request: (kind RESPONSE or ERROR, body)."""


class UpstreamProtocol(QuicConnectionProtocol):
    """One QUIC connection to the CSMS, gateway side."""

    def __init__(self, *args: Any, uplink: Uplink, settings: UplinkSettings,
                 on_acked: Callable[[list[int]], None], on_request: RequestHandler, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.uplink = uplink
        self.settings = settings
        self.on_acked = on_acked
        self.on_request = on_request
        self.sids: list[int] = []
        self.class_of: dict[int, int] = {}
        self.readers: dict[int, StreamReader] = {}
        self.out_seq: dict[int, int] = {}
        self.written: dict[int, int] = {}
        self.ready = False
        self.closed = asyncio.Event()
        self.hello_answered: asyncio.Future[_core.Frame] = asyncio.get_running_loop().create_future()
        # The runner may have given up waiting (connect timeout) before the link dies: the
        # outcome is then read here, so that asyncio does not report it as never retrieved.
        self.hello_answered.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pump_scheduled = False
        self.caps = [1 << 20, 32 << 10, 32 << 10, settings.bulk_unsent_max]
        """Bytes a class may leave in aioquic unsent: what an urgent frame can find ahead of it."""
        self.max_relay_bytes = [
            settings.urgent_relay_max_bytes,
            settings.relay_max_bytes,
            settings.relay_max_bytes,
            min(settings.bulk_relay_max_bytes, settings.relay_max_bytes),
        ]
        self.urgent_reserve = 4 * self._quic._max_datagram_size
        """Congestion window bytes the lower classes leave free for urgent relays."""
        size = self._quic._max_datagram_size
        # Floor: two datagrams, and at least four of the smallest QUIC size, so that the bound
        # can grow by a quarter per round from it; no more, or a slow link queues the floor.
        self.flight = FlightBound(floor=max(2 * size, 4 * 1200), queue_s=settings.bulk_queue_ms / 1000)
        self.pending: dict[int, deque[memoryview]] = {}
        """Per stream, encoded bytes not yet handed to aioquic (fed one cap at a time)."""

    # ---------------------------------------------------------- sending

    def _open_streams(self) -> None:
        for prio in CLASS_ORDER:
            sid = self._quic.get_next_available_stream_id()
            self._quic.send_stream_data(sid, b"")  # creates the stream, so the next id is the next one
            self.sids.append(sid)
            self.class_of[sid] = prio
            self.readers[sid] = StreamReader()
            self.out_seq[sid] = 0
            self.written[sid] = 0
            self.pending[sid] = deque()

    def _send(self, prio: int, kind: int, msg_id: int, env_prio: int, action: int, body: dict[int, Any]) -> None:
        sid = self.sids[prio]
        self.out_seq[sid] += 1
        frame = _core.encode(kind, self.out_seq[sid], msg_id, env_prio, proto_ts(time.time()), action, body, K_UP)
        self._write(sid, prefix(frame))

    def _write(self, sid: int, data: bytes) -> None:
        """Queues bytes on a stream behind what is pending there, and feeds aioquic."""
        self.pending[sid].append(memoryview(data))
        self._feed(sid, self.cap(self.class_of[sid]))

    def _feed(self, sid: int, cap: int) -> bool:
        """Hands aioquic pending bytes of `sid` while its unsent bytes stay under `cap`,
        at most `cap` bytes at a time (one chunk for bulk). True when it handed some."""
        q = self.pending[sid]
        fed = False
        lower = self.class_of[sid] != Priority.URGENT
        while q:
            room = cap - self.unsent(sid)
            if lower:
                room = min(room, self.flight_room())
            if room <= 0:
                break
            data = q[0]
            if len(data) <= room:
                q.popleft()
            else:
                q[0] = data[room:]
                data = data[:room]
            self._quic.send_stream_data(sid, bytes(data))
            self.written[sid] += len(data)
            fed = True
        return fed

    async def hello(self, site_id: str) -> _core.Frame:
        self._open_streams()
        body: dict[int, Any] = {
            Key.SITE_ID: site_id,
            Key.VER_MIN: PROTOCOL_VERSION,
            Key.VER_MAX: PROTOCOL_VERSION,
            Key.SCHEMA_REV: SCHEMA_REV,
        }
        self._send(Priority.CONTROL, Kind.REQUEST, 1, Priority.CONTROL, Action.SITE_HELLO, body)
        self.transmit()
        reply = await asyncio.wait_for(self.hello_answered, MESSAGES[Action.SITE_HELLO].timeout_ms / 1000)
        self.ready = True
        self.pump()
        return reply

    def flight_room(self) -> int:
        """Bytes the lower classes may still hand aioquic: the smaller of the congestion window
        and the flight bound (gateway/pacing.py), less what is in flight, what waits unsent
        in aioquic and a reserve kept for urgent data, so that an urgent relay is never held
        back by a window bulk filled, nor queued at the receiver behind more than about
        `queue_s` of bulk. Nothing in flight: no limit (the window cannot be below one
        datagram's reserve forever)."""
        loss = self._quic._loss
        if not loss.bytes_in_flight:
            return 1 << 30
        held = sum(self.unsent(sid) for sid in self.sids)
        window = loss.congestion_window - self.urgent_reserve
        if self.settings.bulk_queue_ms and not self.uplink.fifo:
            window = min(window, self.flight.bound(self._loop.time()))
        return int(window - loss.bytes_in_flight - held)

    def cap(self, prio: int) -> int:
        """Bytes class `prio` may leave in aioquic unsent. For the lower classes, at most what
        the path delivers in `bulk_queue_ms` (and at least one datagram): aioquic paces its
        packets, so unsent bulk ahead of an urgent relay is time on a slow link (16 KiB is
        6.5 ms at 20 Mbit/s) — the same allowance as the flight bound's."""
        static = self.caps[prio]
        if prio == Priority.URGENT or not self.settings.bulk_queue_ms or self.uplink.fifo:
            return static
        timed = int(self.flight.rate(self._loop.time()) * self.flight.queue_s)
        return max(self._quic._max_datagram_size, min(static, timed))

    def path_state(self) -> dict[str, float]:
        """The uplink path as the sender sees it, for /status and /metrics."""
        loss, now = self._quic._loss, self._loop.time()
        return {
            "cwnd_bytes": loss.congestion_window,
            "bytes_in_flight": loss.bytes_in_flight,
            "flight_bound_bytes": self.flight.bound(now),
            "delivery_rate_bps": round(self.flight.rate(now)),
            "rtt_min_s": loss._rtt_min if loss._rtt_initialized else 0.0,
            "rtt_smoothed_s": loss._rtt_smoothed,
        }

    def unsent(self, sid: int) -> int:
        # aioquic exposes no public per-stream send offset; `highest_offset` of the stream's
        # sender is the end of what it has put on the wire.
        stream = self._quic._streams.get(sid)
        return 0 if stream is None else self.written[sid] - stream.sender.highest_offset

    def pump(self) -> None:
        """Hands aioquic what each class may add now, urgent first, then transmits."""
        self._pump_scheduled = False
        if not self.ready or self.closed.is_set():
            return
        up = self.uplink
        wrote = False
        limit = self.settings.inflight_max_bytes
        ts = proto_ts(time.time())
        trace = up.trace
        traced: list[list[Any]] = []
        for prio in CLASS_ORDER:
            sid = self.sids[prio]
            cap = self.cap(prio)
            if self.pending[sid] and self._feed(sid, cap):
                wrote = True
            while (
                up.unsent[prio]
                and up.inflight_bytes < limit
                and not self.pending[sid]
                and self.unsent(sid) < cap
                and (prio == Priority.URGENT or self.flight_room() > 0)
            ):
                relay = up.take(prio, self.max_relay_bytes[prio])
                assert relay is not None
                self.out_seq[sid] += 1
                env_prio = min(prio, RELAY_DEFAULT_PRIO)
                frame = encode_relay(
                    self.out_seq[sid], relay.relay_id, env_prio, ts, up.site_id, relay.items, len(relay.rows)
                )
                self._write(sid, prefix(frame))
                wrote = True
                if trace is not None and trace.pending and (prio == Priority.URGENT or up.fifo):
                    traced += trace.relayed([r[0] for r in relay.rows], time.perf_counter())
        if wrote:
            self.transmit()
            if traced:
                assert trace is not None
                trace.sent(traced, time.perf_counter())
            # More may fit once aioquic has sent what it holds; let the LAN run first.
            if (any(up.unsent) or any(self.pending.values())) and not self._pump_scheduled:
                self._pump_scheduled = True
                asyncio.get_running_loop().call_soon(self.pump)

    def kick(self) -> None:
        if not self._pump_scheduled and self.ready:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    # ---------------------------------------------------------- receiving

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # aioquic's own three steps, with the bytes that left flight measured in between
        # for the flight bound (aioquic reports no delivery rate).
        loss = self._quic._loss
        before, now = loss.bytes_in_flight, self._loop.time()
        self._quic.receive_datagram(cast(bytes, data), addr, now=now)
        rtt_min = loss._rtt_min if loss._rtt_initialized else 0.0
        self.flight.delivered(max(0, before - loss.bytes_in_flight), before, now, rtt_min)
        self._process_events()
        self.transmit()
        # Acks free aioquic's congestion window and send buffers: feed what waits.
        if self.ready and (any(self.uplink.unsent) or any(self.pending.values())):
            self.kick()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            reader = self.readers.get(event.stream_id)
            if reader is None:
                reader = self.readers[event.stream_id] = StreamReader()
            for raw in reader.feed(event.data):
                self._frame(event.stream_id, raw)
            self.kick()
        elif isinstance(event, ConnectionTerminated):
            log.warning("upstream closed: %s (%s)", event.reason_phrase, event.error_code)
            self.ready = False
            self.closed.set()
            if not self.hello_answered.done():
                self.hello_answered.set_exception(ConnectionError(event.reason_phrase or "connection terminated"))
        elif isinstance(event, HandshakeCompleted):
            log.info("upstream handshake done, ALPN %s", event.alpn_protocol)

    def _frame(self, sid: int, raw: bytes) -> None:
        try:
            f = _core.decode(raw, K_UP)
        except _core.CoreError as e:
            log.warning("upstream frame rejected: %s %s", e.name, e.reason)
            return
        if f.kind == Kind.ACK and f.action == Action.RELAY:
            seqs: list[int] = []
            for rid in [f.msg_id, *cast(list[int], f.body.get(Key.IDS, []))]:
                seqs.extend(self.uplink.acked(rid))
            if seqs:
                self.on_acked(seqs)
        elif f.kind in (Kind.RESPONSE, Kind.ERROR) and f.action == Action.SITE_HELLO:
            if not self.hello_answered.done():
                if f.kind == Kind.RESPONSE:
                    self.hello_answered.set_result(f)
                else:
                    self.hello_answered.set_exception(ConnectionError(f"SiteHello refused: {f.body.get(Key.REASON)}"))
        elif f.kind == Kind.REQUEST:
            asyncio.get_running_loop().create_task(self._answer(sid, f))

    async def _answer(self, sid: int, f: _core.Frame) -> None:
        kind, body = await self.on_request(f)
        if self.closed.is_set():
            return
        if sid in self.class_of:
            self._send(self.class_of[sid], kind, f.msg_id, f.prio, f.action, body)
        else:  # a CSMS command stream (server-initiated): the answer goes back on it
            self.out_seq[sid] = self.out_seq.get(sid, 0) + 1
            frame = _core.encode(kind, self.out_seq[sid], f.msg_id, f.prio, proto_ts(time.time()), f.action, body, K_UP)
            self._quic.send_stream_data(sid, prefix(frame))
        self.transmit()

    def send_relay(self, relay_id: int, prio: int, body: dict[int, Any]) -> bool:
        """Sends a Relay that is not in the outbox (a board request the CSMS answers)."""
        if not self.ready or self.closed.is_set():
            return False
        self._send(prio, Kind.EVENT, relay_id, min(prio, RELAY_DEFAULT_PRIO), Action.RELAY, body)
        self.transmit()
        return True


class UplinkRunner:
    """Keeps one connection up: connect, SiteHello, relay; on loss, back off and resume
    from the outbox rows still owed (nothing in flight is forgotten)."""

    def __init__(self, uplink: Uplink, settings: UplinkSettings, site_id: str,
                 on_acked: Callable[[list[int]], None], on_request: RequestHandler) -> None:  # fmt: skip
        self.uplink = uplink
        self.settings = settings
        self.site_id = site_id
        self.on_acked = on_acked
        self.on_request = on_request
        self.protocol: UpstreamProtocol | None = None
        self.state = "down"
        self.connects = 0
        self.last_error = ""
        self.up_since = 0.0

    def kick(self, now: bool = False) -> None:
        """More rows to relay: pump in the next loop turn, or at once (`now`, urgent rows)."""
        if self.protocol is not None:
            if now and self.protocol.ready:
                self.protocol.pump()
            else:
                self.protocol.kick()

    async def run(self) -> None:
        s = self.settings
        backoff = s.backoff_min_s
        while True:
            self.state = "connecting"
            try:
                async with self._connect() as proto:
                    await asyncio.wait_for(proto.hello(self.site_id), s.connect_timeout_s)
                    self.protocol = proto
                    self.state = "up"
                    self.connects += 1
                    self.up_since = time.time()
                    backoff = s.backoff_min_s
                    log.info("upstream up (%s:%d)", s.host, s.port)
                    await self._keepalive(proto)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure of one connection leads to a reconnect
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("upstream: %s", self.last_error)
            finally:
                self.protocol = None
                self.uplink.reset()
            self.state = "down"
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, s.backoff_max_s)

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[UpstreamProtocol]:
        """aioquic's `connect`, with every wait bounded: the handshake by `connect_timeout_s`
        and the closing handshake by one second, so that neither a peer that never answers
        nor one that refuses us can hold the runner (or the gateway's shutdown)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(loop.getaddrinfo(s.host, s.port, type=socket.SOCK_DGRAM), s.connect_timeout_s)
        host, port = str(infos[0][4][0]), int(infos[0][4][1])
        addr = ("::ffff:" + host if ":" not in host else host, port, 0, 0)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0, 0, 0))
        except OSError:
            sock.close()
            raise
        quic = QuicConnection(configuration=s.quic())
        transport, proto = await loop.create_datagram_endpoint(
            lambda: UpstreamProtocol(
                quic, uplink=self.uplink, settings=s, on_acked=self.on_acked, on_request=self.on_request
            ),
            sock=sock,
        )
        try:
            proto.connect(addr)
            await asyncio.wait_for(proto.wait_connected(), s.connect_timeout_s)
            yield proto
        finally:
            proto.close()
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(proto.wait_closed(), 1.0)
            transport.close()

    async def _keepalive(self, proto: UpstreamProtocol) -> None:
        """PINGs keep a quiet connection alive and find a dead peer within the idle timeout."""
        period = self.settings.idle_timeout_s / 3
        while not proto.closed.is_set():
            try:
                await asyncio.wait_for(proto.closed.wait(), period)
            except TimeoutError:
                proto._quic.send_ping(0)
                proto.transmit()


# ---------------------------------------------------------------- commands (CSMS → site)

SIGNED_ACTIONS = frozenset(
    {Action.UPDATE_FIRMWARE, Action.INSTALL_CERTIFICATE, Action.CERTIFICATE_SIGNED, Action.SET_TARIFF}
)
"""Commands a third party must be able to verify: Ed25519-signed upstream, checked here."""
FORWARDED = frozenset({Action.FIRMWARE_CHUNK, Action.SIGN_CERTIFICATE, Action.GET15118_EV_CERTIFICATE})
"""Board requests the site cannot answer: relayed to the CSMS, answered by a Command."""
SECRET_KEYS = frozenset(k for k, spec in FIELDS.items() if spec.type == "secret")
TOKEN_MEMORY = 100_000
FORWARD_RELAY_BASE = 1 << 52
"""Relay ids of forwarded board requests, far above the outbox's row numbers."""
LOCAL_FALLBACK_SHARE = 0.6
"""Share of a forwarded request's timeout after which the local CSMS answers instead."""


class CommandPath:
    """The command path of docs/upstream.md, gateway side.

    - `handle`: a request from the CSMS. `Command`: inner frame decoded by the core,
      Ed25519 signature and expiry checked, then fanned out (B11): a request inner frame is
      re-sealed per board with its key and counter (plaintext `secret` fields encrypted for
      that board) and each target's result carries the board's response envelope under
      `frame`; a response/error inner frame answers a board request that went upstream
      (its `id` is the board's request id). Empty targets address the site itself. A bare
      `AvailablePower` or `DsoLimit` request is answered with its own response.
    - `board_request`: board requests the local CSMS cannot answer (FirmwareChunk,
      SignCertificate, Get15118EVCertificate; Authorize of a token the site does not know)
      go upstream in a Relay while the uplink is up.
    - `accepted`: plaintext id tokens of accepted frames, added to the Relay items as
      `token_uid`.

    `gw` is the `gateway.service.Gateway`, which makes its command path when it starts.
    """

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.forwarded: dict[tuple[str, int], str | None] = {}
        """(device, request id) of board requests waiting for the CSMS → Authorize token."""
        self.late: dict[tuple[str, int], str | None] = {}
        """The same, for requests the local CSMS answered because the CSMS was too slow."""
        self._next_relay = FORWARD_RELAY_BASE + (int(time.time()) << 16)

    # ---------------------------------------------------------- upstream requests

    def _err(self, code: int, reason: str) -> tuple[int, dict[int, Any]]:
        self.gw.count_name(_core.error_name(code))
        return Kind.ERROR, {Key.ERROR_CODE: code, Key.REASON: reason.encode()[:120].decode(errors="ignore")}

    async def handle(self, f: _core.Frame) -> tuple[int, dict[int, Any]]:
        try:
            if f.action == Action.COMMAND:
                return await self._command(f.body)
            if f.action in (Action.AVAILABLE_POWER, Action.DSO_LIMIT):  # bare requests: the response is the result
                status, reason = await self.gw._site_command(f)
                body: dict[int, Any] = {Key.STATUS: status}
                if reason:
                    body[Key.REASON] = reason[:120]
                return Kind.RESPONSE, body
        except (KeyError, ValueError, TypeError) as e:
            return self._err(ErrorCode.REJECTED, f"malformed request: {e}")
        return self._err(ErrorCode.NOT_SUPPORTED, f"{MESSAGES[f.action].name} is not served by this gateway")

    async def _command(self, body: dict[int, Any]) -> tuple[int, dict[int, Any]]:
        gw = self.gw
        raw = body[Key.FRAME]
        try:
            inner = _core.decode(raw)
        except _core.CoreError as e:
            return self._err(e.code, f"inner frame: {e.reason}")
        now = gw.clock.now()
        sig, signer = body.get(Key.SIGNATURE), body.get(Key.SIGNER)
        if sig is not None or inner.action in SIGNED_ACTIONS:
            pub = gw.cfg.signers.get(str(signer)) if signer is not None else None
            if sig is None or pub is None:
                name = MESSAGES[inner.action].name
                return self._err(ErrorCode.BAD_SIGNATURE, f"{name} must be signed by a known signer")
            try:
                ok = _core.ed25519_verify(pub, raw, sig)
            except _core.SignatureError as e:
                return self._err(ErrorCode.BAD_SIGNATURE, e.reason)
            if not ok:
                return self._err(ErrorCode.BAD_SIGNATURE, f"signature of {signer} does not verify")
        expiry = body.get(Key.EXPIRY)
        if expiry is not None and proto_ts(now) > expiry:
            return self._err(ErrorCode.EXPIRED, f"command expired {proto_ts(now) - expiry} s ago")
        targets: list[str] = list(body[Key.TARGETS])
        if inner.action == Action.UPDATE_FIRMWARE and inner.kind == Kind.REQUEST:
            gw.firmware.manifest(inner.body)  # signed: the chunks the cache takes must add up to it
        timeout = MESSAGES[inner.action].timeout_ms / 1000
        if expiry is not None:
            timeout = min(timeout, max(0.0, expiry + 1 - proto_ts(now)))
        if not targets and inner.action == Action.INSTALL_CERTIFICATE:
            return Kind.RESPONSE, {Key.RESULTS: await self._local_csms_cert(inner, timeout)}
        if not targets and inner.action == Action.SEND_LOCAL_LIST:
            status, reason = await self._local_list(inner.body)
            return Kind.RESPONSE, {Key.RESULTS: [{Key.DEVICE_ID: "", Key.STATUS: status, Key.REASON: reason}]}
        if not targets:
            status, reason = await gw._site_command(inner)
            res: dict[int, Any] = {Key.DEVICE_ID: "", Key.STATUS: status}
            if reason:
                res[Key.REASON] = reason[:120]
            return Kind.RESPONSE, {Key.RESULTS: [res]}
        if inner.kind in (Kind.RESPONSE, Kind.ERROR):
            return Kind.RESPONSE, {Key.RESULTS: [self._answer_board(t, inner, now) for t in targets]}
        first = gw.cfg.fw_first_wave
        if inner.action == Action.UPDATE_FIRMWARE and 0 < first < len(targets):
            return Kind.RESPONSE, {Key.RESULTS: await self._staged(raw, targets, inner, timeout, first)}
        a, b, p = inner.action, inner.body, inner.prio
        results = await asyncio.gather(*(self._deliver(t, a, b, p, timeout) for t in targets))
        return Kind.RESPONSE, {Key.RESULTS: list(results)}

    async def _staged(
        self, raw: bytes, targets: list[str], inner: _core.Frame, timeout: float, first: int
    ) -> list[dict[int, Any]]:
        """M4 staged rollout (`gateway.localcsms.firmware.Rollouts`): the first `first` targets
        get the update, the others once each of those reported Installed or Activated; a
        refusal, a failure status or no final status within `firmware.wave_timeout_s` stops it.
        Persisted, so a restart resumes it; the same Command sent again joins it. The expiry
        bounds the first wave's delivery, the message's own timeout each later board's."""
        gw = self.gw
        later = MESSAGES[inner.action].timeout_ms / 1000
        rollouts: Rollouts = gw.firmware.rollouts
        return await rollouts.run(raw, targets, first, timeout, gw.cfg.fw_wave_timeout_s, later, self._deliver)

    def resume_rollouts(self) -> list[asyncio.Task[Any]]:
        """At start: the rollouts a restart interrupted go on (their records are written on the
        outbox's writer thread, so a board's FirmwareStatus is on disk before it is acked)."""
        rollouts: Rollouts = self.gw.firmware.rollouts
        rollouts.bind(self.gw.committer.run_sync, self._deliver)
        return list(rollouts.resume())

    async def _local_csms_cert(self, inner: _core.Frame, timeout: float) -> list[dict[int, Any]]:
        """M17, a site command: every online board is told to trust the gateway's own
        certificate as its local CSMS (InstallCertificate, cert_type local_csms). The command
        names no certificate of its own (`cert` empty) or exactly the gateway's."""
        gw = self.gw
        own: bytes = gw.local_csms_cert
        b = inner.body
        site: dict[int, Any] = {Key.DEVICE_ID: ""}
        if int(b[Key.CERT_TYPE]) != CertType.LOCAL_CSMS:
            site.update(
                {Key.STATUS: Status.NOT_SUPPORTED, Key.REASON: "site-level InstallCertificate is local_csms only"}
            )
            return [site]
        if not own or len(own) > FIELDS[Key.CERT].max_len:
            site.update({Key.STATUS: Status.REJECTED, Key.REASON: "no local CSMS certificate (of at most 2048 bytes)"})
            return [site]
        if b.get(Key.CERT) and bytes(b[Key.CERT]) != own:
            site.update({Key.STATUS: Status.REJECTED, Key.REASON: "cert is not this gateway's certificate"})
            return [site]
        body: dict[int, Any] = {Key.CERT_TYPE: int(CertType.LOCAL_CSMS), Key.CERT: own}
        boards = sorted(gw.online)
        results = list(
            await asyncio.gather(*(self._deliver(t, inner.action, body, inner.prio, timeout) for t in boards))
        )
        failed = [r[Key.DEVICE_ID] for r in results if r[Key.STATUS] != Status.ACCEPTED]
        site[Key.STATUS] = Status.REJECTED if failed else Status.ACCEPTED
        site[Key.REASON] = (f"not accepted by {','.join(failed)}" if failed else f"{len(boards)} boards")[:120]
        return [site, *results]

    async def _local_list(self, b: dict[int, Any]) -> tuple[int, str]:
        """S2: the CSMS's local list for the site itself (the gateway's offline authorization);
        `entries` is plaintext upstream: a msgpack list of {id_token, auth_status, expiry?}."""
        raw = _core.unpack(b[Key.ENTRIES])
        entries = [(str(e[Key.ID_TOKEN]), int(e[Key.AUTH_STATUS]), e.get(Key.EXPIRY)) for e in raw]
        full = int(b[Key.UPDATE_TYPE]) == 0
        await self.gw.committer.run_sync(lambda: self.gw.auth.update_list(int(b[Key.LIST_VERSION]), full, entries))
        return Status.ACCEPTED, f"{len(entries)} tokens in the site's local list"

    @staticmethod
    def _seal_body(link: Any, body: dict[int, Any]) -> dict[int, Any]:
        """The inner body for one board: plaintext secret fields encrypted under its E_dn and
        the `seq` its next frame carries (call right before sealing, no await between)."""
        if not SECRET_KEYS.intersection(body):
            return body
        seq = link.tx.seq
        out = dict(body)
        for k in SECRET_KEYS.intersection(body):
            v = body[k]
            plain = v.encode() if isinstance(v, str) else bytes(v)
            out[k] = _core.aes_ctr(link.e_dn, seq, k, plain)
        return out

    def _answer_board(self, device_id: str, inner: _core.Frame, now: float) -> dict[int, Any]:
        """The CSMS answers a board request that went upstream: re-sealed as its response."""
        gw = self.gw
        key = (device_id, inner.msg_id)
        late = key not in self.forwarded and key in self.late
        token = self.late.pop(key) if late else self.forwarded.pop(key, None)
        if inner.kind == Kind.RESPONSE and inner.action == Action.AUTHORIZE and token is not None:
            b = inner.body
            gw.auth.remember(token, int(b[Key.AUTH_STATUS]), b.get(Key.EXPIRY))
        if inner.kind == Kind.RESPONSE and inner.action == Action.FIRMWARE_CHUNK:
            gw.firmware.put(inner.body)  # M4: later boards of the site are served from the cache
        if late:  # the board already has the local answer; the CSMS's only fills the cache
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "answered locally after timeout"}
        conn = gw.online.get(device_id)
        if conn is None:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "board offline"}
        link = conn.link
        if inner.kind == Kind.ERROR:
            b = inner.body
            frame = link.error(
                int(b[Key.ERROR_CODE]), str(b.get(Key.REASON, "")), inner.msg_id, inner.prio, inner.action, now
            )
        else:
            frame = link.respond(inner.msg_id, inner.prio, inner.action, self._seal_body(link, inner.body), now)
        conn.send_one(frame)
        return {Key.DEVICE_ID: device_id, Key.STATUS: Status.ACCEPTED}

    async def _deliver(
        self, device_id: str, action: int, body: dict[int, Any], prio: int, timeout: float
    ) -> dict[int, Any]:
        """Re-seals the command for one board and waits for its answer; a board offline now
        gets it if it comes back before the deadline (B16)."""
        gw = self.gw
        deadline = time.monotonic() + timeout
        conn = gw.online.get(device_id)
        if conn is None:
            ev = gw.came_online.setdefault(device_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout)
            conn = gw.online.get(device_id)
            if conn is None:
                return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "board offline until expiry"}
        link = conn.link
        if link.tx is None:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.FAILED, Key.REASON: "link not open"}
        msg_id, frame = link.request(action, self._seal_body(link, body), gw.clock.now(), prio)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        gw.pending_cmds[link.idx, msg_id] = fut
        conn.send_one(frame)
        try:
            raw = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return {
                Key.DEVICE_ID: device_id,
                Key.STATUS: Status.FAILED,
                Key.REASON: "TIMEOUT: no answer from the board",
            }
        except ConnectionError:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.FAILED, Key.REASON: "link lost before the answer"}
        finally:
            gw.pending_cmds.pop((link.idx, msg_id), None)
        answer = _core.decode(raw)
        out: dict[int, Any] = {Key.DEVICE_ID: device_id, Key.FRAME: raw}
        if answer.kind == Kind.ERROR:
            out[Key.STATUS] = Status.REJECTED
            out[Key.REASON] = str(answer.body.get(Key.REASON, ""))[:120]
        else:
            out[Key.STATUS] = int(answer.body.get(Key.STATUS, Status.ACCEPTED))
            if Key.REASON in answer.body:
                out[Key.REASON] = answer.body[Key.REASON]
        return out

    # ---------------------------------------------------------- board side

    def accepted(self, rows: list[tuple[str, int, int, bytes]]) -> None:
        """Frames about to be stored: remembers the plaintext of their id tokens (the link
        that accepted them holds E_up) for the Relay items."""
        tokens = self.gw.uplink.token_uids
        for device, msg_id, _prio, frame in rows:
            if b"\x10\xc4" not in frame:  # key 16 (id_token) followed by a bin8: cheap filter
                continue
            conn = self.gw.online.get(device)
            if conn is None or not conn.link.e_up:
                continue
            f = _core.decode(frame)
            ct = f.body.get(Key.ID_TOKEN)
            if isinstance(ct, bytes):
                tokens[device, msg_id] = conn.link.decrypt(f.seq, Key.ID_TOKEN, ct).decode("utf-8", "replace")
        while len(tokens) > TOKEN_MEMORY:
            del tokens[next(iter(tokens))]

    def board_request(self, conn: Any, frame: bytes, now: float) -> bool:
        """Relays a board request the site cannot answer to the CSMS; False to answer locally."""
        gw = self.gw
        proto = gw.runner.protocol if gw.runner is not None else None
        if proto is None or not proto.ready:
            return False
        f = _core.decode(frame)
        link = conn.link
        token: str | None = None
        if f.action == Action.AUTHORIZE:
            ct = f.body.get(Key.ID_TOKEN)
            if not isinstance(ct, bytes):
                return False
            token = link.decrypt(f.seq, Key.ID_TOKEN, ct).decode("utf-8", "replace")
            if gw.auth.authorize(token, proto_ts(now)).source in ("list", "cache"):
                return False  # known here: the local CSMS answers at once
        elif f.action not in FORWARDED:
            return False
        elif f.action == Action.FIRMWARE_CHUNK and gw.firmware.has(int(f.body[Key.IMAGE_ID])):
            return False  # a verified image in the site's cache: the local CSMS serves it
        item: dict[int, Any] = {Key.DEVICE_ID: link.device_id, Key.FRAME: frame}
        if token is not None:
            item[Key.TOKEN_UID] = token
        self._next_relay += 1
        if not proto.send_relay(self._next_relay, f.prio, {Key.SITE_ID: gw.cfg.site_id, Key.FRAMES: [item]}):
            return False
        self.forwarded[link.device_id, f.msg_id] = token
        while len(self.forwarded) > TOKEN_MEMORY:
            del self.forwarded[next(iter(self.forwarded))]
        # The board waits for its answer only for the message's timeout (B1): when the CSMS
        # has not answered well before that (uplink cut but not yet noticed, slow CSMS), the
        # local CSMS answers instead (B18).
        delay = MESSAGES[f.action].timeout_ms / 1000 * LOCAL_FALLBACK_SHARE
        asyncio.get_running_loop().call_later(delay, self._fall_back, conn, frame, link.device_id, f.msg_id)
        return True

    def _fall_back(self, conn: Any, frame: bytes, device_id: str, msg_id: int) -> None:
        key = (device_id, msg_id)
        if key not in self.forwarded:
            return  # the CSMS answered in time
        self.late[key] = self.forwarded.pop(key)
        while len(self.late) > TOKEN_MEMORY:
            del self.late[next(iter(self.late))]
        if self.gw.online.get(device_id) is conn:
            self.gw.answer_locally(conn, frame, self.gw.clock.now())

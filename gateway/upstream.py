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
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived

from gateway import _core
from gateway.link import proto_ts
from gateway.outbox import Row
from gateway.schema import MESSAGES, PROTOCOL_VERSION, SCHEMA_REV, Action, Key, Kind, Priority
from gateway.upstream_wire import ALPN, CLASS_ORDER, K_UP, StreamReader, prefix

log = logging.getLogger("gateway.upstream")

RELAY_DEFAULT_PRIO = MESSAGES[Action.RELAY].priority
RELAY_HEAD = 48
"""Envelope, tag and site id overhead of a Relay, in bytes (upper bound)."""
RELAY_ITEM = 12
"""Per-frame overhead inside a Relay (map, keys, length prefixes), upper bound."""
MAX_RELAY_BYTES = _core.MAX_FRAME
"""The Rust core decodes frames up to MAX_FRAME only, so a Relay stays within it (both
ends decode with the core); docs/upstream.md allows 1 MiB once the core does too."""


@dataclass
class Relay:
    relay_id: int
    prio: int
    rows: list[Row]
    nbytes: int


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

    def add(self, rows: list[Row]) -> None:
        for r in rows:
            c = Priority.TELEMETRY if self.fifo else r.prio
            self.unsent[c].append(r)
            self.unsent_bytes[c] += len(r.frame)

    def backlog(self) -> int:
        return sum(len(q) for q in self.unsent) + sum(len(r.rows) for r in self.inflight.values())

    def depth(self, prio: int) -> int:
        return len(self.unsent[prio])

    def take(self, prio: int, max_bytes: int) -> Relay | None:
        """The next relay of class `prio`: up to `max_frames` rows and about `max_bytes`
        bytes of frames (the first row always comes)."""
        q = self.unsent[prio]
        if not q:
            return None
        rows: list[Row] = []
        n = 0
        wire = RELAY_HEAD + len(self.site_id)
        while q and len(rows) < self.max_frames:
            r = q[0]
            cost = len(r.frame) + len(r.device) + RELAY_ITEM
            if rows and wire + cost > max_bytes:
                break
            q.popleft()
            rows.append(r)
            n += len(r.frame)
            wire += cost
        self.unsent_bytes[prio] -= n
        relay = Relay(rows[0].seq, prio, rows, n)
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
        return {
            Key.SITE_ID: self.site_id,
            Key.FRAMES: [{Key.DEVICE_ID: r.device, Key.FRAME: r.frame} for r in relay.rows],
        }


@dataclass(frozen=True)
class UplinkSettings:
    host: str
    port: int
    server_name: str
    ca_file: str
    cert_file: str
    key_file: str
    bulk_unsent_max: int = 4096
    inflight_max_bytes: int = 4 << 20
    backoff_min_s: float = 0.1
    backoff_max_s: float = 30.0
    idle_timeout_s: float = 10.0

    def quic(self) -> QuicConfiguration:
        qc = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=self.server_name,
            verify_mode=ssl.CERT_REQUIRED,
            idle_timeout=self.idle_timeout_s,
            max_datagram_frame_size=None,
        )
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
        self._pump_scheduled = False
        self.caps = [1 << 20, 64 << 10, 64 << 10, settings.bulk_unsent_max]
        self.max_relay_bytes = [
            MAX_RELAY_BYTES,
            MAX_RELAY_BYTES,
            MAX_RELAY_BYTES,
            min(MAX_RELAY_BYTES, settings.bulk_unsent_max),
        ]

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

    def _send(self, prio: int, kind: int, msg_id: int, env_prio: int, action: int, body: dict[int, Any]) -> None:
        sid = self.sids[prio]
        self.out_seq[sid] += 1
        frame = _core.encode(kind, self.out_seq[sid], msg_id, env_prio, proto_ts(time.time()), action, body, K_UP)
        data = prefix(frame)
        self._quic.send_stream_data(sid, data)
        self.written[sid] += len(data)

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
        for prio in CLASS_ORDER:
            sid = self.sids[prio]
            while up.unsent[prio] and up.inflight_bytes < limit and self.unsent(sid) < self.caps[prio]:
                relay = up.take(prio, self.max_relay_bytes[prio])
                assert relay is not None
                env_prio = min(prio, RELAY_DEFAULT_PRIO)
                self._send(prio, Kind.EVENT, relay.relay_id, env_prio, Action.RELAY, up.relay_body(relay))
                wrote = True
        if wrote:
            self.transmit()
            # More may fit once aioquic has sent what it holds; let the LAN run first.
            if any(up.unsent) and not self._pump_scheduled:
                self._pump_scheduled = True
                asyncio.get_running_loop().call_soon(self.pump)

    def kick(self) -> None:
        if not self._pump_scheduled and self.ready:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    # ---------------------------------------------------------- receiving

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
        prio = self.class_of.get(sid, f.prio)
        self._send(prio, kind, f.msg_id, f.prio, f.action, body)
        self.transmit()


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

    def kick(self) -> None:
        if self.protocol is not None:
            self.protocol.kick()

    async def run(self) -> None:
        s = self.settings
        backoff = s.backoff_min_s
        while True:
            self.state = "connecting"
            try:
                async with connect(
                    s.host,
                    s.port,
                    configuration=s.quic(),
                    create_protocol=lambda *a, **k: UpstreamProtocol(
                        *a, uplink=self.uplink, settings=s, on_acked=self.on_acked, on_request=self.on_request, **k
                    ),
                ) as proto:
                    assert isinstance(proto, UpstreamProtocol)
                    await proto.hello(self.site_id)
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

    async def _keepalive(self, proto: UpstreamProtocol) -> None:
        """PINGs keep a quiet connection alive and find a dead peer within the idle timeout."""
        period = self.settings.idle_timeout_s / 3
        while not proto.closed.is_set():
            try:
                await asyncio.wait_for(proto.closed.wait(), period)
            except TimeoutError:
                proto._quic.send_ping(0)
                proto.transmit()

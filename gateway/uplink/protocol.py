"""One QUIC connection to the CSMS, gateway side: the asyncio glue of the uplink.

Rule: urgent data never waits behind more than one chunk of any lower class in the gateway.
aioquic has no stream priorities and takes any amount of data into its send buffers, so
priority is enforced above it: a class hands aioquic more data only while what it handed
over and aioquic has not sent yet is under that class's cap, and the lower classes only
while the path has room (gateway/pacing.py decides both, from the figures
`quic_internals` reads). An urgent relay is handed over at once, and each `transmit` builds
few packets, so the event loop returns quickly to the LAN.

Mechanism: four long-lived streams, one per class, opened in `CLASS_ORDER`. `pump` takes
Relays from the `Uplink` (sans I/O) urgent first, encodes them (`encode_relay`) and feeds
them; bytes a stream may not hand over yet wait in `pending`, one cap at a time. The glue
itself only feeds datagrams in (measuring what left flight for the flight bound), drains
aioquic's events into frames, transmits, and re-arms one callback: the pump, scheduled
once per loop turn while something waits. Upstream requests go to `on_request`, acks of
Relays to `on_acked`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived

from gateway import _core
from gateway.config import UpstreamConfig
from gateway.link import proto_ts
from gateway.pacing import Pacer
from gateway.protocol.upstream_wire import CLASS_ORDER, K_UP, StreamReader, prefix
from gateway.schema import MESSAGES, PROTOCOL_VERSION, SCHEMA_REV, Action, Key, Kind, Priority
from gateway.uplink.quic_internals import QuicInternals
from gateway.uplink.relay import RELAY_DEFAULT_PRIO, Uplink, encode_relay
from gateway.uplink.settings import class_caps, relay_max_bytes

log = logging.getLogger("gateway.uplink")

RequestHandler = Callable[[_core.Frame], Awaitable[tuple[int, dict[int, Any]]]]
"""Answers an upstream request: (kind RESPONSE or ERROR, body)."""


class UpstreamProtocol(QuicConnectionProtocol):
    """One QUIC connection to the CSMS, gateway side."""

    def __init__(self, *args: Any, uplink: Uplink, up: UpstreamConfig,
                 on_acked: Callable[[list[int]], None], on_request: RequestHandler, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.uplink = uplink
        self.on_acked = on_acked
        self.on_request = on_request
        self.inflight_max_bytes = up.inflight_max_bytes
        self.sids: list[int] = []
        self.class_of: dict[int, int] = {}
        self.readers: dict[int, StreamReader] = {}
        self.out_seq: dict[int, int] = {}
        self.written: dict[int, int] = {}
        self.ready = False
        self.site_events = 0
        """Site events sent on this connection (their message ids)."""
        self.closed = asyncio.Event()
        self.close_reason = ""
        """Why the connection ended, as the peer or aioquic said (empty while it lives)."""
        self.hello_answered: asyncio.Future[_core.Frame] = asyncio.get_running_loop().create_future()
        # The runner may have given up waiting (connect timeout) before the link dies: the
        # outcome is then read here, so that asyncio does not report it as never retrieved.
        self.hello_answered.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pump_scheduled = False
        self.path = QuicInternals(self._quic)
        self.pacer = Pacer(self.path.datagram_size, class_caps(up), up.bulk_queue_ms / 1000,
                           bounded=bool(up.bulk_queue_ms) and not uplink.fifo)  # fmt: skip
        self.max_relay_bytes = relay_max_bytes(up)
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
        """Bytes the lower classes may still hand aioquic (`Pacer.room`): what is held unsent
        in aioquic counts as in flight."""
        path = self.path
        in_flight = path.in_flight()
        if not in_flight:
            return 1 << 30  # as Pacer.room, without the sum
        held = sum(self.unsent(sid) for sid in self.sids)
        return self.pacer.room(self._loop.time(), in_flight, path.cwnd(), held)

    def cap(self, prio: int) -> int:
        """Bytes class `prio` may leave in aioquic unsent (`Pacer.cap`)."""
        return self.pacer.cap(prio, self._loop.time())

    def path_state(self) -> dict[str, float]:
        """The uplink path as the sender sees it, for /status and /metrics."""
        path, flight, now = self.path, self.pacer.flight, self._loop.time()
        return {
            "cwnd_bytes": path.cwnd(),
            "bytes_in_flight": path.in_flight(),
            "flight_bound_bytes": flight.bound(now),
            "delivery_rate_bps": round(flight.rate(now)),
            "rtt_min_s": path.rtt_min(),
            "rtt_smoothed_s": path.rtt_smoothed(),
        }

    def unsent(self, sid: int) -> int:
        """Bytes of stream `sid` handed to aioquic and not yet on the wire."""
        return self.written[sid] - self.path.sent(sid)

    def pump(self) -> None:
        """Hands aioquic what each class may add now, urgent first, then transmits."""
        self._pump_scheduled = False
        if not self.ready or self.closed.is_set():
            return
        up = self.uplink
        wrote = False
        limit = self.inflight_max_bytes
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

    def ping_now(self) -> None:
        """A PING, sent now (the runner's keepalive; aioquic's own `ping` waits for the answer)."""
        self._quic.send_ping(0)
        self.transmit()

    # ---------------------------------------------------------- receiving

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # aioquic's own three steps, with the bytes that left flight measured in between
        # for the flight bound (aioquic reports no delivery rate).
        path = self.path
        before, now = path.in_flight(), self._loop.time()
        self._quic.receive_datagram(cast(bytes, data), addr, now=now)
        self.pacer.flight.delivered(max(0, before - path.in_flight()), before, now, path.rtt_min())
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
            why = event.reason_phrase or ("closed by the peer" if event.error_code == 0 else "no reason given")
            log.warning("upstream closed: %s (QUIC error code %s)", why, event.error_code)
            self.close_reason = f"{why} (QUIC error code {event.error_code})"
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

    def send_event(self, action: int, body: dict[int, Any]) -> bool:
        """Sends a site event (SiteForecast, BoardsReport) on its action's class, outside the
        outbox: nothing is owed if the connection is lost (a newer report supersedes it)."""
        if not self.ready or self.closed.is_set():
            return False
        prio = int(MESSAGES[action].priority)
        self.site_events += 1
        self._send(prio, Kind.EVENT, self.site_events, prio, action, body)
        self.transmit()
        return True

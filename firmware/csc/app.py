"""The asyncio glue: TCP to the gateway, the clock, and the services.

The link (link.py) and the services are driven from here and never touch a socket or
a clock themselves: the receive task feeds bytes into the FrameSplitter and the link,
the send task seals queued messages into the link's buffer and writes them, the tick
task reads the HAL and steps the services with `now` (ticks) and the wall clock.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

import asyncio
import os

from micropython import const

from . import link as L  # noqa: N812
from . import store
from .frame import FrameSplitter
from .ids import Ids
from .msgpack import FrameError, Map
from .outbox import SECURITY, Outbox
from .schema import (
    A_BOOT_NOTIFICATION,
    A_HEARTBEAT,
    A_SECURITY_EVENT,
    E_NOT_SUPPORTED,
    EPOCH_UNIX,
    F_EVENT_NAME,
    F_FW_VERSION,
    F_INTERVAL_S,
    F_MODEL,
    F_REASON,
    F_REGISTRATION,
    F_SERIAL,
    F_STATUS,
    F_TIME,
    F_TIME_MS,
    F_VENDOR,
    REGISTRATION_ACCEPTED,
    REGISTRATION_REJECTED,
)
from .sendq import SendQueue

FW_VERSION = "1.0.0"
TICK_MS = const(50)
WINDOW = const(8)  # durable records in flight


class Refused(Exception):
    """Raised by a command handler: the command is impossible; `reason` says why."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def status(code, reason=None):
    b = Map()
    b[F_STATUS] = code
    if reason:
        b[F_REASON] = reason
    return b


class App:
    def __init__(self, hal, device_id, factory_key, gateway, note=None):
        self.hal = hal
        self.device_id = device_id
        self.factory_key = factory_key
        self.gateway = gateway  # (host, port); a Migrate stores another
        self.note = note or (lambda kind, data=None: None)
        self.ids = Ids()
        self.outbox = Outbox()
        self.q = SendQueue(hal.ticks_ms)
        self.link = L.Link(self.q, device_id, FW_VERSION)
        self.link.load = self.outbox.load  # stored events are not kept in RAM while in flight
        self.split = FrameSplitter()
        self.handlers = {}  # action -> fn(body, seq) -> response body (or raises Refused)
        self.ev_handlers = {}
        self.pending = {}  # our request id -> fn(body or None, error code)
        self.flying = {}  # outbox ids in flight
        self.registered = False
        self.interval_s = 300
        self.online = False
        self.wake = asyncio.Event()
        self._t_s = int(__import__("time").time()) - EPOCH_UNIX
        self._t_ticks = hal.ticks_ms()
        self._hb_due = 0
        self._w = None
        self.stop_reason = None
        self._reconnect = False  # set when the link must be dropped and opened again
        g = store.load(store.path("gw"))
        if g:
            self.gateway = (g[0], g[1])
        self.services = []
        from .services import load_all

        load_all(self)

    # ---------------------------------------------------------------- clock
    def now(self):
        return self.hal.ticks_ms()

    def time(self):
        """Seconds since 2024-01-01 (the gateway's time once synchronized, B13)."""
        return self._t_s + L.ticks_diff(self.hal.ticks_ms(), self._t_ticks) // 1000

    def set_time(self, t, ms=0):
        self._t_s = t
        self._t_ticks = L.ticks_diff(self.hal.ticks_ms(), ms)

    # ---------------------------------------------------------------- registry
    def on(self, action, fn):
        self.handlers[action] = fn

    def on_event(self, action, fn):
        self.ev_handlers[action] = fn

    def kick(self):
        self.wake.set()

    # ---------------------------------------------------------------- sending
    def emit(self, action, body, cls=None):
        """Publish an event. With a value class (outbox.TX …) it is durable: on flash
        first, then sent, removed when acked; returns False when the outbox refused it."""
        mid = self.ids.next()
        if cls is None:
            ok = self.link.event(mid, action, body, self.now())
            self.kick()
            return ok
        ok = self.outbox.put(mid, action, L.default_prio(action), cls, body)
        if self.outbox.shed and action != A_SECURITY_EVENT:
            n = self.outbox.shed
            self.outbox.shed = 0
            self.security_event("OutboxShed", "%d telemetry records dropped, outbox full" % n)
        if not ok:
            self.note("outbox_refused", {"action": action})
        self.note("stored", {"id": mid, "action": action, "ok": ok})
        self.pump()
        return ok

    def security_event(self, name, reason=None):
        b = Map()
        b[F_EVENT_NAME] = name
        b[F_TIME] = self.time()
        if reason:
            b[F_REASON] = reason[:120]
        self.emit(A_SECURITY_EVENT, b, SECURITY)

    def request(self, action, body, cb, prio=None):
        """Send a request of ours; cb(body, 0) on the response, cb(None, code) on failure."""
        if not self.online:
            cb(None, -1)
            return
        mid = self.ids.next()
        self.pending[mid] = cb
        self.link.request(mid, action, body, self.now(), prio)
        self.kick()

    def pump(self):
        """Send stored records (in id order) while fewer than WINDOW are unacknowledged."""
        if not self.online:
            return
        for r in self.outbox.index:
            if len(self.flying) >= WINDOW:
                break
            mid = r[0]
            if mid in self.flying:
                continue
            body = self.outbox.load(mid)
            if body is None:
                continue
            self.flying[mid] = 1
            self.link.event(mid, r[1], body, self.now(), r[2], True)
        self.kick()

    # ---------------------------------------------------------------- link events
    def _drain(self):
        link = self.link
        while True:
            ev = link.next_event()
            if ev is None:
                return
            t = ev[0]
            if t == L.REQUEST_RECEIVED:
                self._command(ev[1], ev[2], ev[3], ev[4], ev[5])
            elif t == L.ACKED:
                self.outbox.remove(ev[1])
                self.flying.pop(ev[1], None)
                self.note("acked", {"id": ev[1]})
                self.pump()
            elif t == L.RESPONSE_RECEIVED:
                cb = self.pending.pop(ev[1], None)
                if cb:
                    cb(ev[3], 0)
            elif t == L.EVENT_RECEIVED:
                h = self.ev_handlers.get(ev[2])
                if h:
                    h(ev[3])
            elif t == L.FAILED:
                mid = ev[1]
                cb = self.pending.pop(mid, None)
                if cb:
                    cb(None, ev[2])
                elif mid in self.flying:
                    # the gateway refused a stored record for good: keep the queue moving
                    self.flying.pop(mid)
                    self.outbox.remove(mid)
                    self.note("record_refused", {"id": mid, "code": ev[2]})
                    self.pump()
            elif t == L.OPENED:
                if not self._reconnect:  # not when a device key just came (onboarding)
                    self._opened(ev[1])
            elif t == L.KEY_PROVISIONED:
                store.write_atomic(store.path("key"), ev[1])
                self.note("key_provisioned")
                self._reconnect = True
            elif t == L.CLOSED:
                self.note("link_closed", {"reason": ev[1]})
                self._reconnect = True
        # done

    def _command(self, mid, action, prio, body, seq):
        h = self.handlers.get(action)
        if h is None:
            self.link.refuse(mid, action, prio, "not supported by this board", E_NOT_SUPPORTED)
        else:
            try:
                res = h(body, seq)
            except Refused as e:
                self.link.refuse(mid, action, prio, e.reason)
            else:
                self.link.respond(mid, action, prio, res)
        self.note("command", {"action": action, "id": mid})
        self.kick()

    def _opened(self, body):
        self.online = True
        self.set_time(body[F_TIME], body.get(F_TIME_MS, 0))
        self.interval_s = body.get(F_INTERVAL_S, self.interval_s) or self.interval_s
        self.note("online", {"time": body[F_TIME]})
        self.boot_notification()
        self.pump()
        for s in self.services:
            s.online()

    def boot_notification(self):
        b = Map()
        b[F_MODEL] = self.hal.model
        b[F_VENDOR] = self.hal.vendor
        b[F_SERIAL] = self.hal.serial
        b[F_FW_VERSION] = FW_VERSION
        self.request(A_BOOT_NOTIFICATION, b, self._booted)

    def _booted(self, body, err):
        if body is None:
            return
        self.registered = body[F_REGISTRATION] == REGISTRATION_ACCEPTED
        self.rejected = body[F_REGISTRATION] == REGISTRATION_REJECTED
        self.interval_s = body[F_INTERVAL_S] or self.interval_s
        self.set_time(body[F_TIME])
        self._hb_due = L.ticks_diff(self.now(), -self.interval_s * 1000)
        self.note("registration", {"status": body[F_REGISTRATION]})

    def log(self, text, level=5):
        """A line for the board's log (the log service keeps it when present)."""
        a = getattr(self, "admin", None)
        if a is not None:
            a.log(text, level)

    def _heartbeat(self, body, err):
        if body is not None:
            self.set_time(body[F_TIME])

    # ---------------------------------------------------------------- tasks
    def key(self):
        k = store.read(store.path("key"))
        if k and len(k) == 32:
            return k, False
        return self.factory_key, True

    async def _rx(self, r):
        split = self.split
        link = self.link
        while True:
            n = await r.readinto(split.space())
            if not n:
                return
            split.wrote(n)
            try:
                f = split.next()
                while f is not None:
                    link.receive(f, self.now())
                    self._drain()
                    f = split.next()
            except FrameError:  # the stream cannot be re-synchronised (OVERSIZE)
                return

    async def _tx(self, w):
        link = self.link
        while True:
            end = link.transmit(self.now(), self.time())
            if end:
                try:
                    w.write(link.tx.mv[:end])
                    await w.drain()
                except OSError:  # connection refused or reset
                    return
                continue
            if self._reconnect:
                return
            self.wake.clear()
            try:
                # MicroPython's asyncio has wait_for_ms (asyncio/funcs.py); the stubs copy CPython's API
                await asyncio.wait_for_ms(self.wake.wait(), TICK_MS)  # type: ignore[attr-defined]
            except asyncio.TimeoutError:
                pass

    async def run_link(self):
        backoff = 200
        while True:
            self._reconnect = False
            self.split.start = self.split.end = 0
            self.split.failed = False
            try:
                r, w = await asyncio.open_connection(self.gateway[0], self.gateway[1])
            except OSError:
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, 5000)
                continue
            backoff = 200
            k, factory = self.key()
            self.link.connect(self.now(), k, os.urandom(16), self.ids.next(), factory)
            rx = asyncio.create_task(self._rx(r))
            tx = asyncio.create_task(self._tx(w))
            while not self._reconnect and not rx.done() and not tx.done():
                await asyncio.sleep_ms(TICK_MS)
            rx.cancel()
            tx.cancel()
            try:
                w.close()
                await w.wait_closed()
            except OSError:
                pass
            self.online = False
            self.flying = {}
            for mid in list(self.pending):
                self.pending.pop(mid)(None, -1)
            self.link.close()
            self.note("offline")
            await asyncio.sleep_ms(100)

    def tick(self):
        now = self.now()
        self.link.handle_timer(now)
        self._drain()
        if self.online and self.registered and L.ticks_diff(now, self._hb_due) >= 0:
            self._hb_due = now + self.interval_s * 1000
            self.request(A_HEARTBEAT, {}, self._heartbeat)
        for s in self.services:
            s.tick(now)

    async def run_ticks(self):
        while True:
            try:
                self.tick()
            except Exception as e:  # a service bug must not stop the board
                self.note("error", {"where": "tick", "what": repr(e)})
            await asyncio.sleep_ms(TICK_MS)

    async def main(self, extra=()):
        for s in self.services:
            s.boot()
        tasks = [asyncio.create_task(self.run_link()), asyncio.create_task(self.run_ticks())]
        for c in extra:
            tasks.append(asyncio.create_task(c))
        await tasks[0]

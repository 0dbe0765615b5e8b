"""The asyncio glue: TCP to the gateway, the clock, and the services.

The link (link.py) and the services are driven from here and never touch a socket or
a clock themselves: the receive task feeds bytes into the FrameSplitter and the link; the
connecting task (`run_link`) then sends: it writes what the link seals, woken by `kick()`
when something was queued and by every tick; the tick task reads the HAL and steps the
services with `now` (ticks) and the wall clock. No task or timeout object is made per tick.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

import asyncio
import os
import socket
from errno import EINPROGRESS

from micropython import const

# Every name here is an entry of this module's globals (heap on a board): what only a rare
# method or the constructor uses is imported there (the schema's tables, Map, FW_VERSION, …)
from . import link as L  # noqa: N812
from . import store
from .msgpack import FrameError
from .outbox import SECURITY, Outbox
from .schema import (
    A_BOOT_NOTIFICATION,
    A_CERTIFICATE_SIGNED,
    A_CLEAR_MONITORS,
    A_DELETE_CERTIFICATE,
    A_GET_INSTALLED_CERTIFICATES,
    A_HEARTBEAT,
    A_INSTALL_CERTIFICATE,
    A_OCSP_RESPONSE,
    A_REVOKE_CERTIFICATE,
    A_SECURITY_EVENT,
    A_SET_MONITORS,
    E_NOT_SUPPORTED,
    EPOCH_UNIX,
    F_EVENT_NAME,
    F_FW_VERSION,
    F_ID_FLOOR,
    F_INTERVAL_S,
    F_MODEL,
    F_REASON,
    F_REGISTRATION,
    F_SERIAL,
    F_TIME,
    F_TIME_MS,
    F_VENDOR,
    REGISTRATION_ACCEPTED,
    STOP_REASON_OTHER,
    TX_TRIGGER_ABNORMAL_CONDITION,
)
from .sendq import RX, URGENT, SendQueue

TICK_MS = const(50)
_BOOT_RETRY_MS = const(30000)  # a BootNotification left unanswered is sent again after this
_HOLD_MAX_MS = const(8000)  # the longest wait before a Hello again after the gateway refused one
WINDOW = const(8)  # durable records in flight
# MicroPython's asyncio core, which `import asyncio` loads: the board waits on its socket through the
# core's I/O queue and parks the sender as a task, as asyncio's own Stream and Event do, without
# their modules (stream 928 B and event 560 B of heap on the board image; CPython, for tooling: None)
_core = getattr(asyncio, "core", None)


def wait_io(s, write):
    """Awaited: until the stream `s` can be read (`write` 0) or written (1) without blocking, by
    asyncio's I/O queue (the task is parked and its poller wakes it: what asyncio's Stream does)."""
    if write:
        _core._io_queue.queue_write(s)
    else:
        _core._io_queue.queue_read(s)
    yield


def park(app):
    """Awaited by the sender: until the next `app.kick()` (asyncio's Event.wait, without its module;
    a function of the module rather than a method: one entry fewer in App's method table)."""
    app._parked = _core.cur_task
    yield


def _built(app, name):
    # the service of class `name` among those built (security and monitoring: on their first use)
    for s in app.services:
        if type(s).__name__ == name:
            return s
    return None


class App:
    def __init__(self, hal, device_id, factory_key, gateway, note, slots):
        from . import FW_VERSION

        self.hal = hal
        # the board's loader: its firmware slots and the keys that sign updates (the firmware
        # update service, M4); None on a board that cannot install an update
        self.slots = slots
        self.factory_key = factory_key
        self.gateway = gateway  # (host, port); a Migrate stores another
        self.note = note or (lambda kind, data=None: None)
        self.outbox = Outbox()  # and the message ids: self.outbox.next() (outbox.py)
        q = SendQueue(hal.ticks_ms)
        self.link = L.Link(q, device_id, FW_VERSION)
        self.link.load = self.outbox.load  # stored events are not kept in RAM while in flight
        self.link.anchor = store.read(store.path("anchor"))  # M14/M17 (services/security.py)
        self.pending = {}  # our request id -> fn(body or None, error code)
        self.flying = {}  # outbox ids in flight
        # M13: the CSMS's last decision, on flash: a board that reboots offline obeys it still
        self.registered = store.load(store.path("reg"), None) == REGISTRATION_ACCEPTED
        self._boot_due = None  # when to ask again (BootNotification) while not accepted
        self._hold_ms = 0  # extra wait before reconnecting after the gateway refused our Hello
        self.interval_s = 300
        self.online = False
        self._parked = None  # the sender's task while it waits for kick() (`_park`)
        self._t_s = int(__import__("time").time()) - EPOCH_UNIX
        self._t_ticks = hal.ticks_ms()
        self._hb_due = 0
        # the link must be dropped and opened again: True (1), or 2 for a soft reset (M5): the
        # services are built again once the link is down
        self._reconnect = 0
        self.version = FW_VERSION  # of the code that runs: the factory's or the slot's the loader booted
        # why the board booted (BootNotification, M5): what the reset before wrote, else a power-up
        self.boot_reason = store.load(store.path("bootr"), None) or "PowerUp"
        store.remove(store.path("bootr"))
        g = store.load(store.path("gw"), None)
        if g:
            self.gateway = (g[0], g[1])
        self.services = []
        self._build_services()

    # ---------------------------------------------------------------- services
    def _build_services(self):
        """The services built at boot, one per feature (csc/services/); the certificate and
        monitor services are built on their first command instead (`security()`,
        `monitoring()`), so their code costs no heap before."""
        # `from .services import auth`, not `from .services.auth import Auth`: the relative
        # module name of the latter is a qstr of its own (heap on the unix port)
        from .services import auth, config, smart_charging, transactions

        self.cfg = config.Config(self)
        self.auth = auth.Auth(self)
        self.sc = smart_charging.SmartCharging(self)
        self.tx = transactions.Transactions(self)
        try:
            from .services import admin, firmware_update
        except ImportError:  # a build without them
            return
        from .services import station

        self.fw = firmware_update.FirmwareUpdate(self)
        self.admin = admin.Admin(self)
        self.station = station.Station(self)
        # security() and monitoring() are built on their first command and found among the
        # services then (`_built`: no attribute of their own, App's attribute table is under a step)
        if store.exists(store.path("mon")):
            self.monitoring()

    def security(self):
        """The certificate service (M14–M19, S7), built on first use (it then registers its
        own commands)."""
        s = _built(self, "Security")
        if s is None:
            from .services import security

            s = security.Security(self)
        return s

    def monitoring(self):
        """The monitor service (M3), built on its first command, or at boot when monitors are
        stored: a board that has none spends no heap on its code."""
        s = _built(self, "Monitoring")
        if s is None:
            from .services import monitoring

            s = monitoring.Monitoring(self)
        return s

    # ---------------------------------------------------------------- clock
    def now(self):
        return self.hal.ticks_ms()

    def time(self):
        """Seconds since 2024-01-01 (the gateway's time once synchronized, B13)."""
        return self._t_s + L.ticks_diff(self.hal.ticks_ms(), self._t_ticks) // 1000

    def set_time(self, t, ms):
        # t: seconds since 2024-01-01, ms: the milliseconds past it (no defaults: a function
        # with defaults costs twice the heap on a board, and every caller says)
        self._t_s = t
        self._t_ticks = L.ticks_diff(self.hal.ticks_ms(), ms)

    # ---------------------------------------------------------------- registry
    def kick(self):
        """Wake the sender (something was queued, or a tick passed)."""
        t = self._parked
        if t is not None:
            self._parked = None
            _core._task_queue.push(t)

    # ---------------------------------------------------------------- sending
    def emit(self, action, body, cls=None):
        """Publish an event. With a value class (outbox.TX …) it is durable: on flash
        first, then sent, removed when acked; returns False when the outbox refused it."""
        mid = self.outbox.next()
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

    def security_event(self, name, reason):
        # (`reason` None: none; no default, a function with defaults costs twice the heap)
        from .msgpack import Map
        from .schema import FLEN, LIMITS

        self.log("%s %s" % (name, reason or ""), 3, "SecurityCtrlr", 1)  # the security log
        b = Map()
        b[F_EVENT_NAME] = name
        b[F_TIME] = self.time()
        if reason:
            b[F_REASON] = reason[: LIMITS[FLEN[F_REASON]]]  # the schema's bound
        self.emit(A_SECURITY_EVENT, b, SECURITY)

    def request(self, action, body, cb):
        """Send a request of ours (in its action's default class); cb(body, 0) on the response,
        cb(None, code) on failure."""
        if not self.online:
            cb(None, -1)
            return
        mid = self.outbox.next()
        self.pending[mid] = cb
        self.link.request(mid, action, body, self.now(), None)
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
        mid = link.next_acked()
        while mid >= 0:
            self.outbox.remove(mid)
            self.flying.pop(mid, None)
            self.note("acked", {"id": mid})
            self.pump()
            mid = link.next_acked()
        while True:
            ev = link.next_event()
            if ev is None:
                return
            t = ev[0]
            if t == L.REQUEST_RECEIVED:  # a command: answered (or refused) at once
                mid = ev[1]
                action = ev[2]
                prio = ev[3]
                try:
                    s = self._service(action, True)
                    if s is None:
                        link.refuse(mid, action, prio, "not supported by this board", E_NOT_SUPPORTED)
                    else:
                        link.respond(mid, action, prio, s.command(action, ev[4], ev[5]))
                except FrameError as e:  # refused (services.refused), or a value the codec rejected
                    link.refuse(mid, action, prio, e.reason, e.code)
                self.note("command", {"action": action, "id": mid})
                self.kick()
            elif t == L.RESPONSE_RECEIVED:
                cb = self.pending.pop(ev[1], None)
                if cb:
                    cb(ev[3], 0)
            elif t == L.EVENT_RECEIVED:
                s = self._service(ev[2], False)  # an event of the gateway's: no answer
                if s is not None:
                    s.command(ev[2], ev[3], 0)
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
                self._hold_ms = 0
                floor = ev[1].get(F_ID_FLOOR)
                if floor:  # onboarding: a replaced board counts above every id the site saw
                    self.outbox.raise_to(floor)
                if not self._reconnect:  # not when a device key just came (onboarding)
                    body = ev[1]
                    self.online = True
                    self.set_time(body[F_TIME], body.get(F_TIME_MS, 0))
                    self.interval_s = body.get(F_INTERVAL_S, self.interval_s) or self.interval_s
                    self.note("online", {"time": body[F_TIME]})
                    self.log("online", 5, "NetworkCtrlr")
                    self.boot_notification()
                    self.pump()
                    for s in self.services:
                        s.online()
            elif t == L.KEY_PROVISIONED:
                store.write_atomic(store.path("key"), ev[1])
                self.note("key_provisioned")
                self._reconnect = self._reconnect or 1  # (a soft reset asked for stays asked for)
            elif t == L.CLOSED:
                self.note("link_closed", {"reason": ev[1]})
                self._reconnect = self._reconnect or 1
                if ev[1].startswith("hello refused"):  # e.g. deregistered (M11): ask again, slower
                    self._hold_ms = min(self._hold_ms * 2 or 500, _HOLD_MAX_MS)
        # done

    def _service(self, action, build):
        """The service that answers `action` (a command, or an event of the gateway's), or None;
        with `build`, one built on its first command (security, monitoring) is built now (no
        default: a function with defaults costs twice the heap, and both callers say). The
        services' COMMANDS tables are searched (a few dozen entries) rather than a table per
        action kept in RAM."""
        for s in self.services:
            if action in s.COMMANDS:  # (action, method name, …): an int never equals a name
                return s
        if not build or not hasattr(self, "station"):  # (a build without them: _build_services)
            return None
        # the certificate commands (services/security.py): rarely used, so the service is built on
        # the first of them (or the first security()) and its code costs no heap before
        if action in (
            A_INSTALL_CERTIFICATE,
            A_DELETE_CERTIFICATE,
            A_GET_INSTALLED_CERTIFICATES,
            A_OCSP_RESPONSE,
            A_CERTIFICATE_SIGNED,
            A_REVOKE_CERTIFICATE,
        ):  # constants: a tuple in flash
            return self.security()
        if action == A_SET_MONITORS or action == A_CLEAR_MONITORS:  # noqa: PLR1714, SIM109 — two int compares
            return self.monitoring()
        return None

    def boot_notification(self):
        from .msgpack import Map

        b = Map()
        b[F_MODEL] = self.hal.model
        b[F_VENDOR] = self.hal.vendor
        b[F_SERIAL] = self.hal.serial
        b[F_FW_VERSION] = self.version
        b[F_REASON] = self.boot_reason
        self.request(A_BOOT_NOTIFICATION, b, self._booted)

    def _booted(self, body, err):
        if body is None:  # no answer (link lost, timeout): asked again, as when pending
            self._boot_due = self.now() + _BOOT_RETRY_MS
            return
        self.interval_s = body[F_INTERVAL_S] or self.interval_s
        self.registration(body[F_REGISTRATION])
        if self.registered and self.slots is not None:
            self.fw.accepted()  # a new image on trial passed its self-test
        self.set_time(body[F_TIME], 0)
        self._hb_due = L.ticks_diff(self.now(), -self.interval_s * 1000)
        self.note("registration", {"status": body[F_REGISTRATION]})
        self.log("registration %d" % body[F_REGISTRATION], 5, "NetworkCtrlr")

    def registration(self, r):
        """M13: the CSMS's decision, obeyed and kept on flash. Only an accepted board charges:
        pending or rejected (or deregistered, M11), a running transaction ends, the EVSE is
        unavailable and the board asks again (BootNotification) after `interval_s`."""
        p = store.path("reg")
        if r != store.load(p, None):  # read again rather than kept: decisions are rare, RAM is not
            store.save(p, r)
        was = self.registered
        self.registered = r == REGISTRATION_ACCEPTED
        self._boot_due = None if self.registered else self.now() + self.interval_s * 1000
        self._obey(was)

    def _obey(self, was):
        # `was`: registered before the decision obeyed now. A board not accepted is made
        # unavailable here (every tick while it is not); accepted after that, it gets back the
        # availability the station service keeps
        tx = self.tx
        if not self.registered:
            if tx.active():
                tx.stop(STOP_REASON_OTHER, TX_TRIGGER_ABNORMAL_CONDITION)
            if not tx.inoperative:  # (ChangeAvailability may have cleared it: made so again)
                tx.inoperative = True
                tx.apply()
        elif not was:
            st = getattr(self, "station", None)
            tx.inoperative = st is not None and (st.estop or not st.operative)
            tx.apply()

    def log(self, text, level=5, component="ChargingStation", log_type=0):
        """A line for the board's log `log_type` (0 diagnostics, 1 security), from `component`
        at `level` (1 error … 7 debug): the log service keeps it when present and its criteria
        select it (services/admin.py)."""
        a = getattr(self, "admin", None)
        if a is not None:
            a.log(text, level, component, log_type)

    def restart(self, reason):
        """M5 soft reset: the application starts again on the running board. The link is
        closed; once it is down (`run_link`) the services are built again from flash and booted,
        as at power-up, and the board connects again (BootNotification with `reason`)."""
        self.boot_reason = reason
        self._reconnect = 2
        self.kick()

    def _rebuild(self):
        hal = self.hal
        for n in range(1, hal.evses + 1):  # the outputs safe first, as at power-up
            hal.set_contactor(False, n)
            hal.set_limit_w(0, n)
        self.services = []  # (the registration stays: the CSMS's decision, kept on flash)
        __import__("gc").collect()  # the old services go before the new ones take heap
        self._build_services()
        for s in self.services:
            s.boot()
        self.note("restarted", {"reason": self.boot_reason})

    def _heartbeat(self, body, err):
        if body is not None:
            self.set_time(body[F_TIME], 0)

    # ---------------------------------------------------------------- tasks
    async def _rx(self, s):
        link = self.link
        q = link.q
        # one connection's frame splitter (reset: nothing pending, no room lent). Its buffer is part
        # of the send queue's: a frame above RX bytes borrows the shared send region (sendq.py), so
        # the board holds no receive buffer of its own
        split = L.frame.FrameSplitter(q.w.mv[URGENT:], RX, q.lend)
        split.reset()
        while True:
            room = split.space()
            if room is None:  # a frame above RX bytes: the shared send region drains first
                self.kick()
                await asyncio.sleep_ms(5)
                continue
            await wait_io(s, 0)
            n = s.readinto(room)
            if not n:
                return
            split.wrote(n)
            try:
                e = split.take()
                while e:
                    link.receive(split.mv, self.now(), split.at, e)
                    split.release()  # its own part again: the link gave a lent region back once decoded
                    self._drain()
                    e = split.take()
            except FrameError:  # the stream cannot be re-synchronised (OVERSIZE)
                return

    async def run_link(self):
        """Connect, then send: this task writes what the link seals, woken by `kick()` (a
        message queued) and by every tick (retransmissions); a second task receives. Two
        tasks per connection and no task or timeout object made per tick (a
        `wait_for_ms` would make a task every 50 ms)."""
        backoff = 200
        link = self.link
        while True:
            if self._reconnect == 2:
                self._rebuild()
            self._reconnect = 0
            s = None
            try:  # a non-blocking TCP connection, as asyncio's open_connection makes it
                a = socket.getaddrinfo(self.gateway[0], self.gateway[1], 0, socket.SOCK_STREAM)[0]
                s = socket.socket(a[0], a[1], a[2])
                s.setblocking(False)
                try:
                    s.connect(a[-1])
                except OSError as e:
                    if e.errno != EINPROGRESS:
                        raise
                a = None  # its address is not kept in this task's frame for the connection's life (heap)
                await wait_io(s, 1)
            except OSError:
                if s is not None:
                    s.close()
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, 5000)
                continue
            backoff = 200
            k = store.read(store.path("key"))  # the device key onboarding gave, else the factory's
            factory = not (k and len(k) == 32)
            link.connect(self.now(), self.factory_key if factory else k, os.urandom(16), self.outbox.next(), factory)
            rx = asyncio.create_task(self._rx(s))
            try:
                while not rx.done():
                    n = link.transmit(self.now(), self.time())
                    if n:
                        # straight to the socket (the stream method write(buf, off, len): no view
                        # nor buffer made per frame); what the socket did not take is copied (the
                        # next put may reuse the frame's room) and written as it drains
                        k = s.write(link.q.w.buf, link.at, n) or 0  # type: ignore[call-arg]
                        if k < n:
                            rest = bytes(link.q.w.mv[link.at + k : link.at + n])
                            k = 0
                            while k < len(rest):
                                await wait_io(s, 1)
                                k += s.write(rest, k, len(rest) - k) or 0  # type: ignore[call-arg]
                        await asyncio.sleep_ms(0)  # the other tasks run between frames
                        continue
                    if self._reconnect:
                        break
                    await park(self)
            except OSError:  # connection refused or reset
                pass
            rx.cancel()
            try:
                s.close()
            except OSError:
                pass
            self.online = False
            self.flying = {}
            for mid in list(self.pending):
                self.pending.pop(mid)(None, -1)
            link.close()
            self.note("offline")
            self.log("offline", 3, "NetworkCtrlr")
            await asyncio.sleep_ms(100 + self._hold_ms)

    def tick(self):
        now = self.now()
        self.link.handle_timer(now)
        self._drain()
        if self.online and self.registered and L.ticks_diff(now, self._hb_due) >= 0:
            self._hb_due = now + self.interval_s * 1000
            self.request(A_HEARTBEAT, {}, self._heartbeat)
        if not self.registered:
            self._obey(False)
            b = self._boot_due
            if self.online and b is not None and L.ticks_diff(now, b) >= 0:
                self._boot_due = None
                self.boot_notification()
        for s in self.services:
            s.tick(now)

    async def run_ticks(self):
        while True:
            try:
                self.tick()
            except Exception as e:  # a service bug must not stop the board
                self.note("error", {"where": "tick", "what": repr(e)})
            self.kick()  # the sender looks for retransmissions and a closed link
            await asyncio.sleep_ms(TICK_MS)

    def main(self, extra):
        """Boot the services and start the tasks: `asyncio.run(app.main(extra))`, `extra` the
        board's own coroutines, run as tasks too (no default: every board passes them). Returns the
        connecting coroutine (run_link), which asyncio.run runs as its task: no coroutine of
        main's own waits on it for the board's life (its frame: 80 B of heap on a board). Called
        before the loop runs: MicroPython's create_task queues a task then (CPython's would not, and
        never runs this: the firmware's loop is the board's)."""
        for s in self.services:
            s.boot()
        # MicroPython's scheduler holds its tasks: no list of them is kept here
        asyncio.create_task(self.run_ticks())  # noqa: RUF006
        for c in extra:
            asyncio.create_task(c)  # noqa: RUF006
        return self.run_link()  # the main task: one task fewer

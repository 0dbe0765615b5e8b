"""Managing the board: M5 reset, M6 display messages, M7/M8 log criteria and upload,
M9 fault codes, M11 deregistration, M12 migration.

The log is a ring of two files on flash (`log0`, `log1`, LOG_MAX bytes each); SetLogCriteria
sets the level kept (on flash, `loglvl`). GetLog answers accepted and uploads the log as
LogChunk events of at most MAX_CHUNK bytes (bulk class: they never delay urgent frames),
at most CHUNKS_IN_FLIGHT unacknowledged, then a LogStatus (uploaded). The position up to
which the gateway acknowledged is on flash (`logup`): after a power cut the upload resumes
there (a chunk resent after the cut carries the same `offset`, so the receiver places it
idempotently).
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from micropython import const

from .. import store
from ..app import Refused, status
from ..msgpack import Map
from ..outbox import SECURITY
from ..schema import (
    A_CLEAR_DISPLAY_MESSAGE,
    A_DEREGISTER,
    A_FAULT_REPORT,
    A_GET_LOG,
    A_LOG_CHUNK,
    A_LOG_STATUS,
    A_MIGRATE,
    A_RESET,
    A_SET_DISPLAY_MESSAGE,
    A_SET_FAULT_TABLE,
    A_SET_LOG_CRITERIA,
    F_ACTIVE,
    F_ADDRESS,
    F_DATA,
    F_DEVICE_KEY,
    F_DISPLAY_ID,
    F_DISPLAY_PRIORITY,
    F_EVSE,
    F_FAULT_CODE,
    F_FAULT_TABLE,
    F_LAST,
    F_LOG_LEVEL,
    F_LOG_STATUS,
    F_OFFSET,
    F_REASON,
    F_REQUEST_ID,
    F_SEVERITY,
    F_TEXT,
    F_TIME,
    LOG_STATUS_ACCEPTED,
    LOG_STATUS_UPLOADED,
    LOG_STATUS_UPLOADING,
    MAX_CHUNK,
    RESET_WHEN_NOW,
    STATUS_ACCEPTED,
    STATUS_SCHEDULED,
    STATUS_UNKNOWN,
    STOP_REASON_REBOOT,
    TX_TRIGGER_ABNORMAL_CONDITION,
)
from . import Service

LOG_MAX = const(16384)
CHUNKS_IN_FLIGHT = const(1)  # one LogChunk held for retransmission (its body ~1 KiB) and one in the bulk region
FAULT_OVERTEMP = const(2001)


class Admin(Service):
    def __init__(self, app):
        super().__init__(app)
        self.level = store.load(store.path("loglvl"), 5)
        self.faults = store.load(store.path("faults"), {}) or {}
        self.messages = {}
        u = store.load(store.path("logup"), None)  # an upload a power cut interrupted
        self.upload = [u[0], u[1], u[2], u[3], []] if u else None  # [request_id, file, offset, total, in flight]
        self.reset_when_idle = False
        self.overtemp = False
        for a, h in (
            (A_RESET, self.reset),
            (A_SET_DISPLAY_MESSAGE, self.set_display),
            (A_CLEAR_DISPLAY_MESSAGE, self.clear_display),
            (A_SET_LOG_CRITERIA, self.set_log_criteria),
            (A_GET_LOG, self.get_log),
            (A_SET_FAULT_TABLE, self.set_fault_table),
            (A_DEREGISTER, self.deregister),
            (A_MIGRATE, self.migrate),
        ):
            app.on(a, h)

    # ---------------------------------------------------------------- M7/M8 log
    def log(self, text, level=5):
        if level > self.level:
            return
        import os

        p = store.path("log0")
        try:
            if os.stat(p)[6] > LOG_MAX:
                os.rename(p, store.path("log1"))
        except OSError:
            pass
        try:
            with open(p, "a") as f:
                f.write("%d %s\n" % (self.app.time(), text))
        except OSError:
            pass

    def set_log_criteria(self, body, seq):
        self.level = body[F_LOG_LEVEL]
        store.save(store.path("loglvl"), self.level)
        return status(STATUS_ACCEPTED)

    def get_log(self, body, seq):
        self.upload = [body[F_REQUEST_ID], 1, 0, 0, []]
        self._save_upload(self.upload)
        self._log_status(LOG_STATUS_UPLOADING)
        b = Map()
        b[F_LOG_STATUS] = LOG_STATUS_ACCEPTED
        return b

    def _save_upload(self, pos):
        store.save(store.path("logup"), pos[:4])

    def _log_status(self, st):
        b = Map()
        b[F_REQUEST_ID] = self.upload[0]
        b[F_LOG_STATUS] = st
        self.app.emit(A_LOG_STATUS, b, SECURITY)

    def _upload_step(self):
        u = self.upload
        app = self.app
        pend = u[4]  # chunks in flight, in order: [mid, request id, file, offset, total] after each
        acked = None
        while pend and pend[0][0] not in app.link.inflight:
            acked = pend.pop(0)
        if acked is not None:  # resume here after a power cut
            self._save_upload(acked[1:])
        while len(pend) < CHUNKS_IN_FLIGHT and u[1] >= 0 and app.online:
            p = store.path("log%d" % u[1])
            data = b""
            try:
                with open(p, "rb") as f:
                    f.seek(u[2])
                    data = f.read(MAX_CHUNK)
            except OSError:
                pass
            last = False
            if len(data) < MAX_CHUNK:
                u[1] -= 1
                u[2] = 0
                last = u[1] < 0
            else:
                u[2] += len(data)
            if not data and not last:
                continue
            b = Map()
            b[F_REQUEST_ID] = u[0]
            b[F_OFFSET] = u[3]
            b[F_DATA] = data
            b[F_LAST] = last
            u[3] += len(data)
            mid = app.ids.next()
            pend.append([mid, u[0], u[1], u[2], u[3]])
            app.link.event(mid, A_LOG_CHUNK, b, app.now())  # resent until acked
            app.kick()
        if u[1] < 0 and not pend:
            self._log_status(LOG_STATUS_UPLOADED)
            app.note("log_uploaded", {"bytes": u[3]})
            self.upload = None
            store.remove(store.path("logup"))

    # ---------------------------------------------------------------- M5 reset
    def reset(self, body, seq):
        app = self.app
        if app.tx.active() and body.get(97) != RESET_WHEN_NOW:
            self.reset_when_idle = True
            return status(STATUS_SCHEDULED)
        if app.tx.active():
            app.tx.stop(STOP_REASON_REBOOT, TX_TRIGGER_ABNORMAL_CONDITION)
        self._reboot_at = app.now() + 300  # let the answer and the last events leave
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- M6 display
    def set_display(self, body, seq):
        if body.get(F_EVSE, 1) > self.app.hal.evses:
            raise Refused("unknown evse")
        self.messages[body[F_DISPLAY_ID]] = (body[F_DISPLAY_PRIORITY], body[F_TEXT])
        self._show()
        return status(STATUS_ACCEPTED)

    def clear_display(self, body, seq):
        if self.messages.pop(body[F_DISPLAY_ID], None) is None:
            return status(STATUS_UNKNOWN)
        self._show()
        return status(STATUS_ACCEPTED)

    def _show(self):
        best = None
        for k in self.messages:
            m = self.messages[k]
            if best is None or m[0] < best[0]:
                best = m
        self.app.hal.display(best[1] if best else "")

    # ---------------------------------------------------------------- M9 faults
    def set_fault_table(self, body, seq):
        t = {}
        for f in body[F_FAULT_TABLE]:
            t[f[F_FAULT_CODE]] = [f[F_SEVERITY], f.get(F_TEXT, "")]
        self.faults = t
        store.save(store.path("faults"), t)
        return status(STATUS_ACCEPTED)

    def fault(self, code, active, reason=None):
        b = Map()
        b[F_FAULT_CODE] = code
        b[F_ACTIVE] = active
        b[F_TIME] = self.app.time()
        b[F_EVSE] = 1
        t = self.faults.get(code)
        r = reason or (t[1] if t else None)
        if r:
            b[F_REASON] = r[:120]
        self.app.emit(A_FAULT_REPORT, b, SECURITY)
        self.log("fault %d %s" % (code, "on" if active else "off"), 1)

    # ---------------------------------------------------------------- M11/M12
    def deregister(self, body, seq):
        app = self.app
        app.security_event("Deregistered", body.get(F_REASON))
        store.remove(store.path("key"))  # credentials revoked: back to factory onboarding
        app.auth.clear_cache(None, 0)  # personal data goes; billing records stay
        app.registered = False
        self._close_at = app.now() + 300
        return status(STATUS_ACCEPTED)

    def migrate(self, body, seq):
        addr = body[F_ADDRESS]
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise Refused("address must be host:port")
        k = body.get(F_DEVICE_KEY)
        if k is not None:
            k = self.app.link.decrypt(seq, F_DEVICE_KEY, k)
            if len(k) != 32:
                raise Refused("device key must be 32 bytes")
        store.save(store.path("gw"), [host, int(port)])
        if k is not None:
            store.write_atomic(store.path("key"), k)
        self.app.gateway = (host, int(port))
        self._close_at = self.app.now() + 300
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- tick
    def tick(self, now):
        app = self.app
        from ..link import ticks_diff

        if self.upload is not None:
            self._upload_step()
        t = app.hal.temperature_dc()
        hot = t > 800
        if hot != self.overtemp:
            self.overtemp = hot
            self.fault(FAULT_OVERTEMP, hot, "temperature %d.%d C" % (t // 10, t % 10))
        r = getattr(self, "_reboot_at", None)
        if self.reset_when_idle and not app.tx.active():
            self.reset_when_idle = False
            self._reboot_at = r = now + 300
        if r is not None and ticks_diff(now, r) >= 0:
            app.note("reboot")
            app.hal.reboot()
        c = getattr(self, "_close_at", None)
        if c is not None and ticks_diff(now, c) >= 0:
            self._close_at = None
            app._reconnect = True

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
    F_DATA,
    F_EVSE,
    F_FAULT_CODE,
    F_LAST,
    F_LOG_LEVEL,
    F_LOG_STATUS,
    F_OFFSET,
    F_REASON,
    F_REQUEST_ID,
    F_TIME,
    FLEN,
    LIMITS,
    LOG_STATUS_ACCEPTED,
    LOG_STATUS_UPLOADED,
    LOG_STATUS_UPLOADING,
    MAX_CHUNK,
    STATUS_ACCEPTED,
    STOP_REASON_REBOOT,
    TX_TRIGGER_ABNORMAL_CONDITION,
)
from . import Service, status

LOG_MAX = const(16384)
CHUNKS_IN_FLIGHT = const(1)  # one LogChunk held for retransmission (its body ~1 KiB) and one in the bulk region
FAULT_OVERTEMP = const(2001)


def _read(path, at, n):
    try:
        with open(path, "rb") as f:
            f.seek(at)
            return f.read(n)
    except OSError:
        return b""


def _chunk_body(request_id, offset, data, last):
    b = Map()
    b[F_REQUEST_ID] = request_id
    b[F_OFFSET] = offset
    b[F_DATA] = data
    b[F_LAST] = last
    return b


class Admin(Service):
    # ".name": a rare command, name() of admin_cmds.py, imported for the command and dropped again
    COMMANDS = (
        A_SET_LOG_CRITERIA, "set_log_criteria",
        A_GET_LOG, "get_log",
        A_RESET, ".reset",
        A_SET_DISPLAY_MESSAGE, ".set_display",
        A_CLEAR_DISPLAY_MESSAGE, ".clear_display",
        A_SET_FAULT_TABLE, ".set_fault_table",
        A_DEREGISTER, ".deregister",
        A_MIGRATE, ".migrate",
    )  # fmt: skip

    def __init__(self, app):
        super().__init__(app)
        self.level = store.load(store.path("loglvl"), 5)
        self.faults = store.load(store.path("faults"), {}) or {}
        self.messages = {}
        u = store.load(store.path("logup"), None)  # an upload a power cut interrupted
        self.upload = [u[0], u[1], u[2], u[3], []] if u else None  # [request_id, file, offset, total, in flight]
        self.reset_when_idle = False
        self.overtemp = False

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
        # chunks in flight, in order: [mid, request id, file, offset, total] after each, then the
        # chunk's own [file path, offset in it, length, last]
        pend = u[4]
        acked = None
        while pend and pend[0][0] not in app.link.inflight:
            acked = pend.pop(0)
        if acked is not None:  # resume here after a power cut
            self._save_upload(acked[1:5])
        while len(pend) < CHUNKS_IN_FLIGHT and u[1] >= 0 and app.online:
            p = store.path("log%d" % u[1])
            at = u[2]
            data = _read(p, at, MAX_CHUNK)
            last = False
            if len(data) < MAX_CHUNK:
                u[1] -= 1
                u[2] = 0
                last = u[1] < 0
            else:
                u[2] += len(data)
            if not data and not last:
                continue
            b = _chunk_body(u[0], u[3], data, last)
            u[3] += len(data)
            mid = app.ids.next()
            pend.append([mid, u[0], u[1], u[2], u[3], p, at, len(data), last])
            # resent until acked; meanwhile the link keeps `_resend`, not the 1 KiB body
            app.link.event(mid, A_LOG_CHUNK, b, app.now(), None, self._resend)
            app.kick()
        if u[1] < 0 and not pend:
            self._log_status(LOG_STATUS_UPLOADED)
            app.note("log_uploaded", {"bytes": u[3]})
            self.upload = None
            store.remove(store.path("logup"))

    def _resend(self, mid):
        """The body of LogChunk `mid` again, read from the log file; None when it is gone."""
        for c in self.upload[4] if self.upload else ():
            if c[0] == mid:
                data = _read(c[5], c[6], c[7])
                if len(data) == c[7]:
                    return _chunk_body(c[1], c[4] - c[7], data, c[8])
        return None

    # ---------------------------------------------------------------- M9 faults
    def fault(self, code, active, reason=None):
        b = Map()
        b[F_FAULT_CODE] = code
        b[F_ACTIVE] = active
        b[F_TIME] = self.app.time()
        b[F_EVSE] = 1
        t = self.faults.get(code)
        r = reason or (t[1] if t else None)
        if r:
            b[F_REASON] = r[: LIMITS[FLEN[F_REASON]]]  # the schema's bound
        self.app.emit(A_FAULT_REPORT, b, SECURITY)
        self.log("fault %d %s" % (code, "on" if active else "off"), 1)

    # ---------------------------------------------------------------- tick
    def reboot_soon(self, delay_ms):
        """Reboot in `delay_ms` (the answer and the last events leave first), ending a running
        transaction now (stop reason reboot): Reset `now` and UpdateFirmware `now`."""
        app = self.app
        if app.tx.active():
            app.tx.stop(STOP_REASON_REBOOT, TX_TRIGGER_ABNORMAL_CONDITION)
        self._reboot_at = app.now() + delay_ms

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

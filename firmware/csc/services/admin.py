"""Managing the board: M5 reset, M6 display messages, M7/M8 log criteria and upload,
M9 fault codes, M11 deregistration, M12 migration.

Logs (M7/M8): two logs, each a ring of two files on flash (LOG_MAX bytes each): the
diagnostics log (`log0`, `log1`) and the security log (`slog0`, `slog1`, the security
events). A line is `<time> <level> <component> <text>`: levels 1 error, 3 warning, 5
information, 7 debug; components are those of the component model (config.VARS:
ChargingStation, SampledDataCtrlr, DisplayCtrlr, NetworkCtrlr …), SecurityCtrlr for the security
events. SetLogCriteria sets, per log (`log_type`, diagnostics when absent), the highest level
kept and the components kept (none: every one); level 0 turns the log off. The criteria decide
what is written, so the log holds only what they select; they are on flash (`logcrit`). Each
change is itself written (component LogCtrlr, level 0) whatever the criteria, so that a reader
sees from where they hold. GetLog uploads the log of its `log_type` as LogChunk events of at
most MAX_CHUNK bytes (bulk class: they never delay urgent frames), at most CHUNKS_IN_FLIGHT
unacknowledged, then a LogStatus (uploaded). The position up to which the gateway acknowledged
is on flash (`logup`): after a power cut the upload resumes there (a chunk resent after the
cut carries the same `offset`, so the receiver places it idempotently).

Reset (M5): `soft` restarts the application (App.restart: the link closed, the services built
again from flash) on a running board; `hard` resets the board (Hal.reboot). `when` now ends a
running transaction first (stop reason reboot); idle, the default, answers scheduled during a
transaction and resets once it has ended. Each reset is a SecurityEvent ResetOrReboot, and the
next BootNotification says why the board booted (App.boot_reason: SoftReset, HardReset,
FirmwareUpdate, PowerUp), so the CSMS sees which reset happened.

Display messages (M6): [priority, text, language, valid_from, valid_to] per display id, on flash
(`disp`), so a power cut keeps them. Shown is the message valid now (valid_from ≤ time <
valid_to, each bound optional) of the best priority; among equals, one in the station's
language (DisplayCtrlr.Language) or in none before one in another language (the fallback when
none matches), then the lowest id. A message past its valid_to is dropped. The choice is made
again every DISPLAY_MS, so a message appears at its start and goes at its end; the display is
written only when the choice changes (the tariff and the cost use it too).
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed (never in
# what a tick runs: a `from … import` statement makes a tuple each time it runs).

from micropython import const

from .. import store
from ..link import ticks_diff
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
    F_LOG_STATUS,
    F_LOG_TYPE,
    F_OFFSET,
    F_REASON,
    F_REQUEST_ID,
    F_TIME,
    LOG_STATUS_ACCEPTED,
    LOG_STATUS_UPLOADED,
    LOG_STATUS_UPLOADING,
    MAX_CHUNK,
    STOP_REASON_REBOOT,
    TX_TRIGGER_ABNORMAL_CONDITION,
)
from . import Service

LOG_MAX = const(16384)
CHUNKS_IN_FLIGHT = const(1)  # one LogChunk held for retransmission (its body ~1 KiB) and one in the bulk region
FAULT_OVERTEMP = const(2001)
DISPLAY_MS = const(1000)
LOGS = ("log", "slog")  # the files of each log, by log type: diagnostics, security


def _read(path, at, n):
    try:
        with open(path, "rb") as f:
            f.seek(at)
            return f.read(n)
    except OSError:
        return b""


def write(log_type, line):
    """Append `line` to the log `log_type`, the older file giving way when the newer is full."""
    import os

    name = LOGS[log_type]
    p = store.path(name + "0")
    try:
        if os.stat(p)[6] > LOG_MAX:
            os.rename(p, store.path(name + "1"))
    except OSError:
        pass
    try:
        with open(p, "a") as f:
            f.write(line)
    except OSError:
        pass


def _log_status(app, request_id, st):
    b = Map()
    b[F_REQUEST_ID] = request_id
    b[F_LOG_STATUS] = st
    app.emit(A_LOG_STATUS, b, SECURITY)


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
        A_SET_LOG_CRITERIA, ".set_log_criteria",
        A_GET_LOG, "get_log",
        A_RESET, ".reset",
        A_SET_DISPLAY_MESSAGE, ".set_display",
        A_CLEAR_DISPLAY_MESSAGE, ".clear_display",
        A_SET_FAULT_TABLE, ".set_fault_table",
        A_DEREGISTER, ".deregister",
        A_MIGRATE, ".migrate",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        c = store.load(store.path("logcrit"), None)
        # per log: [highest level kept, components kept (None: all)]; when the CSMS has set none,
        # information for diagnostics and everything for security (a constant: in flash on a board)
        self.crit = c if c and len(c) == 2 else ((5, None), (9, None))
        self.faults = store.load(store.path("faults"), {}) or {}
        self.messages = store.load(store.path("disp"), {}) or {}  # id -> [prio, text, lang, from, to]
        self._shown = None  # the id of the message on the display
        self._disp_due = 0
        u = store.load(store.path("logup"), None)  # an upload a power cut interrupted
        # [request_id, file, offset, total, in flight, log type]
        self.upload = [u[0], u[1], u[2], u[3], [], u[4] if len(u) > 4 else 0] if u else None
        self.reset_when_idle = None  # the reset type (ResetType) waiting for the transaction's end
        self.overtemp = False

    def boot(self):
        self.show()

    # ---------------------------------------------------------------- M7/M8 log
    def log(self, text, level, component, log_type):
        """A line from `component` at `level` for the log `log_type`, if its criteria keep it
        (App.log, which has the usual defaults)."""
        c = self.crit[log_type]
        if level > c[0] or (c[1] and component not in c[1]):
            return
        write(log_type, "%d %d %s %s\n" % (self.app.time(), level, component, text))

    def get_log(self, body, seq):
        t = body[F_LOG_TYPE]
        rid = body[F_REQUEST_ID]
        t = t if t < len(LOGS) else 0
        self.upload = [rid, 1, 0, 0, [], t]
        store.save(store.path("logup"), [rid, 1, 0, 0, t])  # [request id, file, offset, total, log type]
        _log_status(self.app, rid, LOG_STATUS_UPLOADING)
        b = Map()
        b[F_LOG_STATUS] = LOG_STATUS_ACCEPTED
        return b

    def _upload_step(self):
        u = self.upload
        app = self.app
        # chunks in flight, in order: [mid, request id, file, offset, total] after each, then the
        # chunk's own [file path, offset in it, length, last]
        pend = u[4]
        acked = None
        while pend and pend[0][0] not in app.link.inflight:
            acked = pend.pop(0)
        if acked is not None:  # resume here after a power cut (as get_log saves it)
            store.save(store.path("logup"), [acked[1], acked[2], acked[3], acked[4], u[5]])
        while len(pend) < CHUNKS_IN_FLIGHT and u[1] >= 0 and app.online:
            p = store.path(LOGS[u[5]] + "%d" % u[1])
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
            mid = app.outbox.next()
            pend.append([mid, u[0], u[1], u[2], u[3], p, at, len(data), last])
            # resent until acked; meanwhile the link keeps `_resend`, not the 1 KiB body
            app.link.event(mid, A_LOG_CHUNK, b, app.now(), None, self._resend)
            app.kick()
        if u[1] < 0 and not pend:
            _log_status(app, u[0], LOG_STATUS_UPLOADED)
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

    # ---------------------------------------------------------------- M6 display
    def show(self):
        """Put the message to show now on the display (see the module's docstring); drop the
        expired ones."""
        app = self.app
        t = app.time()
        lang = app.cfg.get("DisplayCtrlr", "Language")
        best = None
        bk = 0
        gone = None
        ms = self.messages
        for k in ms:
            m = ms[k]
            if m[4] is not None and t >= m[4]:
                gone = (gone or []) + [k]
                continue
            if m[3] is not None and t < m[3]:
                continue
            key = m[0] * 2 + (1 if m[2] and m[2] != lang else 0)
            if best is None or key < bk or (key == bk and k < best):
                best = k
                bk = key
        if gone:
            for k in gone:
                ms.pop(k)
            store.save(store.path("disp"), ms)
        if best != self._shown:
            self._shown = best
            app.hal.display(ms[best][1] if best is not None else "")
            if best is not None:
                self.log("showing message %d" % best, 7, "DisplayCtrlr", 0)

    # ---------------------------------------------------------------- M5 reset
    def reboot_soon(self, delay_ms, hard, reason):
        """Reset in `delay_ms` (the answer and the last events leave first), ending a running
        transaction now (stop reason reboot): Reset `now` and UpdateFirmware `now`. `hard`: the
        board resets (Hal.reboot); else the application restarts (App.restart). `reason`: the
        next BootNotification's."""
        app = self.app
        if app.tx.active():
            app.tx.stop(STOP_REASON_REBOOT, TX_TRIGGER_ABNORMAL_CONDITION)
        self._reboot = (app.now() + delay_ms, hard, reason)  # (when, hard, reason): tick() resets

    # ---------------------------------------------------------------- tick
    def tick(self, now):
        app = self.app
        if self.upload is not None:
            self._upload_step()
        t = app.hal.temperature_dc()
        hot = t > 800
        if hot != self.overtemp:  # M9: the fault is reported set or cleared
            self.overtemp = hot
            b = Map()
            b[F_FAULT_CODE] = FAULT_OVERTEMP
            b[F_ACTIVE] = hot
            b[F_TIME] = app.time()
            b[F_EVSE] = 1
            # the provisioned table's text, followed by what the board measured; the board's own
            # text when the table has none
            why = "temperature %d.%d C" % (t // 10, t % 10)
            f = self.faults.get(FAULT_OVERTEMP)
            if f and f[1]:
                why = "%s (%s)" % (f[1], why)
            from ..schema import FLEN, LIMITS  # (here: names imported at the top would be globals)

            b[F_REASON] = why[: LIMITS[FLEN[F_REASON]]]  # the schema's bound
            app.emit(A_FAULT_REPORT, b, SECURITY)
            self.log(
                "fault %d %s %s" % (FAULT_OVERTEMP, "on" if hot else "off", why), 1 if hot else 5, "ChargingStation", 0
            )
        if (self.messages or self._shown is not None) and ticks_diff(now, self._disp_due) >= 0:
            self._disp_due = now + DISPLAY_MS
            self.show()
        if self.reset_when_idle is not None and not app.tx.active():
            hard = self.reset_when_idle
            self.reset_when_idle = None
            self.reboot_soon(300, hard, "HardReset" if hard else "SoftReset")
        r = getattr(self, "_reboot", None)
        if r is not None and ticks_diff(now, r[0]) >= 0:
            self._reboot = None
            app.note("reboot", {"reason": r[2]})
            if not r[1]:
                app.restart(r[2])
            else:
                store.save(store.path("bootr"), r[2])  # what App.boot_reason reads after the reset
                app.hal.reboot()
        c = getattr(self, "_close_at", None)
        if c is not None and ticks_diff(now, c) >= 0:
            self._close_at = None
            app._reconnect = app._reconnect or 1  # (a soft reset asked for stays asked for)

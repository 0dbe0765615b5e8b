"""M3 monitors: SetMonitors / ClearMonitors, MonitorEvent when one triggers.

A monitor watches one measured variable of the component model:

    EVSE.Power (W)  EVSE.Energy (Wh)  ChargingStation.Temperature (d°C)
    ChargingStation.Frequency (mHz)

- upper / lower: an event when the value crosses above / below `threshold`, once per
  crossing (armed again when the value is back on the other side);
- delta: an event when the value moved by at least `threshold` since the last event
  (the first sample sets the reference);
- periodic: an event every `threshold` seconds; periodic_clock: at every multiple of
  `threshold` seconds of the clock.
Monitors are checked every CHECK_MS, kept on flash (`mon`: [id, var index, type,
threshold, severity, state]) and at most MAX_MONITORS. A SetMonitors with one bad monitor
(unknown variable, threshold ≤ 0 for delta/periodic, too many) changes nothing and is
rejected with the reason. MonitorEvent is durable (outbox class TELEMETRY).
"""

from micropython import const

from .. import store
from ..link import ticks_diff
from ..msgpack import Map
from ..outbox import TELEMETRY
from ..schema import (
    A_CLEAR_MONITORS,
    A_MONITOR_EVENT,
    A_SET_MONITORS,
    F_COMPONENT,
    F_EVSE,
    F_IDS,
    F_MONITOR_ID,
    F_MONITOR_TYPE,
    F_MONITORS,
    F_SEVERITY,
    F_THRESHOLD,
    F_TIME,
    F_VAL,
    F_VARIABLE,
    MONITOR_TYPE_DELTA,
    MONITOR_TYPE_LOWER,
    MONITOR_TYPE_PERIODIC,
    MONITOR_TYPE_PERIODIC_CLOCK,
    MONITOR_TYPE_UPPER,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
)
from . import Service, status

MAX_MONITORS = const(8)
CHECK_MS = const(500)
VARS = (("EVSE", "Power"), ("EVSE", "Energy"), ("ChargingStation", "Temperature"), ("ChargingStation", "Frequency"))

# monitor fields
_ID = const(0)
_VAR = const(1)
_TYPE = const(2)
_THR = const(3)
_SEV = const(4)
_ST = const(5)  # upper/lower: armed; delta: reference value; periodic: next time (s)


class Monitoring(Service):
    COMMANDS = (
        A_SET_MONITORS, "set_monitors",
        A_CLEAR_MONITORS, "clear_monitors",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        self.mons = store.load(store.path("mon"), []) or []
        self._next = 0

    def _value(self, i):
        hal = self.app.hal
        if i == 0:
            return hal.meter(1)[2]
        if i == 1:
            return hal.meter(1)[0]
        if i == 2:
            return hal.temperature_dc()
        return hal.freq_mhz()

    def set_monitors(self, body, seq):
        new = []
        for m in body[F_MONITORS]:
            key = (m[F_COMPONENT], m[F_VARIABLE])
            if key not in VARS:
                return status(STATUS_REJECTED, "no monitorable variable %s.%s" % key)
            t = m[F_MONITOR_TYPE]
            thr = m[F_THRESHOLD]
            if t >= MONITOR_TYPE_DELTA and thr <= 0:
                return status(STATUS_REJECTED, "monitor %d needs a positive threshold" % m[F_MONITOR_ID])
            st = True if t <= MONITOR_TYPE_LOWER else None
            new.append([m[F_MONITOR_ID], VARS.index(key), t, thr, m[F_SEVERITY], st])
        keep = [x for x in self.mons if x[_ID] not in [n[_ID] for n in new]]
        if len(keep) + len(new) > MAX_MONITORS:
            return status(STATUS_REJECTED, "at most %d monitors" % MAX_MONITORS)
        self.mons = keep + new
        store.save(store.path("mon"), self.mons)
        return status(STATUS_ACCEPTED)

    def clear_monitors(self, body, seq):
        ids = body[F_IDS]
        keep = [x for x in self.mons if x[_ID] not in ids]
        found = len(keep) != len(self.mons)
        self.mons = keep
        store.save(store.path("mon"), keep)
        return status(STATUS_ACCEPTED if found else STATUS_UNKNOWN)

    def _event(self, m, v):
        app = self.app
        c, var = VARS[m[_VAR]]
        b = Map()
        b[F_MONITOR_ID] = m[_ID]
        b[F_COMPONENT] = c
        b[F_VARIABLE] = var
        b[F_VAL] = str(v)
        b[F_SEVERITY] = m[_SEV]
        b[F_TIME] = app.time()
        if m[_VAR] < 2:
            b[F_EVSE] = 1
        app.emit(A_MONITOR_EVENT, b, TELEMETRY)
        app.note("monitor", {"id": m[_ID], "val": v})

    def tick(self, now):
        if not self.mons or ticks_diff(now, self._next) < 0:
            return
        self._next = now + CHECK_MS
        t = self.app.time()
        for m in self.mons:
            v = self._value(m[_VAR])
            k = m[_TYPE]
            thr = m[_THR]
            if k == MONITOR_TYPE_UPPER or k == MONITOR_TYPE_LOWER:  # noqa: PLR1714, SIM109 — two int compares on MicroPython
                over = v > thr if k == MONITOR_TYPE_UPPER else v < thr
                if over and m[_ST]:
                    self._event(m, v)
                m[_ST] = not over
            elif k == MONITOR_TYPE_DELTA:
                if m[_ST] is None:
                    m[_ST] = v
                elif abs(v - m[_ST]) >= thr:
                    m[_ST] = v
                    self._event(m, v)
            elif k == MONITOR_TYPE_PERIODIC or k == MONITOR_TYPE_PERIODIC_CLOCK:  # noqa: PLR1714, SIM109 — two int compares on MicroPython
                if m[_ST] is None:
                    p = int(thr)
                    m[_ST] = t + p if k == MONITOR_TYPE_PERIODIC else (t // p + 1) * p
                elif t >= m[_ST]:
                    p = int(thr)
                    m[_ST] = t + p if k == MONITOR_TYPE_PERIODIC else (t // p + 1) * p
                    self._event(m, v)

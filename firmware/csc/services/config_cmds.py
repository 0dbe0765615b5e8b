"""The M1/M2 commands of the configuration model (GetVariables, SetVariables,
GetBaseReport): imported for the command and dropped again (services.on_demand), so their
code takes no heap between commands. The model itself (VARS, the values) stays in
config.py, which the other services read."""

from micropython import const

from .. import store
from ..msgpack import Map
from ..outbox import TELEMETRY
from ..schema import (
    A_NOTIFY_REPORT,
    F_COMPONENT,
    F_LAST,
    F_REQUEST_ID,
    F_SEQ_NO,
    F_STATUS,
    F_VAL,
    F_VARIABLE,
    F_VARS,
    FLEN,
    LIMITS,
    STATUS_ACCEPTED,
    STATUS_REBOOT_REQUIRED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
)
from .config import VARS, find

_REBOOT = ("NetworkCtrlr",)
# per variable of config.VARS, constant: kind, writable, bounds
KIND = "ssssiiiibbbisi"  # i int, b bool, s str
WRITABLE = const(0b11111110000000)  # bit i: VARS[i] is writable (bit 0 is VARS[0])
MIN = (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, 0, 10)
MAX = (0, 0, 0, 0, 0, 0, 0, 86400, 0, 0, 0, 3600, 8, 86400)  # str: its maximum length (0: the schema's bound of `val`)


def get_variables(cfg, body, seq):
    out = []
    for v in body[F_VARS]:
        r = Map()
        r[F_COMPONENT] = v[F_COMPONENT]
        r[F_VARIABLE] = v[F_VARIABLE]
        i = find(v[F_COMPONENT], v[F_VARIABLE])
        if i < 0:
            r[F_STATUS] = STATUS_UNKNOWN
        else:
            r[F_VAL] = str(cfg.vals[i])
            r[F_STATUS] = STATUS_ACCEPTED
        out.append(r)
    b = Map()
    b[F_VARS] = out
    return b


def _parse(i, s):
    k = KIND[i]
    if k == "i":
        try:
            x = int(s)
        except ValueError:
            return None
        return x if MIN[i] <= x <= MAX[i] else None
    if k == "b":
        s = s.lower()
        return True if s == "true" else False if s == "false" else None
    return s if len(s) <= (MAX[i] or LIMITS[FLEN[F_VAL]]) else None


def set_variables(cfg, body, seq):
    out = []
    changed = False
    for v in body[F_VARS]:
        r = Map()
        c = v[F_COMPONENT]
        r[F_COMPONENT] = c
        r[F_VARIABLE] = v[F_VARIABLE]
        i = find(c, v[F_VARIABLE])
        if i < 0:
            r[F_STATUS] = STATUS_UNKNOWN
        else:
            x = _parse(i, v.get(F_VAL, "")) if WRITABLE >> i & 1 else None
            if x is None:
                r[F_STATUS] = STATUS_REJECTED
                cfg.app.log("%s rejected: %s" % (v[F_VARIABLE], v.get(F_VAL, "")), 3, c)  # M7: a warning
            else:
                cfg.app.log("%s set: %s" % (v[F_VARIABLE], x), 5, c)
                cfg.vals[i] = x
                changed = True
                r[F_STATUS] = STATUS_REBOOT_REQUIRED if c in _REBOOT else STATUS_ACCEPTED
        out.append(r)
    if changed:
        d = {}
        for i in range(len(VARS)):
            if WRITABLE >> i & 1:
                d[VARS[i][0] + "." + VARS[i][1]] = cfg.vals[i]
        store.save(store.path("cfg"), d)
    b = Map()
    b[F_VARS] = out
    return b


def get_base_report(cfg, body, seq):
    """Accept, then publish the whole model in NotifyReport parts of 8 variables."""
    rid = body[F_REQUEST_ID]
    n = 0
    for i in range(0, len(VARS), 8):
        part = []
        for j in range(i, min(i + 8, len(VARS))):
            r = Map()
            r[F_COMPONENT] = VARS[j][0]
            r[F_VARIABLE] = VARS[j][1]
            r[F_VAL] = str(cfg.vals[j])
            part.append(r)
        b = Map()
        b[F_REQUEST_ID] = rid
        b[F_SEQ_NO] = n
        b[F_VARS] = part
        b[F_LAST] = i + 8 >= len(VARS)
        cfg.app.emit(A_NOTIFY_REPORT, b, TELEMETRY)
        n += 1  # noqa: SIM113
    b = Map()
    b[F_STATUS] = STATUS_ACCEPTED
    return b

"""M1/M2: the component/variable model (GetVariables, SetVariables, GetBaseReport).

Each variable is (component, variable) (VARS) with a kind, "i" (int), "b" (bool) or "s"
(str), whether it is writable and its bounds, all constant; only the values are kept in
RAM. Writes are validated against kind and bounds, stored on flash (`cfg`), and answered
per variable: accepted, rejected (wrong value, read-only) or unknown. A change of a
variable marked reboot-required answers reboot_required.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from micropython import const

from .. import store
from ..msgpack import Map
from ..schema import (
    A_GET_BASE_REPORT,
    A_GET_VARIABLES,
    A_NOTIFY_REPORT,
    A_SET_VARIABLES,
    F_COMPONENT,
    F_LAST,
    F_REQUEST_ID,
    F_SEQ_NO,
    F_STATUS,
    F_VAL,
    F_VARIABLE,
    F_VARS,
    STATUS_ACCEPTED,
    STATUS_REBOOT_REQUIRED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
)
from . import Service

_REBOOT = ("NetworkCtrlr",)

# The model's shape is constant (frozen in flash on a board): (component, variable), kind,
# writable, min, max per variable; only the values live in RAM (Config.vals, same order).
VARS = (
    ("ChargingStation", "Model"),
    ("ChargingStation", "VendorName"),
    ("ChargingStation", "SerialNumber"),
    ("ChargingStation", "FirmwareVersion"),
    ("ChargingStation", "EVSECount"),
    ("EVSE", "MaxPowerW"),
    ("EVSE", "MaxDischargeW"),
    ("SampledDataCtrlr", "TxUpdatedInterval"),
    ("AuthCtrlr", "LocalPreAuthorize"),
    ("AuthCtrlr", "OfflineTxForUnknownId"),
    ("AuthCtrlr", "AuthCacheEnabled"),
    ("TxCtrlr", "EVConnectionTimeOut"),
    ("DisplayCtrlr", "Language"),
    ("NetworkCtrlr", "HeartbeatInterval"),
)
KIND = "ssssiiiibbbisi"  # per variable: i int, b bool, s str
WRITABLE = const(0b11111110000000)  # bit i: VARS[i] is writable (bit 0 is VARS[0])
MIN = (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, 0, 10)
MAX = (0, 0, 0, 0, 0, 0, 0, 86400, 0, 0, 0, 3600, 8, 86400)  # str: its maximum length (0: 256)


def _find(component, variable):
    for i in range(len(VARS)):
        v = VARS[i]
        if v[0] == component and v[1] == variable:
            return i
    return -1


class Config(Service):
    def __init__(self, app):
        super().__init__(app)
        hal = app.hal
        from ..app import FW_VERSION

        self.vals = [
            hal.model,
            hal.vendor,
            hal.serial,
            FW_VERSION,
            hal.evses,
            hal.rating_w,
            hal.rating_discharge_w,
            60,
            True,
            False,
            True,
            60,
            "en",
            300,
        ]
        saved = store.load(store.path("cfg"), {})
        for k in saved:
            c, v = k.split(".", 1)
            i = _find(c, v)
            if i >= 0:
                self.vals[i] = saved[k]
        app.on(A_GET_VARIABLES, self.get_variables)
        app.on(A_SET_VARIABLES, self.set_variables)
        app.on(A_GET_BASE_REPORT, self.get_base_report)

    def get(self, component, variable):
        return self.vals[_find(component, variable)]

    def get_variables(self, body, seq):
        out = []
        for v in body[F_VARS]:
            r = Map()
            r[F_COMPONENT] = v[F_COMPONENT]
            r[F_VARIABLE] = v[F_VARIABLE]
            i = _find(v[F_COMPONENT], v[F_VARIABLE])
            if i < 0:
                r[F_STATUS] = STATUS_UNKNOWN
            else:
                r[F_VAL] = str(self.vals[i])
                r[F_STATUS] = STATUS_ACCEPTED
            out.append(r)
        b = Map()
        b[F_VARS] = out
        return b

    def _parse(self, i, s):
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
        return s if len(s) <= (MAX[i] or 256) else None

    def set_variables(self, body, seq):
        out = []
        changed = False
        for v in body[F_VARS]:
            r = Map()
            c = v[F_COMPONENT]
            r[F_COMPONENT] = c
            r[F_VARIABLE] = v[F_VARIABLE]
            i = _find(c, v[F_VARIABLE])
            if i < 0:
                r[F_STATUS] = STATUS_UNKNOWN
            else:
                x = self._parse(i, v.get(F_VAL, "")) if WRITABLE >> i & 1 else None
                if x is None:
                    r[F_STATUS] = STATUS_REJECTED
                else:
                    self.vals[i] = x
                    changed = True
                    r[F_STATUS] = STATUS_REBOOT_REQUIRED if c in _REBOOT else STATUS_ACCEPTED
            out.append(r)
        if changed:
            d = {}
            for i in range(len(VARS)):
                if WRITABLE >> i & 1:
                    d[VARS[i][0] + "." + VARS[i][1]] = self.vals[i]
            store.save(store.path("cfg"), d)
        b = Map()
        b[F_VARS] = out
        return b

    def get_base_report(self, body, seq):
        """Accept, then publish the whole model in NotifyReport parts of 8 variables."""
        rid = body[F_REQUEST_ID]
        keys = VARS
        n = 0
        for i in range(0, len(keys), 8):
            part = []
            for j in range(i, min(i + 8, len(keys))):
                r = Map()
                r[F_COMPONENT] = keys[j][0]
                r[F_VARIABLE] = keys[j][1]
                r[F_VAL] = str(self.vals[j])
                part.append(r)
            b = Map()
            b[F_REQUEST_ID] = rid
            b[F_SEQ_NO] = n
            b[F_VARS] = part
            b[F_LAST] = i + 8 >= len(keys)
            from ..outbox import TELEMETRY

            self.app.emit(A_NOTIFY_REPORT, b, TELEMETRY)
            n += 1  # noqa: SIM113
        b = Map()
        b[F_STATUS] = STATUS_ACCEPTED
        return b

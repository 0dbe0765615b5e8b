"""M1/M2: the component/variable model (GetVariables, SetVariables, GetBaseReport).

Each variable is (component, variable) → [value, kind, writable, min, max]; kinds are
"i" (int), "b" (bool), "s" (str). Writes are validated against kind and bounds, stored on
flash (`cfg`), and answered per variable: accepted, rejected (wrong value, read-only) or
unknown. A change of a variable marked reboot-required answers reboot_required.
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

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


class Config(Service):
    def __init__(self, app):
        super().__init__(app)
        hal = app.hal
        from ..app import FW_VERSION

        self.vars = {
            ("ChargingStation", "Model"): [hal.model, "s", False, 0, 0],
            ("ChargingStation", "VendorName"): [hal.vendor, "s", False, 0, 0],
            ("ChargingStation", "SerialNumber"): [hal.serial, "s", False, 0, 0],
            ("ChargingStation", "FirmwareVersion"): [FW_VERSION, "s", False, 0, 0],
            ("ChargingStation", "EVSECount"): [hal.evses, "i", False, 0, 0],
            ("EVSE", "MaxPowerW"): [hal.rating_w, "i", False, 0, 0],
            ("EVSE", "MaxDischargeW"): [hal.rating_discharge_w, "i", False, 0, 0],
            ("SampledDataCtrlr", "TxUpdatedInterval"): [60, "i", True, 1, 86400],
            ("AuthCtrlr", "LocalPreAuthorize"): [True, "b", True, 0, 0],
            ("AuthCtrlr", "OfflineTxForUnknownId"): [False, "b", True, 0, 0],
            ("AuthCtrlr", "AuthCacheEnabled"): [True, "b", True, 0, 0],
            ("TxCtrlr", "EVConnectionTimeOut"): [60, "i", True, 5, 3600],
            ("DisplayCtrlr", "Language"): ["en", "s", True, 0, 8],
            ("NetworkCtrlr", "HeartbeatInterval"): [300, "i", True, 10, 86400],
        }
        saved = store.load(store.path("cfg"), {})
        for k in saved:
            c, v = k.split(".", 1)
            e = self.vars.get((c, v))
            if e is not None:
                e[0] = saved[k]
        app.on(A_GET_VARIABLES, self.get_variables)
        app.on(A_SET_VARIABLES, self.set_variables)
        app.on(A_GET_BASE_REPORT, self.get_base_report)

    def get(self, component, variable):
        return self.vars[(component, variable)][0]

    def get_variables(self, body, seq):
        out = []
        for v in body[F_VARS]:
            r = Map()
            r[F_COMPONENT] = v[F_COMPONENT]
            r[F_VARIABLE] = v[F_VARIABLE]
            e = self.vars.get((v[F_COMPONENT], v[F_VARIABLE]))
            if e is None:
                r[F_STATUS] = STATUS_UNKNOWN
            else:
                r[F_VAL] = str(e[0])
                r[F_STATUS] = STATUS_ACCEPTED
            out.append(r)
        b = Map()
        b[F_VARS] = out
        return b

    def _parse(self, e, s):
        k = e[1]
        if k == "i":
            try:
                x = int(s)
            except ValueError:
                return None
            return x if e[3] <= x <= e[4] else None
        if k == "b":
            return {"true": True, "false": False}.get(s.lower())
        return s if len(s) <= (e[4] or 256) else None

    def set_variables(self, body, seq):
        out = []
        changed = False
        for v in body[F_VARS]:
            r = Map()
            c = v[F_COMPONENT]
            r[F_COMPONENT] = c
            r[F_VARIABLE] = v[F_VARIABLE]
            e = self.vars.get((c, v[F_VARIABLE]))
            if e is None:
                r[F_STATUS] = STATUS_UNKNOWN
            else:
                x = self._parse(e, v.get(F_VAL, "")) if e[2] else None
                if x is None:
                    r[F_STATUS] = STATUS_REJECTED
                else:
                    e[0] = x
                    changed = True
                    r[F_STATUS] = STATUS_REBOOT_REQUIRED if c in _REBOOT else STATUS_ACCEPTED
            out.append(r)
        if changed:
            d = {}
            for k in self.vars:
                e = self.vars[k]
                if e[2]:
                    d[k[0] + "." + k[1]] = e[0]
            store.save(store.path("cfg"), d)
        b = Map()
        b[F_VARS] = out
        return b

    def get_base_report(self, body, seq):
        """Accept, then publish the whole model in NotifyReport parts of 8 variables."""
        rid = body[F_REQUEST_ID]
        keys = list(self.vars)
        n = 0
        for i in range(0, len(keys), 8):
            part = []
            for k in keys[i : i + 8]:
                r = Map()
                r[F_COMPONENT] = k[0]
                r[F_VARIABLE] = k[1]
                r[F_VAL] = str(self.vars[k][0])
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

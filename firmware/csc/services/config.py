"""M1/M2: the component/variable model (its commands GetVariables, SetVariables and
GetBaseReport are in config_cmds.py, loaded on demand).

Each variable is (component, variable) (VARS) with a kind, "i" (int), "b" (bool) or "s"
(str), whether it is writable and its bounds, all constant; only the values are kept in
RAM. Writes are validated against kind and bounds, stored on flash (`cfg`), and answered
per variable: accepted, rejected (wrong value, read-only) or unknown. A change of a
variable marked reboot-required answers reboot_required.
"""

# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from .. import FW_VERSION, store
from ..schema import A_GET_BASE_REPORT, A_GET_VARIABLES, A_SET_VARIABLES
from . import Service

# The model's shape is constant (frozen in flash on a board): (component, variable) here, kind,
# writable, min, max per variable in config_cmds.py; only the values live in RAM (Config.vals,
# same order).
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


def find(component, variable):
    for i in range(len(VARS)):
        v = VARS[i]
        if v[0] == component and v[1] == variable:
            return i
    return -1


class Config(Service):
    # ".name": a rare command, name() of config_cmds.py, imported for the command and dropped again
    COMMANDS = (
        A_GET_VARIABLES, ".get_variables",
        A_SET_VARIABLES, ".set_variables",
        A_GET_BASE_REPORT, ".get_base_report",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        hal = app.hal
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
            i = find(c, v)
            if i >= 0:
                self.vals[i] = saved[k]

    def get(self, component, variable):
        return self.vals[find(component, variable)]

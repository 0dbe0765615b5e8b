"""The rarely used smart-charging commands (smart_charging.py): ClearChargingProfile,
GetCompositeSchedule, StartSetpointLoop, SetFrequencyDroop and DemandResponse. Imported for
the command and dropped again (services.on_demand): their code takes no heap between
commands; the state they set (profiles, loop, droop curve, grid event) and its use on each
tick stay in the SmartCharging service. DsoLimit (urgent) and SetChargingProfile stay there."""

from .. import store
from ..msgpack import Map
from ..schema import (
    F_DEADBAND_MHZ,
    F_DROOP,
    F_DURATION_S,
    F_EVSE,
    F_FREQ_MHZ,
    F_GRID_EVENT,
    F_LIMIT_W,
    F_PERIODS,
    F_POWER_W,
    F_PROFILE_ID,
    F_PURPOSE,
    F_RATE_MS,
    F_START_S,
    F_VALID_TO,
    GRID_EVENT_NORMAL,
    PROFILE_PURPOSE_RESOURCE_MANAGER,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
)
from . import refused, status
from .smart_charging import check_watts


def clear_profile(sc, body, seq):
    pid = body.get(F_PROFILE_ID)
    evse = body.get(F_EVSE)
    pur = body.get(F_PURPOSE)
    # the site's own limit (purpose resource_manager: the gateway's share, E4) is not the CSMS's
    # to clear by accident: only a clear that names that purpose removes it
    keep = [
        p
        for p in sc.profiles
        if not (
            (pid is None or p[0] == pid)
            and (evse is None or p[1] == evse)
            and (p[3] == pur if pur is not None else p[3] != PROFILE_PURPOSE_RESOURCE_MANAGER)
        )
    ]
    found = len(keep) != len(sc.profiles)
    sc.profiles = keep
    store.save(store.path("sc"), keep)
    sc.app.tx.apply()
    return status(STATUS_ACCEPTED if found else STATUS_UNKNOWN)


def composite(sc, body, seq):
    evse = sc._evse(body, True)
    b = status(STATUS_ACCEPTED)
    p = Map()
    p[F_START_S] = 0
    p[F_LIMIT_W] = sc.limit(evse or 1, sc.app.tx.active(evse or 1), 1)
    b[F_PERIODS] = [p]
    return b


def start_loop(sc, body, seq):
    sc._evse(body, True)
    d = body.get(F_DURATION_S)
    now = sc.app.now()
    sc.loop = [body[F_RATE_MS], now + d * 1000 if d else None, now]
    return status(STATUS_ACCEPTED)


def set_droop(sc, body, seq):
    sc._evse(body, False)
    pts = []
    for p in body[F_DROOP]:
        check_watts(sc.app.hal, p[F_POWER_W], 1)
        pts.append([p[F_FREQ_MHZ], p[F_POWER_W]])
    if len(pts) < 2:
        raise refused("a droop curve needs at least two points")
    pts.sort(key=lambda x: x[0])
    sc.droop = [pts, body[F_DEADBAND_MHZ], body.get(F_RATE_MS, 1000)]
    store.save(store.path("droop"), sc.droop)
    return status(STATUS_ACCEPTED)


def demand_response(sc, body, seq):
    ge = body[F_GRID_EVENT]
    if ge == GRID_EVENT_NORMAL:
        sc.dr = None
    else:
        lim = body.get(F_LIMIT_W)
        if lim is None:
            return status(STATUS_REJECTED, "a grid event other than normal needs limit_w")
        if lim < 0:
            raise refused("a demand-response limit cannot be negative")
        sc.dr = [ge, lim, body.get(F_VALID_TO, 0)]
    sc.app.tx.apply()
    sc.app.note("dr_applied", {"hw_limit_w": sc.app.tx.hw_limit})
    return status(STATUS_ACCEPTED)

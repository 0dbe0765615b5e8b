"""E1 charging profiles, E5 DSO limit, E6 V2G (negative setpoints), E7 setpoint loop,
E8 frequency droop, E2 demand response, E3 the EV's needs: everything that decides the power the EVSE may transfer.

`target(evse, tx, share)` is the signed power for the hardware (≥ 0 charge limit, < 0
discharge setpoint), recomputed every tick and at once when a limit arrives. The limits for the
board as a whole (a profile for EVSE 0 — among them the site's share, resource_manager —, the DSO
limit, a demand response, a setpoint, the droop) are split equally among the `share` EVSEs that
offer power (transactions.Transactions.apply); a profile for EVSE n and the rating hold for EVSE n:

1. limit = hardware rating, lowered by the active profile of each purpose (highest
   stack level wins within a purpose; tx_default/tx only during a transaction; a tx
   profile beats tx_default) and by the DSO limit (E5, urgent: applied in the command
   handler itself, checked against the meter at its deadline — a miss is a FaultReport;
   kept on the flash, so that a board rebooted while its gateway is away still keeps to it);
2. a profile period with a negative limit, or a negative setpoint (E6/E7), asks for
   discharge: granted only when the EV and the hardware allow it, bounded by both;
3. the droop curve (E8) overrides the setpoint when the measured frequency leaves the
   dead band; each change is reported as a durable FrequencyResponse.
4. a demand response (E2: price, peak or emergency grid event with a limit) lowers the
   limit, but not below the power the EV needs to get its energy by its departure (from
   ISO 15118, `hal.ev_needs()`), except for an emergency; `normal` ends it;
5. the EV's needs are sent once per plug-in as a durable NotifyEVNeeds (E3) so that the
   CSMS and the resource manager can plan; a resource_manager profile (E4) is one more
   purpose in step 1.
Commands beyond the hardware (a limit above the rating, an unknown EVSE) are refused
with a reason.
"""

from micropython import const

from .. import store
from ..link import ticks_diff
from ..msgpack import Map
from ..outbox import TELEMETRY
from ..schema import (
    A_CLEAR_CHARGING_PROFILE,
    A_DEMAND_RESPONSE,
    A_DSO_LIMIT,
    A_FAULT_REPORT,
    A_FREQUENCY_RESPONSE,
    A_GET_COMPOSITE_SCHEDULE,
    A_MEASURED_VALUES,
    A_NOTIFY_EV_NEEDS,
    A_SET_CHARGING_PROFILE,
    A_SET_FREQUENCY_DROOP,
    A_SETPOINT,
    A_START_SETPOINT_LOOP,
    F_ACTIVE,
    F_DEADLINE_MS,
    F_DEPARTURE,
    F_ENERGY_NEEDED_WH,
    F_EVSE,
    F_FAULT_CODE,
    F_FREQ_MHZ,
    F_LIMIT_W,
    F_PERIODS,
    F_POWER_W,
    F_PROFILE_ID,
    F_PURPOSE,
    F_REASON,
    F_SETPOINT_W,
    F_SOC,
    F_STACK_LEVEL,
    F_START_S,
    F_TIME,
    F_TX_ID,
    F_VALID_FROM,
    F_VALID_TO,
    GRID_EVENT_EMERGENCY,
    PROFILE_PURPOSE_DSO,
    PROFILE_PURPOSE_RESOURCE_MANAGER,
    PROFILE_PURPOSE_TX,
    PROFILE_PURPOSE_TX_DEFAULT,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
)
from . import Service, refused, status

FAULT_DSO_MISSED = const(1001)
_NOMINAL = const(50000)


def _part(w, k):
    """One of `k` equal parts of the signed power `w`, rounded towards 0 (k parts never exceed w)."""
    return w // k if w >= 0 else -(-w // k)


def check_watts(hal, w, k):
    """Refused beyond the rating of the `k` EVSEs the power `w` is for (the rating is an EVSE's)."""
    if w > hal.rating_w * k:
        raise refused("limit %d W above the hardware rating %d W" % (w, hal.rating_w * k))
    if w < -hal.rating_discharge_w * k:
        raise refused("discharge %d W beyond the hardware rating %d W" % (-w, hal.rating_discharge_w * k))


def _droop(d, f):
    """The power of the droop curve `d` (E8) at the frequency `f` (mHz); None inside its dead
    band, or without a curve."""
    if d is None or abs(f - _NOMINAL) <= d[1]:
        return None
    pts = d[0]
    if f <= pts[0][0]:
        return pts[0][1]
    for i in range(1, len(pts)):
        f1, p1 = pts[i]
        if f <= f1:
            f0, p0 = pts[i - 1]
            return p0 + (p1 - p0) * (f - f0) // (f1 - f0)
    return pts[-1][1]


class SmartCharging(Service):
    # ".name": a rare command, name() of smart_charging_cmds.py, imported for the command and dropped again
    COMMANDS = (
        A_SET_CHARGING_PROFILE, "set_profile",
        A_DSO_LIMIT, "dso_limit",
        A_SETPOINT, "on_setpoint",  # an event
        A_CLEAR_CHARGING_PROFILE, ".clear_profile",
        A_GET_COMPOSITE_SCHEDULE, ".composite",
        A_START_SETPOINT_LOOP, ".start_loop",
        A_SET_FREQUENCY_DROOP, ".set_droop",
        A_DEMAND_RESPONSE, ".demand_response",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        # [[pid, evse, level, purpose, periods, from, to, t0]]; none: the empty tuple (a constant, no heap)
        self.profiles = store.load(store.path("sc"), None) or ()
        d = store.load(store.path("droop"), None)
        self.droop = d  # [points [[f, p]...], deadband, rate]
        d = store.load(store.path("dso"), None)  # [limit, valid_to]: the last DSO limit, over a reboot
        self.dso = None if d is None else [d[0], d[1], 0, True]  # [limit, valid_to, deadline ticks, checked]
        self.setpoint = None
        self.loop = None  # [rate_ms, end ticks or None, next ticks]
        self.droop_w = None
        self._mv_next = 0
        self.dr = None  # [grid_event, limit_w, valid_to]
        self.needs_sent = 0  # bit n-1: the EV at EVSE n had its needs sent

    def _evse(self, body, need):
        """The EVSE a command names (`need`: it must name one; else 0 when absent)."""
        e = body.get(F_EVSE, None if need else 0)
        if e is None or e > self.app.hal.evses:
            raise refused("unknown evse %s" % e)
        return e

    # ---------------------------------------------------------------- commands
    def set_profile(self, body, seq):
        evse = self._evse(body, True)
        purpose = body[F_PURPOSE]
        # a site's share (resource manager: the gateway, which does not know this hardware) above
        # the rating limits nothing more than the rating does; the CSMS's profiles must fit it.
        # A profile for EVSE 0 is the board's: the rating of all its EVSEs
        k = 1 if evse else self.app.hal.evses
        top = self.app.hal.rating_w * k if purpose == PROFILE_PURPOSE_RESOURCE_MANAGER else None
        periods = []
        for p in body[F_PERIODS]:
            w = p[F_LIMIT_W]
            if top is not None and w > top:
                w = top
            check_watts(self.app.hal, w, k)
            periods.append([p[F_START_S], w])
        if purpose == PROFILE_PURPOSE_TX and not self.app.tx.active(evse):
            return status(STATUS_REJECTED, "no transaction on this evse")
        now = self.app.time()
        pid = body[F_PROFILE_ID]
        self.profiles = [p for p in self.profiles if p[0] != pid]
        self.profiles.append(
            [
                pid,
                evse,
                body[F_STACK_LEVEL],
                purpose,
                periods,
                body.get(F_VALID_FROM, 0),
                body.get(F_VALID_TO, 0),
                body.get(F_VALID_FROM) or now,
            ]
        )
        store.save(store.path("sc"), self.profiles)
        self.app.tx.apply()
        return status(STATUS_ACCEPTED)

    def dso_limit(self, body, seq):
        lim = body[F_LIMIT_W]
        if lim < 0:
            raise refused("a DSO limit cannot be negative")
        self._evse(body, False)
        now = self.app.now()
        vt = body.get(F_VALID_TO, 0)
        self.dso = [lim, vt, now + body[F_DEADLINE_MS], False]
        self.app.tx.apply()  # the hardware gets the new limit before the answer leaves
        self.app.note("dso_applied", {"limit_w": lim, "hw_limit_w": self.app.tx.hw_limit})
        store.save(store.path("dso"), [lim, vt])
        return status(STATUS_ACCEPTED)

    def on_setpoint(self, body, seq):
        w = body[F_SETPOINT_W]
        hal = self.app.hal
        k = hal.evses  # the board's setpoint, split among its EVSEs (target())
        self.setpoint = max(-hal.rating_discharge_w * k, min(w, hal.rating_w * k))
        self.app.tx.apply()
        if self.loop is None:  # an event has no answer: what the board did is reported (the loop does it at its rate)
            self._measured(self.app.hal)

    # ---------------------------------------------------------------- computing
    def limit(self, evse, tx, share):
        """The signed power allowed now on `evse` (before setpoints and droop), the board's own
        limits split in `share` parts."""
        hal = self.app.hal
        t = self.app.time()
        best = {}  # type: dict  # purpose -> (stack level, watts)
        for p in self.profiles:
            if p[1] not in (0, evse):
                continue
            pur = p[3]
            if pur in (PROFILE_PURPOSE_TX, PROFILE_PURPOSE_TX_DEFAULT) and not tx:
                continue
            if (p[5] and t < p[5]) or (p[6] and t >= p[6]):
                continue  # not valid now
            # its period in force: p[7] is when the schedule started (when the profile came, for a
            # relative one): a clock stepped back since (a time sync after a step forward) must
            # not lift the limit in force
            d = max(t - p[7], 0)
            w = None
            for s, x in p[4]:
                if d >= s:
                    w = x
            if w is None:
                continue
            if not p[1]:
                w = _part(w, share)
            b = best.get(pur)
            if b is None or p[2] > b[0]:
                best[pur] = (p[2], w)
        if PROFILE_PURPOSE_TX in best:
            best.pop(PROFILE_PURPOSE_TX_DEFAULT, None)
        lim = hal.rating_w
        neg = None
        for pur in best:
            w = best[pur][1]
            if w < 0:
                neg = w if neg is None else max(neg, w)
            elif w < lim:
                lim = w
        d = self.dso
        if d is not None:
            if d[1] and t >= d[1]:
                self.dso = None
                store.remove(store.path("dso"))
            else:
                lim = min(lim, d[0] // share)
                if PROFILE_PURPOSE_DSO in best and best[PROFILE_PURPOSE_DSO][1] < lim:
                    lim = best[PROFILE_PURPOSE_DSO][1]
        r = self.dr
        if r is not None:
            if r[2] and t >= r[2]:
                self.dr = None
            else:
                # not below the power the EV needs to get its energy by its departure (E3; 0: no
                # needs known), except for an emergency
                n = None if r[0] == GRID_EVENT_EMERGENCY else hal.ev_needs(evse)
                floor = n[0] * 3600 // n[1] if n and n[1] > 0 else 0
                lim = min(lim, max(r[1] // share, floor))
        if neg is not None:
            return neg
        return lim

    def target(self, evse, tx, share):
        hal = self.app.hal
        lim = self.limit(evse, tx, share)
        w = lim
        sp = self.setpoint
        if sp is not None:
            sp = _part(sp, share)
            w = min(sp, lim) if lim >= 0 else sp
        dw = _droop(self.droop, hal.freq_mhz())
        if dw is not None:
            dw = _part(dw, share)
            w = min(dw, lim) if lim >= 0 else dw
        if w < 0:
            if not hal.ev_discharge_ok(evse) or hal.rating_discharge_w <= 0:
                return 0
            w = max(w, -hal.rating_discharge_w)
            d = self.dso
            if d is not None and -w > d[0] // share:
                w = -(d[0] // share)
        return w

    # ---------------------------------------------------------------- tick
    def tick(self, now):

        app = self.app
        hal = app.hal
        d = self.dso
        if d is not None and not d[3] and ticks_diff(now, d[2]) >= 0:
            d[3] = True
            p = app.tx.power()
            ok = abs(p) <= d[0]
            app.note("dso_checked", {"power_w": p, "limit_w": d[0], "ok": ok})
            if not ok:
                b = Map()
                b[F_FAULT_CODE] = FAULT_DSO_MISSED
                b[F_ACTIVE] = True
                b[F_TIME] = app.time()
                b[F_REASON] = "DSO limit not reached by the deadline"
                app.emit(A_FAULT_REPORT, b, TELEMETRY)
        if self.droop is not None and app.tx.active():
            f = hal.freq_mhz()
            dw = _droop(self.droop, f)
            if dw != self.droop_w:
                self.droop_w = dw
                app.tx.apply()
                b = Map()
                b[F_EVSE] = 1
                b[F_FREQ_MHZ] = f
                b[F_POWER_W] = app.tx.hw_limit
                b[F_TIME] = app.time()
                app.emit(A_FREQUENCY_RESPONSE, b, TELEMETRY)
        for e in app.tx.e:  # E3: the needs of the EV at each EVSE, once per plug-in
            n = hal.ev_needs(e.n)
            bit = 1 << (e.n - 1)
            if n is None:
                self.needs_sent &= ~bit
            elif not self.needs_sent & bit:
                self.needs_sent |= bit
                b = Map()
                b[F_EVSE] = e.n
                b[F_ENERGY_NEEDED_WH] = n[0]
                b[F_DEPARTURE] = app.time() + n[1]
                if n[2] is not None:
                    b[F_SOC] = n[2]
                tx = e.tx
                if tx is not None:
                    b[F_TX_ID] = tx.id
                app.emit(A_NOTIFY_EV_NEEDS, b, TELEMETRY)
        lp = self.loop
        if lp is not None and ticks_diff(now, lp[2]) >= 0:
            if lp[1] is not None and ticks_diff(now, lp[1]) >= 0:
                self.loop = None
                self.setpoint = None
                return
            lp[2] = now + lp[0]
            self._measured(hal)

    def _measured(self, hal):
        b = Map()
        b[F_EVSE] = 1
        b[F_POWER_W] = self.app.tx.power()  # the board's: a setpoint is the board's too
        if self.setpoint is not None:
            b[F_SETPOINT_W] = self.setpoint
        b[F_FREQ_MHZ] = hal.freq_mhz()
        self.app.emit(A_MEASURED_VALUES, b)

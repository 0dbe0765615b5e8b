"""Sessions and transactions (63110-1 clause 6, Annex C), S1 reservations, S2/S3 start
and stop, S4/S5 tariffs and running cost, S6 the SDR data of the final TransactionEvent.

Per EVSE (docs/firmware.md, "Sessions"; a board with several EVSEs runs one `Evse` each, built
at boot for `hal.evses`, each with its own state file `tx<n>`, and a session on each at once): a
*service session* is one customer's service at the EVSE, from the first interaction (card
accepted, remote start, reservation use, plug-in) until the customer is done: the EV unplugged
(after its last transaction), or no EV connected within TxCtrlr.EVConnectionTimeOut of the
authorization (S3: the authorization is dropped, so a later plug-in never charges on it). It
holds the *charging session* (plug-in to unplug) and one or more *transactions*: a tariff change
splits the running transaction (ended + started, trigger tariff_changed, at one meter reading,
the contactor untouched), a stop by card with the EV still plugged and a new start by card make
a second one. The flat session fee goes with the service session's first transaction only. The
end of a service session is a durable SessionEvent (why: ev_disconnected, timeout, power_loss).
Every id comes from the device's id counter (outbox.py), unique for the device's life; the site and
the CSMS make them global with the device's id. All three ids travel in every TransactionEvent.

Each TransactionEvent is durable (outbox class TX) and numbered by `seq_no` from 0 within
its transaction; the EVSE state (`tx<evse>` on flash) is saved right after the event is
stored, with no await in between, so at boot the outbox tells what a power cut may have
cut short: `Transactions.boot()` replays the stored events of the transaction onto the saved
state. A transaction found running at boot is ended with stop_reason power_loss.

Every event carries both registers, energy_wh (imported) and energy_out_wh (exported, E6);
the final one carries the SDR data: samples [import at start, at stop, export at start, at stop],
meter_start/stop_wh and meter_start/stop_out_wh, the signed meter reading, cost and tariff.
"""

from .. import store
from ..hal import FLAG_CARD
from ..link import ticks_diff
from ..msgpack import Map
from ..outbox import BILLING, TX
from ..schema import (
    A_CANCEL_RESERVATION,
    A_COST_UPDATE,
    A_REQUEST_START_TRANSACTION,
    A_REQUEST_STOP_TRANSACTION,
    A_RESERVATION_UPDATE,
    A_RESERVE_NOW,
    A_SESSION_EVENT,
    A_SET_TARIFF,
    A_STATUS_NOTIFICATION,
    A_TRANSACTION_EVENT,
    AUTH_STATUS_ACCEPTED,
    CHARGING_STATE_CHARGING,
    CHARGING_STATE_DISCHARGING,
    CHARGING_STATE_EV_CONNECTED,
    CHARGING_STATE_SUSPENDED_EV,
    CHARGING_STATE_SUSPENDED_EVSE,
    CONNECTOR_STATUS_AVAILABLE,
    CONNECTOR_STATUS_OCCUPIED,
    CONNECTOR_STATUS_RESERVED,
    CONNECTOR_STATUS_UNAVAILABLE,
    CP_STATE_A,
    CP_STATE_B,
    CP_STATE_C,
    F_CHARGING_SESSION_ID,
    F_CHARGING_STATE,
    F_COST,
    F_CP_STATE,
    F_ENERGY_OUT_WH,
    F_ENERGY_WH,
    F_EVENT,
    F_EVSE,
    F_ID_TOKEN,
    F_MEASURAND,
    F_METER_START_OUT_WH,
    F_METER_START_WH,
    F_METER_STOP_OUT_WH,
    F_METER_STOP_WH,
    F_OFFLINE,
    F_POWER_W,
    F_REMOTE_START_ID,
    F_RES_STATUS,
    F_RESERVATION_ID,
    F_SAMPLES,
    F_SEQ_NO,
    F_SESSION_ID,
    F_SIGNED_METER,
    F_STATE,
    F_STOP_REASON,
    F_TARIFF_ID,
    F_TIME,
    F_TOKEN_TYPE,
    F_TRIGGER,
    F_TX_ID,
    F_VALUE,
    MEASURAND_ENERGY_EXPORT_WH,
    MEASURAND_ENERGY_IMPORT_WH,
    RESERVATION_STATUS_EXPIRED,
    RESERVATION_STATUS_USED,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    STOP_REASON_EV_DISCONNECTED,
    STOP_REASON_LOCAL,
    STOP_REASON_POWER_LOSS,
    STOP_REASON_REMOTE,
    STOP_REASON_TIMEOUT,
    TOKEN_TYPE_CENTRAL,
    TX_EVENT_ENDED,
    TX_EVENT_STARTED,
    TX_EVENT_UPDATED,
    TX_TRIGGER_ABNORMAL_CONDITION,
    TX_TRIGGER_AUTHORIZED,
    TX_TRIGGER_CABLE_PLUGGED_IN,
    TX_TRIGGER_CHARGING_STATE_CHANGED,
    TX_TRIGGER_EV_DEPARTED,
    TX_TRIGGER_METER_VALUE_PERIODIC,
    TX_TRIGGER_REMOTE_START,
    TX_TRIGGER_REMOTE_STOP,
    TX_TRIGGER_STOP_AUTHORIZED,
)
from . import Service, refused, status


def _sample(measurand, v, t):
    """One of the meter samples of a TransactionEvent (`samples`: the registers at its start and stop)."""
    s = Map()
    s[F_MEASURAND] = measurand
    s[F_VALUE] = v
    s[F_TIME] = t
    return s


class Tx:
    """The running transaction of an EVSE (saved on flash with the EVSE state)."""

    def __init__(self, tid, seq=0, tok=None, tt=0, rsid=None, res=None, wh0=0, t0=0, tariff=None, out0=0, fee=True):
        self.id = tid
        self.seq = seq  # seq_no of its next TransactionEvent
        self.tok = tok
        self.tt = tt
        self.rsid = rsid  # remote start id
        self.res = res  # reservation used
        self.wh0 = wh0  # meter at start
        self.t0 = t0
        self.tariff = tariff
        self.out0 = out0  # export register at start (E6)
        self.fee = fee  # the service session's first transaction: it carries the session fee

    def dump(self):
        return [self.id, self.seq, self.tok, self.tt, self.rsid, self.res, self.wh0, self.t0, self.tariff, self.out0,
                self.fee]  # fmt: skip


class Evse:
    """One EVSE's sessions: its service and charging session, transaction, authorization,
    reservation, tariff, power offer and status; saved on flash as `tx<n>`."""

    def __init__(self, app, n):
        self.app = app
        self.n = n  # its state file: tx<n> (the path is made when saved: not kept in RAM)
        self.svc = 0  # service session id
        self.chg = 0  # charging session id
        self.tx = None  # the running Tx
        self.auth = None  # [token, type, remote start id] authorized for the next transaction
        self.res = None  # [reservation id, expiry, token]
        self.res_used = None  # reservation id the next transaction uses
        self.tariff = None  # [id, price_kwh, currency, price_session, price_min]
        self.last = 0  # id of the last transaction ended
        self.wait = 0  # time (s) until which the authorization waits for the EV (S3), 0: none
        self.fee_due = False  # the service session's session fee is still to be charged
        s = store.load(store.path("tx%d" % n), None)
        if isinstance(s, list) and len(s) in (8, 10):
            self.svc, self.chg, t, self.auth, self.res, self.res_used, self.tariff, self.last = s[:8]
            if len(s) == 10:
                self.wait, self.fee_due = s[8], s[9]
            self.tx = Tx(*t) if t else None
        self.hw_limit = 0
        self.state = None
        self.status = None
        self._next_update = 0
        self._on = False

    def save(self):
        tx = self.tx
        t = tx.dump() if tx is not None else None
        store.save(store.path("tx%d" % self.n), [self.svc, self.chg, t, self.auth, self.res, self.res_used,
                                                 self.tariff, self.last, self.wait, self.fee_due])  # fmt: skip

    def free(self, tok):
        """No transaction and no authorization waiting here, and not reserved for another token."""
        r = self.res
        return self.tx is None and self.auth is None and not (r and r[2] != tok)

    # ---------------------------------------------------------------- boot recovery
    def recovered(self, b):
        """One stored TransactionEvent of this EVSE replayed onto the saved state (see
        Transactions.boot)."""
        tx = self.tx
        tid = b[F_TX_ID]
        if tx is not None and tid == tx.id:
            if b[F_SEQ_NO] >= tx.seq:
                tx.seq = b[F_SEQ_NO] + 1
            if b[F_EVENT] == TX_EVENT_ENDED:
                self.tx = None
                self.last = tid
        elif tx is None and b[F_EVENT] == TX_EVENT_STARTED and tid > self.last:
            # stored, but the power went before the state was saved
            self.tx = Tx(
                tid,
                b[F_SEQ_NO] + 1,
                b.get(F_ID_TOKEN),
                b.get(F_TOKEN_TYPE, 0),
                None,
                None,
                b.get(F_ENERGY_WH, 0),
                b.get(F_TIME, 0),
                b.get(F_TARIFF_ID),
                b.get(F_METER_START_OUT_WH, 0),
            )
            self.svc = b.get(F_SESSION_ID, 0)

    # ---------------------------------------------------------------- events
    def _event(self, ev, trigger, extra):
        app = self.app
        tx = self.tx
        hal = app.hal
        n = self.n
        m = hal.meter(n)
        b = Map()
        b[F_EVENT] = ev
        b[F_TX_ID] = tx.id
        b[F_SEQ_NO] = tx.seq
        b[F_TRIGGER] = trigger
        b[F_EVSE] = n
        b[F_ENERGY_WH] = m[0]
        b[F_ENERGY_OUT_WH] = m[1]
        b[F_POWER_W] = m[2]
        b[F_TIME] = app.time()
        b[F_CHARGING_STATE] = self.state = self._charging_state()
        b[F_SESSION_ID] = self.svc
        if self.chg:
            b[F_CHARGING_SESSION_ID] = self.chg
        if not app.online:
            b[F_OFFLINE] = True
        if tx.tariff is not None:
            b[F_TARIFF_ID] = tx.tariff
            b[F_COST] = self.cost(m[0])
        if ev == TX_EVENT_STARTED:
            if tx.tok is not None:
                b[F_ID_TOKEN] = tx.tok
                b[F_TOKEN_TYPE] = tx.tt
            if tx.rsid is not None:
                b[F_REMOTE_START_ID] = tx.rsid
            if tx.res is not None:
                b[F_RESERVATION_ID] = tx.res
        if ev != TX_EVENT_UPDATED:
            sm = hal.signed_meter(n)
            if sm:
                b[F_SIGNED_METER] = sm
        if extra:
            for k in extra:
                b[k] = extra[k]
        tx.seq += 1
        ok = app.emit(A_TRANSACTION_EVENT, b, TX)
        self.save()  # no await between the outbox write and this one (see Transactions.boot())
        return ok

    def _charging_state(self):
        hal = self.app.hal
        cp = hal.cp_state(self.n)
        if cp == CP_STATE_A:
            return 0
        p = hal.meter(self.n)[2]
        if p > 0:
            return CHARGING_STATE_CHARGING
        if p < 0:
            return CHARGING_STATE_DISCHARGING
        if cp == CP_STATE_B:
            if self.tx is not None and not self.hw_limit:
                return CHARGING_STATE_SUSPENDED_EVSE  # no current offered: the EVSE holds the EV back
            return CHARGING_STATE_SUSPENDED_EV
        if self.tx is not None and cp == CP_STATE_C:
            return CHARGING_STATE_SUSPENDED_EVSE
        return CHARGING_STATE_EV_CONNECTED

    def svc_open(self):
        if not self.svc:
            self.svc = self.app.outbox.next()
            self.fee_due = True

    def svc_end(self, reason):
        """The service session is over (the customer is done, or the EV never came): said to
        the CSMS, durably; its authorization goes with it."""
        app = self.app
        b = Map()
        b[F_EVENT] = TX_EVENT_ENDED
        b[F_SESSION_ID] = self.svc
        b[F_EVSE] = self.n
        b[F_TIME] = app.time()
        b[F_STOP_REASON] = reason
        if self.chg:
            b[F_CHARGING_SESSION_ID] = self.chg
        a = self.auth
        if a and a[2] is not None:
            b[F_REMOTE_START_ID] = a[2]
        app.emit(A_SESSION_EVENT, b, TX)
        app.note("svc_ended", {"svc": self.svc, "reason": reason, "evse": self.n})
        self.svc = self.chg = self.wait = 0
        self.auth = None
        self.fee_due = False
        self.save()

    def start(self, trigger, m):
        """A transaction starts here (at the meter reading `m`, None: now) on the authorization."""
        a = self.auth
        app = self.app
        self.svc_open()
        if not self.chg and app.hal.plugged(self.n):
            self.chg = app.outbox.next()
        self.wait = 0
        if m is None:
            m = app.hal.meter(self.n)
        wh, out, t = m[0], m[1], app.time()
        tariff = self.tariff
        tx = Tx(
            app.outbox.next(), 0, None, 0, None, self.res_used, wh, t, tariff[0] if tariff else None, out, self.fee_due
        )
        self.fee_due = False
        if a:
            tx.tok, tx.tt, tx.rsid = a[0], a[1], a[2]
        self.tx = tx
        self.res_used = None
        smp = [_sample(MEASURAND_ENERGY_IMPORT_WH, wh, t), _sample(MEASURAND_ENERGY_EXPORT_WH, out, t)]
        ok = self._event(TX_EVENT_STARTED, trigger, {F_SAMPLES: smp, F_METER_START_WH: wh, F_METER_START_OUT_WH: out})
        app.note("tx_started", {"tx_id": tx.id, "ok": ok, "evse": self.n})
        self._next_update = app.now() + app.cfg.get("SampledDataCtrlr", "TxUpdatedInterval") * 1000
        app.tx.apply()  # every EVSE: the board's limit is now shared with this one too
        return tx.id

    def stop(self, reason, trigger):
        if self.tx is None:
            return
        hal = self.app.hal
        hal.set_contactor(False, self.n)
        hal.set_limit_w(0, self.n)
        self.hw_limit = 0
        self._on = False
        self.end(reason, trigger, hal.meter(self.n))

    def end(self, reason, trigger, m):
        tx = self.tx
        app = self.app
        wh, out, t = m[0], m[1], app.time()
        smp = [
            _sample(MEASURAND_ENERGY_IMPORT_WH, tx.wh0, tx.t0),
            _sample(MEASURAND_ENERGY_IMPORT_WH, wh, t),
            _sample(MEASURAND_ENERGY_EXPORT_WH, tx.out0, tx.t0),
            _sample(MEASURAND_ENERGY_EXPORT_WH, out, t),
        ]
        extra = {F_STOP_REASON: reason, F_SAMPLES: smp, F_METER_START_WH: tx.wh0, F_METER_STOP_WH: wh,
                 F_METER_START_OUT_WH: tx.out0, F_METER_STOP_OUT_WH: out}  # fmt: skip
        self._event(TX_EVENT_ENDED, trigger, extra)
        tid = tx.id
        self.tx = None
        self.last = tid
        self.save()
        app.note("tx_ended", {"tx_id": tid, "reason": reason, "wh": wh - tx.wh0, "evse": self.n})

    # ---------------------------------------------------------------- tick
    def tick(self, now):
        app = self.app
        hal = app.hal
        n = self.n
        cp = hal.cp_state(n)
        plugged = cp != CP_STATE_A
        tx = self.tx
        if tx is not None and not plugged:
            self.stop(STOP_REASON_EV_DISCONNECTED, TX_TRIGGER_EV_DEPARTED)
            tx = None
        if plugged and not self.chg:
            self.chg = app.outbox.next()
            self.svc_open()
            self.save()
            if self.auth and tx is None:
                self.start(TX_TRIGGER_CABLE_PLUGGED_IN, None)
                tx = self.tx
        if not plugged and self.chg:
            self.svc_end(STOP_REASON_EV_DISCONNECTED)  # the customer is done: the EV has left
        elif self.wait and not plugged and app.time() >= self.wait:
            self.svc_end(STOP_REASON_TIMEOUT)  # S3: no EV within the EV-connection timeout
        r = self.res
        if r and r[1] <= app.time():
            self.res = None
            self.save()
            app.tx._res_update(r[0], RESERVATION_STATUS_EXPIRED)
        app.tx.apply()  # (every EVSE's: a session that began or ended here changes their shares)
        if tx is not None:
            if self._charging_state() != self.state:
                self._event(TX_EVENT_UPDATED, TX_TRIGGER_CHARGING_STATE_CHANGED, None)
            if ticks_diff(now, self._next_update) >= 0:
                self._next_update = now + app.cfg.get("SampledDataCtrlr", "TxUpdatedInterval") * 1000
                self._event(TX_EVENT_UPDATED, TX_TRIGGER_METER_VALUE_PERIODIC, None)
            t = self.tariff
            if t:
                c = self.cost(hal.meter(n)[0])
                hal.display("%s %d.%02d" % (t[2], c // 100, c % 100))
        else:
            self.state = None
        if app.tx.inoperative and tx is None:
            st = CONNECTOR_STATUS_UNAVAILABLE
        elif plugged:
            st = CONNECTOR_STATUS_OCCUPIED
        else:
            st = CONNECTOR_STATUS_RESERVED if self.res else CONNECTOR_STATUS_AVAILABLE
        if st != self.status:
            self.status = st
            b = Map()
            b[F_EVSE] = n
            b[F_STATE] = st
            b[F_CP_STATE] = cp
            b[F_TIME] = app.time()
            app.emit(A_STATUS_NOTIFICATION, b)

    # ---------------------------------------------------------------- authorization
    def card(self, tok, tt):
        tx = self.tx
        app = self.app
        if tx is not None:
            if tx.tok == tok:
                self.stop(STOP_REASON_LOCAL, TX_TRIGGER_STOP_AUTHORIZED)
            else:
                app.note("card_ignored", {"why": "busy", "evse": self.n})
            return
        if app.tx.inoperative:
            app.note("auth", {"status": "unavailable"})
            return
        r = self.res
        if r and r[2] != tok:
            app.note("auth", {"status": "reserved"})
            return

        def done(st, src):
            app.note("auth", {"status": st, "source": src, "evse": self.n})
            if st != AUTH_STATUS_ACCEPTED or self.tx is not None:
                return
            if r:
                self.res = None
                self.res_used = r[0]
                app.tx._res_update(r[0], RESERVATION_STATUS_USED)
            self.authorize(tok, tt, None, TX_TRIGGER_AUTHORIZED)

        app.auth.check(tok, tt, done)

    def authorize(self, tok, tt, rsid, trigger):
        """`tok` authorized here (a card accepted, a remote start `rsid`): the service session
        opens, and the transaction starts at once with an EV plugged, else when one comes within
        TxCtrlr.EVConnectionTimeOut (S3). The id of the transaction started, or None."""
        app = self.app
        self.auth = [tok, tt, rsid]
        self.svc_open()
        plugged = app.hal.plugged(self.n)
        self.wait = 0 if plugged else app.time() + app.cfg.get("TxCtrlr", "EVConnectionTimeOut")
        self.save()
        return self.start(trigger, None) if plugged else None

    # ---------------------------------------------------------------- S4/S5 tariffs
    def cost(self, wh):
        """Running cost of the transaction in minor currency units."""
        t = self.tariff
        tx = self.tx
        if not t or tx is None:
            return 0
        mins = max(0, self.app.time() - tx.t0) // 60
        return (t[3] if tx.fee else 0) + t[1] * (wh - tx.wh0) // 1000 + t[4] * mins


class Transactions(Service):
    """The service: the board's EVSEs (`e`, EVSE n is e[n - 1]), the commands routed to the right
    one, and what concerns the board as a whole (availability, the split of its power limits)."""

    # ".name": a rare command, name() of transactions_cmds.py, imported for the command and dropped again
    COMMANDS = (
        A_REQUEST_START_TRANSACTION, "remote_start",
        A_REQUEST_STOP_TRANSACTION, "remote_stop",
        A_RESERVE_NOW, ".reserve",
        A_CANCEL_RESERVATION, ".cancel_reservation",
        A_SET_TARIFF, ".set_tariff",
        A_COST_UPDATE, ".cost_update",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        self.e = [Evse(app, n) for n in range(1, app.hal.evses + 1)]
        self.hw_limit = 0  # the board's: the sum of its EVSEs' power targets
        self.inoperative = False  # unavailable or emergency-stopped (services/station.py)

    def active(self, evse=0):
        """A transaction runs on EVSE `evse` (0: on any)."""
        for e in self.e:  # noqa: SIM110 — any() would allocate a generator
            if e.tx is not None and evse in (0, e.n):
                return True
        return False

    def stop(self, reason, trigger, evse=0):
        """Ends the transaction of EVSE `evse` (0: of every EVSE)."""
        for e in self.e:
            if evse in (0, e.n):
                e.stop(reason, trigger)
        self.apply()

    def power(self):
        """The board's power now (W, the sum over its EVSEs)."""
        p = 0
        for e in self.e:
            p += self.app.hal.meter(e.n)[2]
        return p

    # ---------------------------------------------------------------- boot recovery
    def boot(self):
        """The stored TransactionEvents of each EVSE replayed onto its saved state (the state
        file is saved right after each event is stored, so a power cut in between left the event
        and not the state: see the module's doc); then a transaction still running is ended, the
        power went while charging, and so is its service session. Every EVSE is saved after."""
        ob = self.app.outbox
        es = self.e
        for r in ob.records(A_TRANSACTION_EVENT):
            b = ob.load(r[0])
            if b is None:
                continue
            n = b.get(F_EVSE, 1)
            if 1 <= n <= len(es):
                es[n - 1].recovered(b)
        for e in es:
            if e.tx is not None:
                e.stop(STOP_REASON_POWER_LOSS, TX_TRIGGER_ABNORMAL_CONDITION)
            if e.svc:
                e.svc_end(STOP_REASON_POWER_LOSS)
            e.save()

    # ---------------------------------------------------------------- power
    def apply(self):
        """Recompute the power targets and give them to the hardware at once. The board's own
        limits (its share of the site, DSO, demand response, setpoint, profiles for EVSE 0) are
        split equally among the EVSEs offering power (a transaction and an EV plugged), so their
        sum holds it whatever each EV does; lowered ones first, so the sum never exceeds it."""
        hal = self.app.hal
        es = self.e
        # an EVSE offers power (the pilot's PWM, from its target) with a transaction while an EV
        # is plugged (B or C): a real EV closes S2 (B → C) only once offered current
        offer = 0  # bit n-1: EVSE n offers
        k = 0
        for e in es:
            if e.tx is not None and hal.cp_state(e.n) != CP_STATE_A and not self.inoperative:
                offer |= 1 << (e.n - 1)
                k += 1
        for lower in (True, False):  # first only the targets that go down
            for e in es:
                n = e.n
                on = offer & (1 << (n - 1)) != 0
                w = self.app.sc.target(n, True, k or 1) if on else 0
                if w != e.hw_limit and (not lower or w < e.hw_limit):
                    hal.set_limit_w(w, n)
                    e.hw_limit = w
                on = on and hal.cp_state(n) == CP_STATE_C  # the contactor closes only in C
                if on != e._on:
                    hal.set_contactor(on, n)
                    e._on = on
        w = 0
        for e in es:
            w += e.hw_limit
        self.hw_limit = w

    # ---------------------------------------------------------------- tick
    def tick(self, now):
        hal = self.app.hal
        if hal.flags & FLAG_CARD:
            c = hal.take_card()
            if c is not None:
                self.card(c[0], c[1], c[2] if len(c) > 2 else 0)
        for e in self.e:
            e.tick(now)

    def online(self):
        for e in self.e:
            e.status = None  # report the connector status again

    # ---------------------------------------------------------------- authorization
    def card(self, tok, tt, n):
        """A card at the reader of EVSE `n`, or (n = 0) at the board's one reader: it stops the
        transaction it started, else it is for the EVSE reserved for it, else the first free
        one with an EV plugged, else the first free one."""
        es = self.e
        if n > len(es):
            self.app.note("card_ignored", {"why": "no evse %d" % n})
            return
        if not n:
            for e in es:  # its transaction, or its authorization waiting for the EV
                a = e.tx.tok if e.tx is not None else e.auth and e.auth[0]
                if a == tok:
                    e.card(tok, tt)
                    return
            for e in es:
                r = e.res
                if e.tx is None and r and r[2] == tok:
                    n = e.n
                    break
            for e in es:
                if not n and e.free(tok) and self.app.hal.plugged(e.n):
                    n = e.n
            for e in es:
                if not n and e.free(tok):
                    n = e.n
        es[(n or 1) - 1].card(tok, tt)

    # ---------------------------------------------------------------- S3 remote start / stop
    def remote_start(self, body, seq):
        n = body.get(F_EVSE, 0)
        es = self.e
        if n > len(es):
            raise refused("unknown evse %d" % n)
        tok = self.app.link.decrypt(seq, F_ID_TOKEN, body[F_ID_TOKEN])
        if not n:  # any EVSE: the first free one
            for e in es:
                if not n and e.free(tok):
                    n = e.n
            if not n:
                return status(STATUS_REJECTED, "every evse occupied")
        e = es[n - 1]
        if e.tx is not None:
            return status(STATUS_REJECTED, "evse occupied by a transaction")
        if self.inoperative:
            return status(STATUS_REJECTED, "evse unavailable")
        r = e.res
        if r and r[2] != tok:
            return status(STATUS_REJECTED, "evse reserved for another token")
        b = status(STATUS_ACCEPTED)
        tid = e.authorize(tok, body.get(F_TOKEN_TYPE, TOKEN_TYPE_CENTRAL), body[F_REMOTE_START_ID],
                          TX_TRIGGER_REMOTE_START)  # fmt: skip
        if tid is not None:
            b[F_TX_ID] = tid
        return b

    def by_tx(self, tid):
        """The EVSE running transaction `tid`, or None."""
        for e in self.e:
            if e.tx is not None and e.tx.id == tid:
                return e
        return None

    def remote_stop(self, body, seq):
        e = self.by_tx(body[F_TX_ID])
        if e is None:
            return status(STATUS_REJECTED, "no such transaction")
        e.stop(STOP_REASON_REMOTE, TX_TRIGGER_REMOTE_STOP)
        self.apply()
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- S1 reservations
    def _res_update(self, rid, st):
        b = Map()
        b[F_RESERVATION_ID] = rid
        b[F_RES_STATUS] = st
        self.app.emit(A_RESERVATION_UPDATE, b, BILLING)

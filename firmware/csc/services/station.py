"""The station's own operations: TriggerMessage, ChangeAvailability, UnlockConnector and
EmergencyStop (urgent; from the gateway or from the board's emergency button), and time
(B13): TimeSync at each connection and every TIME_SYNC_S.

- ChangeAvailability(operative=false) makes the EVSE unavailable (StatusNotification
  unavailable, no new transaction); during a transaction it is scheduled for its end.
  The state is on flash (`avail`). operative=true also clears an emergency stop.
- EmergencyStop opens the contactor at once (the power target is 0 while stopped), ends
  the transaction with stop_reason emergency_stop and leaves the EVSE unavailable until
  ChangeAvailability(operative=true). Pressing the button (Hal FLAG_BUTTON) does the same
  and tells the gateway with an urgent EmergencyStop request.
- UnlockConnector ends a running transaction (remote), then releases the cable lock.
- Clock steps: the board sets its clock from TimeSync, Heartbeat and Hello; ordering uses
  message ids and transaction seq_no, which only grow, never `time`.
"""

from micropython import const

from .. import store
from ..hal import FLAG_BUTTON
from ..link import ticks_diff
from ..schema import (
    A_CHANGE_AVAILABILITY,
    A_EMERGENCY_STOP,
    A_TIME_SYNC,
    A_TRIGGER_MESSAGE,
    A_UNLOCK_CONNECTOR,
    F_EVSE,
    F_REASON,
    F_TIME,
    F_TIME_MS,
    STATUS_ACCEPTED,
    STOP_REASON_EMERGENCY_STOP,
    STOP_REASON_REMOTE,
    TX_TRIGGER_ABNORMAL_CONDITION,
    TX_TRIGGER_REMOTE_STOP,
)
from . import Service, refused, status

TIME_SYNC_S = const(3600)


class Station(Service):
    # ".name": a rare command, name() of station_cmds.py, imported for the command and dropped again
    # (the urgent ones, UnlockConnector and EmergencyStop, stay here)
    COMMANDS = (
        A_UNLOCK_CONNECTOR, "unlock",
        A_EMERGENCY_STOP, "emergency_stop",
        A_TRIGGER_MESSAGE, ".trigger",
        A_CHANGE_AVAILABILITY, ".change_availability",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        a = store.load(store.path("avail"), None) or [True, False]
        self.operative = a[0]
        self.estop = a[1]
        self.pending_inop = False
        self._sync_due = 0
        self._syncing = False
        app.tx.inoperative = self.estop or not self.operative

    def _save(self):
        store.save(store.path("avail"), [self.operative, self.estop])
        self.app.tx.inoperative = self.estop or not self.operative

    def _evse(self, body):
        e = body.get(F_EVSE, 1)
        if e < 0 or e > self.app.hal.evses:
            raise refused("unknown evse %d" % e)
        return e

    # ---------------------------------------------------------------- urgent
    def unlock(self, body, seq):
        n = self._evse(body) or 1  # the connector of EVSE n: its transaction only
        tx = self.app.tx
        if tx.active(n):
            tx.stop(STOP_REASON_REMOTE, TX_TRIGGER_REMOTE_STOP, n)
        self.app.hal.set_lock(False, n)
        self.app.note("unlocked")
        return status(STATUS_ACCEPTED)

    def _stop_now(self, reason):
        hal = self.app.hal
        for n in range(1, hal.evses + 1):  # every EVSE's, first, before anything that may fail
            hal.set_contactor(False, n)
            hal.set_limit_w(0, n)
        self.estop = True
        self._save()
        tx = self.app.tx
        if tx.active():
            tx.stop(STOP_REASON_EMERGENCY_STOP, TX_TRIGGER_ABNORMAL_CONDITION)
        tx.apply()
        self.app.note("emergency_stop", {"reason": reason})
        self.app.log("emergency stop: %s" % reason, 1)

    def emergency_stop(self, body, seq):
        self._evse(body)
        self._stop_now(body[F_REASON])
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- tick
    def online(self):
        self._sync_due = self.app.now()

    def _synced(self, body, err):
        self._syncing = False
        if body is not None:
            self.app.set_time(body[F_TIME], body.get(F_TIME_MS, 0))
            self.app.note("time_synced", {"time": body[F_TIME]})

    def tick(self, now):
        app = self.app
        hal = app.hal
        if hal.flags & FLAG_BUTTON:
            hal.flags &= ~FLAG_BUTTON
            self._stop_now("emergency button")
            b = {F_EVSE: 1, F_REASON: "emergency button pressed"}
            app.request(A_EMERGENCY_STOP, b, lambda body, err: None)
        if self.pending_inop and not app.tx.active():
            self.pending_inop = False
            self.operative = False
            self._save()
        if app.online and not self._syncing and ticks_diff(now, self._sync_due) >= 0:
            self._syncing = True
            self._sync_due = now + TIME_SYNC_S * 1000
            app.request(A_TIME_SYNC, {}, self._synced)

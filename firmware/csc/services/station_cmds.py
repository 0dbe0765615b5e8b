"""TriggerMessage and ChangeAvailability of the station service (station.py). Imported for
the command and dropped again (services.on_demand): their code takes no heap between
commands. The urgent operations (UnlockConnector, EmergencyStop) stay in station.py."""

from ..msgpack import Map
from ..schema import (
    A_BOOT_NOTIFICATION,
    A_HEARTBEAT,
    A_METER_VALUES,
    A_SIGN_CERTIFICATE,
    A_STATUS_NOTIFICATION,
    A_TIME_SYNC,
    F_ENERGY_WH,
    F_EVSE,
    F_OPERATIVE,
    F_POWER_W,
    F_REQUESTED_ACTION,
    F_TIME,
    STATUS_ACCEPTED,
    STATUS_NOT_SUPPORTED,
    STATUS_REJECTED,
    STATUS_SCHEDULED,
)
from . import status


def trigger(st, body, seq):
    st._evse(body)
    a = body[F_REQUESTED_ACTION]
    app = st.app
    if a == A_STATUS_NOTIFICATION:
        app.tx.online()  # the next tick reports every EVSE's
    elif a == A_HEARTBEAT:
        app._hb_due = app.now()
    elif a == A_TIME_SYNC:
        st._sync_due = app.now()
    elif a == A_BOOT_NOTIFICATION:
        app.boot_notification()
    elif a == A_METER_VALUES:
        m = app.hal.meter(1)
        b = Map()
        b[F_EVSE] = 1
        b[F_ENERGY_WH] = m[0]
        b[F_POWER_W] = m[2]
        b[F_TIME] = app.time()
        app.emit(A_METER_VALUES, b)
    elif a == A_SIGN_CERTIFICATE:
        if not app.security().sign_request():
            return status(STATUS_REJECTED, "no secure element to make a key pair")
    else:
        return status(STATUS_NOT_SUPPORTED, "cannot trigger action %d" % a)
    return status(STATUS_ACCEPTED)


def change_availability(st, body, seq):
    st._evse(body)
    st.app.log("availability: %s" % ("operative" if body[F_OPERATIVE] else "inoperative"), 5)
    if body[F_OPERATIVE]:
        st.operative = True
        st.estop = False
        st.pending_inop = False
        st._save()
        return status(STATUS_ACCEPTED)
    if st.app.tx.active():
        st.pending_inop = True
        return status(STATUS_SCHEDULED)
    st.operative = False
    st._save()
    return status(STATUS_ACCEPTED)

"""The rarely used commands of the board's management (admin.py): M5 Reset, M6 display
messages, M9 fault table, M11 deregistration, M12 migration. Imported for the command and
dropped again (services.on_demand): their code takes no heap between commands; their state
(messages, faults, the reboot and close times) stays in the Admin service."""

from .. import store
from ..schema import (
    A_CLEAR_CACHE,
    F_ADDRESS,
    F_DEVICE_KEY,
    F_DISPLAY_ID,
    F_DISPLAY_PRIORITY,
    F_EVSE,
    F_FAULT_CODE,
    F_FAULT_TABLE,
    F_REASON,
    F_SEVERITY,
    F_TEXT,
    F_WHEN,
    RESET_WHEN_NOW,
    STATUS_ACCEPTED,
    STATUS_SCHEDULED,
    STATUS_UNKNOWN,
)
from . import Refused, status


# ---------------------------------------------------------------- M5 reset
def reset(adm, body, seq):
    app = adm.app
    if app.tx.active() and body.get(F_WHEN) != RESET_WHEN_NOW:
        adm.reset_when_idle = True
        return status(STATUS_SCHEDULED)
    adm.reboot_soon(300)  # let the answer and the last events leave
    return status(STATUS_ACCEPTED)


# ---------------------------------------------------------------- M6 display
def set_display(adm, body, seq):
    if body.get(F_EVSE, 1) > adm.app.hal.evses:
        raise Refused("unknown evse")
    adm.messages[body[F_DISPLAY_ID]] = (body[F_DISPLAY_PRIORITY], body[F_TEXT])
    _show(adm)
    return status(STATUS_ACCEPTED)


def clear_display(adm, body, seq):
    if adm.messages.pop(body[F_DISPLAY_ID], None) is None:
        return status(STATUS_UNKNOWN)
    _show(adm)
    return status(STATUS_ACCEPTED)


def _show(adm):
    best = None
    for k in adm.messages:
        m = adm.messages[k]
        if best is None or m[0] < best[0]:
            best = m
    adm.app.hal.display(best[1] if best else "")


# ---------------------------------------------------------------- M9 faults
def set_fault_table(adm, body, seq):
    t = {}
    for f in body[F_FAULT_TABLE]:
        t[f[F_FAULT_CODE]] = [f[F_SEVERITY], f.get(F_TEXT, "")]
    adm.faults = t
    store.save(store.path("faults"), t)
    return status(STATUS_ACCEPTED)


# ---------------------------------------------------------------- M11/M12
def deregister(adm, body, seq):
    app = adm.app
    app.security_event("Deregistered", body.get(F_REASON))
    store.remove(store.path("key"))  # credentials revoked: back to factory onboarding
    app.auth.command(A_CLEAR_CACHE, None, 0)  # personal data goes; billing records stay
    app.registered = False
    adm._close_at = app.now() + 300
    return status(STATUS_ACCEPTED)


def migrate(adm, body, seq):
    addr = body[F_ADDRESS]
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise Refused("address must be host:port")
    k = body.get(F_DEVICE_KEY)
    if k is not None:
        k = adm.app.link.decrypt(seq, F_DEVICE_KEY, k)
        if len(k) != 32:
            raise Refused("device key must be 32 bytes")
    store.save(store.path("gw"), [host, int(port)])
    if k is not None:
        store.write_atomic(store.path("key"), k)
    adm.app.gateway = (host, int(port))
    adm._close_at = adm.app.now() + 300
    return status(STATUS_ACCEPTED)

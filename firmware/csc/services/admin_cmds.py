"""The rarely used commands of the board's management (admin.py): M5 Reset, M6 display
messages, M7 log criteria, M9 fault table, M11 deregistration, M12 migration. Imported for the
command and dropped again (services.on_demand): their code takes no heap between commands; their
state (messages, criteria, faults, the reset and close times) stays in the Admin service."""

from .. import store
from ..schema import (
    A_CLEAR_CACHE,
    F_ADDRESS,
    F_CERT,
    F_COMPONENTS,
    F_DEVICE_KEY,
    F_DISPLAY_ID,
    F_DISPLAY_PRIORITY,
    F_EVSE,
    F_FAULT_CODE,
    F_FAULT_TABLE,
    F_LANGUAGE,
    F_LOG_LEVEL,
    F_LOG_TYPE,
    F_REASON,
    F_RESET_TYPE,
    F_SEVERITY,
    F_STATUS,
    F_TEXT,
    F_VALID_FROM,
    F_VALID_TO,
    F_WHEN,
    REGISTRATION_REJECTED,
    RESET_TYPE_HARD,
    RESET_WHEN_NOW,
    STATUS_ACCEPTED,
    STATUS_SCHEDULED,
    STATUS_UNKNOWN,
)
from . import refused, status


# ---------------------------------------------------------------- M5 reset
def reset(adm, body, seq):
    app = adm.app
    hard = body[F_RESET_TYPE] == RESET_TYPE_HARD
    now = body.get(F_WHEN) == RESET_WHEN_NOW
    kind = "hard" if hard else "soft"
    app.security_event("ResetOrReboot", "%s reset by the CSMS, %s" % (kind, "now" if now else "when idle"))
    app.log("%s reset %s" % (kind, "now" if now else "when idle"), 3)
    if app.tx.active() and not now:
        adm.reset_when_idle = hard
        return status(STATUS_SCHEDULED)
    adm.reboot_soon(300, hard, "HardReset" if hard else "SoftReset")  # the answer and the last events leave first
    return status(STATUS_ACCEPTED)


# ---------------------------------------------------------------- M6 display
def set_display(adm, body, seq):
    if body.get(F_EVSE, 1) > adm.app.hal.evses:
        raise refused("unknown evse")
    f = body.get(F_VALID_FROM)
    t = body.get(F_VALID_TO)
    if f is not None and t is not None and t <= f:
        raise refused("valid_to must be after valid_from")
    i = body[F_DISPLAY_ID]
    adm.messages[i] = [body[F_DISPLAY_PRIORITY], body[F_TEXT], body.get(F_LANGUAGE), f, t]
    store.save(store.path("disp"), adm.messages)
    adm._shown = -1  # chosen again, and written, now
    adm.show()
    adm.app.log("message %d set" % i, 5, "DisplayCtrlr")
    return status(STATUS_ACCEPTED)


def clear_display(adm, body, seq):
    if adm.messages.pop(body[F_DISPLAY_ID], None) is None:
        return status(STATUS_UNKNOWN)
    store.save(store.path("disp"), adm.messages)
    adm.show()
    return status(STATUS_ACCEPTED)


# ---------------------------------------------------------------- M7 log criteria
def set_log_criteria(adm, body, seq):
    t = body.get(F_LOG_TYPE, 0)
    if t >= len(adm.crit):  # diagnostics, security
        raise refused("unknown log type %d" % t)
    level = body[F_LOG_LEVEL]
    comps = body.get(F_COMPONENTS) or None
    crit = list(adm.crit)  # (the defaults are a constant tuple)
    crit[t] = [level, comps]
    adm.crit = crit
    store.save(store.path("logcrit"), crit)
    from .admin import write  # noqa: PLC0415 — here: a global would grow this module's table while loaded

    # written whatever the criteria: where the new ones begin to hold
    write(
        t,
        "%d 0 LogCtrlr criteria: level %d, components %s\n"
        % (adm.app.time(), level, ",".join(comps) if comps else "all"),
    )
    return status(STATUS_ACCEPTED)


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
    """M11: the board is no longer registered: a running transaction ends now (its records
    leave before the link closes), the EVSE is unavailable, the device key is destroyed. The
    gateway refuses the board's Hellos until the CSMS registers it again; it then onboards
    anew with its factory key."""
    app = adm.app
    app.registration(REGISTRATION_REJECTED)  # kept on flash: no charging offline either
    app.security_event("Deregistered", body.get(F_REASON))
    store.remove(store.path("key"))  # credentials revoked: back to factory onboarding
    app.auth.command(A_CLEAR_CACHE, None, 0)  # personal data goes; billing records stay
    adm._close_at = app.now() + 300
    return status(STATUS_ACCEPTED)


def migrate(adm, body, seq):
    """M12: the board moves to another site's gateway (`address`, host:port on the LAN) and
    onboards there with its factory key, unless the command brings a device key for it (the
    records on its flash go there). The command carries that gateway's local-CSMS certificate
    (`cert`): from then on the board trusts only the holder of its Ed25519 key (M14/M17).
    Refused by name instead: an address the board cannot connect to, a move during a
    transaction (it would be split between two sites), and an unknown gateway (no anchor)."""
    app = adm.app
    addr = body[F_ADDRESS]
    host, _, port = addr.rpartition(":")
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise refused("address must be host:port of a gateway, not %s" % addr)
    if app.tx.active():
        raise refused("a transaction is running: migrate once it has ended")
    try:
        __import__("socket").getaddrinfo(host, int(port))
    except OSError:
        raise refused("address %s does not resolve" % host) from None
    # the new gateway's local-CSMS certificate: the board will trust only the holder of its key
    # there (M14/M17); with no anchor it could not tell that gateway from any other
    cert = body.get(F_CERT)
    sec = app.security()
    if cert is None or sec.key_of(cert) is None:
        raise refused("unknown gateway: migrate needs its local CSMS certificate (an Ed25519 anchor)")
    k = body.get(F_DEVICE_KEY)
    if k is not None:
        k = app.link.decrypt(seq, F_DEVICE_KEY, k)
        if len(k) != 32:
            raise refused("device key must be 32 bytes")
        store.write_atomic(store.path("key"), k)
    else:
        store.remove(store.path("key"))  # this site's key means nothing there: factory onboarding
    if sec.trust_local(cert)[F_STATUS] != STATUS_ACCEPTED:
        raise refused("the new gateway's certificate is revoked or the trust store full")
    store.save(store.path("gw"), [host, int(port)])
    app.gateway = (host, int(port))
    adm._close_at = app.now() + 300
    return status(STATUS_ACCEPTED)

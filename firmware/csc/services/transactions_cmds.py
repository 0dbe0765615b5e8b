"""The reservation and tariff commands of the transaction service (transactions.py): S1
ReserveNow / CancelReservation, S4/S5 SetTariff / CostUpdate. Imported for the command
and dropped again (services.on_demand): their code takes no heap between commands; the
state they change (reservation, tariff) stays in the EVSE's (transactions.Evse).

An EVSE-less ReserveNow (no evse, or 0) reserves the first EVSE that is free (no transaction, no
EV, no reservation): the board holds that one for the token, and a card of the token at the
board's shared reader goes there. SetTariff without an EVSE (or 0) is for every EVSE."""

from ..schema import (
    F_COST,
    F_CURRENCY,
    F_EVSE,
    F_EXPIRY,
    F_ID_TOKEN,
    F_PRICE_KWH,
    F_PRICE_MIN,
    F_PRICE_SESSION,
    F_RESERVATION_ID,
    F_TARIFF_ID,
    F_TEXT,
    F_TX_ID,
    RESERVATION_STATUS_REMOVED,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    STOP_REASON_OTHER,
    TX_TRIGGER_TARIFF_CHANGED,
)
from . import refused, status


# ---------------------------------------------------------------- S1 reservations
def reserve(txs, body, seq):
    n = body.get(F_EVSE, 0)
    es = txs.e
    if n > len(es):
        raise refused("unknown evse %d" % n)
    rid = body[F_RESERVATION_ID]
    plugged = txs.app.hal.plugged
    for e in es:
        r = e.res
        if r and r[0] == rid:  # an update of the same reservation stays where it is
            n = n or e.n
        elif not n and e.tx is None and not r and not plugged(e.n):
            n = e.n
    if not n:
        return status(STATUS_REJECTED, "every evse occupied")
    e = es[n - 1]
    if e.tx is not None or plugged(n):
        return status(STATUS_REJECTED, "evse occupied")
    r = e.res
    if r and r[0] != rid:
        return status(STATUS_REJECTED, "evse already reserved")
    tok = txs.app.link.decrypt(seq, F_ID_TOKEN, body[F_ID_TOKEN])
    e.res = [rid, body[F_EXPIRY], tok]
    e.save()
    return status(STATUS_ACCEPTED)


def cancel_reservation(txs, body, seq):
    for e in txs.e:
        r = e.res
        if r and r[0] == body[F_RESERVATION_ID]:
            e.res = None
            e.save()
            txs._res_update(r[0], RESERVATION_STATUS_REMOVED)
            return status(STATUS_ACCEPTED)
    return status(STATUS_REJECTED, "no such reservation")


# ---------------------------------------------------------------- S4/S5 tariffs
def set_tariff(txs, body, seq):
    n = body.get(F_EVSE, 0)
    if n > len(txs.e):
        raise refused("unknown evse")
    # [id, price_kwh, currency, price_session, price_min]
    t = [
        body[F_TARIFF_ID],
        body[F_PRICE_KWH],
        body[F_CURRENCY],
        body.get(F_PRICE_SESSION, 0),
        body.get(F_PRICE_MIN, 0),
    ]
    txs.app.hal.display(body.get(F_TEXT) or "%s %d.%02d/kWh" % (t[2], t[1] // 100, t[1] % 100))
    for e in txs.e:
        if n not in (0, e.n):
            continue
        old = e.tariff
        e.tariff = t
        e.save()
        if e.tx is not None and (old is None or old[0] != t[0]):
            # a tariff change splits the transaction inside the same service session
            _split(e, STOP_REASON_OTHER, TX_TRIGGER_TARIFF_CHANGED)
    return status(STATUS_ACCEPTED)


def _split(e, reason, trigger):
    """S4: the running transaction of EVSE `e` ends and the next starts at the same meter
    reading; the power path is not touched, so the EV charges on without a gap."""
    tx = e.tx
    m = e.app.hal.meter(e.n)
    e.auth = [tx.tok, tx.tt, tx.rsid]
    e.end(reason, trigger, m)
    e.start(trigger, m)


def cost_update(txs, body, seq):
    e = txs.by_tx(body[F_TX_ID])
    if e is None:
        return status(STATUS_REJECTED, "no such transaction")
    c = body[F_COST]
    txs.app.hal.display("%s %d.%02d" % (body.get(F_CURRENCY, ""), c // 100, c % 100))
    return status(STATUS_ACCEPTED)

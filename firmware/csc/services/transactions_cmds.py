"""The reservation and tariff commands of the transaction service (transactions.py): S1
ReserveNow / CancelReservation, S4/S5 SetTariff / CostUpdate. Imported for the command
and dropped again (services.on_demand): their code takes no heap between commands; the
state they change (reservation, tariff) stays in the Transactions service."""

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
from . import Refused, status


# ---------------------------------------------------------------- S1 reservations
def reserve(txs, body, seq):
    evse = body.get(F_EVSE, 1)
    if evse < 0 or evse > txs.app.hal.evses:
        raise Refused("unknown evse %d" % evse)
    if txs.tx is not None or txs.app.hal.plugged(1):
        return status(STATUS_REJECTED, "evse occupied")
    r = txs.res
    rid = body[F_RESERVATION_ID]
    if r and r[0] != rid:
        return status(STATUS_REJECTED, "evse already reserved")
    tok = txs.app.link.decrypt(seq, F_ID_TOKEN, body[F_ID_TOKEN])
    txs.res = [rid, body[F_EXPIRY], tok]
    txs.save()
    return status(STATUS_ACCEPTED)


def cancel_reservation(txs, body, seq):
    r = txs.res
    if not r or r[0] != body[F_RESERVATION_ID]:
        return status(STATUS_REJECTED, "no such reservation")
    txs.res = None
    txs.save()
    txs._res_update(r[0], RESERVATION_STATUS_REMOVED)
    return status(STATUS_ACCEPTED)


# ---------------------------------------------------------------- S4/S5 tariffs
def set_tariff(txs, body, seq):
    if body.get(F_EVSE, 1) > txs.app.hal.evses:
        raise Refused("unknown evse")
    # [id, price_kwh, currency, price_session, price_min]
    t = [
        body[F_TARIFF_ID],
        body[F_PRICE_KWH],
        body[F_CURRENCY],
        body.get(F_PRICE_SESSION, 0),
        body.get(F_PRICE_MIN, 0),
    ]
    old = txs.tariff
    txs.tariff = t
    txs.save()
    txs.app.hal.display(body.get(F_TEXT) or "%s %d.%02d/kWh" % (t[2], t[1] // 100, t[1] % 100))
    tx = txs.tx
    if tx is not None and (old is None or old[0] != t[0]):
        # a tariff change splits the transaction inside the same service session
        txs.split(STOP_REASON_OTHER, TX_TRIGGER_TARIFF_CHANGED)
    return status(STATUS_ACCEPTED)


def cost_update(txs, body, seq):
    tx = txs.tx
    if tx is None or tx.id != body[F_TX_ID]:
        return status(STATUS_REJECTED, "no such transaction")
    c = body[F_COST]
    txs.app.hal.display("%s %d.%02d" % (body.get(F_CURRENCY, ""), c // 100, c % 100))
    return status(STATUS_ACCEPTED)

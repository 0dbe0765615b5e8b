"""The rarely used commands of the authorization service (auth.py): SendLocalList,
ClearCache and DeletePersonalData (M10). Imported for the command and dropped again
(services.on_demand): their code takes no heap between commands."""

from micropython import const

from .. import store
from ..msgpack import unpackb
from ..schema import (
    F_COUNT,
    F_ENTRIES,
    F_ID_TOKEN,
    F_LAST,
    F_LIST_VERSION,
    F_UPDATE_TYPE,
    STATUS_ACCEPTED,
    STATUS_FAILED,
    UPDATE_TYPE_FULL,
)
from . import status

_REMOVE = const(255)  # an entry's status that removes its token (differential update)


def send_local_list(auth, body, seq):
    plain = auth.app.link.decrypt(seq, F_ENTRIES, body[F_ENTRIES])
    try:
        entries = unpackb(plain)
        if not isinstance(entries, list):
            raise ValueError
    except Exception:
        return status(STATUS_FAILED)
    full = body[F_UPDATE_TYPE] == UPDATE_TYPE_FULL
    if full:
        if auth._staging is None:
            auth._staging = {}
        target = auth._staging
    else:
        target = auth.local
    for e in entries:
        tok = bytes(e[0])
        if e[1] == _REMOVE:
            target.pop(tok, None)
        else:
            target[tok] = [e[1], e[2] if len(e) > 2 else 0]
    if body[F_LAST]:
        if full:
            auth.local = auth._staging
            auth._staging = None
        auth.version = body[F_LIST_VERSION]
        store.save(store.path("ll"), [auth.version, auth.local])
    return status(STATUS_ACCEPTED)


def clear_cache(auth, body, seq):
    auth.cache = {}
    store.remove(store.path("ac"))
    return status(STATUS_ACCEPTED)


def delete_personal_data(auth, body, seq):
    tok = auth.app.link.decrypt(seq, F_ID_TOKEN, body[F_ID_TOKEN])
    n = 0  # entries removed
    if auth.cache.pop(tok, None) is not None:
        n += 1
        store.save(store.path("ac"), auth.cache)
    if auth.local.pop(tok, None) is not None:
        n += 1
        store.save(store.path("ll"), [auth.version, auth.local])
    n += _forget(auth.app.tx, tok)  # every EVSE's session state too (not the stored billing events)
    b = status(STATUS_ACCEPTED)
    b[F_COUNT] = n
    return b


def _forget(txs, tok):
    """M10: the token's authorization waiting for an EV and its reservations are dropped from
    every EVSE of the transaction service `txs` (a running transaction keeps its token: it is
    billed with it). The number dropped."""
    k = 0
    for e in txs.e:
        n = k
        a = e.auth
        if a and a[0] == tok and e.tx is None:
            e.auth = None
            k += 1
        r = e.res
        if r and r[2] == tok:
            e.res = None
            k += 1
        if k > n:
            e.save()
    return k

"""S2 authorization with locally presented credentials: local list, cache, online.

- Local list (SendLocalList): the `entries` field is a secret (AES-CTR under the
  connection's downlink key, protocol "Encrypted fields"); its plaintext is a msgpack array
  of `[token (bin), auth_status (uint), expiry (uint, 0 = none)]`. `full` replaces the list
  (parts until `last`), `differential` merges, and an entry with status 255 removes its
  token. Stored on flash (`ll`) with its version.
- Cache: the answers of online Authorize requests, at most CACHE_MAX tokens, on flash
  (`ac`); ClearCache empties it; DeletePersonalData (M10) removes a token everywhere.
- check(): local list first (LocalPreAuthorize), then the gateway when online, else the
  cache, else OfflineTxForUnknownId.
"""

from micropython import const

from .. import store
from ..msgpack import Map
from ..schema import (
    A_AUTHORIZE,
    A_CLEAR_CACHE,
    A_DELETE_PERSONAL_DATA,
    A_SEND_LOCAL_LIST,
    AUTH_STATUS_ACCEPTED,
    AUTH_STATUS_EXPIRED,
    AUTH_STATUS_UNKNOWN,
    F_AUTH_STATUS,
    F_EXPIRY,
    F_ID_TOKEN,
    F_TOKEN_TYPE,
)
from . import Service

CACHE_MAX = const(16)


class Auth(Service):
    # ".name": a rare command, name() of auth_cmds.py, imported for the command and dropped again
    COMMANDS = (
        A_SEND_LOCAL_LIST, ".send_local_list",
        A_CLEAR_CACHE, ".clear_cache",
        A_DELETE_PERSONAL_DATA, ".delete_personal_data",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        d = store.load(store.path("ll"), None) or [0, {}]
        self.version = d[0]
        self.local = d[1]
        self.cache = store.load(store.path("ac"), {}) or {}
        self._staging = None

    def _status(self, e):
        """The status of a local list or cache entry [status, expiry] now."""
        if e[0] == AUTH_STATUS_ACCEPTED and e[1] and e[1] <= self.app.time():
            return AUTH_STATUS_EXPIRED
        return e[0]

    def check(self, tok, tt, cb):
        """cb(auth_status, source) with source "local", "online", "cache" or "offline"."""
        tok = bytes(tok)
        cfg = self.app.cfg
        e = self.local.get(tok)
        if e is not None and cfg.get("AuthCtrlr", "LocalPreAuthorize") and self._status(e) == AUTH_STATUS_ACCEPTED:
            cb(AUTH_STATUS_ACCEPTED, "local")
            return

        def answer(body, err):
            if body is not None:
                st = body[F_AUTH_STATUS]
                if cfg.get("AuthCtrlr", "AuthCacheEnabled"):
                    self._cache(tok, st, body.get(F_EXPIRY, 0))
                cb(st, "online")
                return
            self.offline(tok, cb)

        if self.app.online:
            b = Map()
            b[F_ID_TOKEN] = tok
            b[F_TOKEN_TYPE] = tt
            self.app.request(A_AUTHORIZE, b, answer)
        else:
            self.offline(tok, cb)

    def offline(self, tok, cb):
        e = self.local.get(tok) or self.cache.get(tok)
        if e is not None:
            cb(self._status(e), "cache" if tok in self.cache else "local")
        elif self.app.cfg.get("AuthCtrlr", "OfflineTxForUnknownId"):
            cb(AUTH_STATUS_ACCEPTED, "offline")
        else:
            cb(AUTH_STATUS_UNKNOWN, "offline")

    def _cache(self, tok, st, expiry):
        c = self.cache
        if tok not in c and len(c) >= CACHE_MAX:
            c.pop(next(iter(c)))
        c[tok] = [st, expiry]
        store.save(store.path("ac"), c)

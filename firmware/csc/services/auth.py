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
from ..msgpack import Map, unpackb
from ..schema import (
    A_AUTHORIZE,
    A_CLEAR_CACHE,
    A_DELETE_PERSONAL_DATA,
    A_SEND_LOCAL_LIST,
    AUTH_STATUS_ACCEPTED,
    AUTH_STATUS_EXPIRED,
    AUTH_STATUS_UNKNOWN,
    F_AUTH_STATUS,
    F_COUNT,
    F_ENTRIES,
    F_EXPIRY,
    F_ID_TOKEN,
    F_LAST,
    F_LIST_VERSION,
    F_STATUS,
    F_TOKEN_TYPE,
    F_UPDATE_TYPE,
    STATUS_ACCEPTED,
    STATUS_FAILED,
    UPDATE_TYPE_FULL,
)
from . import Service

CACHE_MAX = const(16)
_REMOVE = const(255)


class Auth(Service):
    def __init__(self, app):
        super().__init__(app)
        d = store.load(store.path("ll"), None) or [0, {}]
        self.version = d[0]
        self.local = d[1]
        self.cache = store.load(store.path("ac"), {}) or {}
        self._staging = None
        app.on(A_SEND_LOCAL_LIST, self.send_local_list)
        app.on(A_CLEAR_CACHE, self.clear_cache)
        app.on(A_DELETE_PERSONAL_DATA, self.delete_personal_data)

    def _ok(self, e):
        return e[0] == AUTH_STATUS_ACCEPTED and (not e[1] or e[1] > self.app.time())

    def _status(self, e):
        if e[0] == AUTH_STATUS_ACCEPTED and e[1] and e[1] <= self.app.time():
            return AUTH_STATUS_EXPIRED
        return e[0]

    def check(self, tok, tt, cb):
        """cb(auth_status, source) with source "local", "online", "cache" or "offline"."""
        tok = bytes(tok)
        cfg = self.app.cfg
        e = self.local.get(tok)
        if e is not None and cfg.get("AuthCtrlr", "LocalPreAuthorize") and self._ok(e):
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

    def send_local_list(self, body, seq):
        plain = self.app.link.decrypt(seq, F_ENTRIES, body[F_ENTRIES])
        try:
            entries = unpackb(plain)
            if not isinstance(entries, list):
                raise ValueError
        except Exception:
            b = Map()
            b[F_STATUS] = STATUS_FAILED
            return b
        full = body[F_UPDATE_TYPE] == UPDATE_TYPE_FULL
        if full:
            if self._staging is None:
                self._staging = {}
            target = self._staging
        else:
            target = self.local
        for e in entries:
            tok = bytes(e[0])
            if e[1] == _REMOVE:
                target.pop(tok, None)
            else:
                target[tok] = [e[1], e[2] if len(e) > 2 else 0]
        if body[F_LAST]:
            if full:
                self.local = self._staging
                self._staging = None
            self.version = body[F_LIST_VERSION]
            store.save(store.path("ll"), [self.version, self.local])
        b = Map()
        b[F_STATUS] = STATUS_ACCEPTED
        return b

    def clear_cache(self, body, seq):
        self.cache = {}
        store.remove(store.path("ac"))
        b = Map()
        b[F_STATUS] = STATUS_ACCEPTED
        return b

    def forget(self, tok):
        """Remove a token from the cache and the local list; how many entries went."""
        n = 0
        if self.cache.pop(tok, None) is not None:
            n += 1
            store.save(store.path("ac"), self.cache)
        if self.local.pop(tok, None) is not None:
            n += 1
            store.save(store.path("ll"), [self.version, self.local])
        return n

    def delete_personal_data(self, body, seq):
        tok = self.app.link.decrypt(seq, F_ID_TOKEN, body[F_ID_TOKEN])
        n = self.forget(tok) + self.app.tx.forget(tok)
        b = Map()
        b[F_STATUS] = STATUS_ACCEPTED
        b[F_COUNT] = n
        return b

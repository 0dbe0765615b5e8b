"""Site authorization (S2, R4-2): the pre-distributed local list, then the cache.

The local list comes from the CSMS (`SendLocalList`) or from roaming token lists
(`TokenList`, R4-2): the CSMS's own decisions, handed out in advance and versioned, so the
site answers from it at once, online or not. The cache remembers what the CSMS (or the
roaming endpoint) answered before; it is for offline use: while the uplink is up a card is
asked upstream again, so that a card blocked since is refused at once, unless the operator
trusts a cached answer for a while (`auth.online_trust_s`: 0, the default, never). Offline
the list comes first, then the cache, each with its expiry. Both live in SQLite so that a
restart during an outage keeps them. A token unknown to both is refused offline (or
accepted, if the operator prefers service over revenue: `auth.unknown_token_offline`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

from gateway.schema import EPOCH_UNIX, AuthStatus


class Decision(NamedTuple):
    status: int
    expiry: int | None
    source: str
    """"list", "cache", "policy" or "unknown"."""
    trusted: bool = False
    """The site may give this answer while online without asking upstream: a local-list entry
    in force, or a cached answer younger than the operator's trust window."""


def _proto_now() -> int:
    return max(0, int(time.time()) - EPOCH_UNIX)


class Authorizer:
    def __init__(self, path: Path | str, unknown_policy: str = "reject", online_trust_s: float = 0.0) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (token TEXT NOT NULL, source TEXT NOT NULL, status INTEGER NOT NULL,"
            " expiry INTEGER, PRIMARY KEY (source, token))"
        )
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(tokens)")}
        if "at" not in cols:  # a site's database from before the trust window: its entries count as old
            self._db.execute("ALTER TABLE tokens ADD COLUMN at INTEGER NOT NULL DEFAULT 0")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.unknown_policy = unknown_policy
        self.online_trust_s = online_trust_s
        self._mem: dict[tuple[str, str], tuple[int, int | None, int]] = {
            (s, t): (st, e, at)
            for t, s, st, e, at in self._db.execute("SELECT token, source, status, expiry, at FROM tokens")
        }
        row = self._db.execute("SELECT v FROM meta WHERE k = 'list_version'").fetchone()
        self.list_version: int = row[0] if row else 0

    def close(self) -> None:
        self._db.close()

    def update_list(self, version: int, full: bool, entries: list[tuple[str, int, int | None]]) -> None:
        """Installs a local-list update (full replaces, differential merges) in one transaction."""
        db = self._db
        at = _proto_now()
        db.execute("BEGIN IMMEDIATE")
        if full:
            db.execute("DELETE FROM tokens WHERE source = 'list'")
            self._mem = {k: v for k, v in self._mem.items() if k[0] != "list"}
        db.executemany(
            "INSERT OR REPLACE INTO tokens(token, source, status, expiry, at) VALUES (?, 'list', ?, ?, ?)",
            [(t, s, e, at) for t, s, e in entries],
        )
        db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('list_version', ?)", (version,))
        db.execute("COMMIT")
        for token, status, expiry in entries:
            self._mem["list", token] = (status, expiry, at)
        self.list_version = version

    def remember(self, token: str, status: int, expiry: int | None, at: int | None = None) -> None:
        """Caches an authorization decided upstream (`at`: when, protocol seconds; now if None)."""
        at = _proto_now() if at is None else at
        self._db.execute(
            "INSERT OR REPLACE INTO tokens(token, source, status, expiry, at) VALUES (?, 'cache', ?, ?, ?)",
            (token, status, expiry, at),
        )
        self._mem["cache", token] = (status, expiry, at)

    def clear_cache(self) -> None:
        self._db.execute("DELETE FROM tokens WHERE source = 'cache'")
        self._mem = {k: v for k, v in self._mem.items() if k[0] != "cache"}

    def forget(self, token: str) -> int:
        """M10: removes the token everywhere this site holds it (list and cache); how many entries."""
        n = self._db.execute("DELETE FROM tokens WHERE token = ?", (token,)).rowcount
        for src in ("list", "cache"):
            self._mem.pop((src, token), None)
        return int(n)

    def authorize(self, token: str, now_ts: int) -> Decision:
        """`now_ts` in protocol seconds; an expired entry answers EXPIRED (and is not trusted
        online: the CSMS may have renewed it)."""
        for source in ("list", "cache"):
            hit = self._mem.get((source, token))
            if hit is not None:
                status, expiry, at = hit
                if expiry is not None and expiry < now_ts and status == AuthStatus.ACCEPTED:
                    return Decision(AuthStatus.EXPIRED, expiry, source)
                trusted = source == "list" or (self.online_trust_s > 0 and now_ts - at < self.online_trust_s)
                return Decision(status, expiry, source, trusted)
        if self.unknown_policy == "accept":
            return Decision(AuthStatus.ACCEPTED, None, "policy")
        return Decision(AuthStatus.UNKNOWN, None, "unknown")

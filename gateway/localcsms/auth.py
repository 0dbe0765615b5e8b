"""Offline authorization (S2, R4-2): the pre-distributed local list, then the cache.

The local list comes from the CSMS (`SendLocalList`) or from roaming token lists
(`TokenList`, R4-2); the cache remembers what this site accepted before. Both live in
SQLite so that a restart during an outage keeps them. A token unknown to both is refused
(or accepted, if the operator prefers service over revenue: `auth.unknown_token_offline`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import NamedTuple

from gateway.schema import AuthStatus


class Decision(NamedTuple):
    status: int
    expiry: int | None
    source: str


class Authorizer:
    def __init__(self, path: Path | str, unknown_policy: str = "reject") -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (token TEXT NOT NULL, source TEXT NOT NULL, status INTEGER NOT NULL,"
            " expiry INTEGER, PRIMARY KEY (source, token))"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.unknown_policy = unknown_policy
        self._mem: dict[tuple[str, str], tuple[int, int | None]] = {
            (s, t): (st, e) for t, s, st, e in self._db.execute("SELECT token, source, status, expiry FROM tokens")
        }
        row = self._db.execute("SELECT v FROM meta WHERE k = 'list_version'").fetchone()
        self.list_version: int = row[0] if row else 0

    def close(self) -> None:
        self._db.close()

    def update_list(self, version: int, full: bool, entries: list[tuple[str, int, int | None]]) -> None:
        """Installs a local-list update (full replaces, differential merges) in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        if full:
            db.execute("DELETE FROM tokens WHERE source = 'list'")
            self._mem = {k: v for k, v in self._mem.items() if k[0] != "list"}
        db.executemany("INSERT OR REPLACE INTO tokens(token, source, status, expiry) VALUES (?, 'list', ?, ?)", entries)
        db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('list_version', ?)", (version,))
        db.execute("COMMIT")
        for token, status, expiry in entries:
            self._mem["list", token] = (status, expiry)
        self.list_version = version

    def remember(self, token: str, status: int, expiry: int | None) -> None:
        """Caches an authorization decided upstream."""
        self._db.execute(
            "INSERT OR REPLACE INTO tokens(token, source, status, expiry) VALUES (?, 'cache', ?, ?)",
            (token, status, expiry),
        )
        self._mem["cache", token] = (status, expiry)

    def clear_cache(self) -> None:
        self._db.execute("DELETE FROM tokens WHERE source = 'cache'")
        self._mem = {k: v for k, v in self._mem.items() if k[0] != "cache"}

    def forget(self, token: str) -> int:
        """M10: removes the token everywhere this site holds it."""
        n = self._db.execute("DELETE FROM tokens WHERE token = ?", (token,)).rowcount
        for src in ("list", "cache"):
            self._mem.pop((src, token), None)
        return n

    def authorize(self, token: str, now_ts: int) -> Decision:
        """`now_ts` in protocol seconds; an expired entry answers EXPIRED."""
        for source in ("list", "cache"):
            hit = self._mem.get((source, token))
            if hit is not None:
                status, expiry = hit
                if expiry is not None and expiry < now_ts and status == AuthStatus.ACCEPTED:
                    return Decision(AuthStatus.EXPIRED, expiry, source)
                return Decision(status, expiry, source)
        if self.unknown_policy == "accept":
            return Decision(AuthStatus.ACCEPTED, None, "policy")
        return Decision(AuthStatus.UNKNOWN, None, "unknown")

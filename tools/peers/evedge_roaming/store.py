"""SQLite store of one roaming endpoint: WAL, synchronous=FULL, one transaction per request
that commits before the answer is sent (what is acknowledged survives a crash or restart).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMMON_DDL = """
CREATE TABLE IF NOT EXISTS login_tokens(digest TEXT PRIMARY KEY, party TEXT NOT NULL, expiry INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nonces(party TEXT NOT NULL, nonce TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY(party, nonce));
CREATE TABLE IF NOT EXISTS idempotency(origin TEXT NOT NULL, message TEXT NOT NULL, key TEXT NOT NULL,
    body_sha256 TEXT NOT NULL, response TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY(origin, message, key));
-- M10: to which parties personal data (a token uid) was sent, so that a deletion follows it
CREATE TABLE IF NOT EXISTS shared(token_uid TEXT NOT NULL, party TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY(token_uid, party));
-- durable outgoing jobs (DeleteUserData hand-ons, Settlements, reservation expiry notices): retried with
-- backoff by the endpoint's background loop until the peer acknowledges; state pending | refused (a 4xx)
CREATE TABLE IF NOT EXISTS jobs(id INTEGER PRIMARY KEY, message TEXT NOT NULL, dest TEXT NOT NULL, key TEXT NOT NULL,
    body TEXT NOT NULL, ref TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, due REAL NOT NULL, created INTEGER NOT NULL, last_error TEXT,
    UNIQUE(message, dest, key));
"""

#: security bookkeeping, not domain data (a refused request may still record its nonce)
BOOKKEEPING = ("login_tokens", "nonces")


class Store:
    def __init__(self, path: Path, ddl: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(COMMON_DDL + ddl)
        self._depth = 0

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction (nested calls join the outer one); rolled back on any exception."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK")
            raise
        self._depth = 0
        self.db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, args).fetchone()
        return row

    def get(self, sql: str, *args: Any) -> sqlite3.Row:
        """The first row; LookupError when there is none."""
        row = self.one(sql, *args)
        if row is None:
            raise LookupError(f"no row for {sql!r} {args!r}")
        return row

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return list(self.db.execute(sql, args).fetchall())

    def exec(self, sql: str, *args: Any) -> int:
        with self.tx() as db:
            return db.execute(sql, args).rowcount

    def tables(self) -> list[str]:
        rows = self.all("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        return [str(r[0]) for r in rows]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every domain table's rows (tests assert that a refused request changed nothing)."""
        return {
            t: sorted((tuple(r) for r in self.all(f"SELECT * FROM {t}")), key=_row_order)
            for t in self.tables()
            if t not in BOOKKEEPING
        }

    def close(self) -> None:
        self.db.close()


def _row_order(row: tuple[Any, ...]) -> tuple[tuple[bool, Any], ...]:
    """A sort key for rows whose columns may hold NULL: NULL first, the values of a column (one SQLite
    type each here) in their own order; plain tuples fail when two rows tie up to a NULL and a value."""
    return tuple((v is not None, v if v is not None else 0) for v in row)

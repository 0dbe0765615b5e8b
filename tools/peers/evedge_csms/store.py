"""The CSMS store: a `Store` protocol and its SQLite implementation.

Every domain operation of the CSMS is written against the small table-oriented `Store`
protocol (insert/upsert/get/select/update/delete inside `transaction()`), over the data
model of `tables.py`. `SqliteStore` is the embedded default (WAL, synchronous=FULL: a
committed row survives a power cut); a PostgreSQL backend implements the same eight
methods with the same DDL types mapped (`int` → BIGINT, `blob` → BYTEA, `json` → JSONB).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from evedge_csms.tables import BY_NAME, TABLES, Table

Row = dict[str, Any]


class StoreError(RuntimeError):
    """A store operation named a table or column that the data model does not have."""


class Store(Protocol):
    """What the CSMS needs from a persistent store. All writes inside one `transaction()`
    are committed together (durably) when the block exits, or not at all."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def insert(self, table: str, row: Row, *, ignore: bool = False) -> bool:
        """Insert a row; with `ignore`, a row whose key exists is left alone. True if inserted."""

    def upsert(self, table: str, row: Row) -> None:
        """Insert, or update the given non-key columns of the row with the same key."""

    def get(self, table: str, **key: Any) -> Row | None: ...
    def select(self, table: str, where: Row | None = None, order: str | None = None) -> list[Row]: ...
    def update(self, table: str, values: Row, where: Row) -> int: ...
    def delete(self, table: str, where: Row) -> int: ...
    def next_id(self, name: str) -> int:
        """The next value (1, 2, …) of a named durable counter."""

    def close(self) -> None: ...


def _to_json(value: Any) -> str:
    def enc(v: Any) -> Any:
        if isinstance(v, bytes | bytearray):
            return {"hex": bytes(v).hex()}
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [enc(x) for x in v]
        return v

    return json.dumps(enc(value), separators=(",", ":"), sort_keys=True)


def _from_json(text: str) -> Any:
    def dec(v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) == {"hex"} and isinstance(v["hex"], str):
                return bytes.fromhex(v["hex"])
            return {k: dec(x) for k, x in v.items()}
        if isinstance(v, list):
            return [dec(x) for x in v]
        return v

    return dec(json.loads(text))


_SQL_TYPE = {"int": "INTEGER", "text": "TEXT", "blob": "BLOB", "json": "TEXT"}


def ddl(table: Table) -> str:
    cols = ", ".join(f"{c} {_SQL_TYPE[t]}" for c, t in table.columns)
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({cols}, PRIMARY KEY ({', '.join(table.key)}))"


class SqliteStore:
    """`Store` on one SQLite file (WAL, synchronous=FULL, busy timeout for the admin CLI)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        self._depth = 0
        with self.transaction():
            for t in TABLES:
                self._db.execute(ddl(t))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _table(name: str) -> Table:
        try:
            return BY_NAME[name]
        except KeyError:
            raise StoreError(f"no table {name!r} in the CSMS data model") from None

    @staticmethod
    def _check_cols(table: Table, cols: Any) -> None:
        bad = [c for c in cols if c not in table.column_names]
        if bad:
            raise StoreError(f"table {table.name} has no column(s) {bad}")

    @staticmethod
    def _in(table: Table, row: Row) -> list[Any]:
        types = dict(table.columns)
        return [_to_json(v) if types[c] == "json" and v is not None else v for c, v in row.items()]

    @staticmethod
    def _out(table: Table, cur: sqlite3.Cursor) -> list[Row]:
        names = [d[0] for d in cur.description]
        types = dict(table.columns)
        rows = []
        for rec in cur.fetchall():
            rows.append(
                {
                    n: (_from_json(v) if types[n] == "json" and v is not None else v)
                    for n, v in zip(names, rec, strict=True)
                }
            )
        return rows

    def _where(self, table: Table, where: Row | None) -> tuple[str, list[Any]]:
        if not where:
            return "", []
        self._check_cols(table, where)
        parts, args = [], []
        for c, v in where.items():
            if v is None:
                parts.append(f"{c} IS NULL")
            else:
                parts.append(f"{c} = ?")
                args.append(v)
        return " WHERE " + " AND ".join(parts), args

    # ------------------------------------------------------------------ Store
    @contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            self._db.execute("COMMIT")

    def transaction(self) -> AbstractContextManager[None]:
        return self._tx()

    def insert(self, table: str, row: Row, *, ignore: bool = False) -> bool:
        t = self._table(table)
        self._check_cols(t, row)
        verb = "INSERT OR IGNORE" if ignore else "INSERT"
        sql = f"{verb} INTO {t.name} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
        with self._lock:
            return self._db.execute(sql, self._in(t, row)).rowcount == 1

    def upsert(self, table: str, row: Row) -> None:
        t = self._table(table)
        self._check_cols(t, row)
        missing = [k for k in t.key if k not in row]
        if missing:
            raise StoreError(f"upsert into {t.name} without key column(s) {missing}")
        rest = [c for c in row if c not in t.key]
        action = "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest) if rest else "DO NOTHING"
        sql = (
            f"INSERT INTO {t.name} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
            f" ON CONFLICT ({', '.join(t.key)}) {action}"
        )
        with self._lock:
            self._db.execute(sql, self._in(t, row))

    def get(self, table: str, **key: Any) -> Row | None:
        rows = self.select(table, key)
        return rows[0] if rows else None

    def select(self, table: str, where: Row | None = None, order: str | None = None) -> list[Row]:
        t = self._table(table)
        clause, args = self._where(t, where)
        sql = f"SELECT * FROM {t.name}{clause}"
        if order:
            self._check_cols(t, [o.split()[0] for o in order.split(",")])
            sql += f" ORDER BY {order}"
        with self._lock:
            return self._out(t, self._db.execute(sql, args))

    def update(self, table: str, values: Row, where: Row) -> int:
        t = self._table(table)
        self._check_cols(t, values)
        clause, args = self._where(t, where)
        sets = ", ".join(f"{c} = ?" for c in values)
        with self._lock:
            return self._db.execute(f"UPDATE {t.name} SET {sets}{clause}", self._in(t, values) + args).rowcount

    def delete(self, table: str, where: Row) -> int:
        t = self._table(table)
        clause, args = self._where(t, where)
        with self._lock:
            return self._db.execute(f"DELETE FROM {t.name}{clause}", args).rowcount

    def next_id(self, name: str) -> int:
        with self.transaction():
            row = self.get("counters", name=name)
            value = (row["value"] if row else 0) + 1
            self.upsert("counters", {"name": name, "value": value})
            return int(value)

    def close(self) -> None:
        with self._lock:
            self._db.close()

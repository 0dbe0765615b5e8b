"""The durable outbox: what the gateway owes upstream, in SQLite (WAL, synchronous=FULL).

A row is a frame a board gave us, kept with its device and message id. The LAN side acks a
frame to its board only after the transaction holding its row has committed; the uplink
relays rows in `seq` order (the order of acceptance) and retires them when the CSMS acks.
`(device, msg_id)` is unique, so a board that resends after a lost ack creates no second
row; retired rows keep their key (frame dropped) for the dedup horizon, then are pruned.

`Outbox` is synchronous and owned by one thread; `Committer` is the asyncio side: it
gathers the rows that arrive while a commit is running into the next transaction (group
commit), so the commit rate adapts to the disk and the event loop never waits on fsync.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from gateway.schema import FIELDS, Key

BOARD_IDS = int(FIELDS[Key.ID_FLOOR].max) + 1
"""A board numbers its messages below this (its counter stays a small int on a 32-bit board)."""


class Row(NamedTuple):
    """One frame owed upstream."""

    seq: int
    device: str
    msg_id: int
    prio: int
    frame: bytes


NewRow = Row
"""A row to store: its seq is given when the dispatcher accepts it (`Committer.alloc`)."""


class Outbox:
    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, device TEXT NOT NULL,"
            " msg_id INTEGER NOT NULL, prio INTEGER NOT NULL, at_ms INTEGER NOT NULL, frame BLOB,"
            " acked INTEGER NOT NULL DEFAULT 0, UNIQUE (device, msg_id))"
        )
        # the highest message id of each device whose rows were pruned: the dedup key outlives
        # its rows here, so that a board given a new key (a replacement with a fresh flash) is
        # told to number above it (`high_water`)
        self._db.execute("CREATE TABLE IF NOT EXISTS high_water (device TEXT PRIMARY KEY, msg_id INTEGER NOT NULL)")
        (last,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()
        self.next_seq: int = last + 1

    def close(self) -> None:
        self._db.close()

    def commit(self, rows: Sequence[Row], retire: Sequence[int], now_ms: int) -> list[int | None]:
        """Stores `rows` (their seqs given by the caller, in acceptance order) and retires
        `retire` in one transaction; returns each row's seq, None for a duplicate of a row
        already held (same device and message id)."""
        db = self._db
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:  # the rows themselves are the parameters: no tuple per row
                db.executemany(
                    "INSERT OR IGNORE INTO outbox(seq, device, msg_id, prio, frame, at_ms)"
                    f" VALUES (?,?,?,?,?,{int(now_ms)})",
                    rows,
                )
            inserted = db.total_changes - before
            if retire:
                db.executemany(
                    "UPDATE outbox SET acked = 1, frame = NULL WHERE seq BETWEEN ? AND ?", seq_ranges(retire)
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        seqs: list[int | None] = [r[0] for r in rows]
        if rows:
            self.next_seq = max(self.next_seq, max(r[0] for r in rows) + 1)
        if inserted != len(rows):
            lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
            present = {s for (s,) in db.execute("SELECT seq FROM outbox WHERE seq BETWEEN ? AND ?", (lo, hi))}
            seqs = [s if s in present else None for s in seqs]
        return seqs

    def pending(self) -> list[Row]:
        """Every row not yet acknowledged upstream, in acceptance order (at start-up)."""
        return [
            Row(*r)
            for r in self._db.execute(
                "SELECT seq, device, msg_id, prio, frame FROM outbox WHERE acked = 0 ORDER BY seq"
            )
        ]

    def oldest_pending_ms(self) -> int | None:
        r = self._db.execute("SELECT min(at_ms) FROM outbox WHERE acked = 0").fetchone()
        return None if r is None else r[0]

    def prune(self, before_ms: int, limit: int = 50_000) -> int:
        """Forgets retired rows accepted before `before_ms` (their dedup horizon is over),
        keeping each device's highest message id among them (`high_water`)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (seq INTEGER PRIMARY KEY, device TEXT, msg_id INTEGER)")
            db.execute("DELETE FROM doomed")
            db.execute(
                "INSERT INTO doomed SELECT seq, device, msg_id FROM outbox WHERE acked = 1 AND at_ms < ? LIMIT ?",
                (before_ms, limit),
            )
            db.execute(
                "INSERT INTO high_water(device, msg_id) SELECT device, max(msg_id) FROM doomed WHERE msg_id < ?"
                " GROUP BY device ON CONFLICT(device) DO UPDATE SET msg_id = max(msg_id, excluded.msg_id)",
                (BOARD_IDS,),
            )
            cur = db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM doomed)")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return cur.rowcount

    def high_water(self, device: str) -> int:
        """The highest message id the site ever accepted from the board `device` (0: none).
        The gateway's own frames about a device (e.g. its security events) are numbered from
        the clock, far above any board's counter (`BOARD_IDS`): they are not the board's."""
        (held,) = self._db.execute(
            "SELECT coalesce(max(msg_id), 0) FROM outbox WHERE device = ? AND msg_id < ?", (device, BOARD_IDS)
        ).fetchone()
        row = self._db.execute("SELECT msg_id FROM high_water WHERE device = ?", (device,)).fetchone()
        return max(int(held), int(row[0]) if row else 0)


def seq_ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive seqs as (first, last): relays retire rows in long runs."""
    out: list[tuple[int, int]] = []
    it = iter(sorted(seqs))
    first = last = next(it)
    for s in it:
        if s != last + 1:
            out.append((first, last))
            first = s
        last = s
    out.append((first, last))
    return out


Done = Callable[[list[int | None] | BaseException], None]


class Committer:
    """Group commit on one writer thread: rows submitted while a commit runs go into the next one."""

    def __init__(self, outbox: Outbox, max_rows: int = 16_384, max_bytes: int = 1 << 20) -> None:
        self.outbox = outbox
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._rows: list[NewRow] = []
        self._bytes = 0
        self._waiters: list[tuple[int, Done]] = []
        self._urgent: list[NewRow] = []
        self._urgent_waiters: list[tuple[int, Done]] = []
        self._retire: list[int] = []
        self._busy = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self.commits = 0
        self.rows_committed = 0
        self.last_commit_s = 0.0
        self.next_seq = outbox.next_seq
        """Seq of the next row accepted: given on the event loop, in acceptance order, so that
        a row is known by its seq before its commit (urgent rows are relayed before it)."""

    def alloc(self, n: int) -> int:
        """Reserves `n` consecutive seqs; returns the first."""
        first = self.next_seq
        self.next_seq = first + n
        return first

    @property
    def waiting(self) -> int:
        return len(self._rows) + len(self._urgent)

    @property
    def full(self) -> bool:
        """Enough rows wait for the next commit: the dispatcher stops feeding it."""
        return len(self._rows) >= self.max_rows or self._bytes >= self.max_bytes

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, rows: list[NewRow], done: Done, urgent: bool = False, nbytes: int | None = None) -> None:
        """Queues rows for the next commit. Urgent rows get a small commit of their own,
        ahead of the rows of other classes waiting (they wait for at most the commit in
        progress, which `max_bytes` keeps short). `nbytes`: the rows' frame bytes, when the
        caller counted them."""
        if urgent:
            self._urgent.extend(rows)
            self._urgent_waiters.append((len(rows), done))
        else:
            self._rows.extend(rows)
            self._bytes += sum(len(r[4]) for r in rows) if nbytes is None else nbytes
            self._waiters.append((len(rows), done))
        self._kick()

    def retire(self, seqs: Sequence[int]) -> None:
        """Retirement need not be durable at once: a row relayed again after a crash is
        deduplicated by the CSMS. It rides with the next commit."""
        self._retire.extend(seqs)
        self._kick()

    def _kick(self) -> None:
        if self._busy or not (self._rows or self._retire or self._urgent):
            return
        self._busy = True
        if self._urgent:
            rows, waiters, retire = self._urgent, self._urgent_waiters, []
            self._urgent, self._urgent_waiters = [], []
        else:
            rows, waiters, retire = self._rows, self._waiters, self._retire
            self._rows, self._waiters, self._retire, self._bytes = [], [], [], 0
        loop = asyncio.get_running_loop()
        now_ms = int(time.time() * 1000)
        t0 = time.perf_counter()
        fut = loop.run_in_executor(self._pool, self.outbox.commit, rows, retire, now_ms)

        def finished(f: asyncio.Future[list[int | None]]) -> None:
            self._busy = False
            self.last_commit_s = time.perf_counter() - t0
            exc = f.exception()
            if exc is None:
                seqs = f.result()
                self.commits += 1
                self.rows_committed += len(rows)
                pos = 0
                for n, done in waiters:
                    done(seqs[pos : pos + n])
                    pos += n
            else:
                self._retire[:0] = retire
                for _, done in waiters:
                    done(exc)
            self._kick()

        fut.add_done_callback(finished)

    async def drain(self) -> None:
        """Waits until nothing is waiting and no commit runs."""
        while self._busy or self._rows or self._retire or self._urgent:
            await asyncio.sleep(0.002)

    def run_sync(self, fn: Callable[[], object]) -> asyncio.Future[object]:
        """Runs `fn` on the writer thread (the only thread that touches the database)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

"""What the OCPP face keeps across restarts, and the rule by which outbox rows retire.

Rule: the outbox (gateway/outbox.py) is the one durable queue; the OCPP face keeps no copy of
a row. It keeps, per board, the highest outbox `seq` its CSMS acknowledged (`cursor`): rows of
that board at or below it are not sent again after a restart, the rest are, in order. A row is
retired in the outbox only when every northbound that carries it has delivered it
(`RetireGate`): the native uplink alone, the OCPP face alone, or both. Until then its frame
stays, so a gateway kill -9 loses nothing for either.

Also kept: each board's identity as its station (from its last BootNotification) and the
CSMS's last registration answer, so that stations come up at a restart before their boards
speak, and a board is answered while the CSMS is unreachable with what the CSMS decided.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.ocpp.up import BoardInfo


class Ledger:
    """ocpp.sqlite. Written on the outbox's writer thread (`Gateway.run_sync`), read at start."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS station (device TEXT PRIMARY KEY, model TEXT, vendor TEXT, serial TEXT,"
            " fw_version TEXT, reason TEXT, registration INTEGER)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS cursor (device TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS token (seq INTEGER PRIMARY KEY, device TEXT, token TEXT)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS display (device TEXT, id INTEGER, info TEXT, PRIMARY KEY (device, id))"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS upload (device TEXT, request_id INTEGER, location TEXT, filename TEXT,"
            " PRIMARY KEY (device, request_id))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cert (device TEXT, sha256 BLOB, type TEXT, der BLOB,"
            " PRIMARY KEY (device, sha256))"
        )
        self.cursors: dict[str, int] = dict(self._db.execute("SELECT device, seq FROM cursor").fetchall())
        """device → the highest outbox seq its station delivered."""

    def close(self) -> None:
        self._db.close()

    def stations(self) -> dict[str, tuple[BoardInfo, int | None]]:
        rows = self._db.execute("SELECT device, model, vendor, serial, fw_version, reason, registration FROM station")
        return {r[0]: (BoardInfo(r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows}

    def save_station(self, device: str, info: BoardInfo, registration: int | None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO station VALUES (?,?,?,?,?,?,?)",
            (device, info.model, info.vendor, info.serial, info.fw_version, info.reason, registration),
        )

    def delivered(self, device: str, seq: int) -> None:
        """The CSMS acknowledged `device`'s rows up to `seq` (called in the rows' order)."""
        self.delivered_many({device: seq})

    def delivered_many(self, cursors: dict[str, int]) -> None:
        """Several boards' cursors in one transaction (one fsync): the group commit of
        `OcppBridge.delivered`."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT OR REPLACE INTO cursor VALUES (?, ?)", cursors.items())
        self._db.executemany("DELETE FROM token WHERE device = ? AND seq <= ?", cursors.items())
        self._db.execute("COMMIT")

    def save_tokens(self, rows: list[tuple[int, str, str]]) -> None:
        """(seq, device, token in clear) of rows whose id token OCPP must carry (the Started
        TransactionEvent's idToken): the gateway holds the clear text in memory only, and the
        row may be sent after a restart."""
        self._db.executemany("INSERT OR REPLACE INTO token VALUES (?, ?, ?)", rows)

    def token(self, seq: int) -> str | None:
        r = self._db.execute("SELECT token FROM token WHERE seq = ?", (seq,)).fetchone()
        return None if r is None else str(r[0])

    def monitor_ids(self, n: int) -> list[int]:
        """`n` new monitor ids, unique on the site and never reused (OCPP: the station numbers
        the monitors the CSMS sets without one); from MONITOR_ID_BASE so that the ids an
        operator gives through the native CSMS (small numbers) are not replaced by accident."""
        row = self._db.execute("SELECT v FROM meta WHERE k = 'monitor_id'").fetchone()
        first = int(row[0]) + 1 if row else MONITOR_ID_BASE
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('monitor_id', ?)", (first + n - 1,))
        return list(range(first, first + n))

    def save_display(self, device: str, info: dict[str, object]) -> None:
        """A display message (OCPP's MessageInfo) the board accepted: GetDisplayMessages answers
        from these, the board keeps its own copy on flash."""
        self._db.execute("INSERT OR REPLACE INTO display VALUES (?, ?, ?)", (device, info["id"], json.dumps(info)))

    def drop_display(self, device: str, display_id: int | None) -> None:
        if display_id is None:
            self._db.execute("DELETE FROM display WHERE device = ?", (device,))
        else:
            self._db.execute("DELETE FROM display WHERE device = ? AND id = ?", (device, display_id))

    def displays(self, device: str) -> list[dict[str, object]]:
        rows = self._db.execute("SELECT info FROM display WHERE device = ? ORDER BY id", (device,))
        return [json.loads(r[0]) for r in rows]

    def save_upload(self, device: str, request_id: int, location: str, filename: str) -> None:
        """A GetLog of the CSMS under way: after a restart its board's Uploaded is not the
        gateway's to pass on as is (the chunks gathered before are gone: UploadFailure)."""
        self._db.execute("INSERT OR REPLACE INTO upload VALUES (?, ?, ?, ?)", (device, request_id, location, filename))

    def drop_upload(self, device: str, request_id: int) -> None:
        self._db.execute("DELETE FROM upload WHERE device = ? AND request_id = ?", (device, request_id))

    def uploads(self) -> list[tuple[str, int, str, str]]:
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in self._db.execute("SELECT * FROM upload")]

    def save_cert(self, device: str, sha256: bytes, kind: str, der: bytes) -> None:
        """A CA certificate a board installed through OCPP (its OCPP type): how the board's hash is
        told as OCPP's CertificateHashData (gateway/ocpp/certs.py)."""
        self._db.execute("INSERT OR REPLACE INTO cert VALUES (?, ?, ?, ?)", (device, sha256, kind, der))

    def drop_cert(self, device: str, sha256: bytes) -> None:
        self._db.execute("DELETE FROM cert WHERE device = ? AND sha256 = ?", (device, sha256))

    def certs(self, device: str) -> dict[bytes, tuple[str, bytes]]:
        """SHA-256 of the DER → (OCPP certificate type, DER)."""
        rows = self._db.execute("SELECT sha256, type, der FROM cert WHERE device = ?", (device,))
        return {bytes(r[0]): (str(r[1]), bytes(r[2])) for r in rows}


MONITOR_ID_BASE = 100_000


class RetireGate:
    """A row retires once each of `consumers` delivered it (in memory: after a restart the
    rows still held are owed to every consumer, each of which skips what it knows it sent:
    the CSMS deduplicates the native Relays, the OCPP face has its cursor)."""

    def __init__(self, consumers: Iterable[str]) -> None:
        self.consumers = frozenset(consumers)
        self._seen: dict[int, set[str]] = {}

    def delivered(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """The seqs `consumer` delivered that may now be retired."""
        if len(self.consumers) == 1:
            return list(seqs)
        out = []
        for s in seqs:
            got = self._seen.setdefault(s, set())
            got.add(consumer)
            if got >= self.consumers:
                del self._seen[s]
                out.append(s)
        return out

    @property
    def waiting(self) -> int:
        """Rows delivered by some consumers and not yet by all."""
        return len(self._seen)

"""Per-device keys of the site's boards (M11 deregistration, M12 migration, M13 onboarding).

A board is known by its `device_id`. Its 32-byte `K_dev` is made at onboarding (the board
proves its factory key, the gateway answers with a fresh key encrypted under the
factory-derived session key) and kept in SQLite, committed before the Hello response that
carries it is sent, so a crash never leaves a board with a key the gateway forgot.
Factory keys are `HMAC-SHA256(factory_seed, device_id)` (the id's UTF-8 bytes): the
manufacturer's per-device keys, derived from one seed the operator installs. Development
sites may also accept a device-id prefix whose keys derive from `dev_seed` (load tests,
benchmarks).

No Hello writes the table before its tag verified: a development device's row is inserted,
and an onboarding key committed, only then, and on the gateway's writer thread
(`onboard`, `admit`, through a connection of their own), never with an fsync on the event
loop. The table is the one source of truth, shared by the running gateway and
`python -m gateway devices` (another process): every Hello reads its device's row, so a
device provisioned or deregistered while the gateway runs is seen at its next Hello,
without a restart. Only the numbering of devices (`idx`, the Rust queue's device number,
never reused or changed) is cached, in a bounded map.

Registration (M13, M11) is the CSMS's: its last answer to a device's BootNotification is
kept in `registration` (NULL: never decided), so that the site answers with it while the
uplink is down. A deregistration revokes the key and refuses every Hello, the factory one
included, until the CSMS registers the device again (`decided` with accepted): then the
device may onboard anew with its factory key.

Onboarding is the operator's decision (M13, `[devices] onboarding`): with "registered" (the
default) a factory Hello is answered only for a device the operator registered, at the CSMS
(its decision accepted or pending, pushed to the site: `decided`) or here (`register`, the
`devices register` command); "any" onboards every device holding a factory key (development
sites). A factory Hello for a device that already holds a key here is a re-key: refused
unless the operator approved one (`approve_rekey`, `devices rekey`), which the next
onboarding uses up. Both refusals are raised only once the Hello's tag verified under the
factory key (`DeviceError.key`), so that they report a real holder of that key.

M19: the certificate a board was given (CertificateSigned, `set_certificate`) is kept; a
Hello from a board whose certificate the revocation list names is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

ACTIVE, REVOKED, MIGRATED = "active", "revoked", "migrated"
_ACCEPTED, _REJECTED = 0, 2
"""gateway.schema.Registration's values (not imported: `python -m gateway devices` needs no core)."""


_COLS = "device_id, idx, k_dev, status, registration, enrolled, rekey, cert"
ONBOARDING = ("registered", "any")
"""`[devices] onboarding`: who may onboard with a factory key (see above)."""
_MAY_ONBOARD = (_ACCEPTED, 1)
"""Registrations (accepted, pending) by which the CSMS's operator registered a device."""


class RevocationCheck(Protocol):
    """The revocation list in force (gateway.protocol.revocation.Revocations is one)."""

    def revoked(self, cert: x509.Certificate) -> str | None: ...


def derive(seed: bytes, device_id: str) -> bytes:
    return hmac.new(seed, device_id.encode(), hashlib.sha256).digest()


@dataclass
class Device:
    device_id: str
    idx: int
    key: bytes | None
    status: str
    registration: int | None = None
    """The CSMS's last registration decision (gateway.schema.Registration), None if never made."""
    enrolled: int | None = None
    """1: the operator registered the device here for onboarding (`register`)."""
    rekey: int | None = None
    """1: the operator approved one re-key of the active device (`approve_rekey`)."""
    cert: bytes | None = None
    """DER of the certificate the board was given (M16, M18), None before one."""


class DeviceError(Exception):
    """Why a device may not connect; `name` is the wire error (UNKNOWN_DEVICE, REJECTED).
    `key`: when set, the refusal stands only for a Hello whose tag verifies under it (the
    factory key): otherwise the Hello is refused for its tag. `event`: the SecurityEvent
    name under which such a refusal is reported upstream."""

    def __init__(self, name: str, reason: str, key: bytes | None = None, event: str = "") -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason
        self.key = key
        self.event = event


class Devices:
    """The device table (SQLite, WAL) and a bounded cache of the device numbers (`idx`)."""

    NAMES_MAX = 65536
    """Entries of the `idx` → device id cache (a miss reads the table)."""

    def __init__(
        self,
        path: Path | str,
        factory_seed: bytes | None,
        dev_seed: bytes | None = None,
        dev_prefix: str = "",
        onboarding: str = "registered",
        revocations: RevocationCheck | None = None,
    ) -> None:
        if onboarding not in ONBOARDING:
            raise ValueError(f"onboarding must be one of {', '.join(ONBOARDING)}, not {onboarding!r}")
        self.onboarding = onboarding
        self.revocations = revocations
        # Another process (`python -m gateway devices`) may write the table: wait for its
        # short write transactions rather than fail with "database is locked".
        self._path = str(path)
        self._db = self._connect()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, idx INTEGER UNIQUE NOT NULL,"
            " k_dev BLOB, status TEXT NOT NULL)"
        )
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        for col, kind in (("registration", "INTEGER"), ("enrolled", "INTEGER"), ("rekey", "INTEGER"), ("cert", "BLOB")):
            if col not in cols:  # a table made before these were kept (M13, M19)
                self._db.execute(f"ALTER TABLE devices ADD COLUMN {col} {kind}")
        self._wdb: sqlite3.Connection | None = None
        """The connection of `onboard` and `admit`, opened by the first of them (the writer thread)."""
        self._factory_seed = factory_seed
        self._dev_seed = dev_seed if dev_prefix else None
        self._dev_prefix = dev_prefix
        self._names: OrderedDict[int, str] = OrderedDict()
        self._data_version = self._version()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def close(self) -> None:
        self._db.close()
        if self._wdb is not None:
            self._wdb.close()

    def _row(self, where: str, arg: str | int) -> Device | None:
        r = self._db.execute(f"SELECT {_COLS} FROM devices WHERE {where} = ?", (arg,)).fetchone()
        return None if r is None else Device(*r)

    def get(self, device_id: str) -> Device | None:
        """The device's row as stored now (one indexed read)."""
        return self._row("device_id", device_id)

    def all(self) -> list[Device]:
        return [Device(*r) for r in self._db.execute(f"SELECT {_COLS} FROM devices ORDER BY idx")]

    def name_of(self, idx: int) -> str:
        """The device id numbered `idx` (cached: an idx never changes its device)."""
        names = self._names
        did = names.get(idx)
        if did is None:
            d = self._row("idx", idx)
            if d is None:
                raise KeyError(idx)
            did = self._remember(d.idx, d.device_id)
        else:
            names.move_to_end(idx)
        return did

    def _remember(self, idx: int, device_id: str) -> str:
        names = self._names
        names[idx] = device_id
        names.move_to_end(idx)
        while len(names) > self.NAMES_MAX:
            names.popitem(last=False)
        return device_id

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM devices").fetchone()[0])

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def changed_elsewhere(self) -> bool:
        """Whether another connection (the `devices` command) committed to the table since
        the last call: a cheap check, no table read."""
        v = self._version()
        changed, self._data_version = v != self._data_version, v
        return changed

    def inactive(self, device_ids: Iterable[str]) -> set[str]:
        """Those of `device_ids` that may not connect any more (revoked, migrated)."""
        ids = list(device_ids)
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT device_id FROM devices WHERE status != ? AND device_id IN ({marks})"
            out.update(r[0] for r in self._db.execute(q, (ACTIVE, *chunk)))
        return out

    def _put(self, device_id: str, key: bytes | None, status: str) -> Device:
        """Inserts or updates a device; a new one gets the next number in the same statement,
        so that the gateway and the `devices` command never hand out one number twice."""
        idx = self._write(self._db, device_id, key, status)
        self._remember(idx, device_id)
        return Device(device_id, idx, key, status)

    @staticmethod
    def _write(db: sqlite3.Connection, device_id: str, key: bytes | None, status: str) -> int:
        (idx,) = db.execute(
            "INSERT INTO devices(device_id, idx, k_dev, status)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET k_dev=excluded.k_dev, status=excluded.status RETURNING idx",
            (device_id, key, status),
        ).fetchall()[0]
        return int(idx)

    def _writer(self) -> sqlite3.Connection:
        if self._wdb is None:
            self._wdb = self._connect()
        return self._wdb

    def hello_key(self, device_id: str, factory: bool) -> tuple[bytes, bool]:
        """`(key, new)`: the key the board's Hello must be tagged with (`K_dev`, or its factory
        key when onboarding), read from the table at each Hello (nothing is written), and
        whether the device is a development device without its row yet (`admit` it once the
        Hello's tag verified). Raises DeviceError naming why the device may not connect."""
        d = self.get(device_id)
        if d is not None and d.status == REVOKED:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} was deregistered: refused until registered again")
        if d is not None and d.status != ACTIVE:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} is {d.status} at this site")
        if d is not None and d.cert is not None and self.revocations is not None:
            why = self.revocations.revoked(x509.load_der_x509_certificate(d.cert))
            if why is not None:
                reason = f"device {device_id}: its certificate (serial {_serial(d.cert)}) is {why}"
                key = derive(self._factory_seed, device_id) if factory and self._factory_seed else d.key
                raise DeviceError("REJECTED", reason, key, "CertificateRevoked")
        if factory:
            if self._factory_seed is None:
                raise DeviceError("UNKNOWN_DEVICE", "this site has no factory seed: onboarding is closed")
            key = derive(self._factory_seed, device_id)
            if d is not None and d.key is not None:
                if not d.rekey:
                    reason = f"device {device_id} is active: re-keying needs the operator's approval"
                    raise DeviceError("REJECTED", reason, key, "RekeyRefused")
            elif self.onboarding == "registered" and not _registered(d):
                reason = f"device {device_id} is not registered by the operator: onboarding refused"
                raise DeviceError("UNKNOWN_DEVICE", reason, key, "OnboardingRefused")
            return key, False
        if d is not None and d.key is not None:
            return d.key, False
        if self._dev_seed is not None and device_id.startswith(self._dev_prefix):
            return derive(self._dev_seed, device_id), True
        raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} is not provisioned at this site")

    def onboard(self, device_id: str) -> bytes:
        """M13: makes and commits a fresh K_dev (it replaces an earlier one: the board
        only asks with its factory key when it holds no device key). On the writer thread,
        once the factory Hello's tag verified."""
        key = secrets.token_bytes(32)
        self._writer().execute(
            "INSERT INTO devices(device_id, idx, k_dev, status)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET k_dev=excluded.k_dev, status=excluded.status, rekey=NULL",
            (device_id, key, ACTIVE),
        )  # an approved re-key is used up
        return key

    def admit(self, device_id: str, key: bytes) -> None:
        """Commits the row of a development device (its key derived from `dev_seed`). On the
        writer thread, once its Hello's tag verified; a row written meanwhile by the `devices`
        command (a key provisioned, the device deregistered) is left as it is."""
        self._writer().execute(
            "INSERT INTO devices(device_id, idx, k_dev, status)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET k_dev=excluded.k_dev WHERE status = ? AND k_dev IS NULL",
            (device_id, key, ACTIVE, ACTIVE),
        )

    def provision(self, device_id: str, key: bytes) -> Device:
        """Installs a key made elsewhere (`devices provision`, a migration into this site
        (M12), a test); a running gateway accepts the device at its next Hello."""
        if len(key) != 32:
            raise ValueError(f"a device key is 32 bytes (64 hex digits), got {len(key)} bytes")
        return self._put(device_id, key, ACTIVE)

    def register(self, device_id: str) -> Device:
        """M13, the operator at the site (`devices register`): the device may onboard with its
        factory key (`[devices] onboarding = "registered"`); a deregistered one stays refused
        until the CSMS registers it again."""
        self._db.execute(
            "INSERT INTO devices(device_id, idx, k_dev, status, enrolled)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), NULL, ?, 1)"
            " ON CONFLICT(device_id) DO UPDATE SET enrolled=1",
            (device_id, ACTIVE),
        )
        d = self.get(device_id)
        assert d is not None
        return d

    def approve_rekey(self, device_id: str) -> None:
        """The operator approves one re-key of an active device (`devices rekey`): its next
        factory Hello gets a new key, and the old key stops working."""
        d = self.get(device_id)
        if d is None or d.status != ACTIVE or d.key is None:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} holds no key at this site: nothing to re-key")
        self._db.execute("UPDATE devices SET rekey=1 WHERE device_id=?", (device_id,))

    def set_certificate(self, device_id: str, cert_der: bytes) -> None:
        """M16, M18: the certificate the board installed (checked against revocations at its
        Hellos). On the writer thread."""
        self._writer().execute("UPDATE devices SET cert=? WHERE device_id=?", (cert_der, device_id))

    def deregister(self, device_id: str) -> None:
        """M11: the key is destroyed; the id stays so that the device is refused by name (its
        factory Hello too) until the CSMS registers it again (`decided`)."""
        self._put(device_id, None, REVOKED)

    def deregistered(self, device_id: str) -> None:
        """M11, the CSMS's Deregister: `deregister`, and the registration rejected. On the
        writer thread."""
        self._writer().execute(
            "INSERT INTO devices(device_id, idx, k_dev, status, registration)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), NULL, ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET k_dev=NULL, status=excluded.status,"
            " registration=excluded.registration",
            (device_id, REVOKED, _REJECTED),
        )

    def decided(self, device_id: str, registration: int) -> None:
        """M13: the CSMS's registration decision for the device, kept for the answers the site
        gives alone. Accepted after a deregistration (M11) lets the device onboard again with
        its factory key (its old key stays destroyed). On the writer thread."""
        self._writer().execute(
            "INSERT INTO devices(device_id, idx, k_dev, status, registration)"
            " VALUES (?, (SELECT COALESCE(MAX(idx), 0) + 1 FROM devices), NULL, ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET registration=excluded.registration,"
            " status=CASE WHEN status = ? AND excluded.registration = ? THEN ? ELSE status END",
            (device_id, ACTIVE, int(registration), REVOKED, _ACCEPTED, ACTIVE),
        )

    def migrated(self, device_id: str) -> None:
        """M12: the device moved to another site: its key here is destroyed and its Hellos
        refused. On the writer thread."""
        self._writer().execute("UPDATE devices SET k_dev=NULL, status=? WHERE device_id=?", (MIGRATED, device_id))

    def registration_of(self, device_id: str) -> int | None:
        """The CSMS's last decision for the device (None: never decided), one indexed read."""
        r = self._db.execute("SELECT registration FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return None if r is None or r[0] is None else int(r[0])

    def hand_over(self, device_id: str) -> bytes:
        """M12: returns the device key for the new site and stops accepting it here."""
        d = self.get(device_id)
        if d is None or d.key is None or d.status != ACTIVE:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} has no active key at this site")
        self._put(device_id, None, MIGRATED)
        return d.key

    def with_certificates(self) -> list[Device]:
        """The active devices that hold a certificate (checked when the revocations change)."""
        q = f"SELECT {_COLS} FROM devices WHERE cert IS NOT NULL AND status = ?"
        return [Device(*r) for r in self._db.execute(q, (ACTIVE,))]

    def idx_of(self, device_id: str) -> int:
        d = self.get(device_id)
        if d is None:
            d = self._put(device_id, None, ACTIVE)
        self._remember(d.idx, device_id)
        return d.idx


def _registered(d: Device | None) -> bool:
    """The operator registered the device: here, or at the CSMS (accepted or pending)."""
    return d is not None and (bool(d.enrolled) or d.registration in _MAY_ONBOARD)


def _serial(cert_der: bytes) -> str:
    return format(x509.load_der_x509_certificate(cert_der).serial_number, "x")

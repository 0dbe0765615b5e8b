"""Per-device keys of the site's boards (M11 deregistration, M12 migration, M13 onboarding).

A board is known by its `device_id`. Its 32-byte `K_dev` is made at onboarding (the board
proves its factory key, the gateway answers with a fresh key encrypted under the
factory-derived session key) and kept in SQLite, committed before the Hello response that
carries it is sent, so a crash never leaves a board with a key the gateway forgot.
Factory keys are `HMAC-SHA256(factory_seed, device_id)`: the manufacturer's per-device
keys, derived from one seed the operator installs. Development sites may also accept a
device-id prefix whose keys derive from `dev_seed` (load tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

ACTIVE, REVOKED, MIGRATED = "active", "revoked", "migrated"


def derive(seed: bytes, device_id: str) -> bytes:
    return hmac.new(seed, device_id.encode(), hashlib.sha256).digest()


@dataclass
class Device:
    device_id: str
    idx: int
    key: bytes | None
    status: str


class DeviceError(Exception):
    """Why a device may not connect; `name` is the wire error (UNKNOWN_DEVICE, REJECTED)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


class Devices:
    """The device table and its in-memory index (`idx` numbers devices for the Rust queue)."""

    def __init__(
        self, path: Path | str, factory_seed: bytes | None, dev_seed: bytes | None = None, dev_prefix: str = ""
    ) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, idx INTEGER UNIQUE NOT NULL,"
            " k_dev BLOB, status TEXT NOT NULL)"
        )
        self._factory_seed = factory_seed
        self._dev_seed = dev_seed if dev_prefix else None
        self._dev_prefix = dev_prefix
        self._by_id: dict[str, Device] = {}
        self._by_idx: dict[int, Device] = {}
        for did, idx, key, status in self._db.execute("SELECT device_id, idx, k_dev, status FROM devices"):
            self._index(Device(did, idx, key, status))
        self._next_idx = max(self._by_idx, default=0) + 1

    def _index(self, d: Device) -> None:
        self._by_id[d.device_id] = d
        self._by_idx[d.idx] = d

    def close(self) -> None:
        self._db.close()

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def by_idx(self, idx: int) -> Device:
        return self._by_idx[idx]

    def __len__(self) -> int:
        return len(self._by_id)

    def _save(self, d: Device) -> None:
        self._db.execute(
            "INSERT INTO devices(device_id, idx, k_dev, status) VALUES (?,?,?,?) ON CONFLICT(device_id) DO UPDATE"
            " SET k_dev=excluded.k_dev, status=excluded.status",
            (d.device_id, d.idx, d.key, d.status),
        )
        self._index(d)

    def _new(self, device_id: str, key: bytes | None, status: str) -> Device:
        d = self._by_id.get(device_id)
        if d is None:
            d = Device(device_id, self._next_idx, key, status)
            self._next_idx += 1
        else:
            d = Device(device_id, d.idx, key, status)
        self._save(d)
        return d

    def hello_key(self, device_id: str, factory: bool) -> bytes:
        """The key the board's Hello must be tagged with (`K_dev`, or its factory key when
        onboarding). Raises DeviceError naming why the device may not connect."""
        d = self._by_id.get(device_id)
        if d is not None and d.status != ACTIVE:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} is {d.status} at this site")
        if factory:
            if self._factory_seed is None:
                raise DeviceError("UNKNOWN_DEVICE", "this site has no factory seed: onboarding is closed")
            return derive(self._factory_seed, device_id)
        if d is not None and d.key is not None:
            return d.key
        if self._dev_seed is not None and device_id.startswith(self._dev_prefix):
            key = derive(self._dev_seed, device_id)
            self._new(device_id, key, ACTIVE)
            return key
        raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} is not provisioned at this site")

    def onboard(self, device_id: str) -> bytes:
        """M13: makes and commits a fresh K_dev (it replaces an earlier one: the board
        only asks with its factory key when it holds no device key)."""
        key = secrets.token_bytes(32)
        self._new(device_id, key, ACTIVE)
        return key

    def provision(self, device_id: str, key: bytes) -> Device:
        """Installs a key made elsewhere (a migration into this site, M12, or a test)."""
        if len(key) != 32:
            raise ValueError("a device key is 32 bytes")
        return self._new(device_id, key, ACTIVE)

    def deregister(self, device_id: str) -> None:
        """M11: the key is destroyed; the id stays so that the device is refused by name."""
        self._new(device_id, None, REVOKED)

    def hand_over(self, device_id: str) -> bytes:
        """M12: returns the device key for the new site and stops accepting it here."""
        d = self._by_id.get(device_id)
        if d is None or d.key is None or d.status != ACTIVE:
            raise DeviceError("UNKNOWN_DEVICE", f"device {device_id} has no active key at this site")
        key = d.key
        self._new(device_id, None, MIGRATED)
        return key

    def idx_of(self, device_id: str) -> int:
        d = self._by_id.get(device_id)
        if d is None:
            d = self._new(device_id, None, ACTIVE)
        return d.idx

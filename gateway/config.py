"""The gateway's configuration: one TOML file over embedded defaults.

Every key has a default that runs on one machine (data under `./gwdata`, loopback
addresses, development keys and certificates made on first run). A bad value raises
`ConfigError` naming the key, so an operator never has to guess which line is wrong.
"""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.protocol import devpki, gid


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Zone:
    """A group of boards behind one feeder: their EVSEs share `limit_w` (E1, E5)."""

    zone: int
    limit_w: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    site_id: str = "DE*EVE*LSITE1"
    data_dir: Path = Path("gwdata")
    # LAN
    lan_host: str = "127.0.0.1"
    lan_port: int = 7700
    max_bad_frames: int = 20
    bad_window_s: float = 10.0
    throttle_s: float = 0.5
    heartbeat_s: int = 60
    queue_high: int = 50_000
    # outbox
    outbox_max_rows: int = 2_000_000
    outbox_alarm_ratio: float = 0.8
    commit_max_rows: int = 4096
    commit_max_bytes: int = 128 << 10
    dedup_horizon_s: int = 7 * 86400
    synchronous: str = "FULL"
    # upstream
    upstream_enabled: bool = True
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 7800
    server_name: str = "csms"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    relay_max_frames: int = 256
    relay_max_bytes: int = 256 << 10
    connect_timeout_s: float = 5.0
    bulk_unsent_max: int = 16384
    bulk_queue_ms: float = 1.0
    """How long, about, an urgent relay may wait behind the lower classes at the receiver; 0: no
    flight bound (aioquic's congestion window only)."""
    max_datagram_size: int = 0
    """UDP payload of the uplink's QUIC packets; 0: 16 KiB on loopback, else aioquic's 1200."""
    inflight_max_bytes: int = 4 << 20
    backoff_min_s: float = 0.1
    backoff_max_s: float = 30.0
    idle_timeout_s: float = 10.0
    fifo: bool = False
    signers: dict[str, bytes] = field(default_factory=dict)
    # devices
    factory_seed: bytes | None = None
    dev_seed: bytes | None = None
    dev_prefix: str = ""
    # local CSMS
    site_limit_w: int = 100_000
    zones: tuple[Zone, ...] = ()
    min_evse_w: int = 1_380
    unknown_token_offline: str = "reject"
    local_csms_cert: Path | None = None
    """The gateway's own certificate as local CSMS (M17); default: issued by the dev PKI."""
    # firmware (M4 at the site)
    fw_cache: bool = True
    fw_first_wave: int = 1
    """Boards of a multi-board UpdateFirmware that get it first; 0: all at once."""
    fw_wave_timeout_s: float = 900.0
    fw_cache_max_bytes: int = 256 << 20
    """Bound of the image cache: least recently used images are evicted, never one a rollout needs."""
    # online identification through the CSO's roaming endpoint (IEC 63119 mixed mode); off
    # unless [roaming] names the endpoint
    roaming_party: str = ""
    roaming_cso: str = ""
    roaming_host: str = ""
    roaming_port: int = 0
    roaming_server_name: str = "localhost"
    roaming_ca: Path | None = None
    roaming_cert: Path | None = None
    roaming_key: Path | None = None
    roaming_password: str = ""
    roaming_secret: bytes = b""
    roaming_timeout_s: float = 3.0
    # metrics
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9700

    @property
    def roaming_enabled(self) -> bool:
        return bool(self.roaming_host)

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox.sqlite"

    @property
    def devices_path(self) -> Path:
        return self.data_dir / "devices.sqlite"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"


# (section, key) -> (attribute, converter)
def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    return v


def _int(lo: int, hi: int) -> Any:
    def conv(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"{key}: expected an integer in {lo}..{hi}, got {v!r}")
        return v

    return conv


def _datagram(key: str, v: Any) -> int:
    n: int = _int(0, 65000)(key, v)
    if 0 < n < 1200:
        raise ConfigError(f"{key}: 0 (automatic) or at least 1200 (QUIC's minimum), got {v!r}")
    return n


def _float(lo: float, hi: float) -> Any:
    def conv(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ConfigError(f"{key}: expected a number in {lo}..{hi}, got {v!r}")
        return float(v)

    return conv


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _hex32(key: str, v: Any) -> bytes:
    try:
        b = bytes.fromhex(_str(key, v))
    except ValueError:
        raise ConfigError(f"{key}: expected 64 hex digits, got {v!r}") from None
    if len(b) != 32:
        raise ConfigError(f"{key}: expected 32 bytes (64 hex digits), got {len(b)} bytes")
    return b


def _path(key: str, v: Any) -> Path:
    return Path(_str(key, v))


def _addr(key: str, v: Any) -> tuple[str, int]:
    s = _str(key, v)
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port (e.g. 127.0.0.1:7700), got {v!r}")
    return host.strip("[]"), int(port)


def _site(key: str, v: Any) -> str:
    try:
        return str(gid.parse(_str(key, v), expect="L"))
    except gid.GidError as e:
        raise ConfigError(f"{key}: {e}") from None


def _operator(key: str, v: Any) -> str:
    try:
        return str(gid.parse(_str(key, v), expect="O"))
    except gid.GidError as e:
        raise ConfigError(f"{key}: {e}") from None


def _secret(key: str, v: Any) -> bytes:
    try:
        b = bytes.fromhex(_str(key, v))
    except ValueError:
        raise ConfigError(f"{key}: expected hex digits, got a string that is not hex") from None
    if len(b) < 16:
        raise ConfigError(f"{key}: expected at least 16 bytes (32 hex digits), got {len(b)} bytes")
    return b


def _sync(key: str, v: Any) -> str:
    s = _str(key, v).upper()
    if s not in ("FULL", "EXTRA", "NORMAL"):
        raise ConfigError(f"{key}: expected FULL, EXTRA or NORMAL, got {v!r}")
    return s


def _policy(key: str, v: Any) -> str:
    s = _str(key, v)
    if s not in ("reject", "accept"):
        raise ConfigError(f"{key}: expected 'reject' or 'accept', got {v!r}")
    return s


SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "site": {"id": ("site_id", _site), "data_dir": ("data_dir", _path), "local_csms_cert": ("local_csms_cert", _path)},
    "lan": {
        "max_bad_frames": ("max_bad_frames", _int(1, 1_000_000)),
        "bad_window_s": ("bad_window_s", _float(0.01, 3600)),
        "throttle_s": ("throttle_s", _float(0, 60)),
        "heartbeat_s": ("heartbeat_s", _int(1, 86400)),
        "queue_high": ("queue_high", _int(16, 10_000_000)),
    },
    "outbox": {
        "max_rows": ("outbox_max_rows", _int(1, 1 << 40)),
        "alarm_ratio": ("outbox_alarm_ratio", _float(0.01, 1.0)),
        "commit_max_rows": ("commit_max_rows", _int(1, 1 << 20)),
        "commit_max_bytes": ("commit_max_bytes", _int(4096, 1 << 30)),
        "dedup_horizon_s": ("dedup_horizon_s", _int(0, 1 << 31)),
        "synchronous": ("synchronous", _sync),
    },
    "upstream": {
        "enabled": ("upstream_enabled", _bool),
        "server_name": ("server_name", _str),
        "ca": ("ca_file", _path),
        "cert": ("cert_file", _path),
        "key": ("key_file", _path),
        "relay_max_frames": ("relay_max_frames", _int(1, 256)),
        "relay_max_bytes": ("relay_max_bytes", _int(4096, 1 << 20)),
        "connect_timeout_s": ("connect_timeout_s", _float(0.1, 600)),
        "bulk_unsent_max": ("bulk_unsent_max", _int(256, 1 << 20)),
        "bulk_queue_ms": ("bulk_queue_ms", _float(0, 10_000)),
        "max_datagram_size": ("max_datagram_size", _datagram),
        "inflight_max_bytes": ("inflight_max_bytes", _int(4096, 1 << 30)),
        "backoff_min_s": ("backoff_min_s", _float(0.001, 60)),
        "backoff_max_s": ("backoff_max_s", _float(0.01, 3600)),
        "idle_timeout_s": ("idle_timeout_s", _float(0.5, 3600)),
        "fifo": ("fifo", _bool),
    },
    "devices": {
        "factory_seed": ("factory_seed", _hex32),
        "dev_seed": ("dev_seed", _hex32),
        "dev_prefix": ("dev_prefix", _str),
    },
    "power": {
        "site_limit_w": ("site_limit_w", _int(0, 100_000_000)),
        "min_evse_w": ("min_evse_w", _int(0, 1_000_000)),
    },
    "firmware": {
        "cache": ("fw_cache", _bool),
        "first_wave": ("fw_first_wave", _int(0, 100_000)),
        "wave_timeout_s": ("fw_wave_timeout_s", _float(1, 86400)),
        "cache_max_bytes": ("fw_cache_max_bytes", _int(1 << 16, 1 << 40)),
    },
    "auth": {"unknown_token_offline": ("unknown_token_offline", _policy)},
    "roaming": {
        "party_id": ("roaming_party", _operator),
        "cso_party": ("roaming_cso", _operator),
        "server_name": ("roaming_server_name", _str),
        "ca": ("roaming_ca", _path),
        "cert": ("roaming_cert", _path),
        "key": ("roaming_key", _path),
        "password": ("roaming_password", _str),
        "secret": ("roaming_secret", _secret),
        "timeout_s": ("roaming_timeout_s", _float(0.1, 30)),
    },
    "metrics": {},
}
ROAMING_REQUIRED = ("party_id", "cso_party", "address", "ca", "password", "secret")
ADDRS = {"lan.listen": ("lan_host", "lan_port"), "upstream.address": ("upstream_host", "upstream_port"),
         "metrics.listen": ("metrics_host", "metrics_port"),
         "roaming.address": ("roaming_host", "roaming_port")}  # fmt: skip


def parse(doc: dict[str, Any], base: Path = Path()) -> Config:
    """Builds a Config from a parsed TOML document; relative paths are taken from `base`."""
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted(SCHEMA))})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        for key, v in table.items():
            name = f"{section}.{key}"
            if name in ADDRS:
                h, p = ADDRS[name]
                values[h], values[p] = _addr(name, v)
            elif section == "upstream" and key == "signers":
                if not isinstance(v, dict):
                    raise ConfigError(f"{name}: expected a table of signer name = hex Ed25519 public key")
                values["signers"] = {str(k): _hex32(f"{name}.{k}", pk) for k, pk in v.items()}
            elif section == "power" and key == "zone":
                values["zones"] = _zones(name, v)
            elif key in SCHEMA[section]:
                attr, conv = SCHEMA[section][key]
                values[attr] = conv(name, v)
            else:
                raise ConfigError(f"{name}: unknown key")
    roaming = doc.get("roaming")
    if roaming:
        missing = [k for k in ROAMING_REQUIRED if k not in roaming]
        if missing:
            raise ConfigError(f"roaming.{missing[0]}: required when [roaming] is present")
    cfg = Config(**values)
    for attr in ("data_dir", "ca_file", "cert_file", "key_file", "roaming_ca", "roaming_cert", "roaming_key",
                 "local_csms_cert"):  # fmt: skip
        p = getattr(cfg, attr)
        if p is not None and not p.is_absolute():
            values[attr] = base / p
    if cfg.backoff_min_s > cfg.backoff_max_s:
        raise ConfigError("upstream.backoff_min_s: must not exceed upstream.backoff_max_s")
    return Config(**values)


def _zones(name: str, v: Any) -> tuple[Zone, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{name}: expected an array of tables [[power.zone]]")
    out = []
    for i, z in enumerate(v):
        key = f"{name}[{i}]"
        if not isinstance(z, dict):
            raise ConfigError(f"{key}: expected a table")
        unknown = set(z) - {"zone", "limit_w", "devices"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key")
        devs = z.get("devices", [])
        if not isinstance(devs, list) or not all(isinstance(d, str) for d in devs):
            raise ConfigError(f"{key}.devices: expected a list of device ids")
        out.append(
            Zone(
                _int(0, 65535)(f"{key}.zone", z.get("zone")),
                _int(0, 100_000_000)(f"{key}.limit_w", z.get("limit_w")),
                tuple(devs),
            )
        )
    return tuple(out)


def load(path: Path | None) -> Config:
    """Reads the file (None: the embedded defaults alone)."""
    if path is None:
        return parse({})
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse(doc, path.parent)


def prepare(cfg: Config) -> Config:
    """Creates the data folder, the development CA and certificates and the factory seed
    on first run; returns the config with every path filled in."""
    devpki.private_dir(cfg.data_dir)
    values = dict(cfg.__dict__)
    if cfg.cert_file is None or cfg.key_file is None or cfg.ca_file is None:
        ca = devpki.ensure_ca(cfg.pki_dir)
        issued = devpki.issue(cfg.pki_dir, cfg.site_id, ca=ca, server=False, client=True)
        values["ca_file"] = cfg.ca_file or issued.ca
        values["cert_file"] = cfg.cert_file or issued.cert
        values["key_file"] = cfg.key_file or issued.key
    if cfg.local_csms_cert is None:
        ca = devpki.ensure_ca(cfg.pki_dir)
        values["local_csms_cert"] = devpki.issue(cfg.pki_dir, f"localcsms.{cfg.site_id}", ca=ca, client=False).cert
    if cfg.factory_seed is None:
        seed_file = cfg.data_dir / "factory_seed"
        if not seed_file.exists():
            devpki.write_private(seed_file, secrets.token_hex(32).encode())
        values["factory_seed"] = _hex32(str(seed_file), seed_file.read_text().strip())
    return Config(**values)

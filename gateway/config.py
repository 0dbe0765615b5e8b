"""The gateway's configuration: one TOML file over embedded defaults, one frozen dataclass per section.

Every key has a default that runs on one machine (data under `./gwdata`, loopback
addresses, development keys and certificates made on first run), and a bad value raises
`ConfigError` naming `section.key`, so an operator never has to guess which line is wrong.

`Config` holds one frozen dataclass per TOML section (`cfg.lan.queue_high`,
`cfg.upstream.fifo`, `cfg.roaming.timeout_s`), each field named after its TOML key: an
address (`listen`, `address`) gives `host` and `port`, `[[power.zone]]` gives `zones`. A
section is handed whole to the part it configures (the uplink gets `cfg.upstream`, the
roaming client `cfg.roaming`), so no settings object repeats a section field by field. The
parts on the hot path copy the values they use into attributes when they are built and never
walk `cfg.…` per frame. The TOML format is docs/gateway.md's "Configuration".
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway.localcsms import hellokey
from gateway.protocol import devpki, gid
from gateway.schema import FIELDS, Key


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Zone:
    """A group of boards behind one feeder: their EVSEs share `limit_w` (E1, E5)."""

    zone: int
    limit_w: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class SiteConfig:
    """`[site]`."""

    id: str = "DE*EVE*LSITE1"
    """Global id of the location (type L); CN of the site certificate."""
    data_dir: Path = Path("gwdata")
    local_csms_cert: Path | None = None
    """The gateway's own certificate as local CSMS (M17); default: issued by the dev PKI."""

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox.sqlite"

    @property
    def devices_path(self) -> Path:
        return self.data_dir / "devices.sqlite"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"


@dataclass(frozen=True)
class LanConfig:
    """`[lan]`: the boards' TCP server, its bounds (gateway/languard.py) and the flood policy."""

    host: str = "127.0.0.1"
    port: int = 7700
    max_bad_frames: int = 20
    """Bad frames within `bad_window_s`: throttled; twice that: closed, and the device's
    Hellos refused (RATE_LIMITED) until its count falls below it."""
    bad_window_s: float = 10.0
    throttle_s: float = 0.5
    heartbeat_s: int = 60
    queue_high: int = 50_000
    """Frames queued before reading pauses (backpressure)."""
    max_connections: int = 2048
    """Connections at once, lowered to RLIMIT_NOFILE less a headroom (languard.FD_HEADROOM)."""
    max_per_address: int = 64
    """Connections without a completed Hello from one source address."""
    hello_timeout_s: float = 10.0
    """A connection whose Hello has not arrived by then is closed."""
    frame_timeout_s: float = 10.0
    """A frame whose bytes have not all arrived by then (from its first byte) closes its connection."""
    idle_heartbeats: float = 3.0
    """A live link silent for this many heartbeat intervals (`heartbeat_s`) is closed."""


@dataclass(frozen=True)
class OutboxConfig:
    """`[outbox]`."""

    max_rows: int = 2_000_000
    alarm_ratio: float = 0.8
    commit_max_rows: int = 4096
    commit_max_bytes: int = 128 << 10
    dedup_horizon_s: int = 7 * 86400
    synchronous: str = "FULL"


@dataclass(frozen=True)
class UpstreamConfig:
    """`[upstream]`: the uplink to the CSMS (gateway/uplink/)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 7800
    server_name: str = "csms"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    relay_max_frames: int = FIELDS[Key.FRAMES].max_len
    """Frames in one Relay; at most the schema's bound of `frames`."""
    relay_max_bytes: int = 256 << 10
    connect_timeout_s: float = 5.0
    bulk_unsent_max: int = 16384
    """Bulk bytes handed to aioquic and not yet sent (one loopback datagram)."""
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
    """Benchmark baseline only: one queue, one stream, no priority."""
    signers: Mapping[str, bytes] = field(default_factory=dict)
    """Signer name → Ed25519 public key of signed commands."""
    reports_interval_s: float = 60.0
    """E3, M1: at most one SiteForecast (per zone) and one BoardsReport per this many seconds;
    a change within it is sent at its end (gateway/localcsms/reports.py)."""


@dataclass(frozen=True)
class DevicesConfig:
    """`[devices]`."""

    factory_seed: bytes | None = None
    """Default: generated into data_dir/factory_seed (`prepare`)."""
    dev_seed: bytes | None = None
    dev_prefix: str = ""
    offline_registration: str = "pending"
    """M13: the registration the site gives, while the uplink is down, a board the CSMS has
    never decided on (pending: it charges nothing and asks again; accepted; rejected)."""
    onboarding: str = "registered"
    """M13: who may onboard with a factory key: "registered" (the operator registered the device,
    at the CSMS or with `devices register`) or "any" (every holder of a factory key: development)."""


@dataclass(frozen=True)
class PowerConfig:
    """`[power]` and its `[[power.zone]]` tables."""

    site_limit_w: int = 100_000
    min_evse_w: int = 1_380
    zones: tuple[Zone, ...] = ()


@dataclass(frozen=True)
class FirmwareConfig:
    """`[firmware]`: M4 at the site."""

    cache: bool = True
    first_wave: int = 1
    """Boards of a multi-board UpdateFirmware that get it first; 0: all at once."""
    wave_timeout_s: float = 900.0
    cache_max_bytes: int = 256 << 20
    """Bound of the image cache: least recently used images are evicted, never one a rollout needs."""


@dataclass(frozen=True)
class AuthConfig:
    """`[auth]`."""

    unknown_token_offline: str = "reject"
    online_trust_s: float = 0.0
    """While the uplink is up, a cached answer younger than this is given without asking the
    CSMS (S2); 0: always ask, so that a card blocked at the CSMS is refused at once."""


@dataclass(frozen=True)
class RoamingConfig:
    """`[roaming]`: online identification through the CSO's roaming endpoint (IEC 63119 mixed
    mode), the site being a party (role `site`) of that endpoint; off unless the section is there."""

    party_id: str = ""
    """This site's party id at the CSO endpoint (type O)."""
    cso_party: str = ""
    """The CSO endpoint's party id."""
    host: str = ""
    port: int = 0
    server_name: str = "localhost"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    password: str = ""
    secret: bytes = b""
    timeout_s: float = 3.0
    """An Authorize is answered well within the board's own timeout."""

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class OcppConfig:
    """`[ocpp]`: the OCPP 2.0.1 northbound (gateway/ocpp/, docs/ocpp.md); off unless `url` is set.
    Each board is a charging station on a WebSocket of its own, `url`/device id."""

    url: str = ""
    """ws://… (security profile 1) or wss://… (2, 3): the CSMS's OCPP endpoint."""
    security_profile: int = 1
    """1: basic auth over ws; 2: basic auth over TLS; 3: mutual TLS (`cert`, `key`: the site's)."""
    password_file: Path | None = None
    """Profiles 1 and 2: the stations' basic-auth password, one line, a file only its owner may read."""
    ca: Path | None = None
    cert: Path | None = None
    """Profile 3: default the site's certificate (`upstream.cert`, `upstream.key`)."""
    key: Path | None = None
    timeout_s: float = 10.0
    """How long a station waits for the CSMS's answer to one of its CALLs."""
    backoff_max_s: float = 30.0
    max_frame: int = 65536
    """A bigger frame from the CSMS is answered FormatViolation."""
    firmware_ca: Path | None = None
    """UpdateFirmware: the PEM bundle of the firmware signers' roots (OCPP's
    ManufacturerRootCertificate); unset: every UpdateFirmware is refused (InvalidCertificate)."""
    firmware_signer_key: Path | None = None
    """UpdateFirmware: the Ed25519 private key (PEM, mode 0600) the gateway signs a checked image's
    manifest with for the boards, whose loaders trust only Ed25519 signers; its name at the
    boards is `csms-<SHA-256 of the public key, 16 hex>`. Unset: UpdateFirmware is refused."""
    transfer_max_bytes: int = 1 << 20
    """The largest firmware image fetched, or log uploaded, over HTTP(S)."""
    transfer_timeout_s: float = 60.0
    """One firmware download or log upload, from connecting to the last byte."""
    transfer_ca: Path | None = None
    """https:// locations: the CAs their servers are verified against (default the system's)."""

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: GET /metrics, /status, /urgent."""

    host: str = "127.0.0.1"
    port: int = 9700


@dataclass(frozen=True)
class Config:
    site: SiteConfig = field(default_factory=SiteConfig)
    lan: LanConfig = field(default_factory=LanConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    firmware: FirmwareConfig = field(default_factory=FirmwareConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    roaming: RoamingConfig = field(default_factory=RoamingConfig)
    ocpp: OcppConfig = field(default_factory=OcppConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def factory_seed(self) -> bytes | None:
        """`devices.factory_seed`, for tools/board/__main__.py, which reads it under this name
        (its owner moves it to `cfg.devices.factory_seed`; then this goes)."""
        return self.devices.factory_seed


# ---------------------------------------------------------------- converters: (key, value) → value

Conv = Callable[[str, Any], Any]


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    return v


def _int(lo: int, hi: int) -> Conv:
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


def _float(lo: float, hi: float) -> Conv:
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


def _gid(expect: str) -> Conv:
    def conv(key: str, v: Any) -> str:
        try:
            return str(gid.parse(_str(key, v), expect=expect))
        except gid.GidError as e:
            raise ConfigError(f"{key}: {e}") from None

    return conv


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


def _choice(*options: str) -> Conv:
    def conv(key: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(f"{key}: expected {' or '.join(map(repr, options))}, got {v!r}")
        return str(v)

    return conv


def _signers(key: str, v: Any) -> dict[str, bytes]:
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a table of signer name = hex Ed25519 public key")
    return {str(k): _hex32(f"{key}.{k}", pk) for k, pk in v.items()}


def _zones(key: str, v: Any) -> tuple[Zone, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected an array of tables [[power.zone]]")
    out = []
    for i, z in enumerate(v):
        at = f"{key}[{i}]"
        if not isinstance(z, dict):
            raise ConfigError(f"{at}: expected a table")
        unknown = set(z) - {"zone", "limit_w", "devices"}
        if unknown:
            raise ConfigError(f"{at}.{sorted(unknown)[0]}: unknown key")
        devs = z.get("devices", [])
        if not isinstance(devs, list) or not all(isinstance(d, str) for d in devs):
            raise ConfigError(f"{at}.devices: expected a list of device ids")
        out.append(
            Zone(_int(0, 65535)(f"{at}.zone", z.get("zone")), _int(0, 100_000_000)(f"{at}.limit_w", z.get("limit_w")),
                 tuple(devs))
        )  # fmt: skip
    return tuple(out)


def _ocpp_url(key: str, v: Any) -> str:
    url = _str(key, v)
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"{key}: expected a ws:// or wss:// URL, got {v!r}")
    return url


SECTIONS: dict[str, tuple[type[Any], dict[str, Conv]]] = {
    "site": (SiteConfig, {"id": _gid("L"), "data_dir": _path, "local_csms_cert": _path}),
    "lan": (LanConfig, {
        "listen": _addr,
        "max_bad_frames": _int(1, 1_000_000),
        "bad_window_s": _float(0.01, 3600),
        "throttle_s": _float(0, 60),
        "heartbeat_s": _int(1, 86400),
        "queue_high": _int(16, 10_000_000),
        "max_connections": _int(1, 1_000_000),
        "max_per_address": _int(1, 1_000_000),
        "hello_timeout_s": _float(0.01, 3600),
        "frame_timeout_s": _float(0.01, 3600),
        "idle_heartbeats": _float(1.0, 1000),
    }),
    "outbox": (OutboxConfig, {
        "max_rows": _int(1, 1 << 40),
        "alarm_ratio": _float(0.01, 1.0),
        "commit_max_rows": _int(1, 1 << 20),
        "commit_max_bytes": _int(4096, 1 << 30),
        "dedup_horizon_s": _int(0, 1 << 31),
        "synchronous": _sync,
    }),
    "upstream": (UpstreamConfig, {
        "enabled": _bool,
        "address": _addr,
        "server_name": _str,
        "ca": _path,
        "cert": _path,
        "key": _path,
        "relay_max_frames": _int(1, FIELDS[Key.FRAMES].max_len),
        "relay_max_bytes": _int(4096, 1 << 20),
        "connect_timeout_s": _float(0.1, 600),
        "bulk_unsent_max": _int(256, 1 << 20),
        "bulk_queue_ms": _float(0, 10_000),
        "max_datagram_size": _datagram,
        "inflight_max_bytes": _int(4096, 1 << 30),
        "backoff_min_s": _float(0.001, 60),
        "backoff_max_s": _float(0.01, 3600),
        "idle_timeout_s": _float(0.5, 3600),
        "fifo": _bool,
        "signers": _signers,
        "reports_interval_s": _float(0.1, 86400),
    }),
    "devices": (DevicesConfig, {"factory_seed": _hex32, "dev_seed": _hex32, "dev_prefix": _str,
                                "offline_registration": _choice("pending", "accepted", "rejected"),
                                "onboarding": _choice("registered", "any")}),
    "power": (PowerConfig, {"site_limit_w": _int(0, 100_000_000), "min_evse_w": _int(0, 1_000_000), "zone": _zones}),
    "firmware": (FirmwareConfig, {
        "cache": _bool,
        "first_wave": _int(0, 100_000),
        "wave_timeout_s": _float(1, 86400),
        "cache_max_bytes": _int(1 << 16, 1 << 40),
    }),
    "auth": (AuthConfig, {"unknown_token_offline": _choice("reject", "accept"),
                          "online_trust_s": _float(0, 30 * 86400)}),
    "roaming": (RoamingConfig, {
        "party_id": _gid("O"),
        "cso_party": _gid("O"),
        "address": _addr,
        "server_name": _str,
        "ca": _path,
        "cert": _path,
        "key": _path,
        "password": _str,
        "secret": _secret,
        "timeout_s": _float(0.1, 30),
    }),
    "ocpp": (OcppConfig, {
        "url": _ocpp_url,
        "security_profile": _int(1, 3),
        "password_file": _path,
        "ca": _path,
        "cert": _path,
        "key": _path,
        "timeout_s": _float(0.5, 300),
        "backoff_max_s": _float(0.05, 3600),
        "max_frame": _int(1024, 1 << 24),
        "firmware_ca": _path,
        "firmware_signer_key": _path,
        "transfer_max_bytes": _int(1024, 1 << 30),
        "transfer_timeout_s": _float(0.5, 3600),
        "transfer_ca": _path,
    }),
    "metrics": (MetricsConfig, {"listen": _addr}),
}  # fmt: skip
"""Section → (its dataclass, TOML key → converter)."""
ADDRESS_KEYS = frozenset({"listen", "address"})
"""Keys of the form host:port: they fill the section's `host` and `port`."""
ROAMING_REQUIRED = ("party_id", "cso_party", "address", "ca", "password", "secret")
_FIELD_OF = {"zone": "zones"}
"""TOML keys whose field is named otherwise."""


def _section(section: str, table: Any) -> Any:
    cls, keys = SECTIONS[section]
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: expected a table")
    values: dict[str, Any] = {}
    for k, v in table.items():
        key = str(k)
        conv = keys.get(key)
        if conv is None:
            raise ConfigError(f"{section}.{key}: unknown key")
        if key in ADDRESS_KEYS:
            values["host"], values["port"] = conv(f"{section}.{key}", v)
        else:
            values[_FIELD_OF.get(key, key)] = conv(f"{section}.{key}", v)
    return cls(**values)


def _rebased(section: Any, base: Path) -> Any:
    """The section with its relative paths taken from `base` (the configuration file's folder)."""
    moved = {
        f.name: base / p
        for f in fields(section)
        if isinstance(p := getattr(section, f.name), Path) and not p.is_absolute()
    }
    return replace(section, **moved) if moved else section


def parse(doc: dict[str, Any], base: Path = Path()) -> Config:
    """Builds a Config from a parsed TOML document; relative paths are taken from `base`."""
    for section in doc:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted(SECTIONS))})")
    sections = {name: _rebased(_section(name, doc.get(name, {})), base) for name in SECTIONS}
    roaming = doc.get("roaming")
    if roaming:
        missing = [k for k in ROAMING_REQUIRED if k not in roaming]
        if missing:
            raise ConfigError(f"roaming.{missing[0]}: required when [roaming] is present")
    cfg = Config(**sections)
    _check_ocpp(cfg.ocpp)
    if cfg.upstream.backoff_min_s > cfg.upstream.backoff_max_s:
        raise ConfigError("upstream.backoff_min_s: must not exceed upstream.backoff_max_s")
    return cfg


def _check_ocpp(o: OcppConfig) -> None:
    if not o.enabled:
        return
    tls = o.url.startswith("wss://")
    if (o.security_profile == 1 and tls) or (o.security_profile > 1 and not tls):
        raise ConfigError(f"ocpp.url: security profile {o.security_profile} wants {'wss' if not tls else 'ws'}://")
    if o.security_profile < 3 and o.password_file is None:
        raise ConfigError(f"ocpp.password_file: required by security profile {o.security_profile}")


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
    site, up, devices = cfg.site, cfg.upstream, cfg.devices
    devpki.private_dir(site.data_dir)
    if up.cert is None or up.key is None or up.ca is None:
        ca = devpki.ensure_ca(site.pki_dir)
        issued = devpki.issue(site.pki_dir, site.id, ca=ca, server=False, client=True)
        up = replace(up, ca=up.ca or issued.ca, cert=up.cert or issued.cert, key=up.key or issued.key)
    if site.local_csms_cert is None:
        ca = devpki.ensure_ca(site.pki_dir)
        # an Ed25519 key: the boards check the gateway's Hello signature with it (M14/M17)
        site = replace(site, local_csms_cert=hellokey.issue(site.pki_dir, f"localcsms.{site.id}", ca=ca))
    if devices.factory_seed is None:
        seed_file = site.data_dir / "factory_seed"
        if not seed_file.exists():
            devpki.write_private(seed_file, secrets.token_hex(32).encode())
        devices = replace(devices, factory_seed=_hex32(str(seed_file), seed_file.read_text().strip()))
    return replace(cfg, site=site, upstream=up, devices=devices)

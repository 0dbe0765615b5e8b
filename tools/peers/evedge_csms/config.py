"""The CSMS configuration file (TOML) and first-run provisioning.

```toml
[csms]
listen = "127.0.0.1"          # address to bind (IPv4 or IPv6)
port = 4433                   # UDP port; 0 = ephemeral
data = "csms-data"            # data folder (relative paths: to the config file)

[tls]                         # PEM paths (relative: to the data folder)
ca = "pki/ca.pem"             # trust anchor of the gateways' certificates
ca_key = "pki/ca.key"         # signs CSRs (M16) and keys made here (M18)
cert = "pki/csms.pem"
key = "pki/csms.key"

[signing]
key = "signing.key"           # Ed25519 PEM: firmware manifests, certificates, tariffs

[policy]
registration = "accepted"     # answer to unknown stations' BootNotification (M13)
heartbeat_s = 300
currency = "EUR"
country = "DE"                # SDR ids: CC*PPP*R...
party = "EVE"
# default_tariff = 1
```
Every key is optional. Missing CA/certificate/key files are made with `gateway.protocol.devpki` on
first run (development only: an operator points these at the real PKI).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evedge_csms.settings import Settings
from gateway.protocol import devpki


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key."""


@dataclass(frozen=True)
class Config:
    listen: str
    port: int
    data_dir: Path
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    signing_key: Path
    settings: Settings

    @property
    def db_path(self) -> Path:
        return self.data_dir / "csms.sqlite"


def _get(section: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = section.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{key} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def load(path: Path | None = None, *, data_dir: Path | None = None, **overrides: Any) -> Config:
    """Read a config file (or none: all defaults under `data_dir`)."""
    raw: dict[str, Any] = tomllib.loads(path.read_text()) if path is not None else {}
    base = path.parent if path is not None else Path.cwd()
    csms, tls_, sig, pol = (raw.get(k, {}) for k in ("csms", "tls", "signing", "policy"))
    data = data_dir or (base / _get(csms, "data", str, "csms-data"))

    def p(section: dict[str, Any], key: str, default: str) -> Path:
        return data / str(_get(section, key, str, default))

    settings = Settings(
        data_dir=data,
        country=_get(pol, "country", str, "DE"),
        party=_get(pol, "party", str, "EVE"),
        currency=_get(pol, "currency", str, "EUR"),
        registration=_get(pol, "registration", str, "accepted"),
        heartbeat_s=_get(pol, "heartbeat_s", int, 300),
        default_tariff=_get(pol, "default_tariff", int, None),
    )
    if settings.registration not in ("accepted", "pending", "rejected"):
        raise ConfigError("policy.registration must be accepted, pending or rejected")
    cfg = Config(
        listen=overrides.get("listen") or _get(csms, "listen", str, "127.0.0.1"),
        port=overrides.get("port", _get(csms, "port", int, 4433)),
        data_dir=data,
        ca=p(tls_, "ca", "pki/ca.pem"),
        ca_key=p(tls_, "ca_key", "pki/ca.key"),
        cert=p(tls_, "cert", "pki/csms.pem"),
        key=p(tls_, "key", "pki/csms.key"),
        signing_key=p(sig, "key", "signing.key"),
        settings=settings,
    )
    return cfg


def provision(cfg: Config) -> None:
    """Make the data folder and, where absent, the development CA and server identity."""
    devpki.private_dir(cfg.data_dir)
    if not cfg.ca.exists():
        folder = cfg.ca.parent
        made = devpki.ensure_ca(folder, cfg.ca.stem)
        if made != (cfg.ca, cfg.ca_key):
            made[1].rename(cfg.ca_key)
    if not (cfg.cert.exists() and cfg.key.exists()):
        issued = devpki.issue(cfg.cert.parent, cfg.cert.stem, ca=(cfg.ca, cfg.ca_key), client=False)
        if issued.key != cfg.key:
            issued.key.rename(cfg.key)

"""Run-time settings of the CSMS domain logic (the parts of the config file it reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    country: str = "DE"
    party: str = "EVE"
    currency: str = "EUR"
    registration: str = "accepted"
    """Answer to the BootNotification of a station the operator has not decided on (M13)."""
    heartbeat_s: int = 300
    default_tariff: int | None = None

    @property
    def firmware_dir(self) -> Path:
        return self.data_dir / "firmware"

"""Site power management (E1, E4, E5): one site limit and zones shared among active EVSEs.

The allowed power of a zone is the least of its configured limit and the DSO limit for it;
the site's is the least of the configured site limit, the resource manager's available
power (E4) and a site-wide DSO limit (E5). Each is shared equally among the online boards
under it, never below `min_evse_w` per board unless the limit itself is lower (then the
share is what there is). Sans I/O: `allocate` is a pure function of the limits and the
online boards; the gateway sends the shares and checks the deadline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.config import Zone

SITE = -1


@dataclass
class PowerManager:
    site_limit_w: int
    zones: tuple[Zone, ...] = ()
    min_evse_w: int = 0
    dso: dict[int, int] = field(default_factory=dict)  # zone (SITE for the whole site) -> W
    available_w: int | None = None  # E4, from the resource manager

    def zone_of(self, device_id: str) -> int | None:
        for z in self.zones:
            if device_id in z.devices:
                return z.zone
        return None

    def site_cap(self) -> int:
        caps = [self.site_limit_w]
        if self.available_w is not None:
            caps.append(self.available_w)
        if SITE in self.dso:
            caps.append(self.dso[SITE])
        return max(0, min(caps))

    def zone_cap(self, zone: int) -> int | None:
        caps = [z.limit_w for z in self.zones if z.zone == zone]
        if zone in self.dso:
            caps.append(self.dso[zone])
        return max(0, min(caps)) if caps else None

    def allocate(self, online: Iterable[str]) -> dict[str, int]:
        """Per-board limit in W for the boards online now."""
        boards = sorted(online)
        if not boards:
            return {}
        share = self.site_cap() // len(boards)
        out = {d: share for d in boards}
        by_zone: dict[int, list[str]] = {}
        for d in boards:
            z = self.zone_of(d)
            if z is not None:
                by_zone.setdefault(z, []).append(d)
        for z, members in by_zone.items():
            cap = self.zone_cap(z)
            if cap is not None:
                zshare = cap // len(members)
                for d in members:
                    out[d] = min(out[d], zshare)
        return out

    def affected(self, zone: int | None, online: Iterable[str]) -> list[str]:
        """The boards a limit for `zone` (None: the whole site) applies to."""
        if zone is None:
            return sorted(online)
        return sorted(d for d in online if self.zone_of(d) == zone)

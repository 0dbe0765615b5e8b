"""Site power management (E1, E4, E5): the site's and the zones' limits shared among the boards.

A cap covers a group of boards: the site's covers every board, a zone's the boards listed in
it. The site's cap is the least of the configured site limit, the resource manager's available
power for the site (E4) and the DSO's limit for the site (E5); a zone's, the least of its
configured limit and the available power and DSO limit for that zone. Each limit from outside
may carry a `valid_to` (protocol seconds) after which it no longer counts.

The sharing rule (docs/gateway.md, "Power"): within each cap, a board without a transaction
(idle) keeps a minimal share, `min_evse_w` (or the equal split of the cap when that is less),
so that a session can start at once without breaking the cap; the boards with a transaction
(drawing) share the rest equally. A board's share is the least of its shares under the caps
that cover it. A board offline keeps the last share it was sent (nobody can lower it): that
share is set aside within its caps until it is back.

Sans I/O: `allocate` is a pure function of the limits, the boards online, the boards drawing
and the shares last sent; `gateway/localcsms/sharing.py` sends the shares and keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.config import Zone

SITE = -1
"""The key of the whole site among the zones of `dso` and `available`."""


@dataclass(frozen=True)
class Cap:
    """A limit from outside (DSO, resource manager): `watts` until `valid_to` (None: for good)."""

    watts: int
    valid_to: int | None = None

    def in_force(self, now: int) -> bool:
        return self.valid_to is None or now < self.valid_to


@dataclass
class PowerManager:
    site_limit_w: int
    zones: tuple[Zone, ...] = ()
    min_evse_w: int = 0
    dso: dict[int, Cap] = field(default_factory=dict)
    """E5: zone (SITE for the whole site) → the DSO's limit."""
    available: dict[int, Cap] = field(default_factory=dict)
    """E4: zone (SITE for the whole site) → the resource manager's available power."""
    drawing: set[str] = field(default_factory=set)
    """Boards with a transaction (from their TransactionEvents)."""
    dso_told: set[str] = field(default_factory=set)
    """Boards whose DSO limit holds a share of ours (lifted when the DSO lifts the limit)."""
    shares: dict[str, int] = field(default_factory=dict)
    """The share each board may draw now as far as the site knows: the last one sent (the
    higher of the old and the new one while a change is not confirmed)."""

    def zone_of(self, device_id: str) -> int | None:
        for z in self.zones:
            if device_id in z.devices:
                return z.zone
        return None

    def expire(self, now: int) -> bool:
        """Drops the limits whose validity ended; True if one did."""
        gone = False
        for limits in (self.dso, self.available):
            for k in [k for k, c in limits.items() if not c.in_force(now)]:
                del limits[k]
                gone = True
        return gone

    def next_expiry(self) -> int | None:
        """When the next limit from outside ends (protocol seconds), None if none does."""
        ends = [c.valid_to for lim in (self.dso, self.available) for c in lim.values() if c.valid_to is not None]
        return min(ends) if ends else None

    def _outside(self, key: int) -> list[int]:
        return [lim[key].watts for lim in (self.dso, self.available) if key in lim]

    def site_cap(self) -> int:
        return max(0, min([self.site_limit_w, *self._outside(SITE)]))

    def zone_cap(self, zone: int) -> int | None:
        caps = [z.limit_w for z in self.zones if z.zone == zone] + self._outside(zone)
        return max(0, min(caps)) if caps else None

    def dso_covers(self, device_id: str) -> bool:
        """A DSO limit in force covers the board (it is told with an urgent DsoLimit too)."""
        return SITE in self.dso or (self.zone_of(device_id) in self.dso)

    def _split(self, cap: int, members: list[str], online: set[str], out: dict[str, int]) -> None:
        """The shares of `cap` among `members`, lowered into `out` (online members only)."""
        held = sum(self.shares.get(d, 0) for d in members if d not in online)
        live = [d for d in members if d in online]
        if not live:
            return
        room = max(0, cap - held)
        busy = [d for d in live if d in self.drawing]
        idle_w = min(self.min_evse_w, room // len(live))
        busy_w = (room - idle_w * (len(live) - len(busy))) // len(busy) if busy else 0
        for d in live:
            w = busy_w if d in self.drawing else idle_w
            out[d] = min(out.get(d, w), w)

    def allocate(self, online: Iterable[str]) -> dict[str, int]:
        """The share (W) of each board online, under every cap that covers it."""
        on = set(online)
        members = sorted(on | set(self.shares))
        out: dict[str, int] = {}
        self._split(self.site_cap(), members, on, out)
        by_zone: dict[int, list[str]] = {}
        for d in members:
            z = self.zone_of(d)
            if z is not None:
                by_zone.setdefault(z, []).append(d)
        for z, group in by_zone.items():
            cap = self.zone_cap(z)
            if cap is not None:
                self._split(cap, group, on, out)
        return out

    def affected(self, zone: int | None, online: Iterable[str]) -> list[str]:
        """The boards a limit for `zone` (None: the whole site) applies to."""
        if zone is None:
            return sorted(online)
        return sorted(d for d in online if self.zone_of(d) == zone)

"""What the site will draw over the coming hours (E3 SiteForecast): sans I/O.

The gateway is the site's local CSMS: it tells the CSMS what its sessions need, so that the
CSMS can ask the resource manager for it (IEC 63110-1 E3). The forecast is built from what the
site knows of each board (`Demand`, fed from the frames the gateway relays):

- a board without a transaction needs nothing;
- a session whose EV told its needs (NotifyEVNeeds: energy, departure) needs the energy still
  owed spread evenly until the departure: the least steady power that serves the EV in time,
  at most the board's rate; with no departure ahead, it draws at its rate until the energy is
  delivered;
- a session without needs draws at its rate for as long as anyone knows: to the end of the
  forecast.

A board's rate is its rating (discovered by the inventory), else its last metered power, else
its share of the site: what the site needs, not what it is granted now (the forecast is how it
asks for more).

The forecast is a step function: periods `(start_s, watts)`, `start_s` counted from the moment
it is made (the frame's time), the last period holding until a newer forecast. The sum is
clipped to the configured limit of the site (or zone): the site can never draw more, whatever
it is granted. At most `PERIODS_MAX` periods: when the sessions end at more distinct times, the
ends are rounded up to a coarser grid (`GRID_S`), so that the site never asks for less than
it needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.schema import FIELDS, Key

PERIODS_MAX = FIELDS[Key.FORECAST].max_len
"""Periods one SiteForecast may carry (the schema's bound)."""
START_MAX = int(FIELDS[Key.START_S].max)
"""The latest period start the schema allows (seconds from the forecast's time)."""
WATTS_MAX = int(FIELDS[Key.LIMIT_W].max)
"""The most a period may carry (the schema's bound of `limit_w`)."""
GRID_S = (1, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
"""The grids (s) period ends are rounded up to, finest first, until few enough periods remain."""

Period = tuple[int, int]
"""(start_s, watts)."""


@dataclass
class Demand:
    """One board's session as the site sees it (the last values its frames told)."""

    drawing: bool = False
    """A transaction runs."""
    power_w: int = 0
    """The last metered power of the transaction (0: none metered yet)."""
    meter_wh: int | None = None
    """The last meter register the transaction reported."""
    needed_wh: int | None = None
    """The energy the EV asked for (NotifyEVNeeds), None: no needs told."""
    needs_base_wh: int | None = None
    """The meter register when the needs were told (what is delivered since counts)."""
    departure: int | None = None
    """The EV's departure (protocol seconds), None: not told."""

    def transaction(self, started: bool, ended: bool, energy_wh: int | None, power_w: int | None) -> bool:
        """A TransactionEvent of this board; True if the session started or ended."""
        changed = False
        if ended:
            changed = self.drawing
            self.drawing = False
            self.power_w = 0
            self.meter_wh = None
            self.needed_wh = self.needs_base_wh = self.departure = None  # the EV's needs leave with it
            return changed
        if not self.drawing:
            changed = self.drawing = True
        if power_w is not None:
            self.power_w = max(0, power_w)
        if energy_wh is not None:
            self.meter_wh = energy_wh
            if self.needed_wh is not None and self.needs_base_wh is None:
                self.needs_base_wh = energy_wh
        return changed or started

    def needs(self, energy_wh: int, departure: int | None) -> None:
        """NotifyEVNeeds: the EV's needs from now (they replace older ones)."""
        self.needed_wh = max(0, energy_wh)
        self.departure = departure
        self.needs_base_wh = self.meter_wh

    def remaining_wh(self) -> int | None:
        """The energy still owed to the EV, None when it told no needs."""
        if self.needed_wh is None:
            return None
        done = 0
        if self.meter_wh is not None and self.needs_base_wh is not None:
            done = max(0, self.meter_wh - self.needs_base_wh)
        return max(0, self.needed_wh - done)


def steps(d: Demand, now: int, rating_w: int, share_w: int = 0) -> tuple[int, int | None] | None:
    """One session's part of the forecast: (watts, end in s from now, None: open), or None.
    The board's rate is its rating (what it draws when the site lets it), else its metered
    power, else its share of the site: the forecast says what the site needs, not what it is
    granted now."""
    if not d.drawing:
        return None
    rate = rating_w or d.power_w or share_w
    left = d.remaining_wh()
    if left is None:
        return (rate, None) if rate > 0 else None
    if left == 0:
        return None
    if d.departure is not None and d.departure > now:
        span = d.departure - now
        watts = -(-left * 3600 // span)  # rounded up: the EV is served in time
        return (min(watts, rate) if rate > 0 else watts), span
    if rate <= 0:
        return None
    return rate, -(-left * 3600 // rate)


def forecast(parts: Iterable[tuple[int, int | None]], cap_w: int) -> list[Period]:
    """The step function of the sessions' parts `(watts, end_s or None)`, clipped to `cap_w`,
    in at most `PERIODS_MAX` periods; [(0, 0)] when nothing draws."""
    items = [(w, None if end is None else min(end, START_MAX)) for w, end in parts if w > 0]
    ends = {e for _, e in items if e is not None}
    grid = GRID_S[0]
    for grid in GRID_S:
        rounded = {-(-e // grid) * grid for e in ends}
        if len(rounded) < PERIODS_MAX:
            break
    items = [(w, None if e is None else min(-(-e // grid) * grid, START_MAX)) for w, e in items]
    cuts = sorted({0} | {e for _, e in items if e is not None})
    out: list[Period] = []
    for t in cuts:
        watts = min(cap_w, WATTS_MAX, sum(w for w, e in items if e is None or e > t))
        if not out or out[-1][1] != watts:
            out.append((t, watts))
    return out[:PERIODS_MAX]


def energy_wh(periods: list[Period], horizon_s: int) -> float:
    """The energy a forecast asks for up to `horizon_s` (the last period held until then)."""
    total = 0.0
    for i, (start, watts) in enumerate(periods):
        end = periods[i + 1][0] if i + 1 < len(periods) else horizon_s
        total += watts * max(0, min(end, horizon_s) - start) / 3600
    return total


class Throttle:
    """When a report that changed may be sent: at once, unless one was sent less than
    `interval_s` ago; then at the end of that interval (the changes in between coalesce)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last: float | None = None
        self.dirty = False
        self.forced = False

    def mark(self, force: bool = False) -> None:
        """The report changed (`force`: send it at the next chance, whatever the interval)."""
        self.dirty = True
        self.forced = self.forced or force

    def when(self, now: float) -> float | None:
        """When the report is due, None when it is not dirty."""
        if not self.dirty:
            return None
        if self.forced or self.last is None:
            return now
        return max(now, self.last + self.interval_s)

    def due(self, now: float) -> bool:
        t = self.when(now)
        return t is not None and t <= now

    def sent(self, now: float) -> None:
        self.dirty = self.forced = False
        self.last = now

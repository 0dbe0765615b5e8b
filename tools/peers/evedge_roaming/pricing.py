"""Roaming prices (R2, R3-5, R3-9), sans I/O: the one rule the CSO prices an SDR with and the
home CSP (and so the CH) checks it with.

A tariff's elements (PushTariff, GetTariffs `tariffs[]`): `price_kwh` per kWh, `price_min`
per started minute of the transaction, `price_session` once per session (on its first
transaction), `currency`, and `valid_from` (Unix s; 0 = always) — a tariff is not in force
before it. The cost of a transaction is the CSMS's rule (`evedge_csms.inbound.tariff_cost`):

    energy_wh × price_kwh // 1000 + price_min × ceil(duration_s / 60) [+ price_session]

A session is priced per transaction, each with the tariff it ran under (a tariff change
splits the transaction at the CSMS), never with whatever tariff is the latest when the SDR
is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import meter


class PricingError(ValueError):
    """A line names a tariff the pricer does not hold, or one not yet in force."""


@dataclass(frozen=True)
class Tariff:
    tariff_id: int
    price_kwh: int
    currency: str
    price_min: int = 0
    price_session: int = 0
    valid_from: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Tariff:
        return cls(
            int(body["tariff_id"]),
            int(body["price_kwh"]),
            str(body["currency"]),
            int(body.get("price_min") or 0),
            int(body.get("price_session") or 0),
            int(body.get("valid_from") or 0),
        )

    def body(self) -> dict[str, Any]:
        """The tariff_info struct (every element, so that a pull loses nothing)."""
        return {
            "tariff_id": self.tariff_id,
            "price_kwh": self.price_kwh,
            "currency": self.currency,
            "price_min": self.price_min,
            "price_session": self.price_session,
            "valid_from": self.valid_from,
        }

    def cost(self, energy_wh: int, duration_s: int, *, session_fee: bool = True) -> int:
        minutes = -(-max(duration_s, 0) // 60)
        fee = self.price_session if session_fee else 0
        return max(energy_wh, 0) * self.price_kwh // 1000 + minutes * self.price_min + fee


def in_force(tariffs: Iterable[Tariff], at: int) -> Tariff | None:
    """The tariff in force at `at`: the latest `valid_from` not after it (ties: the higher id)."""
    live = [t for t in tariffs if t.valid_from <= at]
    return max(live, key=lambda t: (t.valid_from, t.tariff_id)) if live else None


@dataclass(frozen=True)
class Line:
    """One transaction of a session: its times, energy and the tariff it ran under."""

    started: int
    stopped: int
    energy_wh: int
    tariff_id: int | None = None


def price(tariffs: Mapping[int, Tariff], lines: Iterable[Line]) -> list[int]:
    """Each line's cost with its own tariff (the session fee on the first line only).
    A line without a tariff id is priced with the tariff in force at its start; a line with
    no tariff at all costs 0."""
    out = []
    for i, line in enumerate(lines):
        t = tariff_of(tariffs, line)
        out.append(0 if t is None else t.cost(line.energy_wh, line.stopped - line.started, session_fee=i == 0))
    return out


def tariff_of(tariffs: Mapping[int, Tariff], line: Line) -> Tariff | None:
    if line.tariff_id is None:
        return in_force(tariffs.values(), line.started)
    t = tariffs.get(line.tariff_id)
    if t is None:
        raise PricingError(f"tariff {line.tariff_id} is unknown")
    if t.valid_from > line.started:
        raise PricingError(f"tariff {line.tariff_id} is valid from {t.valid_from}, after the start {line.started}")
    return t


def signed_problems(sdr: Mapping[str, Any], meter_key: bytes | None, evse: int | None = None) -> list[str]:
    """What is wrong with an SDR's signed readings (`EDM1`: the meter start's, then the meter
    stop's, `publish.signed_meter`). Always: the last one's register must be `meter_stop_wh`,
    and the first one's, when there are two or more, `meter_start_wh`. With the EVSE's meter key
    (a CSO could otherwise lower the start and bill the difference): a reading of the start and
    one of the stop, each sealed by the key, of the EVSE `evse` (when known), the start's clock
    not after the stop's. The readings carry no session id: a sealed reading of the same register
    from an earlier session is not told apart here (docs/roaming.md, "Signed meter readings")."""
    found = meter.readings(sdr.get("signed_meter"))
    start_wh, stop_wh = int(sdr["meter_start_wh"]), int(sdr["meter_stop_wh"])
    out = []
    if found and found[-1].register_wh != stop_wh:
        out.append(f"meter stop {stop_wh} Wh, the signed meter reading {found[-1].register_wh} Wh")
    if len(found) > 1 and found[0].register_wh != start_wh:
        out.append(f"meter start {start_wh} Wh, the signed meter reading {found[0].register_wh} Wh")
    if meter_key is None:
        return out
    if not found:
        return [*out, "no signed meter reading, though the EVSE's meter seals its readings"]
    if not all(r.sealed_by(meter_key) for r in found):
        out.append("the signed meter reading's seal is not the EVSE meter's")
    if len(found) < 2:
        out.append("no signed reading of the meter start, though the EVSE's meter seals its readings")
    want = found[-1].evse if evse is None else evse  # unknown: at least all of one EVSE
    others = sorted({r.evse for r in found} - {want})
    if others:
        out.append(f"a signed meter reading of EVSE {others[0]}, the SDR's EVSE is {want}")
    if found[0].time > found[-1].time:
        out.append("the signed meter readings' clock runs backwards (start after stop)")
    return out


@dataclass(frozen=True)
class Audit:
    """The home CSP's check of an SDR against its own record of the session."""

    energy_wh: int  # the CSP's own figure: the last meter reading it received
    cost: int  # the CSP's own price of the SDR's transactions, with its copy of the tariffs
    problems: tuple[str, ...]

    @property
    def verdict(self) -> str:
        if not self.problems:
            return "matched"
        return "mismatch: " + "; ".join(self.problems)


def sdr_lines(sdr: Mapping[str, Any]) -> list[Line]:
    """An SDR's transactions (`lines`), or the SDR as one transaction when it has none."""
    raw = sdr.get("lines") or [sdr]
    return [Line(int(x["started"]), int(x["stopped"]), int(x["energy_wh"]), x.get("tariff_id")) for x in raw]


def signed_register(signed_meter: str | None) -> int | None:
    """The meter register (Wh) the last signed reading (base64, as PutSdr carries it) states, for
    the formats known here (`meter.readings`): the meter stop's; None for another format or none."""
    found = meter.readings(signed_meter)
    return found[-1].register_wh if found else None


def audit_sdr(sdr: Mapping[str, Any], readings: list[tuple[int, int]], tariffs: Mapping[int, Tariff],
              meter_key: bytes | None = None, evse: int | None = None) -> Audit:  # fmt: skip
    """Check an SDR against the readings (time, energy_wh) the CSP received during the session,
    the signed meter readings it carries and its own copy of the CSO's tariffs: the energy must
    be the last reading and no less than any; the signed readings' registers the meter start and
    stop (`signed_problems`); the lines must add up; each line is priced again with the tariff it
    names. `meter_key`: the public key of the EVSE's meter, as its CSO states it (its location),
    `evse` its number on the board when known: the readings must then be there, sealed by it."""
    problems = signed_problems(sdr, meter_key, evse)
    lines = sdr_lines(sdr)
    energy = int(sdr["energy_wh"])
    own_energy = readings[-1][1] if readings else energy
    if not readings:
        problems.append("no meter reading of the session was received")
    elif energy != own_energy:
        problems.append(f"energy {energy} Wh, own record {own_energy} Wh")
    if sum(x.energy_wh for x in lines) != energy:
        problems.append("the transactions' energy does not add up to the SDR's")
    try:
        own_costs = price(tariffs, lines)
    except PricingError as exc:
        problems.append(str(exc))
        own_costs = [0] * len(lines)
    own_cost = sum(own_costs)
    if len(sdr.get("lines") or ()) > 1:  # which transaction is wrong; one line is the total
        for i, (x, own) in enumerate(zip(sdr["lines"], own_costs, strict=True)):
            if int(x["cost"]) != own:
                problems.append(f"transaction {i} cost {x['cost']}, own price {own}")
    if int(sdr["cost"]) != own_cost:
        problems.append(f"cost {sdr['cost']}, own price {own_cost}")
    return Audit(own_energy, own_cost, tuple(problems))

"""The operator's side of a CSO roaming endpoint: what the CSO's CSMS must provide.

The roaming endpoint never touches EVSEs itself; it asks an `OperatorBackend`. The project's
CSMS implements this Protocol (a thin adapter over its own EVSE and transaction model);
`MemoryOperator` is the in-process implementation used by the tests and the demo.

Results are `CommandResult` names of the schema ("accepted", "rejected", "unknown_session",
"evse_occupied", "evse_offline", "timeout"); EVSE states are `EvseStatus` names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol


class OperatorBackend(Protocol):
    async def locations(self) -> list[dict[str, Any]]:
        """The operator's locations as PutLocation bodies (location_id, operator_id, name, latitude,
        longitude, evses = [{evse_gid, evse_status, max_power_w, connector?}])."""

    async def evse_status(self, evse_gid: str) -> str | None:
        """The EVSE's status name, or None when the operator has no such EVSE."""

    async def start(self, evse_gid: str, token_uid: str, session_id: str) -> str:
        """Start charging on the EVSE for an authorized token (R3-1, R3-2, R3-3)."""

    async def stop(self, session_id: str) -> str:
        """Stop the energy transfer of a session (R3-4)."""

    async def unlock(self, evse_gid: str, session_id: str | None) -> str:
        """Emergency cable unlock (R5-2 with a session, R5-3 without)."""

    async def reserve(self, evse_gid: str, token_uid: str, expiry: int, reservation_id: int) -> str:
        """Reserve the EVSE for a token until `expiry` (Unix seconds) (R3-8)."""

    async def cancel_reservation(self, evse_gid: str, reservation_id: int) -> str:
        """Cancel a reservation (R3-8: it expired unused); the EVSE is available again."""

    async def apply_plan(self, session_id: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Follow a charge plan (R3-7); return the plan actually applied, or None if refused."""

    async def token_status(self, token_uid: str) -> str | None:
        """The `AuthStatus` name of one of the operator's own tokens (its CSMS's token table), or
        None when the operator does not know it (then the home CSP is asked)."""


@dataclass
class MemoryEvse:
    evse_gid: str
    max_power_w: int
    status: str = "available"
    session: str | None = None
    reservation: int | None = None
    unlocked: int = 0


@dataclass
class MemoryOperator:
    """An in-memory operator with a few EVSEs at one location (tests, demo)."""

    location: dict[str, Any]
    evses: dict[str, MemoryEvse] = field(default_factory=dict)
    plans: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)
    cancelled: list[int] = field(default_factory=list)  # reservation ids cancelled (R3-8 expiry)

    @classmethod
    def one_site(
        cls, operator_id: str, location_id: str, evse_gids: list[str], max_power_w: int = 22000
    ) -> MemoryOperator:
        evses = {g: MemoryEvse(g, max_power_w) for g in evse_gids}
        loc = {
            "location_id": location_id,
            "operator_id": operator_id,
            "name": "Demo site",
            "latitude": 48.137,
            "longitude": 11.575,
            "evses": [],
        }
        return cls(loc, evses)

    async def locations(self) -> list[dict[str, Any]]:
        loc = copy.deepcopy(self.location)
        loc["evses"] = [
            {"evse_gid": e.evse_gid, "evse_status": e.status, "max_power_w": e.max_power_w, "connector": 1}
            for e in self.evses.values()
        ]
        return [loc]

    async def evse_status(self, evse_gid: str) -> str | None:
        e = self.evses.get(evse_gid)
        return None if e is None else e.status

    def _session(self, session_id: str) -> MemoryEvse | None:
        return next((e for e in self.evses.values() if e.session == session_id), None)

    async def start(self, evse_gid: str, token_uid: str, session_id: str) -> str:
        e = self.evses[evse_gid]
        if evse_gid in self.offline:
            return "evse_offline"
        if e.session == session_id:
            return "accepted"
        if e.status not in ("available", "reserved"):
            return "evse_occupied"
        e.status, e.session, e.reservation = "occupied", session_id, None
        return "accepted"

    async def stop(self, session_id: str) -> str:
        e = self._session(session_id)
        if e is None:
            return "unknown_session"
        e.status, e.session = "available", None
        return "accepted"

    async def unlock(self, evse_gid: str, session_id: str | None) -> str:
        e = self.evses[evse_gid]
        if session_id is not None and e.session not in (None, session_id):
            return "unknown_session"
        e.unlocked += 1
        if e.session is not None:
            e.status, e.session = "available", None
        return "accepted"

    async def reserve(self, evse_gid: str, token_uid: str, expiry: int, reservation_id: int) -> str:
        e = self.evses[evse_gid]
        if e.reservation == reservation_id:
            return "accepted"
        if e.status != "available":
            return "evse_occupied"
        e.status, e.reservation = "reserved", reservation_id
        return "accepted"

    async def cancel_reservation(self, evse_gid: str, reservation_id: int) -> str:
        e = self.evses[evse_gid]
        self.cancelled.append(reservation_id)
        if e.reservation != reservation_id:
            return "rejected"
        e.reservation = None
        if e.status == "reserved":
            e.status = "available"
        return "accepted"

    async def apply_plan(self, session_id: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        e = self._session(session_id)
        if e is None:
            return None
        applied = [{**p, "limit_w": min(int(p["limit_w"]), e.max_power_w)} for p in plan]
        self.plans[session_id] = applied
        return applied

    async def token_status(self, token_uid: str) -> str | None:
        return None

"""What the CSMS publishes through its CSO endpoint as it changes (R1-2, R1-3, R2-1, R3-6), and
what it bills (R3-5, R3-9): the roaming side of the CSMS's own tables, read each round.

- tariffs (R2-1): every CSMS tariff (SetTariff) is published once, and again when it changes,
  so that the CSO endpoint and the home CSPs hold the tariff each transaction names;
- locations (R1-2): all of them again when the set of EVSEs changes (a board registered);
- EVSE status (R1-3): each EVSE whose status changed since it was last published; out of
  order (the site reports it so, or no longer hears its board) is an outage, the next other
  status its restoration (R5-1);
- session progress (R3-6): the energy so far of each roaming session's transaction;
- the bill (R3-5, R3-9): `sdr_lines` turns a CSMS SDR into the roaming SDR's transactions
  (times in Unix seconds, energy, tariff id) and its signed meter data.

Board times (TransactionEvent, SetTariff's valid_from) count from `EPOCH_UNIX`; roaming
times are Unix seconds.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.protocol.gid import evse_gid
from gateway.schema import EPOCH_UNIX

from . import pricing
from .cso import CsoEndpoint

log = logging.getLogger(__name__)


class CsmsTables(Protocol):
    """The part of the CSMS's store the publisher reads (evedge_csms.store.Store)."""

    def select(
        self, table: str, where: dict[str, Any] | None = None, order: str | None = None
    ) -> list[dict[str, Any]]: ...


def unix(board_s: int | None) -> int:
    """A board time (s since EPOCH_UNIX) in Unix seconds; 0 stays 0 (no time)."""
    return 0 if not board_s else int(board_s) + EPOCH_UNIX


def tariff_body(row: Mapping[str, Any], operator_id: str) -> dict[str, Any]:
    t = pricing.Tariff(
        int(row["tariff_id"]),
        int(row["price_kwh"]),
        str(row["currency"]),
        int(row.get("price_min") or 0),
        int(row.get("price_session") or 0),
        unix(row.get("valid_from")),
    )
    return t.body() | {"operator_id": operator_id}


def sdr_lines(sdr: Mapping[str, Any]) -> list[pricing.Line]:
    """The transactions of a CSMS SDR as roaming SDR lines (one line when it lists none)."""
    raw = sdr.get("transactions") or [sdr]
    return [
        pricing.Line(unix(x["started"]), unix(x["stopped"]), int(x["energy_wh"] or 0), x.get("tariff_id")) for x in raw
    ]


def signed_meter(sdr: Mapping[str, Any], limit: int = 512) -> str | None:
    """The SDR's signed meter data for PutSdr (base64): the last signed reading, the one that
    covers the meter stop (PutSdr holds one value of at most `limit` bytes)."""
    values = sdr.get("signed_meter") or []
    if isinstance(values, bytes | str):
        values = [values]
    for v in reversed(list(values)):
        raw = v if isinstance(v, bytes) else _decode(str(v))
        if raw and len(raw) <= limit:
            return base64.b64encode(raw).decode("ascii")
    return None


def _decode(text: str) -> bytes:
    for dec in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            return bytes(dec(text))
        except (ValueError, binascii.Error):
            continue
    return text.encode()


class CsmsPublisher:
    """One `step()` per round of `CsmsRoaming`: publishes what changed since the last one."""

    def __init__(self, cso: CsoEndpoint) -> None:
        self.cso = cso
        self._evses: tuple[str, ...] | None = None
        self._status: dict[str, str] = {}
        self._progress: dict[str, int] = {}

    async def step(self, tables: CsmsTables, evse_status: Mapping[str, str]) -> None:
        await self.tariffs(tables)
        await self.locations(evse_status)
        await self.progress(tables)

    async def tariffs(self, tables: CsmsTables) -> int:
        kept = {int(t): json.loads(b) for t, b in self.cso.store.all("SELECT tariff_id, body FROM tariffs")}
        n = 0
        for row in tables.select("tariffs", order="tariff_id"):
            body = tariff_body(row, self.cso.me)
            if kept.get(body["tariff_id"]) != body:
                await self.cso.publish_tariff(body)
                n += 1
        return n

    async def locations(self, evse_status: Mapping[str, str]) -> None:
        evses = tuple(sorted(evse_status))
        if evses != self._evses:
            await self.cso.publish_locations()
            self._evses = evses
            self._status = dict(evse_status)
            return
        for evse, status in evse_status.items():
            was = self._status.get(evse)
            if was != status:
                # R5-1: an EVSE out of order is an outage; its return to service says so
                kind = "outage" if status == "out_of_order" else "restored" if was == "out_of_order" else None
                await self.cso.publish_status(evse, status, outage_kind=kind)
                self._status[evse] = status

    async def progress(self, tables: CsmsTables) -> int:
        """R3-6: each open roaming session whose transaction drew more energy since last time."""
        n = 0
        active = {
            (evse_gid(str(t["site_id"]), str(t["device_id"]), int(t["evse"] or 1)), t["id_token"]): t
            for t in tables.select("transactions", {"state": "active"})
        }
        for (evse, token), started in active.items():
            # a roaming card the site answered by itself — from the CSO's token lists (R4-2)
            # or its cache (S2) — has no session yet: opened now, so its progress reaches the
            # home CSP during the charge, not only with the SDR
            if started["remote_start_id"] is not None:  # a remote start's: recorded once it is answered
                continue
            if (
                token
                and self.cso.open_session(evse, str(token)) is None
                and not tables.select("tokens", {"id_token": token})
            ):
                self.cso.adopt_session(evse, str(token), unix(started["started"]) or int(self.cso.clock()))
        for sid, evse, token in self.cso.store.all(
            "SELECT session_id, evse_gid, token_uid FROM sessions WHERE state IN ('active', 'authorized')"
        ):
            tx = active.get((evse, token))
            if tx is None:
                continue
            key = {"site_id": tx["site_id"], "device_id": tx["device_id"], "tx_id": tx["tx_id"]}
            readings = [e["energy_wh"] for e in tables.select("tx_events", key, order="seq_no") if e["energy_wh"]]
            if not readings:
                continue
            start = tx["meter_start_wh"] if tx["meter_start_wh"] is not None else readings[0]
            energy = max(0, int(readings[-1]) - int(start))
            if self._progress.get(sid) == energy:
                continue
            await self.cso.session_progress(sid, energy, 0)
            self._progress[sid] = energy
            n += 1
        return n

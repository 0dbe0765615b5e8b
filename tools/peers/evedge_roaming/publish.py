"""What the CSMS publishes through its CSO endpoint as it changes (R1-2, R1-3, R2-1, R3-6), and
what it bills (R3-5, R3-9): the roaming side of the CSMS's own tables, read each round.

- tariffs (R2-1): every CSMS tariff (SetTariff) is published once, and again when it changes,
  so that the CSO endpoint and the home CSPs hold the tariff each transaction names;
- locations (R1-2): all of them again when the set of EVSEs changes (a board registered) or
  the operator's record of a site (`Csms.set_site`: name, coordinates) does;
- EVSE status (R1-3): each EVSE whose status changed since it was last published; out of
  order (the site reports it so, or no longer hears its board) is an outage, the next other
  status its restoration (R5-1);
- session progress (R3-6): the energy so far of each roaming session: the transactions of its
  card in its service session;
- the bill (R3-5, R3-9): `sdr_parts` splits a CSMS SDR by card (a service session — plug-in to
  unplug — may hold transactions of several cards: each card's are one roaming session, billed
  to its own home), `sdr_lines` turns one into the roaming SDR's transactions (times in Unix
  seconds, energy, tariff id), `signed_meter` gives its signed meter data (the readings of its
  meter start and stop).

A roaming session is bound to the CSMS service session and card it bills (`service_links`):
the next service session of the same card at the same EVSE is another roaming session, even
when the SDR of the one before has not reached the home CSP yet (the CSMS or the CSP away).

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

from . import meter, pricing
from .cso import CsoEndpoint

log = logging.getLogger(__name__)


LINKS_DDL = """CREATE TABLE IF NOT EXISTS service_links(session_id TEXT PRIMARY KEY, site_id TEXT NOT NULL,
    device_id TEXT NOT NULL, service_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS service_links_by_service ON service_links(site_id, device_id, service_id)"""
"""Which CSMS service session each roaming session bills; the card is the session's own (no
personal data here: a card forgotten at the CSO is forgotten here too)."""


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


def sdr_tokens(tables: CsmsTables, sdr: Mapping[str, Any]) -> dict[int, str]:
    """tx id → card of the transactions of a CSMS SDR's device."""
    rows = tables.select("transactions", {"site_id": sdr["site_id"], "device_id": sdr["device_id"]})
    return {int(r["tx_id"]): str(r["id_token"]) for r in rows if r["id_token"]}


def sdr_parts(sdr: Mapping[str, Any], token_of: Mapping[int, str]) -> list[dict[str, Any]]:
    """A CSMS SDR split by card (`token_of`: tx id → card): one SDR per card, with that card's
    transactions, energy, meter start and stop, cost and times; the SDR unchanged when all its
    transactions are one card's. The part of the SDR's own card keeps its `sdr_id`, another
    card's is `sdr_id+card`; a part is marked `split`. Each part carries the signed readings
    whose register is its meter start or stop (`covering`: the meter's word on that part; the
    reading that ended one card's transaction, or started the next one's); a reading of an unknown
    format goes with the part holding the last transaction. A part's `cost` is its transactions'
    costs at the CSMS, which charges a session fee once per service session; the roaming session
    of each card pays its own."""
    raw = list(sdr.get("transactions") or [])
    own = str(sdr.get("id_token") or "")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for x in raw:
        groups.setdefault(token_of.get(int(x["tx_id"])) or own, []).append(x)
    if len(groups) <= 1:
        return [dict(sdr)]
    out = []
    for card, xs in groups.items():
        part = dict(sdr)
        part.update(
            sdr_id=sdr["sdr_id"] if card == own else f"{sdr['sdr_id']}+{card}",
            id_token=card,
            transactions=xs,
            tx_id=xs[0]["tx_id"],
            started=xs[0]["started"],
            stopped=xs[-1]["stopped"],
            meter_start_wh=xs[0]["meter_start_wh"],
            meter_stop_wh=xs[-1]["meter_stop_wh"],
            energy_wh=sum(int(x["energy_wh"] or 0) for x in xs),
            cost=sum(int(x.get("cost") or 0) for x in xs),
            tariff_id=xs[-1].get("tariff_id"),
            signed_meter=covering(sdr.get("signed_meter"), int(xs[0]["meter_start_wh"]), int(xs[-1]["meter_stop_wh"]))
            or (sdr.get("signed_meter") if raw[-1] in xs else None),
            split=True,
        )
        out.append(part)
    return out


def covering(values: Any, start_wh: int, stop_wh: int) -> list[bytes]:
    """The signed readings among `values` (a CSMS SDR's `signed_meter`: a list, or one value)
    whose register is `start_wh` or `stop_wh` (a part's meter start and stop), in a format read
    here (`meter.readings`)."""
    out = []
    for raw in _raw_values(values):
        found = meter.readings(base64.b64encode(raw).decode("ascii"))
        if len(found) == 1 and found[0].register_wh in (start_wh, stop_wh):
            out.append(raw)
    return out


def signed_meter(sdr: Mapping[str, Any], limit: int = 512) -> str | None:
    """The SDR's signed meter data for PutSdr (base64; one value of at most `limit` bytes): its
    `EDM1` readings of the meter start and of the meter stop, concatenated (the home CSP checks
    both: a seal on the stop alone lets a CSO lower the start); else — another format — the last
    value, the one that covers the meter stop."""
    values = _raw_values(sdr.get("signed_meter"))
    pair = _start_and_stop(values, sdr.get("meter_start_wh"), sdr.get("meter_stop_wh"))
    if pair and len(pair) <= limit:
        return base64.b64encode(pair).decode("ascii")
    for raw in reversed(values):
        if len(raw) <= limit:
            return base64.b64encode(raw).decode("ascii")
    return None


def _start_and_stop(values: list[bytes], start_wh: Any, stop_wh: Any) -> bytes:
    """The first `EDM1` reading whose register is `start_wh` (missing: without it) and the last
    one whose register is `stop_wh`, concatenated; b"" without the stop's (the last value then)."""
    found = [(raw, meter.readings(base64.b64encode(raw).decode("ascii"))) for raw in values]
    edm1 = [(raw, r[0]) for raw, r in found if len(r) == 1]
    start = next((raw for raw, r in edm1 if start_wh is not None and r.register_wh == int(start_wh)), b"")
    stop = next((raw for raw, r in reversed(edm1) if stop_wh is not None and r.register_wh == int(stop_wh)), b"")
    return start + stop if stop else b""


def _raw_values(values: Any) -> list[bytes]:
    """A CSMS SDR's `signed_meter` as a list of raw values: a list of them (bytes, or text in hex
    or base64), or one such value alone (not iterated byte by byte); empty ones dropped."""
    if values is None:
        return []
    items = [values] if isinstance(values, bytes | str) else list(values)
    raws = (v if isinstance(v, bytes) else _decode(str(v)) for v in items)
    return [bytes(r) for r in raws if r]


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
        cso.store.db.executescript(LINKS_DDL)
        self._evses: tuple[str, ...] | None = None
        """The EVSEs and site records last published as locations."""
        self._status: dict[str, str] = {}
        self._progress: dict[str, int] = {}

    async def step(self, tables: CsmsTables, evse_status: Mapping[str, str]) -> None:
        await self.tariffs(tables)
        await self.locations(evse_status, tables)
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

    async def locations(self, evse_status: Mapping[str, str], tables: CsmsTables | None = None) -> None:
        """All locations again when the EVSEs or the operator's records of the sites and
        connectors (`set_site`, `set_connector`) changed; else the status of each EVSE whose status changed."""
        records: list[Any] = []
        if tables is not None:
            records += tables.select("site_records", order="site_id")
            records += tables.select("evse_records", order="site_id, device_id, evse")
        evses = (*sorted(evse_status), json.dumps(records, sort_keys=True, default=str))
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

    def session_of(self, key: tuple[str, str, int], evse: str, token: str, adopt_at: int | None) -> str | None:
        """The roaming session billing card `token` in the CSMS service session `key` (site,
        device, service session id): the one bound to it, else the card's open session at the
        EVSE when it is bound to no other service session, else — `adopt_at` given: a roaming
        card the site answered by itself — one opened now (`CsoEndpoint.adopt_session`); bound."""
        q = ("SELECT l.session_id FROM service_links l JOIN sessions s USING(session_id)"
             " WHERE l.site_id=? AND l.device_id=? AND l.service_id=? AND s.token_uid=?")  # fmt: skip
        row = self.cso.store.one(q, *key, token)
        if row is not None:
            return str(row[0])
        sid = self.cso.open_session(evse, token)
        if sid is not None and self.cso.store.one("SELECT 1 FROM service_links WHERE session_id=?", sid):
            sid = None  # the card's session of a service session before: its SDR is on its way
        if sid is None and adopt_at is not None:
            sid = self.cso.adopt_session(evse, token, adopt_at)
        if sid is not None:
            self.cso.store.exec("INSERT INTO service_links VALUES(?,?,?,?)", sid, *key)
        return sid

    async def progress(self, tables: CsmsTables) -> int:
        """R3-6: each open roaming session whose card drew more energy since last time (its
        transactions in the service session, the active one's last reading)."""
        n = 0
        for tx in tables.select("transactions", {"state": "active"}):
            token = tx["id_token"]
            if not token or tx["session_id"] is None:
                continue
            evse = evse_gid(str(tx["site_id"]), str(tx["device_id"]), int(tx["evse"] or 1))
            # a roaming card the site answered by itself — from the CSO's token lists (R4-2) or
            # its cache (S2) — has no session yet: opened now, so its progress reaches the home
            # CSP during the charge, not only with the SDR; a remote start's is recorded once
            # it is answered, the operator's own cards are none
            own = tx["remote_start_id"] is not None or tables.select("tokens", {"id_token": token})
            adopt_at = None if own else unix(tx["started"]) or int(self.cso.clock())
            key = (str(tx["site_id"]), str(tx["device_id"]), int(tx["session_id"]))
            sid = self.session_of(key, evse, str(token), adopt_at)
            if sid is None or self.cso.session(sid)["state"] not in ("active", "authorized"):
                continue
            energy = self._energy(tables, tx)
            if energy is None or self._progress.get(sid) == energy:
                continue
            await self.cso.session_progress(sid, energy, 0)
            self._progress[sid] = energy
            n += 1
        return n

    @staticmethod
    def _energy(tables: CsmsTables, tx: Mapping[str, Any]) -> int | None:
        """The energy so far of `tx`'s card in its service session (None: no reading yet)."""
        where = {"site_id": tx["site_id"], "device_id": tx["device_id"], "session_id": tx["session_id"]}
        done = 0
        for t in tables.select("transactions", where | {"id_token": tx["id_token"], "state": "ended"}):
            done += max(0, int(t["meter_stop_wh"] or 0) - int(t["meter_start_wh"] or 0))
        key = {"site_id": tx["site_id"], "device_id": tx["device_id"], "tx_id": tx["tx_id"]}
        readings = [e["energy_wh"] for e in tables.select("tx_events", key, order="seq_no") if e["energy_wh"]]
        if not readings:
            return None
        start = tx["meter_start_wh"] if tx["meter_start_wh"] is not None else readings[0]
        return done + max(0, int(readings[-1]) - int(start))

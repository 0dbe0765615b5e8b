"""The CSO's roaming endpoint (visited operator): publishes its locations, states and tariffs,
asks home CSPs to authorize tokens, runs remote commands through the `OperatorBackend`, and
reports sessions and SDRs. It keeps: its sessions, the pre-distributed token lists (R4-2),
reservations and plans — and of personal data only token uids, purged after the retention.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from typing import Any, ClassVar

from gateway.protocol import gid
from gateway.protocol.roaming.client import RoamingError
from gateway.protocol.roaming.http3 import H3Error
from gateway.protocol.text import clip_reason

from . import contract_pki, pricing, token_pages
from .config import EndpointConfig
from .endpoint import Ctx, Endpoint, Refused, handles, require_gid, settlement_key
from .operator import OperatorBackend

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS tariffs(tariff_id INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(session_id TEXT PRIMARY KEY, evse_gid TEXT NOT NULL, token_uid TEXT,
    csp TEXT NOT NULL, how TEXT NOT NULL, state TEXT NOT NULL, started INTEGER NOT NULL, stopped INTEGER,
    meter_start_wh INTEGER NOT NULL DEFAULT 0, energy_wh INTEGER NOT NULL DEFAULT 0, power_w INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0, tariff_id INTEGER, sdr_id TEXT);
CREATE TABLE IF NOT EXISTS token_cache(token_uid TEXT PRIMARY KEY, party TEXT NOT NULL, auth_status TEXT NOT NULL,
    expiry INTEGER);
CREATE TABLE IF NOT EXISTS token_lists(party TEXT PRIMARY KEY, version INTEGER NOT NULL);
-- R4-2: pages of a token list version not yet complete (installed at once when all are here)
CREATE TABLE IF NOT EXISTS token_pages(party TEXT NOT NULL, version INTEGER NOT NULL, page INTEGER NOT NULL,
    pages INTEGER NOT NULL, update_type TEXT NOT NULL, tokens TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY(party, version, page));
CREATE TABLE IF NOT EXISTS reservations(reservation_id INTEGER NOT NULL, csp TEXT NOT NULL, evse_gid TEXT NOT NULL,
    token_uid TEXT, expiry INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'active', PRIMARY KEY(csp, reservation_id));
CREATE TABLE IF NOT EXISTS plans(session_id TEXT PRIMARY KEY, plan TEXT NOT NULL, by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settlements(party TEXT NOT NULL, sdrs TEXT NOT NULL, amount INTEGER NOT NULL,
    currency TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS disputes(sdr_id TEXT PRIMARY KEY, csp TEXT NOT NULL, reason TEXT NOT NULL,
    energy_wh INTEGER, cost INTEGER, at INTEGER NOT NULL);
"""


class CsoEndpoint(Endpoint):
    role: ClassVar[str] = "cso"
    DDL: ClassVar[str] = DDL

    #: R3-8: how long after its expiry a start of the reservation's token at its EVSE is refused
    #: (the home CSP may not have heard of the expiry yet); afterwards it is an ordinary start
    EXPIRED_REFUSE_S: ClassVar[int] = 3600

    def __init__(self, cfg: EndpointConfig, operator: OperatorBackend, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.operator = operator
        cols = [r[1] for r in self.store.all("PRAGMA table_info(reservations)")]
        if "state" not in cols:  # a store made before reservation expiry (R3-8): active | used | expired
            self.store.exec("ALTER TABLE reservations ADD COLUMN state TEXT NOT NULL DEFAULT 'active'")
        self._expiring = asyncio.Lock()

    # ---- operator side: what the CSO's CSMS calls
    async def publish_locations(self) -> int:
        """R1-2: push every location to the CSPs (or the CH)."""
        n = 0
        for loc in await self.operator.locations():
            await self.broadcast("PutLocation", loc)
            n += 1
        return n

    async def publish_status(
        self, evse_gid: str, status: str, *, outage_kind: str | None = None, reason: str | None = None
    ) -> None:
        """R1-3 dynamic status; R5-1 with outage_kind (maintenance / outage / restored)."""
        body: dict[str, Any] = {"evse_gid": evse_gid, "evse_status": status, "time": int(self.clock())}
        if outage_kind is not None:
            body["outage_kind"] = outage_kind
        if reason is not None:
            body["reason"] = reason
        await self.broadcast("EvseStatusUpdate", body)

    async def publish_tariff(self, tariff: dict[str, Any]) -> None:
        """R2-1: store the tariff (for R2-2 pulls) and push it."""
        self.store.exec("INSERT OR REPLACE INTO tariffs VALUES(?,?)", tariff["tariff_id"], json.dumps(tariff))
        await self.broadcast("PushTariff", tariff)

    def tariffs(self) -> dict[int, pricing.Tariff]:
        """Every tariff published (kept: a session is priced with the one it ran under)."""
        return {int(r[0]): pricing.Tariff.from_body(json.loads(r[1])) for r in self.store.all("SELECT * FROM tariffs")}

    def _tariff(self) -> pricing.Tariff | None:
        """The tariff in force now (its valid_from passed)."""
        return pricing.in_force(self.tariffs().values(), int(self.clock()))

    def _home_candidates(self, token_uid: str, token_type: str) -> list[str]:
        """The CSPs a card number may be sent to: its home from a token list, or the provider
        of a contract id (an eMAID, also printed on an RFID card); none else (privacy: a card
        number goes to its home CSP only) unless `token_discovery` says to ask every CSP."""
        row = self.store.one("SELECT party FROM token_cache WHERE token_uid=?", token_uid)
        if row is not None:
            return [str(row[0])]
        home = home_of_contract(token_uid)
        if home is not None or token_type == "iso15118":
            party = self.cfg.provider(home or "")  # the provider, or the visited CSP that serves it
            return [party.party_id] if party is not None else []
        if self.cfg.token_discovery == "ask_every_csp":
            return [p.party_id for p in self.cfg.of_role("csp")]
        return []

    async def _ask_home(self, body: dict[str, Any]) -> dict[str, Any]:
        """AuthorizeRoaming to the token's home CSP; a card whose home is unknown here goes to
        the CH (when there is one), which routes it to the home it knows, or answers unknown."""
        uid, kind = body["token_uid"], body["token_type"]
        # peer to peer there is no hub to ask, even when a CH is configured (for other uses)
        ch = self.cfg.clearing_house if self.cfg.mode != "peer_to_peer" else None
        homes = self._home_candidates(uid, kind)
        if ch is not None and not homes:
            homes = [""]  # no x-ev-to: the CH finds the home
        answer: dict[str, Any] = {"auth_status": "unknown"}
        for party in homes:
            try:
                answer = await (self.client(ch).call("AuthorizeRoaming", body) if not party and ch else
                                self.send("AuthorizeRoaming", body, party))  # fmt: skip
            except (ConnectionError, RoamingError, H3Error):
                continue  # that CSP (or the CH) is unreachable: try the next, then the token list
            if answer["auth_status"] != "unknown":
                break
        return answer

    async def token_presented(self, evse_gid: str, token_uid: str, token_type: str = "rfid") -> dict[str, Any]:
        """R3-1 (RFID at the EVSE), R3-3 (Plug & Charge: token_type iso15118, token_uid the contract
        id), R4-1 (online identification): authorize with the home CSP, then start charging.
        Falls back to the pre-distributed token list (R4-2) when no home CSP answers."""
        evse_gid = str(require_gid(evse_gid, "E", "evse_gid"))
        if token_type == "iso15118":
            token_uid = str(require_gid(token_uid, "C", "token_uid"))
        if await self.operator.evse_status(evse_gid) is None:
            raise Refused(404, "unknown_evse", f"{evse_gid} is not an EVSE of {self.me}", "evse_gid")
        body = {"token_uid": token_uid, "evse_gid": evse_gid, "token_type": token_type}
        answer = await self._ask_home(body)
        if answer["auth_status"] == "unknown":
            answer = self._offline_authorize(token_uid)
        if answer["auth_status"] != "accepted":
            return answer
        sid = answer["roaming_session_id"]
        csp = gid.parse(sid, expect="S").operator if "csp" not in answer else answer.pop("csp")
        self.note_shared("AuthorizeRoaming", body, csp)  # also when the CH found the home CSP (M10)
        result, reason = await self._start(sid, evse_gid, token_uid, csp, "local")
        return {**answer, "result": result} | ({"reason": reason} if reason else {})

    @handles("AuthorizeRoaming", senders=("site",))
    async def _on_site_authorize(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """Mixed mode, asked by one of the CSO's own site gateways for a token it does not know
        (R3-1, R4-1): the operator's own token table first, then the home CSP directly (or the
        pre-distributed list, R4-2). Charging is not started here: the gateway answers the
        board's Authorize and the board starts; the session is recorded as `authorized`, and
        its SDR goes to the home CSP when the CSMS reports the transaction ended
        (`session_ended`)."""
        uid, evse, kind = body["token_uid"], body["evse_gid"], body["token_type"]
        await self._evse(evse)
        own = await self.operator.token_status(uid)
        if own is not None:
            return {"auth_status": own}
        ask = {"token_uid": uid, "evse_gid": evse, "token_type": kind}
        answer = await self._ask_home(ask)
        if answer["auth_status"] == "unknown":
            answer = self._offline_authorize(uid)
        if answer["auth_status"] != "accepted":
            return answer
        sid = answer["roaming_session_id"]
        csp = gid.parse(sid, expect="S").operator if "csp" not in answer else answer.pop("csp")
        self.note_shared("AuthorizeRoaming", ask, csp)  # also when the CH found the home CSP (M10)
        tariff = self._tariff()
        self.store.exec(
            "INSERT OR IGNORE INTO sessions(session_id, evse_gid, token_uid, csp, how, state, started, tariff_id)"
            " VALUES(?,?,?,?,?,?,?,?)",
            sid,
            evse,
            uid,
            csp,
            "site",
            "authorized",
            int(self.clock()),
            None if tariff is None else tariff.tariff_id,
        )
        # R3-8: the reserving card at the EVSE held for it: its site lets it start, so its
        # reservation is used (not expired later and reported to the CSP as unused)
        self.store.exec("UPDATE reservations SET state='used' WHERE evse_gid=? AND csp=? AND token_uid=? AND"
                        " state='active'", evse, csp, uid)  # fmt: skip
        return answer

    def open_session(self, evse_gid: str, token_uid: str) -> str | None:
        """The roaming session not yet ended at this EVSE for this token (the newest), if any."""
        row = self.store.one(
            "SELECT session_id FROM sessions WHERE evse_gid=? AND token_uid=? AND state NOT IN ('ended', 'failed')"
            " ORDER BY started DESC LIMIT 1",
            evse_gid,
            token_uid,
        )
        return None if row is None else str(row[0])

    def adopt_session(self, evse_gid: str, token_uid: str, started: int) -> str | None:
        """A session the CSO's site authorized by itself — a roaming card it had cached (S2) or
        from a token list while offline (R4-2) — so no roaming session was opened: one is
        opened now, issued by the CSO, so that its SDR reaches the home CSP like any other.
        The home is the card's list, its last roaming session here, or its contract provider;
        None when it is no known roaming card (then it is the operator's own customer)."""
        row = self.store.one("SELECT party FROM token_cache WHERE token_uid=?", token_uid)
        row = row or self.store.one(
            "SELECT csp FROM sessions WHERE token_uid=? ORDER BY started DESC LIMIT 1", token_uid
        )
        home = str(row[0]) if row is not None else home_of_contract(token_uid)
        party = self.cfg.provider(home or "")  # the provider, or the visited CSP that serves it
        if party is None:
            return None
        home = party.party_id
        sid = self.issue("S", secrets.token_hex(12))
        tariff = pricing.in_force(self.tariffs().values(), started)
        self.store.exec(
            "INSERT INTO sessions(session_id, evse_gid, token_uid, csp, how, state, started, tariff_id)"
            " VALUES(?,?,?,?,?,?,?,?)",
            sid, evse_gid, token_uid, home, "cached", "authorized", started, tariff and tariff.tariff_id,
        )  # fmt: skip
        self.note_shared("PutSdr", {"token_uid": token_uid}, home)
        return sid

    async def session_failed(self, sid: str, why: str) -> None:
        """A session that never charged (a remote start whose EV never came: `why` the board's
        stop reason, e.g. timeout) ends here, and its home CSP is told so that it does not keep
        it active: an EvseStatusUpdate to that CSP (the EVSE's status now, reason `session <id>
        failed: <why>`), a durable job, as for an expired reservation — a SessionUpdate has no
        state to say it with, and a session without a transaction makes no SDR."""
        s = self.session(sid)
        now = int(self.clock())
        status = await self.operator.evse_status(s["evse_gid"]) or "unknown"
        note = {"evse_gid": s["evse_gid"], "evse_status": status, "time": now,
                "reason": clip_reason(f"session {sid} failed: {why}")}  # fmt: skip
        with self.store.tx() as db:
            db.execute(
                "UPDATE sessions SET state='failed', stopped=? WHERE session_id=? AND state='active'", (now, sid)
            )
            job = self.enqueue("EvseStatusUpdate", note, s["csp"], f"session:{sid}")
        await self.run_jobs([job])

    def _cached(self, token_uid: str) -> bool:
        return self.store.one("SELECT 1 FROM token_cache WHERE token_uid=?", token_uid) is not None

    def _offline_authorize(self, token_uid: str) -> dict[str, Any]:
        row = self.store.one("SELECT party, auth_status, expiry FROM token_cache WHERE token_uid=?", token_uid)
        if row is None:
            return {"auth_status": "unknown"}
        if row[2] is not None and row[2] <= self.clock():
            return {"auth_status": "expired"}
        if row[1] != "accepted":
            return {"auth_status": row[1]}
        sid = self.issue("S", secrets.token_hex(12))
        return {"auth_status": "accepted", "roaming_session_id": sid, "csp": row[0]}

    async def _start(self, sid: str, evse_gid: str, token_uid: str, csp: str, how: str) -> tuple[str, str | None]:
        """Start through the operator, honouring reservations (R3-8): an EVSE reserved for another
        token is occupied; the reserving token uses its reservation; a start of a token whose
        reservation at this EVSE expired (within EXPIRED_REFUSE_S) is refused with the reason."""
        await self.expire_reservations()
        now = int(self.clock())
        held = self.store.one(
            "SELECT reservation_id, csp, token_uid FROM reservations WHERE evse_gid=? AND state='active'", evse_gid
        )
        if held is not None and (held[1], held[2]) != (csp, token_uid):
            return "evse_occupied", f"EVSE reserved (reservation {held[0]})"
        if held is None:
            lapsed = self.store.one(
                "SELECT reservation_id, expiry FROM reservations WHERE evse_gid=? AND csp=? AND token_uid=?"
                " AND state='expired' AND expiry > ? ORDER BY expiry DESC LIMIT 1",
                evse_gid,
                csp,
                token_uid,
                now - self.EXPIRED_REFUSE_S,
            )
            if lapsed is not None:
                return "rejected", f"reservation {lapsed[0]} expired at {lapsed[1]} (Unix s) unused"
        result = await self.operator.start(evse_gid, token_uid, sid)
        # a remote start the operator did not confirm in time (`timeout`) may still take effect:
        # recorded like an accepted one, so that its charge is billed to the home CSP (which
        # keeps it too); one whose EV never comes ends as `failed` (`session_failed`)
        if result == "accepted" or (result == "timeout" and how == "remote"):
            tariff = self._tariff()
            with self.store.tx() as db:
                db.execute(
                    "INSERT OR IGNORE INTO sessions(session_id, evse_gid, token_uid, csp, how, state, started,"
                    " tariff_id) VALUES(?,?,?,?,?,?,?,?)",
                    (sid, evse_gid, token_uid, csp, how, "active", now, tariff and tariff.tariff_id),
                )
                if held is not None:
                    db.execute("UPDATE reservations SET state='used' WHERE csp=? AND reservation_id=?", (csp, held[0]))
        return result, None

    async def tick(self) -> None:
        await self.expire_reservations()

    async def expire_reservations(self) -> list[int]:
        """R3-8: every active reservation whose expiry has passed unused is expired: the operator
        cancels it (CancelReservation), the store marks it `expired`, and the home CSP is told
        with an EvseStatusUpdate (the EVSE's status now, reason `reservation <id> expired`) — a
        durable job, retried until the CSP acknowledges. The reservation ids expired."""
        async with self._expiring:
            now = int(self.clock())
            rows = self.store.all(
                "SELECT reservation_id, csp, evse_gid FROM reservations WHERE state='active' AND expiry <= ?", now
            )
            jobs, out = [], []
            for rid, csp, evse in rows:
                try:
                    result = await self.operator.cancel_reservation(evse, rid)
                except Exception as exc:  # the board expires it by itself too: the endpoint goes on
                    result = f"{type(exc).__name__}: {exc}"
                if result != "accepted":
                    log.warning("%s: cancelling expired reservation %s at %s: %s", self.me, rid, evse, result)
                status = await self.operator.evse_status(evse) or "unknown"
                note = {"evse_gid": evse, "evse_status": status, "time": now, "reason": f"reservation {rid} expired"}
                with self.store.tx() as db:
                    db.execute(
                        "UPDATE reservations SET state='expired' WHERE csp=? AND reservation_id=? AND state='active'",
                        (csp, rid),
                    )
                    jobs.append(self.enqueue("EvseStatusUpdate", note, csp, f"reservation:{rid}"))
                out.append(int(rid))
        if jobs:
            await self.run_jobs(jobs)
        return out

    def _price(self, lines: list[pricing.Line]) -> tuple[list[int], str]:
        """Each transaction's cost with the tariff it ran under; a tariff this endpoint was never
        given (or not yet in force at the line's start) gives way to the one in force then."""
        tariffs = self.tariffs()
        usable = []
        for x in lines:
            named = tariffs.get(x.tariff_id) if x.tariff_id is not None else None
            if x.tariff_id is not None and (named is None or named.valid_from > x.started):
                log.warning("%s: tariff %s unusable from %s: the one in force", self.me, x.tariff_id, x.started)
                x = pricing.Line(x.started, x.stopped, x.energy_wh)  # noqa: PLW2901 - the line as priced
            usable.append(x)
        costs = pricing.price(tariffs, usable)
        first = pricing.tariff_of(tariffs, usable[0]) if usable else None
        return costs, self.cfg.currency if first is None else first.currency

    def session(self, sid: str) -> dict[str, Any]:
        row = self.store.one("SELECT * FROM sessions WHERE session_id=?", sid)
        if row is None:
            raise Refused(404, "unknown_session", f"no session {sid} at {self.me}", "roaming_session_id")
        return dict(row)

    async def session_progress(self, sid: str, energy_wh: int, power_w: int) -> dict[str, Any]:
        """R3-6: live energy, power and running cost to the home CSP."""
        s = self.session(sid)
        now = int(self.clock())
        (cost,), _ = self._price([pricing.Line(s["started"], now, energy_wh, s["tariff_id"])])
        self.store.exec(
            "UPDATE sessions SET energy_wh=?, power_w=?, cost=? WHERE session_id=?", energy_wh, power_w, cost, sid
        )
        body = {
            "roaming_session_id": sid,
            "evse_gid": s["evse_gid"],
            "energy_wh": energy_wh,
            "power_w": power_w,
            "cost": cost,
            "time": now,
        }
        return await self.send("SessionUpdate", body, s["csp"])

    async def session_ended(
        self,
        sid: str,
        energy_wh: int,
        *,
        meter_start_wh: int = 0,
        signed_meter: str | None = None,
        lines: list[pricing.Line] | None = None,
    ) -> dict[str, Any]:
        """R3-5 and R3-9: the final SessionUpdate, then the SDR (its id stays the same on a retry).
        `lines`: the session's transactions (times, energy, tariff id), each priced with its own
        tariff; without them the session is one transaction under the tariff of its start."""
        s = self.session(sid)
        now = int(self.clock())
        if not lines:
            lines = [pricing.Line(s["started"], s["stopped"] or now, energy_wh, s["tariff_id"])]
        costs, currency = self._price(lines)
        cost = sum(costs)
        sdr_id = s["sdr_id"] or self.issue("R", secrets.token_hex(12))
        self.store.exec(
            "UPDATE sessions SET state='ended', stopped=COALESCE(stopped, ?), energy_wh=?, power_w=0, cost=?, sdr_id=?"
            " WHERE session_id=?",
            now,
            energy_wh,
            cost,
            sdr_id,
            sid,
        )
        s = self.session(sid)
        update = {
            "roaming_session_id": sid,
            "evse_gid": s["evse_gid"],
            "energy_wh": energy_wh,
            "power_w": 0,
            "cost": cost,
            "time": now,
        }
        await self.send("SessionUpdate", update, s["csp"])
        sdr: dict[str, Any] = {
            "sdr_id": sdr_id,
            "roaming_session_id": sid,
            "evse_gid": s["evse_gid"],
            "token_uid": s["token_uid"] or "",
            # as long as its transactions, by the meter's clock (a session opened late, R4-2,
            # or a meter clock apart from ours, still gives stopped ≥ started)
            "started": min(x.started for x in lines),
            "stopped": max(x for line in lines for x in (line.started, line.stopped)),
            "meter_start_wh": meter_start_wh,
            "meter_stop_wh": meter_start_wh + energy_wh,
            "energy_wh": energy_wh,
            "cost": cost,
            "currency": currency,
        }
        first = lines[0].tariff_id if lines[0].tariff_id is not None else s["tariff_id"]
        if first is not None:
            sdr["tariff_id"] = first
        if signed_meter is not None:
            sdr["signed_meter"] = signed_meter
        sdr["lines"] = [_line_body(x, c) for x, c in zip(lines, costs, strict=True)]
        answer = await self.send("PutSdr", sdr, s["csp"])
        return {**answer, "sdr_id": sdr_id, "cost": cost}

    async def contract_certificate(
        self, evse_gid: str, action_15118: str, exi: bytes, contract_id: str | None = None
    ) -> dict[str, Any]:
        """S7, R3-3: an EV's contract certificate installation/update (from the CSMS) goes to
        the EV user's home CSP — the contract id's party; directly in peer-to-peer and mixed
        mode, through the CH in clearing-house mode. `exi` is the DER CSR (contract_pki.py);
        the answer's `exi` (bytes here) the DER chain, leaf first. The contract id is the
        CSR's subject CN unless given."""
        require_gid(evse_gid, "E", "evse_gid")
        cid = contract_id or contract_pki.csr_contract_id(exi)
        if cid is None:
            return {"status": "rejected", "reason": "no contract id: the CSR has no common name"}
        try:
            home = gid.parse(cid, expect="C").operator
        except gid.GidError:
            return {"status": "rejected", "reason": "the CSR common name is not a contract id"}
        party = self.cfg.party(home)
        if party is None and (served := self.cfg.provider(home)) is not None:  # through its visited CSP
            party, home = served, served.party_id
        # a contract the CH issued (credentials.py) goes to the CH, which knows the CSP it belongs to
        by_ch = home == self.cfg.clearing_house and self.cfg.mode != "peer_to_peer"
        if not by_ch and (party is None or party.role != "csp"):
            return {"status": "rejected", "reason": f"no roaming agreement with the contract's provider {home}"}
        body = {"evse_gid": evse_gid, "action_15118": action_15118, "exi": base64.b64encode(exi).decode("ascii"),
                "contract_id": cid}  # fmt: skip
        try:
            answer = await self.send("ContractCertificate", body, home)
        except (ConnectionError, RoamingError, H3Error) as exc:
            return {"status": "rejected", "reason": clip_reason(f"home CSP {home} not reachable: {exc}")}
        out: dict[str, Any] = {"status": answer["status"]}
        if "exi" in answer:
            out["exi"] = base64.b64decode(answer["exi"])
        if "reason" in answer:
            out["reason"] = answer["reason"]
        return out

    async def update_plan(self, sid: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
        """R3-10: the CSO changes the charge plan: applies it at the EVSE through the operator
        (its CSMS: capped at the EVSE's power) and tells the home CSP the plan applied."""
        s = self.session(sid)
        applied = await self.operator.apply_plan(sid, plan)
        if applied is None:
            return {"status": "rejected"}
        self.store.exec("INSERT OR REPLACE INTO plans VALUES(?,?,?)", sid, json.dumps(applied), self.me)
        return await self.send("ChargePlan", {"roaming_session_id": sid, "plan": applied}, s["csp"])

    # ---- incoming (from the home CSP, or the CH)
    async def _evse(self, evse_gid: str) -> str:
        if gid.parse(evse_gid).operator != self.me:
            raise Refused(404, "unknown_evse", f"{evse_gid} is not operated by {self.me}", "evse_gid")
        state = await self.operator.evse_status(evse_gid)
        if state is None:
            raise Refused(404, "unknown_evse", f"{evse_gid} is not an EVSE of {self.me}", "evse_gid")
        return state

    @handles("GetTariffs", senders=("csp",))
    async def _on_get_tariffs(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        if body["operator_id"] != self.me:
            raise Refused(404, "unknown_operator", f"{body['operator_id']} is not {self.me}", "operator_id")
        t = self._tariff()
        if t is None:
            return {"status": "unknown"}
        kept = sorted(self.tariffs().values(), key=lambda x: (x.valid_from, x.tariff_id))[-64:]
        return {"status": "accepted", **t.body(), "tariffs": [x.body() for x in kept]}

    @handles("RemoteStart", senders=("csp",), key=lambda b: str(b["roaming_session_id"]))
    async def _on_remote_start(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        await self._evse(body["evse_gid"])
        sid = body["roaming_session_id"]
        if gid.parse(sid).operator != ctx.origin:
            raise Refused(403, "not_your_session", f"{sid} was not issued by {ctx.origin}", "roaming_session_id")
        if self.store.one("SELECT 1 FROM sessions WHERE session_id=?", sid):
            raise Refused(409, "conflict", f"session {sid} exists already", "roaming_session_id")
        result, reason = await self._start(sid, body["evse_gid"], body["token_uid"], ctx.origin, "remote")
        return {"result": result} | ({"reason": reason} if reason else {})

    def _own_session(self, sid: str, ctx: Ctx) -> dict[str, Any]:
        s = self.session(sid)
        if s["csp"] != ctx.origin:
            raise Refused(404, "unknown_session", f"no session {sid} of {ctx.origin} here", "roaming_session_id")
        return s

    @handles("RemoteStop", senders=("csp",), key=lambda b: str(b["roaming_session_id"]))
    async def _on_remote_stop(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        s = self._own_session(body["roaming_session_id"], ctx)
        if s["state"] not in ("active", "authorized"):  # authorized: started at the EVSE with a card
            return {"result": "rejected", "reason": "session already ended"}
        result = await self.operator.stop(s["session_id"])
        if result == "accepted":
            self.store.exec(
                "UPDATE sessions SET state='stopping', stopped=? WHERE session_id=?", int(ctx.now), s["session_id"]
            )
        return {"result": result}

    @handles("ChargePlan", senders=("csp",))
    async def _on_charge_plan(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        s = self._own_session(body["roaming_session_id"], ctx)
        applied = await self.operator.apply_plan(s["session_id"], body["plan"])
        if applied is None:
            return {"status": "rejected"}
        self.store.exec("INSERT OR REPLACE INTO plans VALUES(?,?,?)", s["session_id"], json.dumps(applied), ctx.origin)
        return {"status": "accepted", "plan": applied}

    @handles("ReserveRoaming", senders=("csp",), key=lambda b: str(b["reservation_id"]))
    async def _on_reserve(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        await self._evse(body["evse_gid"])
        if body["expiry"] <= ctx.now:
            raise Refused(400, "expired", "reservation expiry is in the past", "expiry")
        result = await self.operator.reserve(
            body["evse_gid"], body["token_uid"], body["expiry"], body["reservation_id"]
        )
        if result == "accepted":
            self.store.exec(
                "INSERT OR REPLACE INTO reservations(reservation_id, csp, evse_gid, token_uid, expiry, state)"
                " VALUES(?,?,?,?,?,'active')",
                body["reservation_id"],
                ctx.origin,
                body["evse_gid"],
                body["token_uid"],
                body["expiry"],
            )
        return {"result": result}

    @handles("UnlockRoaming", senders=("csp",))
    async def _on_unlock(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        await self._evse(body["evse_gid"])
        sid = body.get("roaming_session_id")
        if sid is not None:
            self._own_session(sid, ctx)
        result = await self.operator.unlock(body["evse_gid"], sid)
        if result == "accepted" and sid is not None:  # R5-2: unlocked, the charge is over
            self.store.exec(
                "UPDATE sessions SET state='stopping', stopped=COALESCE(stopped, ?) WHERE session_id=?"
                " AND state IN ('active', 'authorized')",
                int(ctx.now),
                sid,
            )
        return {"result": result}

    @handles("TokenList", senders=("csp",), key=lambda b: f"{b['party_id']}:{b['list_version']}:{b.get('page', 0)}")
    async def _on_token_list(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R4-2: a page of a CSP's token list; a version is installed, in one transaction, once
        every page of it is here (`token_pages`: the rule of the pages and versions)."""
        party = body["party_id"]
        if party != ctx.origin:
            raise Refused(403, "party_mismatch", f"{ctx.origin} may not send the list of {party}", "party_id")
        token_pages.check_page(body, party, self.cfg.max_list_pages)
        for i, t in enumerate(body["tokens"]):
            self._check_ch_credential(t, ctx, f"tokens[{i}].token_uid")
        with self.store.tx() as db:
            tokens = token_pages.stage(db, "token", party, body, int(ctx.now))
            if tokens is None:
                return {"status": "accepted"}
            if body["update_type"] == "full":
                db.execute("DELETE FROM token_cache WHERE party=?", (party,))
            for t in tokens:
                if t["auth_status"] == "invalid":  # gone from the CSP's list
                    db.execute("DELETE FROM token_cache WHERE token_uid=? AND party=?", (t["token_uid"], party))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO token_cache VALUES(?,?,?,?)",
                        (t["token_uid"], party, t["auth_status"], t.get("expiry")),
                    )
        return {"status": "accepted"}

    def _check_ch_credential(self, token: dict[str, Any], ctx: Ctx, field: str) -> None:
        """A credential the CH issued is listed through the CH only, which checks that the CSP
        listing it is the one it was issued to; sent here directly, another CSP could have this
        CSO ask it about that card (privacy) and block it."""
        ch = self.cfg.clearing_house
        listed = token["auth_status"] != "invalid"  # a removal concerns the sender's own list only
        if listed and ch is not None and ctx.hop != ch and home_of_contract(token["token_uid"]) == ch:
            raise Refused(403, "not_via_clearing_house", f"a credential of {ch} is listed through {ch} only", field)

    @handles("Settlement", senders=("ch",), key=settlement_key)
    async def _on_settlement(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        return self.record_settlement(body, ctx)

    @handles("DisputeSdr", senders=("csp",), key=lambda b: str(b["sdr_id"]))
    async def _on_dispute(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """The home CSP contests one of our SDRs: kept for the operator (a corrected SDR is a
        new session's business: the disputed one stays as it was billed)."""
        row = self.store.one("SELECT csp, session_id FROM sessions WHERE sdr_id=?", body["sdr_id"])
        if row is None or row[0] != ctx.origin:
            raise Refused(404, "unknown_sdr", f"no SDR {body['sdr_id']} of {ctx.origin} here", "sdr_id")
        if row[1] != body["roaming_session_id"]:
            raise Refused(400, "inconsistent", "the SDR is of another session", "roaming_session_id")
        self.store.exec(
            "INSERT OR REPLACE INTO disputes VALUES(?,?,?,?,?,?)",
            body["sdr_id"], ctx.origin, body["reason"], body.get("energy_wh"), body.get("cost"), int(ctx.now),
        )  # fmt: skip
        return {"status": "accepted"}

    # ---- privacy
    def may_delete(self, token_uid: str, origin: str) -> bool:
        """M10: a party the token travelled to or from, or its home — the CSP of its list entry,
        of a session or a reservation of it here, the provider of a contract id (or the visited
        CSP serving that provider; the CH for a credential it issued): entitled by the list or
        the contract, also after the retention purged `shared`."""
        if super().may_delete(token_uid, origin):
            return True
        provider = home_of_contract(token_uid)
        served = self.cfg.provider(provider or "")
        if provider is not None and origin in (provider, served.party_id if served else None):
            return True
        q = ("SELECT 1 FROM token_cache WHERE token_uid=? AND party=?"
             " UNION ALL SELECT 1 FROM sessions WHERE token_uid=? AND csp=?"
             " UNION ALL SELECT 1 FROM reservations WHERE token_uid=? AND csp=?")  # fmt: skip
        return self.store.one(q, *(token_uid, origin) * 3) is not None

    async def delete_user(self, token_uid: str, *, skip: str = "") -> int:
        """M10 as everywhere, and the card's home by its list entry always — also when the
        retention purged the `shared` row that named it."""
        row = self.store.one("SELECT party FROM token_cache WHERE token_uid=?", token_uid)
        if row is not None and row[0] != skip:
            self.store.exec("INSERT OR IGNORE INTO shared VALUES(?,?,?)", token_uid, row[0], int(self.clock()))
        return await super().delete_user(token_uid, skip=skip)

    def forget(self, token_uid: str) -> int:
        with self.store.tx() as db:
            n = db.execute("UPDATE sessions SET token_uid=NULL WHERE token_uid=?", (token_uid,)).rowcount
            n += db.execute("DELETE FROM token_cache WHERE token_uid=?", (token_uid,)).rowcount
            for party, version, page, tokens in db.execute(
                "SELECT party, version, page, tokens FROM token_pages"
            ).fetchall():  # a list still arriving
                kept = [t for t in json.loads(tokens) if t["token_uid"] != token_uid]
                if len(kept) == len(json.loads(tokens)):
                    continue
                n += 1  # counted: `holds` tells by the count whether anything of the token is here
                db.execute("UPDATE token_pages SET tokens=? WHERE party=? AND version=? AND page=?",
                           (json.dumps(kept), party, version, page))  # fmt: skip
            n += db.execute("UPDATE reservations SET token_uid=NULL WHERE token_uid=?", (token_uid,)).rowcount
        return n

    def purge_personal(self, cut: int) -> int:
        db = self.store.db
        n = db.execute(
            "UPDATE sessions SET token_uid=NULL WHERE token_uid IS NOT NULL AND started < ?", (cut,)
        ).rowcount
        n += db.execute("DELETE FROM token_cache WHERE expiry IS NOT NULL AND expiry < ?", (cut,)).rowcount
        n += db.execute("DELETE FROM reservations WHERE expiry < ?", (cut,)).rowcount
        n += db.execute("DELETE FROM token_pages WHERE at < ?", (cut,)).rowcount  # a list never completed
        return n


def _line_body(line: pricing.Line, cost: int) -> dict[str, Any]:
    out: dict[str, Any] = {"started": line.started, "stopped": line.stopped, "energy_wh": line.energy_wh, "cost": cost}
    if line.tariff_id is not None:
        out["tariff_id"] = line.tariff_id
    return out


def home_of_contract(token_uid: str) -> str | None:
    """The provider (operator id) of a token that is a contract id in any standard spelling."""
    try:
        return gid.parse(token_uid, expect="C").operator
    except gid.GidError:
        return None

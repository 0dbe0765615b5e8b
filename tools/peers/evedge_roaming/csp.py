"""The home CSP's roaming endpoint: authorizes its customers' tokens and contracts, starts,
stops, plans, reserves and unlocks at visited CSOs, and keeps its own record of each session
(energy, cost from the CSO's tariff) to check the CSO's SDRs against. It keeps: its customers'
tokens, the CSOs' locations, EVSE states and tariffs, its sessions and the SDRs received.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
from pathlib import Path
from typing import Any, ClassVar

from gateway import schema
from gateway.protocol import gid
from gateway.protocol.roaming import json_body
from gateway.protocol.roaming.client import RoamingError
from gateway.protocol.roaming.http3 import ConnectFailed

from . import contract_pki, credentials, meter, pricing
from .config import ConfigError, EndpointConfig
from .endpoint import Ctx, Endpoint, Refused, handles, require_gid, settlement_key

DDL = """
CREATE TABLE IF NOT EXISTS customers(token_uid TEXT PRIMARY KEY, contract_id TEXT, auth_status TEXT NOT NULL,
    expiry INTEGER);
CREATE TABLE IF NOT EXISTS locations(location_id TEXT PRIMARY KEY, operator_id TEXT NOT NULL, body TEXT NOT NULL,
    at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evse_status(evse_gid TEXT PRIMARY KEY, status TEXT NOT NULL, time INTEGER NOT NULL,
    outage_kind TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS tariffs(operator_id TEXT NOT NULL, tariff_id INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY(operator_id, tariff_id));
CREATE TABLE IF NOT EXISTS sessions(session_id TEXT PRIMARY KEY, cso TEXT NOT NULL, evse_gid TEXT NOT NULL,
    token_uid TEXT, state TEXT NOT NULL, created INTEGER NOT NULL, energy_wh INTEGER NOT NULL DEFAULT 0,
    power_w INTEGER NOT NULL DEFAULT 0, cost INTEGER NOT NULL DEFAULT 0, time INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS plans(session_id TEXT PRIMARY KEY, plan TEXT NOT NULL, by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sdrs(sdr_id TEXT PRIMARY KEY, cso TEXT NOT NULL, session_id TEXT NOT NULL,
    body TEXT NOT NULL, verdict TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS token_list(version INTEGER NOT NULL);
-- R4-2: the tokens as the CSOs last received them, the base of a differential list
CREATE TABLE IF NOT EXISTS token_sent(token_uid TEXT PRIMARY KEY, auth_status TEXT NOT NULL, expiry INTEGER);
CREATE TABLE IF NOT EXISTS settlements(party TEXT NOT NULL, sdrs TEXT NOT NULL, amount INTEGER NOT NULL,
    currency TEXT NOT NULL, at INTEGER NOT NULL);
-- R3-8: reservations made at CSOs; state active | expired (the CSO's EvseStatusUpdate said so)
CREATE TABLE IF NOT EXISTS reservations(reservation_id INTEGER NOT NULL, cso TEXT NOT NULL, evse_gid TEXT NOT NULL,
    token_uid TEXT, expiry INTEGER NOT NULL, state TEXT NOT NULL, PRIMARY KEY(cso, reservation_id));
CREATE TABLE IF NOT EXISTS contract_certs(serial TEXT PRIMARY KEY, contract_id TEXT NOT NULL, cso TEXT NOT NULL,
    evse_gid TEXT NOT NULL, action TEXT NOT NULL, der BLOB NOT NULL, issued INTEGER NOT NULL);
-- the CSP's own record of each session: every reading a SessionUpdate brought (R3-6, R3-5)
CREATE TABLE IF NOT EXISTS readings(session_id TEXT NOT NULL, time INTEGER NOT NULL, energy_wh INTEGER NOT NULL,
    PRIMARY KEY(session_id, time));
CREATE TABLE IF NOT EXISTS disputes(sdr_id TEXT PRIMARY KEY, cso TEXT NOT NULL, reason TEXT NOT NULL,
    status TEXT NOT NULL, at INTEGER NOT NULL);
-- CSP↔CSP roaming: the visited CSP that passed on a CSO's publications (we reach that CSO through it)
CREATE TABLE IF NOT EXISTS via_routes(operator_id TEXT PRIMARY KEY, via TEXT NOT NULL);
-- R3-9: each EVSE's meter key as its CSO's locations stated it, a row per change (key NULL: none
-- stated any more): the key in force when a session started checks its SDR's seals
CREATE TABLE IF NOT EXISTS meter_keys(evse_gid TEXT NOT NULL, operator_id TEXT NOT NULL, key BLOB,
    since INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS meter_keys_by_evse ON meter_keys(evse_gid, since);
"""

#: tokens per TokenList page: the schema's limit of one message
TOKEN_PAGE = schema.FIELD_BY_NAME["tokens"].max_len
#: meter-key changes one EVSE's location may state within a day: more is 429 `too_frequent`.
#: The history is pruned by age, never by count (a count let a CSO push the key in force at an
#: open session's start out of the books with key changes): this bounds its rows instead.
METER_KEY_CHANGES_PER_DAY = 16
#: an EVSE id as `gateway.protocol.gid.evse_gid` makes it: `<site>-<device>-<EVSE number>` (a
#: hashed id ends in a 7-character tag instead, which this never matches)
EVSE_NUMBER = re.compile(r".*-([0-9]{1,3})")

#: the reason of the EvseStatusUpdate a CSO sends when a reservation expired unused (R3-8)
EXPIRED_RESERVATION = re.compile(r"reservation (\d+) expired")
#: … and when a session of ours never charged (a remote start whose EV never came, R3-2)
FAILED_SESSION = re.compile(r"session (\S+) failed: .*")


def _canonical_or_self(text: str) -> str:
    try:
        return gid.canonical(text, expect="C")
    except gid.GidError:
        return text


#: refusals that do not say the start was not carried out: a timeout (408), a conflict (409: the
#: same start already in flight or done there) or throttling (429) of a request that may have
#: been delivered before
MAYBE_STARTED = frozenset({408, 409, 429})


def start_surely_failed(exc: BaseException) -> bool:
    """Whether a RemoteStart that raised `exc` surely started nothing: no connection was made
    (`ConnectFailed`; after an earlier attempt without answer the client raises `MaybeDelivered`
    instead), or the CSO (or the visited CSP or CH, 502 `unreachable`: it could not connect to
    the CSO) refused it with a 4xx that is not in MAYBE_STARTED. Otherwise (no answer in time, a
    504 `no_answer`, another 5xx) the CSO may have started it: the session is kept, so that its
    updates and SDR are taken and billed."""
    if isinstance(exc, RoamingError):
        return (exc.status < 500 and exc.status not in MAYBE_STARTED) or exc.cause == "unreachable"
    return isinstance(exc, ConnectFailed)


def mo_pki_folder(cfg: EndpointConfig) -> Path:
    """Where a CSP keeps its MO root and sub-CA: beside its SQLite file, `<db stem>-mo/`."""
    db = Path(cfg.db)
    return db.parent / f"{db.stem}-mo"


class CspEndpoint(Endpoint):
    role: ClassVar[str] = "csp"
    DDL: ClassVar[str] = DDL

    def __init__(self, cfg: EndpointConfig, **kw: Any) -> None:
        if cfg.partners() and "TokenList" not in self.routes:  # would ignore its partners silently
            raise ConfigError("a CSP with partner CSPs runs as visited.VisitedCspEndpoint")
        super().__init__(cfg, **kw)
        self.mo = contract_pki.ContractCa.load_or_create(mo_pki_folder(cfg), cfg.party_id)
        """The contract-certificate PKI (S7, R3-3): MO root + sub-CA, made at first start."""

    # ---- provider side: what the CSP's own back office calls
    def add_customer(
        self, token_uid: str, *, contract_id: str | None = None, status: str = "accepted", expiry: int | None = None
    ) -> None:
        if contract_id is not None:
            contract_id = str(require_gid(contract_id, "C", "contract_id"))
        self.store.exec("INSERT OR REPLACE INTO customers VALUES(?,?,?,?)", token_uid, contract_id, status, expiry)

    def new_session_id(self) -> str:
        return self.issue("S", secrets.token_hex(12))

    async def request_credential(self, token_type: str, request_id: int, expiry: int | None = None) -> dict[str, Any]:
        """CH and mixed mode: a credential for a customer issued by the CH under its provider id,
        then this CSP's customer like its own (credentials.py); the CH's answer."""
        return await credentials.request(self, token_type, request_id, expiry)

    def counterpart(self, operator: str) -> str:
        """Where requests about a CSO's EVSEs go: the CSO, or the visited CSP that passed its
        publications on (CSP↔CSP roaming) when we have no agreement with the CSO itself."""
        if self.cfg.party(operator) is not None:
            return operator
        route = self._route(operator)
        visited = [p.party_id for p in self.cfg.parties if p.visited]
        return route if route is not None else visited[0] if len(visited) == 1 else operator

    def _route(self, operator: str) -> str | None:
        """The visited CSP a CSO is pinned to (the first that published for it), if it is still
        one of our visited CSPs."""
        row = self.store.one("SELECT via FROM via_routes WHERE operator_id=?", operator)
        p = self.cfg.party(str(row[0])) if row is not None else None
        return p.party_id if p is not None and p.visited else None

    def _answers_for(self, operator: str, origin: str, field: str) -> None:
        """`origin` may publish and bill for `operator`'s EVSEs: it is that CSO, or our visited
        CSP passing on a CSO we have no agreement with ourselves — the first visited CSP that
        published for it (pinned: another one would take over its sessions, cards, commands)."""
        if operator == origin:
            return
        p = self.cfg.party(origin)
        if p is None or not p.visited or self.cfg.party(operator) is not None:
            raise Refused(403, "party_mismatch", f"{origin} may not speak for {operator}", field)
        route = self._route(operator)
        if route not in (None, origin):
            raise Refused(403, "party_mismatch", f"{operator} is reached through {route}, not {origin}", field)

    def _note_route(self, operator: str, origin: str) -> None:
        if operator != origin:  # a visited CSP's publication (checked: the route's or the first)
            self.store.exec("INSERT OR REPLACE INTO via_routes VALUES(?,?)", operator, origin)

    def _operator(self, sid: str) -> str:
        """The CSO of a session's EVSE (whose tariffs price it, also through a visited CSP)."""
        return gid.parse(self.session(sid)["evse_gid"]).operator

    async def start_remote(self, evse_gid: str, token_uid: str, session_id: str | None = None) -> dict[str, Any]:
        """R3-2: the user starts from the app; the CSP issues the session id."""
        cso = self.counterpart(require_gid(evse_gid, "E", "evse_gid").operator)
        sid = session_id or self.new_session_id()
        body = {"evse_gid": evse_gid, "token_uid": token_uid, "roaming_session_id": sid}
        # what fails before anything is sent (a bad body, the login) records no session
        json_body.check("RemoteStart", body)
        await self.client(self.hop("RemoteStart", cso)).ensure_login()
        self._record_session(sid, cso, evse_gid, token_uid)
        try:
            answer = await self.send("RemoteStart", body, cso)
        except Exception as exc:
            if start_surely_failed(exc):  # else the CSO may have started it: kept, as `active`
                self.store.exec("DELETE FROM sessions WHERE session_id=? AND energy_wh=0", sid)
            raise
        if answer["result"] not in ("accepted", "timeout"):  # timeout: it may have started
            self.store.exec("UPDATE sessions SET state='failed' WHERE session_id=?", sid)
        return {**answer, "roaming_session_id": sid}

    def _record_session(self, sid: str, cso: str, evse_gid: str, token_uid: str) -> None:
        self.store.exec(
            "INSERT OR IGNORE INTO sessions(session_id, cso, evse_gid, token_uid, state, created) VALUES(?,?,?,?,?,?)",
            sid,
            cso,
            evse_gid,
            token_uid,
            "active",
            int(self.clock()),
        )

    def session(self, sid: str) -> dict[str, Any]:
        row = self.store.one("SELECT * FROM sessions WHERE session_id=?", sid)
        if row is None:
            raise Refused(404, "unknown_session", f"no session {sid} at {self.me}", "roaming_session_id")
        return dict(row)

    async def stop_remote(self, sid: str) -> dict[str, Any]:
        """R3-4."""
        return await self.send("RemoteStop", {"roaming_session_id": sid}, self.session(sid)["cso"])

    async def send_plan(self, sid: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
        """R3-7: the CSP proposes a plan; the CSO answers with the plan it applies."""
        answer = await self.send("ChargePlan", {"roaming_session_id": sid, "plan": plan}, self.session(sid)["cso"])
        if answer["status"] == "accepted":
            self.store.exec(
                "INSERT OR REPLACE INTO plans VALUES(?,?,?)",
                sid,
                json.dumps(answer.get("plan", plan)),
                self.session(sid)["cso"],
            )
        return answer

    async def reserve(self, evse_gid: str, token_uid: str, expiry: int, reservation_id: int) -> dict[str, Any]:
        """R3-8."""
        cso = self.counterpart(require_gid(evse_gid, "E", "evse_gid").operator)
        body = {"evse_gid": evse_gid, "token_uid": token_uid, "expiry": expiry, "reservation_id": reservation_id}
        answer = await self.send("ReserveRoaming", body, cso)
        if answer["result"] == "accepted":
            self.store.exec(
                "INSERT OR REPLACE INTO reservations VALUES(?,?,?,?,?,'active')",
                reservation_id,
                cso,
                evse_gid,
                token_uid,
                expiry,
            )
        return answer

    async def unlock(self, evse_gid: str, sid: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """R5-2 (a session is active) / R5-3 (activation failed: no session)."""
        cso = self.counterpart(require_gid(evse_gid, "E", "evse_gid").operator)
        body: dict[str, Any] = {"evse_gid": evse_gid}
        if sid is not None:
            body["roaming_session_id"] = sid
        if reason is not None:
            body["reason"] = reason
        answer = await self.send("UnlockRoaming", body, cso)
        if answer["result"] == "accepted" and sid is not None:  # R5-2: the charge is over; its SDR follows
            self.store.exec("UPDATE sessions SET state='unlocked' WHERE session_id=? AND state='active'", sid)
        return answer

    async def pull_tariffs(self, operator_id: str) -> dict[str, Any]:
        """R2-2: ask the CSO for its current tariff and keep it."""
        require_gid(operator_id, "O", "operator_id")
        answer = await self.send("GetTariffs", {"operator_id": operator_id}, self.counterpart(operator_id))
        if answer["status"] == "accepted":
            kept = [pricing.Tariff.from_body(t) for t in answer.get("tariffs", [])]
            for t in [*kept, pricing.Tariff.from_body(answer)]:
                self._store_tariff(t.body() | {"operator_id": operator_id})
        return answer

    async def distribute_tokens(self, update_type: str = "full") -> dict[str, dict[str, Any]]:
        """R4-2: send the customers' tokens to every CSO for offline authorization, in pages of
        at most `TOKEN_PAGE` (a CSO installs a version once it has every page). `differential`
        sends only what changed since the list the CSOs last received (a token gone: status
        `invalid`, which removes it); a CSO that missed a version answers `version_gap` and
        gets the full list instead. The answers of the last page sent."""
        with self.store.tx() as db:
            row = db.execute("SELECT version FROM token_list").fetchone()
            version = (row[0] if row else 0) + 1
            db.execute("DELETE FROM token_list")
            db.execute("INSERT INTO token_list VALUES(?)", (version,))
        now = self.list_entries()
        if update_type == "differential":
            sent = {r[0]: (r[1], r[2]) for r in self.store.all("SELECT token_uid, auth_status, expiry FROM token_sent")}
            entries = {u: v for u, v in now.items() if sent.get(u) != v}
            entries |= {u: ("invalid", None) for u in sent.keys() - now.keys()}
        else:
            entries = now
        tokens = [
            {"token_uid": u, "auth_status": st, "party_id": self.me} | ({"expiry": exp} if exp else {})
            for u, (st, exp) in sorted(entries.items())
        ]
        pages = [tokens[i : i + TOKEN_PAGE] for i in range(0, len(tokens), TOKEN_PAGE)] or [[]]
        answer: dict[str, dict[str, Any]] = {}
        try:
            for n, page in enumerate(pages):
                body = {"party_id": self.me, "list_version": version, "update_type": update_type, "tokens": page,
                        "page": n, "pages": len(pages)}  # fmt: skip
                answer = await self.broadcast("TokenList", body)
        except RoamingError as exc:
            if update_type != "differential" or exc.cause != "version_gap":
                raise
            return await self.distribute_tokens("full")
        with self.store.tx() as db:
            db.execute("DELETE FROM token_sent")
            db.executemany("INSERT INTO token_sent VALUES(?,?,?)", [(u, st, exp) for u, (st, exp) in now.items()])
        return answer

    def list_entries(self) -> dict[str, tuple[str, int | None]]:
        """What our token list holds (uid → status, expiry): our customers (a visited CSP adds
        its partners' tokens, visited.py)."""
        return {r[0]: (r[1], r[2]) for r in self.store.all("SELECT token_uid, auth_status, expiry FROM customers")}

    def _store_tariff(self, t: dict[str, Any]) -> None:
        self.store.exec("INSERT OR REPLACE INTO tariffs VALUES(?,?,?)", t["operator_id"], t["tariff_id"], json.dumps(t))

    def tariffs(self, cso: str) -> dict[int, pricing.Tariff]:
        """Our copy of a CSO's tariffs (pushed or pulled), every one kept."""
        rows = self.store.all("SELECT tariff_id, body FROM tariffs WHERE operator_id=?", cso)
        return {int(r[0]): pricing.Tariff.from_body(json.loads(r[1])) for r in rows}

    def meter_key(self, evse_gid: str, at: int | None = None) -> bytes | None:
        """The public key of the EVSE's meter as its own CSO's locations state it (R1-2, R3-9) —
        at `at` (the start of a session; None: now) —, None when it states none: the seal the
        SDRs' signed readings of that EVSE must bear. Another CSO's location never counts."""
        q = ("SELECT key FROM meter_keys WHERE evse_gid=? AND operator_id=? AND since<=?"
             " ORDER BY since DESC, rowid DESC LIMIT 1")  # fmt: skip
        row = self.store.one(q, evse_gid, gid.parse(evse_gid).operator, 2**62 if at is None else at)
        return None if row is None or row[0] is None else bytes(row[0])

    def meter_keys_during(self, evse_gid: str, start: int, end: int) -> list[bytes]:
        """The keys the EVSE's own CSO stated for its meter from `start` to `end`: the one in
        force at `start` and every one stated after it until `end` (a withdrawn key is none)."""
        op = gid.parse(evse_gid).operator
        q = ("SELECT key FROM meter_keys WHERE evse_gid=? AND operator_id=? AND (since > ? AND since <= ? OR"
             " rowid = (SELECT rowid FROM meter_keys WHERE evse_gid=? AND operator_id=? AND since <= ?"
             " ORDER BY since DESC, rowid DESC LIMIT 1)) ORDER BY since, rowid")  # fmt: skip
        rows = self.store.all(q, evse_gid, op, start, end, evse_gid, op, start)
        keys = [bytes(r[0]) for r in rows if r[0] is not None]
        return list(dict.fromkeys(keys))

    @staticmethod
    def _last_meter_key(db: Any, evse: str) -> tuple[bytes | None] | None:
        """The EVSE's latest row (its key, None: withdrawn), None when it has none."""
        q = "SELECT key FROM meter_keys WHERE evse_gid=? ORDER BY since DESC, rowid DESC LIMIT 1"
        row = db.execute(q, (evse,)).fetchone()
        return None if row is None else (None if row[0] is None else bytes(row[0]),)

    def _check_meter_key_rate(self, body: dict[str, Any], now: int) -> None:
        """A location changing an EVSE's key more often than `METER_KEY_CHANGES_PER_DAY` is
        refused (429: the CSO's job retries it later), so that the history, kept by age, stays
        bounded."""
        for i, c in enumerate(body.get("connectors") or ()):
            key = base64.b64decode(c["meter_key"]) if c.get("meter_key") else None
            if self._last_meter_key(self.store.db, c["evse_gid"]) in ((key,), None):
                continue  # no change, or the first statement
            n = self.store.get("SELECT COUNT(*) FROM meter_keys WHERE evse_gid=? AND since > ?",
                               c["evse_gid"], now - 86400)[0]  # fmt: skip
            if n >= METER_KEY_CHANGES_PER_DAY:
                raise Refused(429, "too_frequent", f"{n} meter key changes of {c['evse_gid']} within a day",
                              f"connectors[{i}].meter_key")  # fmt: skip

    def _record_meter_keys(self, db: Any, body: dict[str, Any], now: int) -> None:
        """The meter key each connector of a location states, kept where it changed (a new row,
        the old one stays: the books show when an operator changed a meter's key). The first
        statement is a row even without a key: a session that started before it is then told
        apart from one whose key the books no longer hold."""
        for c in body.get("connectors") or ():
            key = base64.b64decode(c["meter_key"]) if c.get("meter_key") else None
            if self._last_meter_key(db, c["evse_gid"]) == (key,):
                continue  # no change
            db.execute("INSERT INTO meter_keys VALUES(?,?,?,?)", (c["evse_gid"], body["operator_id"], key, now))
            self._prune_meter_keys(db, c["evse_gid"], now)

    def _prune_meter_keys(self, db: Any, evse: str, now: int) -> None:
        """By age only: rows before the one in force at the cut go — the cut is `retention_s`
        before now and before the oldest session at the EVSE still without its SDR (an adopted
        session may have started before we heard of it), so the key in force at the start of
        any session still to be billed stays."""
        oldest = db.execute("SELECT MIN(created) FROM sessions WHERE evse_gid=? AND state NOT IN"
                            " ('completed', 'failed')", (evse,)).fetchone()[0]  # fmt: skip
        cut = (now if oldest is None else min(now, int(oldest))) - self.cfg.retention_s
        db.execute("DELETE FROM meter_keys WHERE evse_gid=? AND since < (SELECT MAX(since) FROM meter_keys"
                   " WHERE evse_gid=? AND since <= ?)", (evse, evse, cut))  # fmt: skip

    def audit(self, sdr: dict[str, Any], sid: str) -> pricing.Audit:
        """Our audit of an SDR of session `sid`: our readings of it, our copy of its CSO's tariffs,
        the meter key in force at its start and the EVSE's number when its id names it."""
        s = self.session(sid)
        evse = str(s["evse_gid"])
        number = EVSE_NUMBER.fullmatch(gid.parse(evse).local)
        n = int(number[1]) if number and 0 < int(number[1]) < 256 else None
        # the keys from the session's start to when we heard of it (an adopted or offline session,
        # R4-2, reaches us later; the SDR's `started` is the CSO's word): the readings must bear one
        # of them, so neither a key change meanwhile nor an earlier claimed start evades the seal
        created = int(s["created"])
        keys = self.meter_keys_during(evse, min(created, int(sdr.get("started", created))), created)
        found = meter.readings(sdr.get("signed_meter"))
        key = next((k for k in keys if found and all(r.sealed_by(k) for r in found)), keys[0] if keys else None)
        return pricing.audit_sdr(sdr, self.readings(sid), self.tariffs(gid.parse(evse).operator), key, n)

    def readings(self, sid: str) -> list[tuple[int, int]]:
        rows = self.store.all("SELECT time, energy_wh FROM readings WHERE session_id=? ORDER BY time", sid)
        return [(int(r[0]), int(r[1])) for r in rows]

    async def dispute(self, sdr_id: str, reason: str | None = None) -> dict[str, Any]:
        """Contest an SDR at its CSO (through the CH in CH and mixed mode, which then holds it out
        of settlement), with our own figures; the reason defaults to the SDR's verdict."""
        row = self.store.one("SELECT cso, session_id, body, verdict FROM sdrs WHERE sdr_id=?", sdr_id)
        if row is None:
            raise Refused(404, "unknown_sdr", f"no SDR {sdr_id} at {self.me}", "sdr_id")
        sdr = json.loads(row[2])
        audit = self.audit(sdr, row[1])
        why = (reason or row[3])[:120]
        body = {"sdr_id": sdr_id, "roaming_session_id": row[1], "reason": why, "energy_wh": audit.energy_wh,
                "cost": audit.cost}  # fmt: skip
        answer = await self.send("DisputeSdr", body, row[0])
        now = int(self.clock())
        self.store.exec("INSERT OR REPLACE INTO disputes VALUES(?,?,?,?,?)", sdr_id, row[0], why, answer["status"], now)
        return answer

    # ---- incoming (from CSOs, or the CH)
    @handles("PutLocation", senders=("cso",))
    async def _on_location(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        op = body["operator_id"]
        self._answers_for(op, ctx.origin, "operator_id")
        if require_gid(body["location_id"], "L", "location_id").operator != op:  # else one CSO overwrites another's
            raise Refused(403, "party_mismatch", f"location of another operator than {op}", "location_id")
        for i, e in enumerate(body["evses"]):
            if gid.parse(e["evse_gid"]).operator != op:
                raise Refused(403, "party_mismatch", "EVSE of another operator", f"evses[{i}].evse_gid")
        own = {e["evse_gid"] for e in body["evses"]}
        for i, c in enumerate(body.get("connectors") or ()):  # a connector (its meter key) of this location's EVSEs
            if c["evse_gid"] not in own:
                raise Refused(403, "party_mismatch", "connector of an EVSE not in this location",
                              f"connectors[{i}].evse_gid")  # fmt: skip
            if c.get("meter_key") and len(base64.b64decode(c["meter_key"])) != 32:
                raise Refused(400, "out_of_range", "an Ed25519 public key is 32 bytes", f"connectors[{i}].meter_key")
        self._check_meter_key_rate(body, int(ctx.now))
        with self.store.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO locations VALUES(?,?,?,?)",
                (body["location_id"], body["operator_id"], json.dumps(body), int(ctx.now)),
            )
            self._record_meter_keys(db, body, int(ctx.now))
            for e in body["evses"]:
                db.execute(
                    "INSERT OR REPLACE INTO evse_status VALUES(?,?,?,NULL,NULL)",
                    (e["evse_gid"], e["evse_status"], int(ctx.now)),
                )
            self._note_route(body["operator_id"], ctx.origin)
        return {"status": "accepted"}

    @handles("EvseStatusUpdate", senders=("cso",))
    async def _on_status(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        evse = body["evse_gid"]
        self._answers_for(gid.parse(evse).operator, ctx.origin, "evse_gid")
        row = self.store.one("SELECT time FROM evse_status WHERE evse_gid=?", evse)
        if row is None:
            raise Refused(404, "unknown_evse", f"{evse} was never published in a location", "evse_gid")
        if row[0] <= body["time"]:  # an older update arriving late changes nothing
            self.store.exec(
                "UPDATE evse_status SET status=?, time=?, outage_kind=?, reason=? WHERE evse_gid=?",
                body["evse_status"],
                body["time"],
                body.get("outage_kind"),
                body.get("reason"),
                evse,
            )
        failed = FAILED_SESSION.fullmatch(body.get("reason") or "")
        if failed is not None:  # the CSO ended a session of ours that never charged
            self.store.exec("UPDATE sessions SET state='failed' WHERE session_id=? AND cso=? AND state='active'",
                            failed[1], ctx.origin)  # fmt: skip
        lapsed = EXPIRED_RESERVATION.fullmatch(body.get("reason") or "")
        if lapsed is not None:  # R3-8: the CSO expired our reservation (a repeat changes nothing)
            self.store.exec(
                "UPDATE reservations SET state='expired' WHERE cso=? AND reservation_id=? AND evse_gid=?",
                ctx.origin,
                int(lapsed[1]),
                evse,
            )
        return {"status": "accepted"}

    @handles("PushTariff", senders=("cso",))
    async def _on_tariff(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        self._answers_for(body["operator_id"], ctx.origin, "operator_id")
        with self.store.tx():
            self._store_tariff(body)
            self._note_route(body["operator_id"], ctx.origin)
        return {"status": "accepted"}

    @handles("AuthorizeRoaming", senders=("cso",))
    async def _on_authorize(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        uid, evse = body["token_uid"], body["evse_gid"]
        self._answers_for(gid.parse(evse).operator, ctx.origin, "evse_gid")
        if body["token_type"] == "iso15118":
            uid = str(require_gid(uid, "C", "token_uid"))
            row = self.store.one(
                "SELECT token_uid, auth_status, expiry, contract_id FROM customers WHERE contract_id=?", uid
            )
        else:
            row = self.store.one(
                "SELECT token_uid, auth_status, expiry, contract_id FROM customers WHERE token_uid=?", uid
            )
        if row is None:
            return {"auth_status": "unknown"}
        status = row[1]
        if status == "accepted" and row[2] is not None and row[2] <= ctx.now:
            status = "expired"
        if status != "accepted":
            return {"auth_status": status}
        sid = self.new_session_id()
        self._record_session(sid, ctx.origin, evse, row[0])
        answer: dict[str, Any] = {"auth_status": "accepted", "roaming_session_id": sid, "expiry": int(ctx.now) + 86400}
        if row[3] is not None:
            answer["contract_id"] = row[3]
        return answer

    @handles("SessionUpdate", senders=("cso",))
    async def _on_session_update(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R3-6 (live), R3-5 (final): each reading joins our own record of the session; the
        running cost shown to the customer is our own price of it. An update older than the
        last one, or for a session already billed, is refused by name (the books stay as
        they were); the same update again is accepted and changes nothing."""
        sid = body["roaming_session_id"]
        q = "SELECT cso, time, state, energy_wh, created, evse_gid FROM sessions WHERE session_id=?"
        row = self.store.one(q, sid)
        if row is None:
            if gid.parse(sid).operator != ctx.origin:  # an offline session (R4-2) is issued by the CSO
                raise Refused(404, "unknown_session", f"no session {sid} here", "roaming_session_id")
            self._record_session(sid, ctx.origin, body["evse_gid"], "")
            row = self.store.get(q, sid)
        if row[0] != ctx.origin:
            raise Refused(404, "unknown_session", f"no session {sid} of {ctx.origin} here", "roaming_session_id")
        t, energy = body["time"], body["energy_wh"]
        if row[2] == "completed":
            if energy == row[3]:
                return {"status": "accepted"}  # the final update again (a retry of the CSO)
            raise Refused(409, "session_completed", f"session {sid} is billed already", "roaming_session_id")
        if (t, energy) == (row[1], row[3]):
            return {"status": "accepted"}  # a repeat
        if t < row[1]:
            raise Refused(409, "out_of_order", f"update of {t} after one of {row[1]}", "time")
        if energy < row[3]:
            raise Refused(400, "energy_decreased", f"{energy} Wh after {row[3]} Wh", "energy_wh")
        tariff = pricing.in_force(self.tariffs(gid.parse(row[5]).operator).values(), int(row[4]))
        cost = body.get("cost", 0) if tariff is None else tariff.cost(energy, t - int(row[4]))
        with self.store.tx() as db:
            db.execute(
                "UPDATE sessions SET energy_wh=?, power_w=?, cost=?, time=? WHERE session_id=?",
                (energy, body["power_w"], cost, t, sid),
            )
            db.execute("INSERT OR REPLACE INTO readings VALUES(?,?,?)", (sid, t, energy))
        return {"status": "accepted"}

    @handles("ChargePlan", senders=("cso",))
    async def _on_plan_update(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        sid = body["roaming_session_id"]
        s = self.session(sid)
        if s["cso"] != ctx.origin:
            raise Refused(404, "unknown_session", f"no session {sid} of {ctx.origin} here", "roaming_session_id")
        self.store.exec("INSERT OR REPLACE INTO plans VALUES(?,?,?)", sid, json.dumps(body["plan"]), ctx.origin)
        return {"status": "accepted"}

    @handles("PutSdr", senders=("cso",), key=lambda b: str(b["sdr_id"]))
    async def _on_sdr(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        sid = body["roaming_session_id"]
        if gid.parse(body["sdr_id"]).operator != ctx.origin:
            raise Refused(403, "party_mismatch", f"{body['sdr_id']} was not issued by {ctx.origin}", "sdr_id")
        if body["meter_stop_wh"] - body["meter_start_wh"] != body["energy_wh"] or body["stopped"] < body["started"]:
            raise Refused(400, "inconsistent", "energy_wh must equal meter_stop_wh - meter_start_wh", "energy_wh")
        s = self.session(sid)
        if s["cso"] != ctx.origin:
            raise Refused(404, "unknown_session", f"no session {sid} of {ctx.origin} here", "roaming_session_id")
        other = self.store.one("SELECT sdr_id FROM sdrs WHERE session_id=?", sid)
        if other is not None:  # one session, one bill
            raise Refused(409, "duplicate_sdr", f"session {sid} is billed by {other[0]} already", "sdr_id")
        audit = self.audit(body, sid)
        own_cost, verdict = audit.cost, audit.verdict[:500]
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO sdrs VALUES(?,?,?,?,?,?)",
                (body["sdr_id"], ctx.origin, sid, json.dumps(body), verdict, int(ctx.now)),
            )
            db.execute("UPDATE sessions SET state='completed' WHERE session_id=?", (sid,))
        ch = self.cfg.clearing_house
        if ctx.via_ch and ch is not None:  # our record of the session, for the CH's reconciliation
            record = {
                "roaming_session_id": sid,
                "evse_gid": s["evse_gid"],
                "energy_wh": audit.energy_wh,
                "power_w": 0,
                "cost": own_cost,
                "time": int(ctx.now),
            }
            await self.send("SessionUpdate", record, ch)
        return {"status": "accepted"}

    @handles("ContractCertificate", senders=("cso",))
    async def _on_contract_certificate(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """S7, R3-3: an EV's contract certificate installation or update, relayed by the CSO.
        `exi` in: the DER PKCS#10 CSR; out: the DER chain leaf first (contract_pki.py)."""
        evse = body["evse_gid"]
        self._answers_for(gid.parse(evse).operator, ctx.origin, "evse_gid")
        try:
            csr = contract_pki.check_csr(base64.b64decode(body["exi"]))
        except contract_pki.CsrError as exc:
            return {"status": "rejected", "reason": str(exc)}
        cn = contract_pki.csr_contract_id(base64.b64decode(body["exi"]))
        cid = body.get("contract_id") or cn
        if cid is None:
            return {"status": "rejected", "reason": "no contract id: neither contract_id nor a CSR common name"}
        try:
            contract = gid.parse(cid, expect="C")
            cid = str(contract)
        except gid.GidError:
            return {"status": "rejected", "reason": "the contract id is not a contract global id (C)"}
        if cn is not None and _canonical_or_self(cn) != cid:  # ISO 15118 CNs spell the eMAID unseparated
            return {"status": "rejected", "reason": "the CSR common name is not the contract id"}
        if contract.operator not in (self.me, self.cfg.clearing_house):  # the CH's: one it issued us
            return {"status": "rejected", "reason": f"contract of another provider than {self.me}"}
        row = self.store.one("SELECT auth_status, expiry FROM customers WHERE contract_id=?", cid)
        if row is None:
            return {"status": "rejected", "reason": "unknown contract"}
        status = row[0]
        if status == "accepted" and row[1] is not None and row[1] <= ctx.now:
            status = "expired"
        if status != "accepted":
            return {"status": "rejected", "reason": f"contract {status}"}
        action = body["action_15118"]
        if action == "update" and self.store.one("SELECT 1 FROM contract_certs WHERE contract_id=?", cid) is None:
            return {"status": "rejected", "reason": "no contract certificate to update: install first"}
        chain = self.mo.issue(csr, cid, dt.datetime.fromtimestamp(ctx.now, dt.UTC))
        serial = format(contract_pki.split_chain(chain[0])[0].serial_number, "x")
        self.store.exec(
            "INSERT INTO contract_certs VALUES(?,?,?,?,?,?,?)", serial, cid, ctx.origin, evse, action, chain[0],
            int(ctx.now),
        )  # fmt: skip
        return {"status": "accepted", "exi": json_body.b64(b"".join(chain))}

    @handles("Settlement", senders=("ch",), key=settlement_key)
    async def _on_settlement(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        return self.record_settlement(body, ctx)

    # ---- privacy
    async def delete_user(self, token_uid: str, *, skip: str = "") -> int:
        """M10: a credential the CH issued (its prefix) is deleted at the CH as well, always —
        not only while `shared` still names the CH (the retention purges that); a card on our
        list at every CSO it went to, however long ago."""
        token_uid = credentials.canonical_if_issued(self, token_uid)  # the spelling every party stores
        ch = credentials.issuer(self, token_uid, skip)
        now = int(self.clock())
        with self.store.tx() as db:
            if ch is not None:
                db.execute("INSERT OR REPLACE INTO shared VALUES(?,?,?)", (token_uid, ch, now))
            if db.execute("SELECT 1 FROM token_sent WHERE token_uid=?", (token_uid,)).fetchone() is not None:
                for p in self.cfg.counterparts("cso"):  # our list went to each: also when `shared` is purged
                    db.execute("INSERT OR IGNORE INTO shared VALUES(?,?,?)", (token_uid, p.party_id, now))
        return await super().delete_user(token_uid, skip=skip)

    def may_delete(self, token_uid: str, origin: str) -> bool:
        """M10: a party the token travelled to or from — also any CSO while it is on our list
        (`token_sent`: the list goes to every CSO), the CSO of a session, reservation or contract
        certificate of it, the CH that issued a credential (its prefix) — all also after the
        retention purged `shared`. Another CSO or CSP may not delete our customer; an entitled
        CSO deletes only what we hold of it (`deletion_asked`)."""
        token_uid = credentials.canonical_if_issued(self, token_uid)  # the spelling we store
        if super().may_delete(token_uid, origin) or origin == credentials.issuer(self, token_uid, ""):
            return True
        p = self.cfg.party(origin)
        if p is None or p.acts_as != "cso":
            return False
        q = ("SELECT 1 FROM token_sent WHERE token_uid=? UNION ALL SELECT 1 FROM sessions WHERE token_uid=? AND cso=?"
             " UNION ALL SELECT 1 FROM reservations WHERE token_uid=? AND cso=?"
             " UNION ALL SELECT 1 FROM contract_certs WHERE contract_id=? AND cso=?")  # fmt: skip
        return self.store.one(q, token_uid, *(token_uid, origin) * 3) is not None

    def _asked_by_cso(self, origin: str) -> bool:
        """A CSO, or our visited CSP (toward us a CSO): its deletion is scoped (`forget_of`)."""
        p = self.cfg.party(origin)
        return p is not None and p.acts_as == "cso"

    async def deletion_asked(self, token_uid: str, origin: str) -> int:
        """M10 asked of us: by a CSO (directly or relayed by the CH) only what we hold of that
        CSO — the contract is our own relation with the customer, which a CSO cannot end, and
        the CSO's own hand-on reaches the parties it shared with; by the CH that issued a
        credential (or, at a visited CSP, the card's home) all of it, passed on."""
        if not self._asked_by_cso(origin):
            return await self.delete_user(token_uid, skip=origin)
        return self.forget_of(credentials.canonical_if_issued(self, token_uid), origin)

    def forget_of(self, token_uid: str, cso: str) -> int:
        """Blank a token in what came from `cso` (its sessions, SDRs, reservations; a contract
        id also under its customer's uid, as sessions hold it) and drop its `shared` row; the
        customer, list entry and contract certificates stay. The records touched."""
        with self.store.tx() as db:
            q = "SELECT token_uid FROM customers WHERE contract_id=?"
            uids = {token_uid} | {str(r[0]) for r in db.execute(q, (token_uid,))}
            db.execute("DELETE FROM shared WHERE token_uid=? AND party=?", (token_uid, cso))
            n = 0
            for uid in uids:
                n += db.execute("UPDATE sessions SET token_uid=NULL WHERE token_uid=? AND cso=?", (uid, cso)).rowcount
                q = "UPDATE reservations SET token_uid=NULL WHERE token_uid=? AND cso=?"
                n += db.execute(q, (uid, cso)).rowcount
            for sdr_id, body in db.execute("SELECT sdr_id, body FROM sdrs WHERE cso=?", (cso,)).fetchall():
                b = json.loads(body)
                if b.get("token_uid") in uids:
                    b["token_uid"] = ""
                    db.execute("UPDATE sdrs SET body=? WHERE sdr_id=?", (json.dumps(b), sdr_id))
                    n += 1
        return n

    def holds(self, token_uid: str) -> bool:
        """As everywhere, a credential of our CH in the spelling we store it in."""
        return super().holds(credentials.canonical_if_issued(self, token_uid))

    def forget(self, token_uid: str) -> int:
        with self.store.tx() as db:
            n = db.execute("DELETE FROM customers WHERE token_uid=? OR contract_id=?", (token_uid, token_uid)).rowcount
            n += db.execute("DELETE FROM token_sent WHERE token_uid=?", (token_uid,)).rowcount
            n += db.execute("UPDATE sessions SET token_uid=NULL WHERE token_uid=?", (token_uid,)).rowcount
            n += db.execute("DELETE FROM contract_certs WHERE contract_id=?", (token_uid,)).rowcount
            n += db.execute("UPDATE reservations SET token_uid=NULL WHERE token_uid=?", (token_uid,)).rowcount
            for sdr_id, body in db.execute("SELECT sdr_id, body FROM sdrs").fetchall():
                b = json.loads(body)
                if b.get("token_uid") == token_uid:
                    b["token_uid"] = ""
                    db.execute("UPDATE sdrs SET body=? WHERE sdr_id=?", (json.dumps(b), sdr_id))
                    n += 1
        return n

    def purge_personal(self, cut: int) -> int:
        db = self.store.db
        n = db.execute(
            "UPDATE sessions SET token_uid=NULL WHERE token_uid IS NOT NULL AND created < ?", (cut,)
        ).rowcount
        n += db.execute("DELETE FROM reservations WHERE expiry < ?", (cut,)).rowcount
        for sdr_id, body in db.execute("SELECT sdr_id, body FROM sdrs WHERE at < ?", (cut,)).fetchall():
            b = json.loads(body)
            if b.get("token_uid"):
                b["token_uid"] = ""
                db.execute("UPDATE sdrs SET body=? WHERE sdr_id=?", (json.dumps(b), sdr_id))
                n += 1
        return n

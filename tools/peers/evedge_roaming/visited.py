"""CSP↔CSP roaming (IEC 63119-1): a visited CSP, through which home CSPs that have no agreement
with a CSO roam (its `partner`s, config.py). Toward a partner it acts as the CSO does: it
passes on the CSOs' locations, EVSE status and tariffs, receives the partner's token list,
asks the partner to authorize its cards, and sends it the session's progress and its own SDR.
Toward the CSO it is a CSP like any other: its token list holds its partners' tokens (under
its own party id: the CSO knows no other), it answers AuthorizeRoaming for a partner's card by
asking that partner, and it receives the session's updates and the CSO's SDR, audits the SDR
against its own record and issues its own SDR to the home, which audits it against its own.

Each session of a partner's customer has two legs and two session ids: the CSO's leg (issued
by us, or by the CSO for a card its site authorized from the list, R4-2) and the home's leg
(issued by the home for an AuthorizeRoaming or a RemoteStart, else by us), linked in
`partner_sessions`. Prices are passed on unchanged: the CSO's tariffs reach the home as the
CSO published them and our SDR carries the CSO's lines and costs (no resale margin: a
margin would need a tariff of our own, which the schema's SDR cannot name beside the CSO's).

The SDR to the home (with the readings not yet passed on before it) is sent in order by the
background loop until the home acknowledges: state `billed` → `forwarded` (or `refused`, a
4xx kept for the operator); so it survives a restart and never overtakes its readings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.protocol import gid
from gateway.protocol.roaming.client import RoamingError
from gateway.protocol.roaming.http3 import H3Error
from gateway.protocol.text import clip_reason

from . import csp, token_pages
from .config import EndpointConfig
from .cso import home_of_contract
from .csp import CspEndpoint
from .endpoint import Ctx, Refused, handles

log = logging.getLogger(__name__)

DDL = (
    csp.DDL
    + """
-- a session of a partner's customer: our leg with the CSO ↔ the home's leg; state open | billed
-- (the CSO's SDR is here, ours to forward) | forwarded | refused; sent_time: the last reading passed on
CREATE TABLE IF NOT EXISTS partner_sessions(session_id TEXT PRIMARY KEY, home TEXT NOT NULL,
    home_session TEXT NOT NULL, cso TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'open', sdr_id TEXT,
    sent_time INTEGER NOT NULL DEFAULT -1, due REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT, created INTEGER NOT NULL, UNIQUE(home, home_session));
-- our SDR ids are random, one per session: unique (an index, made at start by
-- VisitedCspEndpoint._unique_sdr_ids once an older store's colliding ids are issued anew)
-- the partners' token lists as installed (P) and pages of a version still arriving; a uid has one
-- owner (a partner may not list another's card or one of our customers: 403 party_mismatch)
CREATE TABLE IF NOT EXISTS partner_tokens(token_uid TEXT PRIMARY KEY, party TEXT NOT NULL,
    auth_status TEXT NOT NULL, expiry INTEGER);
CREATE TABLE IF NOT EXISTS partner_lists(party TEXT PRIMARY KEY, version INTEGER NOT NULL);
-- R3-8 for a partner: our reservation id at the CSO ↔ the partner's (ids are each CSP's own)
CREATE TABLE IF NOT EXISTS partner_reservations(reservation_id INTEGER NOT NULL, cso TEXT NOT NULL,
    home TEXT NOT NULL, home_reservation INTEGER NOT NULL, PRIMARY KEY(cso, reservation_id));
CREATE TABLE IF NOT EXISTS partner_pages(party TEXT NOT NULL, version INTEGER NOT NULL, page INTEGER NOT NULL,
    pages INTEGER NOT NULL, update_type TEXT NOT NULL, tokens TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY(party, version, page));
"""
)

UNREACHABLE = (ConnectionError, OSError, TimeoutError, H3Error)


@dataclass(frozen=True)
class Link:
    """One partner session: our session id with the CSO and the home's."""

    session_id: str
    home: str
    home_session: str
    cso: str
    state: str
    sdr_id: str | None
    sent_time: int


class VisitedCspEndpoint(CspEndpoint):
    """A CSP endpoint that is also the visited CSP of the `partner` CSPs of its configuration."""

    DDL: ClassVar[str] = DDL

    def __init__(self, cfg: EndpointConfig, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self._listing = asyncio.Lock()
        self._lister: asyncio.Task[Any] | None = None
        self._down_until: dict[str, float] = {}  # partners found unreachable: best effort skips them
        self._forwarding = asyncio.Lock()  # the PutSdr handler and the background loop
        self._list_retry_at = 0.0
        self._list_dirty = True  # our list may differ from what the CSOs have: compare at the next round
        self._unique_sdr_ids()

    def _unique_sdr_ids(self) -> None:
        """Upgrade: our SDR ids were once derived from the CSOs', so two CSOs could make them
        collide; an older store may hold such duplicates, on which the unique index would fail
        (the endpoint would not start). Each duplicate gets a fresh random id first, but the one
        the home has (forwarded) keeps its own."""
        q = ("SELECT session_id FROM (SELECT session_id, ROW_NUMBER() OVER (PARTITION BY sdr_id"
             " ORDER BY state='forwarded' DESC, rowid) AS n FROM partner_sessions WHERE sdr_id IS NOT NULL)"
             " WHERE n > 1")  # fmt: skip
        with self.store.tx() as db:
            for (sid,) in db.execute(q).fetchall():
                fresh = self.issue("R", secrets.token_hex(12))
                db.execute("UPDATE partner_sessions SET sdr_id=? WHERE session_id=?", (fresh, sid))
                log.warning("%s: SDR id of %s issued anew (it collided with another's)", self.me, sid)
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS partner_sessions_sdr ON partner_sessions(sdr_id)")

    # ---- helpers
    def link(self, sid: str) -> Link | None:
        row = self.store.one("SELECT * FROM partner_sessions WHERE session_id=?", sid)
        if row is None:
            return None
        return Link(row["session_id"], row["home"], row["home_session"], row["cso"], row["state"], row["sdr_id"],
                    int(row["sent_time"]))  # fmt: skip

    def _partner(self, ctx: Ctx) -> str:
        """The origin, a partner of ours: anything else may not use us as its visited CSP."""
        p = self.cfg.party(ctx.origin)
        if p is None or not p.partner:
            raise Refused(403, "not_partner", f"{ctx.origin} does not roam through {self.me}")
        return p.party_id

    def _home_of(self, token_uid: str) -> str | None:
        """The partner whose customer a card is: its token list, or a contract id's provider
        (a partner removed from the configuration has none)."""
        row = self.store.one("SELECT party FROM partner_tokens WHERE token_uid=?", token_uid)
        if row is not None:
            return str(row[0]) if str(row[0]) in self._partners() else None
        p = self.cfg.party(home_of_contract(token_uid) or "")
        return p.party_id if p is not None and p.partner else None

    def _is_customer(self, token_uid: str) -> bool:
        """Our own customer's card (by uid or contract id): ours, whoever else lists it."""
        q = "SELECT 1 FROM customers WHERE token_uid=? OR contract_id=?"
        return self.store.one(q, token_uid, token_uid) is not None

    def _cso_of(self, evse_gid: str) -> str:
        op = gid.parse(evse_gid).operator
        p = self.cfg.party(op)
        if p is None or p.role != "cso":
            raise Refused(404, "unknown_evse", f"{evse_gid}: no agreement with its operator {op}", "evse_gid")
        return op

    def list_entries(self) -> dict[str, tuple[str, int | None]]:
        """Our token list: the partners' tokens (of the partners configured now: one removed
        is no longer listed under our id), then our customers' (ours win a uid in both)."""
        partners = set(self._partners())
        q = "SELECT token_uid, auth_status, expiry, party FROM partner_tokens"
        theirs = {r[0]: (r[1], r[2]) for r in self.store.all(q) if r[3] in partners}
        return theirs | super().list_entries()

    def add_customer(
        self, token_uid: str, *, contract_id: str | None = None, status: str = "accepted", expiry: int | None = None
    ) -> None:
        super().add_customer(token_uid, contract_id=contract_id, status=status, expiry=expiry)
        self._list_dirty = True  # our list changed: the background loop compares it again

    async def distribute_tokens(self, update_type: str = "full") -> dict[str, dict[str, Any]]:
        me = asyncio.current_task()
        if self._lister is me:  # the full list after a version_gap, from within the distribution
            return await super().distribute_tokens(update_type)
        async with self._listing:  # the background loop distributes too: one version at a time
            self._lister = me
            try:
                return await super().distribute_tokens(update_type)
            finally:
                self._lister = None

    async def _pass_on(self, message: str, body: dict[str, Any], to: list[str]) -> bool:
        """A CSO's message to partners, at once and best effort (like the CSO's own broadcasts:
        not retried). A partner found unreachable is skipped for `RETRY_BASE_S`, so that the
        CSO's requests, which wait for this, do not each wait for its connect timeout. True
        when every one took it."""
        ok = True
        for home in to:
            if self._down_until.get(home, 0.0) > self.clock():
                ok = False
                continue
            try:
                await self.send(message, body, home)
            except RoamingError as exc:
                log.warning("%s: %s to partner %s: %s", self.me, message, home, exc)
                ok = False
            except UNREACHABLE as exc:
                log.warning("%s: %s to partner %s: %s", self.me, message, home, exc)
                self._down_until[home] = self.clock() + self.RETRY_BASE_S
                ok = False
        return ok

    def _partners(self) -> list[str]:
        return [p.party_id for p in self.cfg.partners()]

    # ---- from the CSO: pass on to the partners
    @handles("PutLocation", senders=("cso",))
    async def _v_location(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        answer = await CspEndpoint._on_location(self, body, ctx)
        await self._pass_on("PutLocation", body, self._partners())
        return answer

    @handles("PushTariff", senders=("cso",))
    async def _v_tariff(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        answer = await CspEndpoint._on_tariff(self, body, ctx)
        await self._pass_on("PushTariff", body, self._partners())  # unchanged: the CSO's prices
        return answer

    @handles("EvseStatusUpdate", senders=("cso",))
    async def _v_status(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """The EVSE's status goes to every partner (R1-3); a reason naming a session or a
        reservation goes only to the partner whose it is, by that partner's own id (the others
        get the status without it: the ids are ours and that partner's business)."""
        reason = body.get("reason") or ""
        failed = csp.FAILED_SESSION.fullmatch(reason)
        lapsed = csp.EXPIRED_RESERVATION.fullmatch(reason)
        # before the base handler marks it: a notice that changes no session of that CSO is not passed on
        live = failed is not None and self.store.one(
            "SELECT 1 FROM sessions WHERE session_id=? AND cso=? AND state='active'", failed[1], ctx.origin
        )
        answer = await CspEndpoint._on_status(self, body, ctx)
        notes: dict[str, dict[str, Any]] = {}  # partner → the notice of its own session / reservation
        link = self.link(failed[1]) if failed is not None and live else None
        if link is not None and link.cso == ctx.origin:  # a partner's session that never charged
            note = reason.replace(link.session_id, link.home_session, 1)
            notes[link.home] = body | {"reason": note[:120]}
        elif lapsed is not None:
            q = "SELECT home, home_reservation FROM partner_reservations WHERE cso=? AND reservation_id=?"
            row = self.store.one(q, ctx.origin, int(lapsed[1]))
            if row is not None:
                notes[str(row[0])] = body | {"reason": f"reservation {row[1]} expired"}
        plain = {k: v for k, v in body.items() if k != "reason"} if failed or lapsed else body
        for home in self._partners():
            await self._pass_on("EvseStatusUpdate", notes.get(home, plain), [home])
        return answer

    @handles("AuthorizeRoaming", senders=("cso",))
    async def _v_authorize(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """Our customers first; a partner's card is asked of that partner only (privacy: the
        card number goes CSO → us → its home, nowhere else); our own session id to the CSO."""
        answer = await CspEndpoint._on_authorize(self, body, ctx)
        uid = body["token_uid"]
        home = self._home_of(uid) if answer["auth_status"] == "unknown" else None
        if home is None:
            return answer
        ask = {"token_uid": uid, "evse_gid": body["evse_gid"], "token_type": body["token_type"]}
        try:
            got = await self.send("AuthorizeRoaming", ask, home)
        except (RoamingError, *UNREACHABLE) as exc:  # the CSO falls back to the list we gave it
            log.warning("%s: partner %s did not answer for a card: %s", self.me, home, exc)
            return {"auth_status": "unknown"}
        if got["auth_status"] != "accepted":
            return {"auth_status": got["auth_status"]}
        home_sid = str(got.get("roaming_session_id", ""))
        if not home_sid or gid.parse(home_sid).operator != home:
            log.error("%s: partner %s accepted a card without a session of its own: %r", self.me, home, home_sid)
            return {"auth_status": "unknown"}
        sid = self.new_session_id()
        with self.store.tx():
            self._record_session(sid, ctx.origin, body["evse_gid"], uid)
            self._link(sid, home, home_sid, ctx.origin)
        out = {"auth_status": "accepted", "roaming_session_id": sid, "expiry": got.get("expiry", int(ctx.now) + 86400)}
        return out | ({"contract_id": got["contract_id"]} if "contract_id" in got else {})

    def _link(self, sid: str, home: str, home_sid: str, cso: str) -> None:
        self.store.exec(
            "INSERT INTO partner_sessions(session_id, home, home_session, cso, created) VALUES(?,?,?,?,?)",
            sid, home, home_sid, cso, int(self.clock()),
        )  # fmt: skip

    @handles("SessionUpdate", senders=("cso",))
    async def _v_session_update(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """Our own record first; then the reading goes on to the home (R3-6) when it is a
        partner's session; a reading the home missed goes with the SDR."""
        answer = await CspEndpoint._on_session_update(self, body, ctx)
        link = self.link(body["roaming_session_id"])
        # a reading of the same second as the last passed on may differ (the final one): sent too
        if link is not None and link.state == "open" and body["time"] >= link.sent_time:
            update = body | {"roaming_session_id": link.home_session}
            if await self._pass_on("SessionUpdate", update, [link.home]):
                self.store.exec("UPDATE partner_sessions SET sent_time=MAX(sent_time, ?) WHERE session_id=?",
                                body["time"], link.session_id)  # fmt: skip
        return answer

    @handles("PutSdr", senders=("cso",), key=lambda b: str(b["sdr_id"]))
    async def _v_sdr(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """The CSO's SDR, audited against our record (CspEndpoint); a partner's session is then
        billed to its home with our own SDR. A session the CSO opened itself (a card of our
        list its site authorized offline, R4-2) is linked now, by the card, with a home-leg
        session id of ours (our own customers' cards first: theirs never go to a partner)."""
        answer = await CspEndpoint._on_sdr(self, body, ctx)
        sid, uid = body["roaming_session_id"], body.get("token_uid") or ""
        link = self.link(sid)
        if link is None:
            home = self._home_of(uid) if uid and not self._is_customer(uid) else None
            if home is None:
                return answer  # our own customer's
            self._link(sid, home, self.new_session_id(), ctx.origin)
        # our own SDR id, random (one derived from the CSO's could collide between CSOs, and the
        # home would refuse the second for good); issued once, kept for the retries
        self.store.exec("UPDATE partner_sessions SET state='billed', sdr_id=COALESCE(sdr_id, ?), due=0"
                        " WHERE session_id=?", self.issue("R", secrets.token_hex(12)), sid)  # fmt: skip
        try:
            await self.forward_sdr(sid)
        except Exception:  # kept as billed: the background loop sends it again
            log.exception("%s: forwarding the SDR of %s", self.me, sid)
        return answer

    # ---- to the home: the SDR, after the readings it has not seen
    async def forward_sdr(self, sid: str) -> bool:
        """Our SDR of a billed partner session to its home, after the readings not passed on
        yet (the home audits the SDR against them); True once the home has it."""
        async with self._forwarding:  # one sender at a time, or readings could cross
            return await self._forward_sdr(sid)

    async def _forward_sdr(self, sid: str) -> bool:
        link = self.link(sid)
        if link is None or link.state != "billed" or link.sdr_id is None:
            return link is not None and link.state == "forwarded"
        due = self.store.get("SELECT due FROM partner_sessions WHERE session_id=?", sid)[0]
        if due > self.clock():  # another sender just tried (and waits its backoff)
            return False
        row = self.store.get("SELECT body FROM sdrs WHERE session_id=?", sid)
        theirs = json.loads(row[0])
        s = self.session(sid)
        try:
            for t, energy in self.readings(sid):
                if t < link.sent_time:  # the last one passed on again: it may have changed within its second
                    continue
                update = {"roaming_session_id": link.home_session, "evse_gid": s["evse_gid"], "energy_wh": energy,
                          "power_w": 0, "cost": s["cost"], "time": t}  # fmt: skip
                await self.send("SessionUpdate", update, link.home)
                self.store.exec("UPDATE partner_sessions SET sent_time=? WHERE session_id=?", t, sid)
            ours = theirs | {"sdr_id": link.sdr_id, "roaming_session_id": link.home_session}
            await self.send("PutSdr", ours, link.home)
        except RoamingError as exc:
            final = 400 <= exc.status < 500 and exc.status not in (408, 429)
            self._forward_failed(link, str(exc), final=final)
            return False
        except UNREACHABLE as exc:
            self._forward_failed(link, f"{type(exc).__name__}: {exc}", final=False)
            return False
        self.store.exec("UPDATE partner_sessions SET state='forwarded', error=NULL WHERE session_id=?", sid)
        self._down_until.pop(link.home, None)  # it is back: live updates go to it again
        return True

    def _forward_failed(self, link: Link, error: str, *, final: bool) -> None:
        row = self.store.get("SELECT attempts FROM partner_sessions WHERE session_id=?", link.session_id)
        attempts = int(row[0]) + 1
        log.warning("%s: SDR of %s to %s (attempt %d): %s", self.me, link.session_id, link.home, attempts, error)
        self.store.exec("UPDATE partner_sessions SET attempts=?, due=?, error=?, state=? WHERE session_id=?",
                        attempts, self.clock() + self.backoff(attempts), error[:300],
                        "refused" if final else "billed", link.session_id)  # fmt: skip

    async def tick(self) -> None:
        await super().tick()
        due = self.store.all("SELECT session_id FROM partner_sessions WHERE state='billed' AND due <= ?", self.clock())
        for (sid,) in due:
            await self.forward_sdr(str(sid))
        if not self._list_dirty or self.clock() < self._list_retry_at:
            return  # nothing changed since the CSOs got our list: no comparison every round
        # cleared first, so that a change during the distribution sets it again; set back on
        # any failure (not only a partner's refusal or its absence), so that a change is never
        # left unsent until the next one
        self._list_dirty = False
        sent = {r[0]: (r[1], r[2]) for r in self.store.all("SELECT token_uid, auth_status, expiry FROM token_sent")}
        if self.list_entries() != sent:  # a partner's list (or our customers) changed
            sent_ok = False
            try:
                await self.distribute_tokens("differential")
                sent_ok = True
            except (RoamingError, *UNREACHABLE) as exc:
                log.warning("%s: token list with the partners' tokens: %s", self.me, exc)
            finally:
                if not sent_ok:
                    self._list_retry_at, self._list_dirty = self.clock() + self.RETRY_BASE_S, True

    # ---- from a partner: its token list, remote commands and tariff pulls for the CSOs' EVSEs
    @handles("TokenList", senders=("csp",), key=lambda b: f"{b['party_id']}:{b['list_version']}:{b.get('page', 0)}")
    async def _v_token_list(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """A partner's token list (R4-2), installed once every page is here (`token_pages`); its
        tokens join ours toward the CSOs at the background loop's next round."""
        party = self._partner(ctx)
        if body["party_id"] != party:
            raise Refused(403, "party_mismatch", f"{party} may not send the list of {body['party_id']}", "party_id")
        token_pages.check_page(body, party, self.cfg.max_list_pages)
        for i, t in enumerate(body["tokens"]):
            self._check_owner(t, party, f"tokens[{i}].token_uid")
        with self.store.tx() as db:
            tokens = token_pages.stage(db, "partner", party, body, int(ctx.now))
            if tokens is None:
                return {"status": "accepted"}
            if body["update_type"] == "full":
                db.execute("DELETE FROM partner_tokens WHERE party=?", (party,))
            for t in tokens:
                if t["auth_status"] == "invalid":
                    db.execute("DELETE FROM partner_tokens WHERE token_uid=? AND party=?", (t["token_uid"], party))
                else:  # never re-owned: a uid another party took since this page was staged stays its
                    db.execute("INSERT INTO partner_tokens VALUES(?,?,?,?) ON CONFLICT(token_uid) DO UPDATE SET"
                               " auth_status=excluded.auth_status, expiry=excluded.expiry WHERE party=excluded.party",
                               (t["token_uid"], party, t["auth_status"], t.get("expiry")))  # fmt: skip
        self._list_retry_at, self._list_dirty = 0.0, True
        return {"status": "accepted"}

    def _check_owner(self, token: dict[str, Any], party: str, field: str) -> None:
        """A partner lists only its own customers' cards: not a uid another partner holds, not
        one of our customers', not a contract id of another provider (it would be re-owned, and
        the card number and its sessions sent to the wrong CSP). Removing one (`invalid`) is
        harmless: it removes only the partner's own."""
        uid = token["token_uid"]
        if token["auth_status"] == "invalid":
            return
        held = self.store.one("SELECT party FROM partner_tokens WHERE token_uid=?", uid)
        provider = home_of_contract(uid)
        if (held is not None and held[0] != party) or self._is_customer(uid) or provider not in (None, party):
            raise Refused(403, "party_mismatch", f"{uid!r} is not a card of {party}", field)

    @handles("RemoteStart", senders=("csp",), key=lambda b: str(b["roaming_session_id"]))
    async def _v_remote_start(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R3-2 for a partner: its session id stays with it; the CSO gets one of ours."""
        home, home_sid = self._partner(ctx), body["roaming_session_id"]
        if gid.parse(home_sid).operator != home:
            raise Refused(403, "not_your_session", f"{home_sid} was not issued by {home}", "roaming_session_id")
        cso = self._cso_of(body["evse_gid"])
        if self.store.one("SELECT 1 FROM partner_sessions WHERE home=? AND home_session=?", home, home_sid):
            # a repeat of a start that got no stored answer (the idempotency lock let the first
            # finish): its outcome at the CSO is unknown, never "nothing started" (a 409 would be)
            return {"result": "timeout", "reason": clip_reason(f"{home_sid} started already: outcome unknown")}
        try:  # a login that fails sends no RemoteStart: nothing is started, none is kept
            await self.client(self.hop("RemoteStart", cso)).ensure_login()
        except (RoamingError, *UNREACHABLE) as exc:
            raise Refused(502, "unreachable", f"{cso}: login failed: {type(exc).__name__}") from None
        sid = self.new_session_id()
        with self.store.tx():
            self._record_session(sid, cso, body["evse_gid"], body["token_uid"])
            self._link(sid, home, home_sid, cso)
        try:
            answer = await self.send("RemoteStart", body | {"roaming_session_id": sid}, cso)
        except (RoamingError, *UNREACHABLE) as exc:
            if not csp.start_surely_failed(exc):  # no answer: the CSO may have started it; kept
                log.warning("%s: RemoteStart %s at %s, outcome unknown: %s", self.me, sid, cso, exc)
                return {"result": "timeout", "reason": clip_reason(f"no answer from {cso}: it may have started")}
            with self.store.tx() as db:  # surely not started: none is kept
                db.execute("DELETE FROM partner_sessions WHERE session_id=?", (sid,))
                db.execute("DELETE FROM sessions WHERE session_id=?", (sid,))
            if isinstance(exc, RoamingError):
                raise Refused(exc.status, exc.cause, exc.detail, exc.field) from None
            raise Refused(502, "unreachable", f"{cso}: {type(exc).__name__}") from None
        if answer["result"] not in ("accepted", "timeout"):
            self.store.exec("UPDATE sessions SET state='failed' WHERE session_id=?", sid)
        return answer

    def _our_session(self, home: str, home_sid: str) -> Link:
        row = self.store.one("SELECT session_id FROM partner_sessions WHERE home=? AND home_session=?", home, home_sid)
        link = None if row is None else self.link(str(row[0]))
        if link is None:
            raise Refused(404, "unknown_session", f"no session {home_sid} of {home} here", "roaming_session_id")
        return link

    @handles("RemoteStop", senders=("csp",), key=lambda b: str(b["roaming_session_id"]))
    async def _v_remote_stop(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R3-4 for a partner: by our session id at the CSO."""
        link = self._our_session(self._partner(ctx), body["roaming_session_id"])
        return await self._to_cso("RemoteStop", {"roaming_session_id": link.session_id}, link.cso)

    async def _to_cso(self, message: str, body: dict[str, Any], cso: str) -> dict[str, Any]:
        """A partner's request passed on to the CSO: its answer, or its refusal as ours (the
        partner sees the CSO's named cause); unreachable: 502 `unreachable`."""
        try:
            return await self.send(message, body, cso)
        except UNREACHABLE as exc:
            raise Refused(502, "unreachable", f"{cso}: {type(exc).__name__}") from None
        except RoamingError as exc:
            raise Refused(exc.status, exc.cause, exc.detail, exc.field) from None

    @handles("ReserveRoaming", senders=("csp",), key=lambda b: str(b["reservation_id"]))
    async def _v_reserve(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R3-8 for a partner, under a reservation id of ours (the CSO keeps one id space per
        CSP: a partner's id could be one of ours or another partner's)."""
        home, cso = self._partner(ctx), self._cso_of(body["evse_gid"])
        ours = body["reservation_id"]
        while self.store.one("SELECT 1 FROM reservations WHERE cso=? AND reservation_id=?", cso, ours):
            ours = secrets.randbelow(2**31)
        answer = await self._to_cso("ReserveRoaming", body | {"reservation_id": ours}, cso)
        if answer["result"] == "accepted":
            with self.store.tx() as db:
                db.execute("INSERT OR REPLACE INTO reservations VALUES(?,?,?,?,?,'active')",
                           (ours, cso, body["evse_gid"], body["token_uid"], body["expiry"]))  # fmt: skip
                db.execute("INSERT OR REPLACE INTO partner_reservations VALUES(?,?,?,?)",
                           (ours, cso, home, body["reservation_id"]))  # fmt: skip
        return answer

    @handles("DisputeSdr", senders=("csp",), key=lambda b: str(b["sdr_id"]))
    async def _v_dispute(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """A partner contests our SDR: as it carries the CSO's figures unchanged, the dispute is
        the CSO's SDR's, passed on with the partner's figures and reason (and kept as ours)."""
        home = self._partner(ctx)
        row = self.store.one("SELECT session_id, home_session, cso FROM partner_sessions WHERE home=? AND sdr_id=?",
                             home, body["sdr_id"])  # fmt: skip
        if row is None:
            raise Refused(404, "unknown_sdr", f"no SDR {body['sdr_id']} of {home} here", "sdr_id")
        if row[1] != body["roaming_session_id"]:
            raise Refused(400, "inconsistent", "the SDR is of another session", "roaming_session_id")
        theirs = str(self.store.get("SELECT sdr_id FROM sdrs WHERE session_id=?", row[0])[0])
        answer = await self._to_cso("DisputeSdr", body | {"sdr_id": theirs, "roaming_session_id": row[0]}, row[2])
        self.store.exec("INSERT OR REPLACE INTO disputes VALUES(?,?,?,?,?)", theirs, row[2], body["reason"],
                        answer["status"], int(ctx.now))  # fmt: skip
        return answer

    @handles("UnlockRoaming", senders=("csp",))
    async def _v_unlock(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R5-2 (with the partner's session: ours at the CSO) / R5-3 (without) for a partner."""
        home, cso = self._partner(ctx), self._cso_of(body["evse_gid"])
        fwd = dict(body)
        if "roaming_session_id" in body:
            fwd["roaming_session_id"] = self._our_session(home, body["roaming_session_id"]).session_id
        answer = await self._to_cso("UnlockRoaming", fwd, cso)
        if answer["result"] == "accepted" and "roaming_session_id" in fwd:
            self.store.exec("UPDATE sessions SET state='unlocked' WHERE session_id=? AND state='active'",
                            fwd["roaming_session_id"])  # fmt: skip
        return answer

    @handles("ChargePlan", senders=("cso", "csp"))
    async def _v_plan(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R3-10 from the CSO (kept, and passed on to a partner session's home), R3-7 from a
        partner (to the CSO with our session id; the plan the CSO applies is the answer)."""
        origin = self.cfg.party(ctx.origin)
        if origin is not None and origin.acts_as == "cso":
            answer = await CspEndpoint._on_plan_update(self, body, ctx)
            link = self.link(body["roaming_session_id"])
            if link is not None:
                await self._pass_on("ChargePlan", body | {"roaming_session_id": link.home_session}, [link.home])
            return answer
        link = self._our_session(self._partner(ctx), body["roaming_session_id"])
        answer = await self._to_cso("ChargePlan", body | {"roaming_session_id": link.session_id}, link.cso)
        if answer["status"] == "accepted":
            self.store.exec("INSERT OR REPLACE INTO plans VALUES(?,?,?)", link.session_id,
                            json.dumps(answer.get("plan", body["plan"])), link.cso)  # fmt: skip
        return answer

    @handles("ContractCertificate", senders=("cso",))
    async def _v_contract_certificate(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """S7, R3-3: a partner's contract (its provider's id) is the partner's to issue: passed on
        to it, the answer unchanged; ours as before."""
        home = self.cfg.party(home_of_contract(body.get("contract_id") or "") or "")
        if home is None or not home.partner:
            return await CspEndpoint._on_contract_certificate(self, body, ctx)
        self._answers_for(gid.parse(body["evse_gid"]).operator, ctx.origin, "evse_gid")  # its own EVSE only
        try:
            return await self.send("ContractCertificate", body, home.party_id)
        except (RoamingError, *UNREACHABLE) as exc:
            return {"status": "rejected", "reason": clip_reason(f"home CSP {home.party_id} not reachable: {exc}")}

    @handles("GetTariffs", senders=("csp",))
    async def _v_get_tariffs(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """R2-2 for a partner: the CSO's answer, unchanged."""
        self._partner(ctx)
        op = body["operator_id"]
        p = self.cfg.party(op)
        if p is None or p.role != "cso":
            raise Refused(404, "unknown_operator", f"{self.me} has no agreement with {op}", "operator_id")
        return await self._to_cso("GetTariffs", body, op)

    # ---- privacy
    def may_delete(self, token_uid: str, origin: str) -> bool:
        """M10: as a CSP's, and the partner whose customer the card is (its list, its contract
        id's provider): entitled by the list or the contract, also after the retention."""
        return super().may_delete(token_uid, origin) or self._home_of(token_uid) == origin

    async def deletion_asked(self, token_uid: str, origin: str) -> int:
        """A CSO's deletion of a partner's card: that CSO's records here are blanked (as a
        CSP's), the partner's list entry stays (its contract, not the CSO's to end), and the
        partner is told only when it got a session of that CSO from us for the card — it then
        blanks what it holds through us (it cannot tell our CSOs apart: the session's party is us)."""
        home = self._home_of(token_uid) if self._asked_by_cso(origin) else None
        q = ("SELECT 1 FROM partner_sessions p JOIN sessions s ON s.session_id=p.session_id"
             " WHERE p.cso=? AND p.home=? AND s.token_uid=?")  # fmt: skip
        linked = home is not None and self.store.one(q, origin, home, token_uid) is not None
        count = await super().deletion_asked(token_uid, origin)
        if home is not None and linked:
            job = self.enqueue("DeleteUserData", {"token_uid": token_uid, "party_id": self.me}, home, token_uid)
            for answer in (await self.run_jobs([job])).values():
                count += int(answer["count"])
        return count

    def forget(self, token_uid: str) -> int:
        n = super().forget(token_uid)
        with self.store.tx() as db:
            n += db.execute("DELETE FROM partner_tokens WHERE token_uid=?", (token_uid,)).rowcount
            self._list_dirty = True
            for party, version, page, tokens in db.execute(
                "SELECT party, version, page, tokens FROM partner_pages"
            ).fetchall():  # a list still arriving
                kept = [t for t in json.loads(tokens) if t["token_uid"] != token_uid]
                if len(kept) == len(json.loads(tokens)):
                    continue
                n += 1  # counted: `holds` tells by the count whether anything of the token is here
                db.execute("UPDATE partner_pages SET tokens=? WHERE party=? AND version=? AND page=?",
                           (json.dumps(kept), party, version, page))  # fmt: skip
        return n

    def purge_personal(self, cut: int) -> int:
        n = super().purge_personal(cut)
        db = self.store.db
        n += db.execute("DELETE FROM partner_tokens WHERE expiry IS NOT NULL AND expiry < ?", (cut,)).rowcount
        self._list_dirty = True
        n += db.execute("DELETE FROM partner_pages WHERE at < ?", (cut,)).rowcount
        db.execute(
            "DELETE FROM partner_reservations WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE"
            " r.cso=partner_reservations.cso AND r.reservation_id=partner_reservations.reservation_id)"
        )
        return n

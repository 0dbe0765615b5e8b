"""The clearing house: transaction hub switch (routes each request by its x-ev-to party id,
fans broadcasts out to every counterpart, finds the home CSP of a token), SDR
reconciliation (the CSO's SDR against the CSP's record of the session: energy and cost must
match) and settlement (per CSO-CSP pair and currency, a Settlement message to both).

It keeps: the SDRs it routed (for reconciliation and settlement), the CSPs' session records,
the settlements, which parties it passed a token uid to (M10), a routing log without
bodies, and the credentials it issued on the CSPs' behalf (credentials.py: IssueCredential)
with the CSOs each was passed to (by a keyed digest: each may end its own part of it, M10).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.protocol import gid
from gateway.protocol.roaming.client import RoamingError
from gateway.protocol.roaming.http3 import ConnectFailed, H3Error

from . import credentials
from .config import EndpointConfig
from .endpoint import COUNTERPART, PERSONAL, Ctx, Endpoint, Refused, handles
from .h3server import Reply

DDL = """
CREATE TABLE IF NOT EXISTS routed(at INTEGER NOT NULL, origin TEXT NOT NULL, dest TEXT NOT NULL,
    message TEXT NOT NULL, status INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sdrs(sdr_id TEXT PRIMARY KEY, cso TEXT NOT NULL, csp TEXT NOT NULL, session_id TEXT NOT NULL,
    energy_wh INTEGER NOT NULL, cost INTEGER NOT NULL, currency TEXT NOT NULL, token_uid TEXT, at INTEGER NOT NULL,
    verdict TEXT, settlement INTEGER);
CREATE TABLE IF NOT EXISTS csp_records(session_id TEXT PRIMARY KEY, csp TEXT NOT NULL, energy_wh INTEGER NOT NULL,
    cost INTEGER NOT NULL, at INTEGER NOT NULL);
-- the home CSP of each token of the lists passed on (R4-2), by a keyed digest: the CH routes a
-- card number to its home without keeping it (the key never leaves the CH's store)
CREATE TABLE IF NOT EXISTS token_homes(digest TEXT PRIMARY KEY, csp TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ch_key(k TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settlements(id INTEGER PRIMARY KEY, cso TEXT NOT NULL, csp TEXT NOT NULL, sdrs TEXT NOT NULL,
    amount INTEGER NOT NULL, currency TEXT NOT NULL, at INTEGER NOT NULL, delivered INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class Reconciled:
    sdr_id: str
    verdict: str  # matched | mismatch | missing (no CSP record yet)
    detail: str = ""


class ClearingHouse(Endpoint):
    role: ClassVar[str] = "ch"
    DDL: ClassVar[str] = DDL + credentials.DDL

    def __init__(self, cfg: EndpointConfig, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        if self.store.one("SELECT 1 FROM ch_key") is None:  # made now: a refused request writes no key
            self.store.exec("INSERT INTO ch_key VALUES(?)", secrets.token_hex(32))

    # ---- transaction hub switch
    async def _forward(self, message: str, body: dict[str, Any], ctx: Ctx, dest: str) -> tuple[int, dict[str, Any]]:
        try:
            answer = await self.client(dest).call(message, body, to=dest, origin=ctx.origin)
            status = 200
        except RoamingError as exc:
            status, answer = exc.status, {"error": exc.cause, "detail": f"{dest}: {exc.detail}"}
            if exc.field:
                answer["field"] = exc.field
        except ConnectFailed as exc:  # nothing was sent: the sender may take it as not done
            status, answer = 502, {"error": "unreachable", "detail": f"{dest}: {exc}"}
        except H3Error as exc:  # sent, no answer in time: it may have been carried out
            status, answer = 504, {"error": "no_answer", "detail": f"{dest}: {exc}"}
        with self.store.tx() as db:
            db.execute("INSERT INTO routed VALUES(?,?,?,?,?)", (int(ctx.now), ctx.origin, dest, message, status))
        if status == 200:
            self.note_shared(message, body, dest)
            self._note_credential_routes(message, body, ctx, dest, answer)
        return status, answer

    def _note_credential_routes(self, message: str, body: dict[str, Any], ctx: Ctx, dest: str,
                                answer: dict[str, Any]) -> None:  # fmt: skip
        """A credential this CH issued, passed between its owner and a CSO (either way): that CSO
        holds it and may delete it (M10). An AuthorizeRoaming its owner does not know gives no
        such right (a CSO cannot earn it by guessing numbers)."""
        if message not in PERSONAL or (message == "AuthorizeRoaming" and answer.get("auth_status") == "unknown"):
            return
        pair = (ctx.origin, dest)
        cso = next((p for p in pair if (c := self.cfg.party(p)) is not None and c.role == "cso"), None)
        if cso is not None:
            credentials.note_routes(self.store, self._digest, pair, cso, credentials.carried(message, body), ctx.now)

    async def _relay(self, message: str, body: dict[str, Any], ctx: Ctx) -> Reply:
        dest = self.cfg.party(ctx.to)
        if dest is None:
            raise Refused(404, "unknown_party", f"{ctx.to} is not known to the clearing house")
        if dest.party_id == ctx.origin:
            raise Refused(400, "loop", "a request cannot be routed back to its origin")
        if message == "IssueCredential":  # the CH issues credentials itself, nobody else does
            raise Refused(403, "not_allowed", "only the clearing house issues credentials: send it no x-ev-to")
        if message == "PutSdr":
            self._check_sdr(body, ctx, dest.party_id)
        if message == "TokenList":  # to one CSO (x-ev-to) as to all: a CSP lists its own credentials only
            self._check_token_list(body, ctx)
        if message == "DeleteUserData":  # the CH's own rule for its credentials, before passing it on
            self._check_deletion(body["token_uid"], ctx.origin)
        if message == "DisputeSdr":
            self._check_dispute(body, ctx, dest.party_id)
        status, answer = await self._forward(message, body, ctx, dest.party_id)
        if status == 200 and message == "DeleteUserData":  # refused there: nothing changes here either
            await self._relayed_deletion(body["token_uid"], ctx, dest.party_id)
        if status == 200 and message == "PutSdr":
            self._keep_sdr(body, ctx, dest.party_id)
        if status == 200 and message == "DisputeSdr":  # held out of settlement until resolved
            self.store.exec("UPDATE sdrs SET verdict='disputed' WHERE sdr_id=?", body["sdr_id"])
        return self._reply(status, answer)

    async def _fan_out(self, message: str, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        origin = self.cfg.party(ctx.origin)
        assert origin is not None
        worst: tuple[int, dict[str, Any]] = (200, {"status": "accepted"})
        for p in self.cfg.of_role(COUNTERPART.get(origin.role, "")):
            status, answer = await self._forward(message, body, ctx, p.party_id)
            if status != 200 and worst[0] == 200:
                worst = (status, answer)
        if worst[0] != 200:
            raise Refused(worst[0], str(worst[1]["error"]), str(worst[1].get("detail", "")), worst[1].get("field"))
        return worst[1]

    @handles("PutLocation", senders=("cso",))
    async def _on_location(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        return await self._fan_out("PutLocation", body, ctx)

    @handles("EvseStatusUpdate", senders=("cso",))
    async def _on_status(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        return await self._fan_out("EvseStatusUpdate", body, ctx)

    @handles("PushTariff", senders=("cso",))
    async def _on_tariff(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        return await self._fan_out("PushTariff", body, ctx)

    def _check_token_list(self, body: dict[str, Any], ctx: Ctx) -> None:
        """A CSP lists the credentials of ours it was issued only: another CSP's would make the
        CSOs ask it about that card (privacy) and let it block the card."""
        for i, t in enumerate(body["tokens"]):
            if t["auth_status"] != "invalid" and credentials.claims_foreign(self.store, self.me, t["token_uid"],
                                                                              ctx.origin):  # fmt: skip
                raise Refused(403, "party_mismatch", "a credential this CH issued to another CSP",
                              f"tokens[{i}].token_uid")  # fmt: skip

    @handles("TokenList", senders=("csp",))
    async def _on_token_list(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        self._check_token_list(body, ctx)
        answer = await self._fan_out("TokenList", body, ctx)
        with self.store.tx() as db:
            if body["update_type"] == "full" and body.get("page", 0) == 0:
                db.execute("DELETE FROM token_homes WHERE csp=?", (ctx.origin,))
            for t in body["tokens"]:
                if t["auth_status"] == "invalid":
                    db.execute("DELETE FROM token_homes WHERE digest=? AND csp=?", (self._digest(t["token_uid"]),
                                                                                   ctx.origin))  # fmt: skip
                else:
                    db.execute("INSERT OR REPLACE INTO token_homes VALUES(?,?,?)",
                               (self._digest(t["token_uid"]), ctx.origin, int(ctx.now)))  # fmt: skip
        return answer

    def _digest(self, token_uid: str) -> str:
        row = self.store.one("SELECT k FROM ch_key")
        key = secrets.token_hex(32) if row is None else str(row[0])
        if row is None:
            self.store.exec("INSERT INTO ch_key VALUES(?)", key)
        return hmac.new(bytes.fromhex(key), token_uid.encode(), hashlib.sha256).hexdigest()

    @handles("AuthorizeRoaming", senders=("cso",))
    async def _on_authorize(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """No destination: find the home CSP — the contract id's provider, else the CSP whose
        token list holds the card; the card number goes to no other CSP (unless this CH is
        configured `token_discovery = "ask_every_csp"`)."""
        csps = [p.party_id for p in self.cfg.of_role("csp")]
        uid = body["token_uid"]
        try:
            home: str | None = gid.parse(uid, expect="C").operator
        except gid.GidError:
            home = None
        if home == self.me:  # a credential this CH issued: to the CSP it belongs to, no other
            owner = credentials.owner(self.store, uid)
            csps = [owner] if owner in csps else []
        elif home is not None or body["token_type"] == "iso15118":
            csps = [home] if home in csps else []
        else:
            row = self.store.one("SELECT csp FROM token_homes WHERE digest=?", self._digest(uid))
            if row is not None:
                csps = [str(row[0])]
            elif self.cfg.token_discovery != "ask_every_csp":
                csps = []
        for csp in csps:
            status, answer = await self._forward("AuthorizeRoaming", body, ctx, csp)
            if status == 200 and answer["auth_status"] != "unknown":
                return answer
        return {"auth_status": "unknown"}

    @handles("ContractCertificate", senders=("cso",))
    async def _on_contract_certificate(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """S7, R3-3 for a contract this CH issued: the certificate is the business of the CSP
        it belongs to (its MO PKI), to which the request goes; no other CSP sees it."""
        owner = credentials.owner(self.store, body.get("contract_id", ""))
        if owner is None or self.cfg.party(owner) is None:
            return {"status": "rejected", "reason": "no contract issued by this clearing house"}
        status, answer = await self._forward("ContractCertificate", body, ctx, owner)
        if status != 200:
            raise Refused(status, str(answer["error"]), str(answer.get("detail", "")), answer.get("field"))
        return answer

    @handles("IssueCredential", senders=("csp",), key=lambda b: str(b["request_id"]))
    async def _on_issue_credential(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """A CSP asks for a credential for one of its customers (CH and mixed mode): issued under
        this CH's provider id, kept with the CSP it belongs to (credentials.py)."""
        return credentials.issue(self.cfg, self.store, body, ctx.origin, ctx.now).answer()

    @handles("SessionUpdate", senders=("csp",))
    async def _on_csp_record(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """A CSP's own record of a completed session (sent after it received the SDR)."""
        sid = body["roaming_session_id"]
        with self.store.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO csp_records VALUES(?,?,?,?,?)",
                (sid, ctx.origin, body["energy_wh"], body.get("cost", 0), int(ctx.now)),
            )
        return {"status": "accepted"}

    # ---- SDR reconciliation and settlement
    def _check_sdr(self, body: dict[str, Any], ctx: Ctx, csp: str) -> None:
        row = self.store.one("SELECT cso, energy_wh, cost FROM sdrs WHERE sdr_id=?", body["sdr_id"])
        if row is not None and (row[0] != ctx.origin or (row[1], row[2]) != (body["energy_wh"], body["cost"])):
            raise Refused(409, "conflict", f"SDR {body['sdr_id']} was already routed with other values", "sdr_id")
        other = self.store.one(
            "SELECT sdr_id FROM sdrs WHERE session_id=? AND cso=? AND sdr_id != ?",
            body["roaming_session_id"], ctx.origin, body["sdr_id"],
        )  # fmt: skip
        if other is not None:  # a second bill for one session is never passed on, nor settled
            raise Refused(409, "duplicate_sdr", f"session is billed by {other[0]} already", "sdr_id")

    def _check_dispute(self, body: dict[str, Any], ctx: Ctx, cso: str) -> None:
        row = self.store.one("SELECT cso, csp FROM sdrs WHERE sdr_id=?", body["sdr_id"])
        if row is None or (row[0], row[1]) != (cso, ctx.origin):
            raise Refused(404, "unknown_sdr", f"no SDR {body['sdr_id']} between {ctx.origin} and {cso}", "sdr_id")
        if self.store.one("SELECT 1 FROM sdrs WHERE sdr_id=? AND settlement IS NOT NULL", body["sdr_id"]):
            raise Refused(409, "settled", f"SDR {body['sdr_id']} is settled already", "sdr_id")

    def _keep_sdr(self, body: dict[str, Any], ctx: Ctx, csp: str) -> None:
        with self.store.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO sdrs(sdr_id, cso, csp, session_id, energy_wh, cost, currency, token_uid,"
                " at) VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    body["sdr_id"],
                    ctx.origin,
                    csp,
                    body["roaming_session_id"],
                    body["energy_wh"],
                    body["cost"],
                    body["currency"],
                    None,  # settlement needs no token uid: the CH keeps none
                    int(ctx.now),
                ),
            )

    def reconcile(self) -> list[Reconciled]:
        """Compare every unsettled SDR with the CSP's record of its session; store the verdicts."""
        out = []
        with self.store.tx() as db:
            rows = db.execute(
                "SELECT s.sdr_id, s.energy_wh, s.cost, r.energy_wh, r.cost, s.csp, r.csp FROM sdrs s"
                " LEFT JOIN csp_records r ON r.session_id = s.session_id"
                " WHERE s.settlement IS NULL AND COALESCE(s.verdict, '') != 'disputed' ORDER BY s.sdr_id"
            ).fetchall()
            for sdr_id, e, c, re_, rc, csp, rcsp in rows:
                if re_ is None or rcsp != csp:
                    r = Reconciled(sdr_id, "missing", "no record of the session from the CSP")
                elif (e, c) != (re_, rc):
                    r = Reconciled(sdr_id, "mismatch", f"CSO energy {e} Wh cost {c}, CSP energy {re_} Wh cost {rc}")
                else:
                    r = Reconciled(sdr_id, "matched")
                db.execute("UPDATE sdrs SET verdict=? WHERE sdr_id=?", (r.verdict, sdr_id))
                out.append(r)
        return out

    async def settle(self) -> list[dict[str, Any]]:
        """Settle the matched SDRs per (CSO, CSP, currency); tell both parties (Settlement)."""
        self.reconcile()
        groups: dict[tuple[str, str, str], list[tuple[str, int]]] = {}
        for sdr_id, cso, csp, cost, cur in self.store.all(
            "SELECT sdr_id, cso, csp, cost, currency FROM sdrs WHERE verdict='matched' AND settlement IS NULL"
            " ORDER BY sdr_id"
        ):
            groups.setdefault((cso, csp, cur), []).append((sdr_id, cost))
        done = []
        for (cso, csp, cur), items in groups.items():
            for chunk in (items[i : i + 256] for i in range(0, len(items), 256)):
                ids, amount = [s for s, _ in chunk], sum(c for _, c in chunk)
                with self.store.tx() as db:
                    cur_ = db.execute(
                        "INSERT INTO settlements(cso, csp, sdrs, amount, currency, at) VALUES(?,?,?,?,?,?)",
                        (cso, csp, json.dumps(ids), amount, cur, int(self.clock())),
                    )
                    sid = cur_.lastrowid
                    db.executemany("UPDATE sdrs SET settlement=? WHERE sdr_id=?", [(sid, s) for s in ids])
                    jobs = [  # durable: delivered (retried) until both parties acknowledge
                        self.enqueue("Settlement", {"party_id": other, "sdrs": ids, "amount": amount, "currency": cur},
                                     to, f"settlement:{sid}", ref=str(sid))
                        for to, other in ((cso, csp), (csp, cso))
                    ]  # fmt: skip
                await self.run_jobs(jobs)
                done.append({"cso": cso, "csp": csp, "sdrs": ids, "amount": amount, "currency": cur})
        return done

    def job_done(self, job: dict[str, Any], answer: dict[str, Any]) -> None:
        """A Settlement acknowledged: the settlement is delivered once both parties have it."""
        if job["message"] == "Settlement" and job["ref"]:
            left = self.store.one("SELECT 1 FROM jobs WHERE message='Settlement' AND ref=?", job["ref"])
            if left is None:
                self.store.db.execute("UPDATE settlements SET delivered=1 WHERE id=?", (int(job["ref"]),))

    # ---- privacy
    def note_shared(self, message: str, body: dict[str, Any], to: str) -> None:
        """The CH forgets card numbers once routed: the sender records where it sent them
        (the answering CSP's party is in its session id), so a deletion needs none here."""

    def forget(self, token_uid: str) -> int:
        with self.store.tx() as db:
            n = db.execute("UPDATE sdrs SET token_uid=NULL WHERE token_uid=?", (token_uid,)).rowcount
            n += db.execute("DELETE FROM shared WHERE token_uid=?", (token_uid,)).rowcount
            n += db.execute("DELETE FROM token_homes WHERE digest=?", (self._digest(token_uid),)).rowcount
            n += credentials.forget(self.store, self._digest, token_uid)
        return n

    def _check_deletion(self, token_uid: str, origin: str) -> None:
        """M10 of a credential this CH issued: by its owner CSP, or by a CSO it was passed to
        (it holds it: its own part only, `deletion_asked`); any other party is refused."""
        if not credentials.may_delete(self.store, self._digest, token_uid, origin):
            raise Refused(403, "not_your_credential", f"{origin} never held this credential of the clearing house",
                          "token_uid")  # fmt: skip

    def may_delete(self, token_uid: str, origin: str) -> bool:
        """M10 here: a credential this CH issued by its own rule (`_check_deletion`); a listed
        card's `token_homes` row by its home CSP only (another party would unroute the card)."""
        if credentials.owner(self.store, token_uid) is not None:
            return credentials.may_delete(self.store, self._digest, token_uid, origin)
        row = self.store.one("SELECT csp FROM token_homes WHERE digest=?", self._digest(token_uid))
        return row is None or str(row[0]) == origin

    async def _relayed_deletion(self, token_uid: str, ctx: Ctx, dest: str) -> None:
        """A DeleteUserData the destination accepted: a CSO's ends only its own route of a
        credential here (the destination kept the customer: a CSO ends no contract, so the card
        stays routed and the credential issued); a CSP's is deleted here too when the sender or
        the destination is entitled here (a card's home; a credential's owner), and the owner of
        a credential this CH issued gets it as well (a job) unless it is the sender or the
        destination."""
        if self._is_cso(ctx.origin):
            credentials.drop_route(self.store, self._digest, token_uid, ctx.origin)
            return
        if not (self.may_delete(token_uid, ctx.origin) or self.may_delete(token_uid, dest)):
            return  # another party's card: the destination's business, not this CH's routing
        if credentials.owner(self.store, token_uid) == dest:
            self.forget(token_uid)  # the forward itself reaches the owner
        else:
            await self.delete_user(token_uid, skip=ctx.origin)

    @handles("DeleteUserData", senders=("cso", "csp", "ch"))
    async def _on_delete_user(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        self._check_deletion(body["token_uid"], ctx.origin)
        return await super()._on_delete_user(body, ctx)

    def _is_cso(self, party: str) -> bool:
        p = self.cfg.party(party)
        return p is not None and p.role == "cso"

    async def deletion_asked(self, token_uid: str, origin: str) -> int:
        """A CSO's deletion sent to the CH itself ends only its route of a credential (a CSO
        cannot end a CSP's customer); the owner's, or another entitled party's, deletes it all."""
        if self._is_cso(origin):
            return credentials.drop_route(self.store, self._digest, token_uid, origin)
        return await super().deletion_asked(token_uid, origin)

    async def delete_user(self, token_uid: str, *, skip: str = "") -> int:
        """M10 started here (or sent to the CH itself): a credential the CH issued is deleted at
        the CSP it belongs to as well, which passes it on to the CSOs that saw it."""
        owner = credentials.owner(self.store, token_uid)
        if owner is not None and owner != skip:
            self.store.exec("INSERT OR REPLACE INTO shared VALUES(?,?,?)", token_uid, owner, int(self.clock()))
        return await super().delete_user(token_uid, skip=skip)

    def purge_personal(self, cut: int) -> int:
        n = self.store.db.execute(
            "UPDATE sdrs SET token_uid=NULL WHERE token_uid IS NOT NULL AND at < ?", (cut,)
        ).rowcount
        return n + credentials.purge(self.store, self._digest, cut, self.cfg.credential_max_lifetime_s)

"""What every roaming endpoint (CSO, home CSP, clearing house) does the same way: the HTTP/3
server, the request pipeline (authentication, body checks, routing, idempotency), platform
login, outgoing calls in the configured roaming mode, retention and deletion of personal data.

Request pipeline, in order (the first failure answers; nothing is written but the nonce):
 1. path `/roaming/v1/<Message>` names a roaming message, method POST          404 / 405
 2. body at most 256 KiB                                                         413
 3. x-ev-party is a known party; HMAC and timestamp verify                       403 / 401
 4. nonce not seen from that party within the window                             409
 5. bearer token issued to that party and unexpired (all but PlatformLogin)      401 / 403
 6. JSON body valid for the message (types, bounds, enums, global ids)           400 / 413
 7. sender allowed: relays only by a CH, message sent by the right role          403
 8. destination: this endpoint, or (CH) another party it routes to               404
 9. idempotency: same key → the stored answer (a repeat of one in flight waits
    for it); same key, other body                                               409
10. the handler (domain checks → 404 unknown ids, 409 conflicts), one transaction

Durable jobs (`jobs` table): what must reach a peer even when it is down — a DeleteUserData
hand-on (M10), a Settlement, a reservation expiry notice (R3-8) — is written to the store in
the same transaction as the change that causes it, tried at once, and then retried by the
background loop with a bounded, jittered exponential backoff until the peer acknowledges
(2xx). A 4xx answer (other than 408/429) is final: the job is kept as `refused` for the
operator. The receivers are idempotent, so a delivery whose answer was lost may be repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.protocol import gid
from gateway.protocol.roaming import auth, json_body
from gateway.protocol.roaming.client import PREFIX, Peer, RoamingClient, RoamingError
from gateway.protocol.roaming.http3 import H3Error, TlsFiles

from .config import EndpointConfig
from .h3server import H3Server, Reply, Request, serve
from .store import Store

log = logging.getLogger(__name__)

#: mixed mode: these go directly RE ↔ RE for a fast answer, everything else through the CH
DIRECT_IN_MIXED = frozenset({"AuthorizeRoaming", "RemoteStart", "RemoteStop", "ContractCertificate"})
#: messages whose bodies carry personal data (a token uid) — recorded for M10 deletion
PERSONAL = frozenset(
    {"AuthorizeRoaming", "RemoteStart", "ReserveRoaming", "PutSdr", "TokenList", "ContractCertificate"}
)
COUNTERPART = {"cso": "csp", "csp": "cso"}
_MESSAGES = frozenset(json_body.roaming_messages())


class Refused(Exception):
    """The application refuses a request: HTTP status, stable cause, the field concerned."""

    def __init__(self, status: int, cause: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.cause, self.detail, self.field = status, cause, detail, field

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.cause, "detail": self.detail}
        if self.field:
            out["field"] = self.field
        return out


@dataclass(frozen=True)
class Ctx:
    """The checked facts about one incoming request."""

    origin: str  # the party that wrote it
    hop: str  # the party that signed it (the origin, or a CH relaying it)
    to: str  # the destination named by the sender ("" = this endpoint / broadcast at a CH)
    now: float

    @property
    def via_ch(self) -> bool:
        return self.hop != self.origin


HandlerFn = Callable[[Any, dict[str, Any], Ctx], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Route:
    fn: HandlerFn
    senders: tuple[str, ...]  # roles allowed to originate the message
    key: Callable[[dict[str, Any]], str] | None  # idempotency key


def handles(
    message: str, *, senders: tuple[str, ...], key: Callable[[dict[str, Any]], str] | None = None
) -> Callable[[HandlerFn], HandlerFn]:
    """Register a method as the handler of a roaming message."""

    def deco(fn: HandlerFn) -> HandlerFn:
        fn.__roaming__ = (message, Route(fn, senders, key))  # type: ignore[attr-defined]
        return fn

    return deco


def error_json(cause: str, detail: str, field: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": cause, "detail": detail}
    if field:
        body["field"] = field
    return json_body.dump(body)


def require_gid(value: str, type_: str, field: str) -> gid.Gid:
    try:
        return gid.parse(value, expect=type_)
    except gid.GidError as exc:
        raise Refused(400, "bad_gid", str(exc), field) from None


class Endpoint:
    role: ClassVar[str] = ""
    DDL: ClassVar[str] = ""
    routes: ClassVar[dict[str, Route]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        routes: dict[str, Route] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                reg = getattr(attr, "__roaming__", None)
                if reg is not None:
                    routes[reg[0]] = reg[1]
        cls.routes = routes

    #: job retry backoff: min(RETRY_CAP_S, RETRY_BASE_S * 2**(attempts-1)), times a jitter in [0.5, 1]
    RETRY_BASE_S: ClassVar[float] = 5.0
    RETRY_CAP_S: ClassVar[float] = 900.0
    #: how often (real seconds) the background loop looks for due jobs and runs `tick`
    LOOP_PERIOD_S: ClassVar[float] = 0.25

    def __init__(self, cfg: EndpointConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.role != self.role:
            raise ValueError(f"configuration is for a {cfg.role}, not a {self.role}")
        self.cfg, self.clock = cfg, clock
        self.me = cfg.party_id
        self.store = Store(cfg.db, self.DDL)
        self.server: H3Server | None = None
        self.clients: dict[str, RoamingClient] = {}
        self._purger: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        #: one lock per (origin, message, idempotency key) being handled, and how many hold or
        #: wait for it: a repeat that arrives while the first is in flight waits for its answer
        #: (a retry after a lost answer must not be taken for a second request); bounded by the
        #: requests in flight, each dropped when its last one is done
        self._keyed: dict[tuple[str, str, str], tuple[asyncio.Lock, int]] = {}

    # ---- life cycle
    @property
    def port(self) -> int:
        assert self.server is not None, "not started"
        return self.server.port

    async def start(self) -> Endpoint:
        self.server = await serve(
            self.cfg.host,
            self.cfg.port,
            self.cfg.cert,
            self.cfg.key,
            self.handle,
            max_body=json_body.MAX_BODY,
            client_ca=self.cfg.ca,
        )
        self._purger = asyncio.create_task(self._purge_loop())
        self._worker = asyncio.create_task(self._job_loop())
        return self

    async def stop(self) -> None:
        for task in (self._purger, self._worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._purger = self._worker = None
        if self.server is not None:
            self.server.close()
            self.server = None
            await asyncio.sleep(0)  # let the transport release its socket (a restart binds the port again)
        for c in self.clients.values():
            await c.close()
        self.clients.clear()
        self.store.close()

    async def _purge_loop(self) -> None:
        period = max(1.0, min(60.0, self.cfg.retention_s / 10))
        while True:
            await asyncio.sleep(period)
            self.purge()

    async def _job_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.LOOP_PERIOD_S)
            self._wake.clear()
            try:
                await self.tick()
                await self.run_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive a bad job or a store hiccup
                log.exception("%s: background jobs", self.me)

    async def tick(self) -> None:
        """Periodic work of a role (the CSO expires reservations), run by the background loop."""

    # ---- durable jobs
    def enqueue(self, message: str, body: dict[str, Any], dest: str, key: str, *, ref: str = "") -> int:
        """Record a request that must reach `dest` (once per (message, dest, key)); its job id.
        Joins the caller's transaction, so the job is durable together with its cause."""
        json_body.check(message, body)
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO jobs(message, dest, key, body, ref, due, created) VALUES(?,?,?,?,?,?,?)"
                " ON CONFLICT(message, dest, key) DO UPDATE SET state='pending', attempts=0, due=excluded.due"
                " WHERE state='refused'",
                (message, dest, key, json.dumps(body), ref, self.clock(), int(self.clock())),
            )
            q = "SELECT id FROM jobs WHERE message=? AND dest=? AND key=?"
            row = db.execute(q, (message, dest, key)).fetchone()
        self._wake.set()
        return int(row[0])

    def jobs(self, state: str = "pending") -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.all("SELECT * FROM jobs WHERE state=? ORDER BY id", state)]

    def backoff(self, attempts: int) -> float:
        return retry_delay(attempts, self.RETRY_BASE_S, self.RETRY_CAP_S)

    async def run_jobs(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        """Try the due pending jobs (or exactly `ids`, due or not; one already under way is
        waited for); the answers of those delivered."""
        if ids is None:
            wanted = [int(r[0]) for r in self.store.all(
                "SELECT id FROM jobs WHERE state='pending' AND due <= ? ORDER BY id", self.clock())]  # fmt: skip
        else:
            wanted = list(ids)
        out = {}
        for job_id in wanted:
            running = self._inflight.get(job_id)
            if running is not None:
                answer = await asyncio.shield(running) if ids is not None else None
            else:
                row = self.store.one("SELECT * FROM jobs WHERE id=? AND state='pending'", job_id)
                answer = None if row is None else await self._attempt(dict(row))
            if answer is not None:
                out[job_id] = answer
        return out

    async def _attempt(self, job: dict[str, Any]) -> dict[str, Any] | None:
        done: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._inflight[job["id"]] = done
        answer: dict[str, Any] | None = None
        try:
            answer = await self.send(job["message"], json.loads(job["body"]), job["dest"])
        except RoamingError as exc:
            final = 400 <= exc.status < 500 and exc.status not in (408, 429)
            self._job_failed(job, str(exc), final=final)
        except (H3Error, OSError, TimeoutError) as exc:  # unreachable (ConnectionError is an OSError)
            self._job_failed(job, f"{type(exc).__name__}: {exc}", final=False)
        except Exception as exc:  # e.g. an answer that fails the schema: retried with backoff all the same
            log.exception("%s: job %s", self.me, job["id"])
            self._job_failed(job, f"{type(exc).__name__}: {exc}", final=False)
        else:
            with self.store.tx():
                self.store.db.execute("DELETE FROM jobs WHERE id=?", (job["id"],))
                self.job_done(job, answer)
        finally:
            del self._inflight[job["id"]]
            done.set_result(answer)
        return answer

    def _job_failed(self, job: dict[str, Any], error: str, *, final: bool) -> None:
        attempts = int(job["attempts"]) + 1
        if final:
            log.error("%s: %s to %s refused, kept as refused: %s", self.me, job["message"], job["dest"], error)
        else:
            log.warning("%s: %s to %s failed (attempt %d), retried: %s", self.me, job["message"], job["dest"],
                        attempts, error)  # fmt: skip
        self.store.exec(
            "UPDATE jobs SET attempts=?, due=?, last_error=?, state=? WHERE id=?",
            attempts,
            self.clock() + self.backoff(attempts),
            error[:300],
            "refused" if final else "pending",
            job["id"],
        )

    def job_done(self, job: dict[str, Any], answer: dict[str, Any]) -> None:
        """A job was acknowledged (inside the transaction that drops it); roles add bookkeeping."""

    # ---- incoming
    def _reply(self, status: int, body: dict[str, Any] | bytes) -> Reply:
        return Reply(status, body if isinstance(body, bytes) else json_body.dump(body))

    async def handle(self, req: Request) -> Reply:
        try:
            return await self._pipeline(req)
        except Refused as exc:
            return self._reply(exc.status, exc.to_json())
        except auth.AuthError as exc:
            return self._reply(exc.status, exc.to_json())
        except json_body.BodyError as exc:
            return self._reply(exc.status, exc.to_json())

    async def _pipeline(self, req: Request) -> Reply:
        now = self.clock()
        message = req.path[len(PREFIX) :] if req.path.startswith(PREFIX) else ""
        if message not in _MESSAGES:
            raise Refused(404, "unknown_message", f"no roaming message at {req.path[:80]!r}")
        if req.method != "POST":
            raise Refused(405, "method_not_allowed", "roaming messages are POSTed")
        if req.oversize:
            raise Refused(413, "too_large", f"body exceeds {json_body.MAX_BODY} bytes")
        party = self.cfg.party(auth.claimed_party(req.headers))
        if party is None:
            raise Refused(403, "unknown_party", f"party {req.headers.get(auth.H_PARTY)} is not known here")
        if req.peer != party.party_id:  # the TLS client certificate names the party that sends
            raise Refused(403, "certificate_mismatch",
                          f"the client certificate is {req.peer!r}'s, not {party.party_id}'s")  # fmt: skip
        signed = auth.verify(req.headers, party.secret_bytes, req.method, req.path, body=req.body, now=now)
        if not self.remember_nonce(signed.party, signed.nonce, signed.ts, now):
            raise Refused(409, "replay", f"nonce {signed.nonce} already used by {signed.party}")
        if message != "PlatformLogin":
            token = auth.bearer(req.headers)
            row = self.store.one("SELECT party, expiry FROM login_tokens WHERE digest=?", auth.token_digest(token))
            auth.check_token(None if row is None else (row[0], row[1]), signed.party, now)
        body = json_body.load(message, req.body)
        if message == "PlatformLogin":
            return self._reply(200, self._login(body, signed.party, now))
        origin = self.cfg.party(signed.origin)
        if origin is None:
            raise Refused(403, "unknown_party", f"origin {signed.origin} is not known here")
        if signed.origin != signed.party and party.role != "ch":
            raise Refused(403, "relay_not_allowed", f"{signed.party} is no clearing house and may not relay")
        ctx = Ctx(signed.origin, signed.party, signed.route.to, now)
        if ctx.to and ctx.to != self.me:
            if self.role != "ch":
                raise Refused(404, "wrong_destination", f"request is for {ctx.to}, this is {self.me}")
            return await self._relay(message, body, ctx)
        route = self.routes.get(message)
        if route is None:
            raise Refused(404, "unknown_message", f"a {self.role} does not handle {message}")
        if origin.acts_as not in route.senders:  # a visited CSP acts as the CSO of its partners
            raise Refused(403, "not_allowed", f"a {origin.acts_as} may not send {message} to a {self.role}")
        return await self._local(message, body, ctx, route)

    async def _local(self, message: str, body: dict[str, Any], ctx: Ctx, route: Route) -> Reply:
        key = route.key(body) if route.key else None
        if key is None:
            return await self._local_once(message, body, ctx, route, None)
        slot = (ctx.origin, message, key)
        lock, users = self._keyed.get(slot, (asyncio.Lock(), 0))
        self._keyed[slot] = (lock, users + 1)
        try:
            async with lock:  # a repeat in flight: it waits, then gets the stored answer below
                return await self._local_once(message, body, ctx, route, key)
        finally:
            lock, users = self._keyed[slot]
            if users > 1:
                self._keyed[slot] = (lock, users - 1)
            else:
                del self._keyed[slot]

    async def _local_once(self, message: str, body: dict[str, Any], ctx: Ctx, route: Route, key: str | None) -> Reply:
        if key is not None:
            row = self.store.one(
                "SELECT body_sha256, response FROM idempotency WHERE origin=? AND message=? AND key=?",
                ctx.origin,
                message,
                key,
            )
            if row is not None:
                if row[0] != _canon_hash(body):
                    raise Refused(409, "conflict", f"{message} {key} was already received with another body")
                return self._reply(200, str(row[1]).encode())
        answer = await route.fn(self, body, ctx)
        json_body.check(message, answer, response=True)
        self.note_shared(message, body, ctx.origin)  # the origin holds this personal data too
        if key is not None:
            self.store.exec(
                "INSERT OR IGNORE INTO idempotency VALUES(?,?,?,?,?,?)",
                ctx.origin,
                message,
                key,
                _canon_hash(body),
                json_body.dump(answer).decode(),
                int(ctx.now),
            )
        return self._reply(200, answer)

    async def _relay(self, message: str, body: dict[str, Any], ctx: Ctx) -> Reply:
        raise Refused(404, "wrong_destination", f"{self.me} does not relay")

    def remember_nonce(self, party: str, nonce: str, ts: int, now: float) -> bool:
        with self.store.tx() as db:
            db.execute("DELETE FROM nonces WHERE ts < ?", (int(now) - auth.NONCE_KEEP,))
            cur = db.execute("INSERT OR IGNORE INTO nonces VALUES(?,?,?)", (party, nonce, ts))
            return cur.rowcount == 1

    def _login(self, body: dict[str, Any], party: str, now: float) -> dict[str, Any]:
        """R1-1: username/password of a known party → a token valid `token_lifetime_s`."""
        cfg = self.cfg.party(party)
        if body["party_id"] != party:
            raise Refused(403, "party_mismatch", f"login for {body['party_id']} signed by {party}", "party_id")
        if cfg is None or body["username"] != party or not auth.password_ok(body["password"], cfg.password):
            raise Refused(401, "bad_credentials", "username or password wrong")
        token = auth.new_token()
        expiry = int(now) + self.cfg.token_lifetime_s
        with self.store.tx() as db:
            db.execute("DELETE FROM login_tokens WHERE expiry <= ?", (int(now),))
            db.execute("INSERT INTO login_tokens VALUES(?,?,?)", (auth.token_digest(token), party, expiry))
        return {"token": token, "expiry": expiry}

    def issue(self, type_: str, local: str) -> str:
        """A global id of this party (sessions, SDRs)."""
        me = gid.parse(self.me)
        return gid.make(me.country, me.party, type_, local)

    # ---- outgoing
    def client(self, party_id: str) -> RoamingClient:
        c = self.clients.get(party_id)
        if c is None:
            p = self.cfg.party(party_id)
            if p is None:
                raise Refused(404, "unknown_party", f"{party_id} is not configured here")
            tls = TlsFiles(self.cfg.ca, self.cfg.cert, self.cfg.key)
            peer = Peer(p.party_id, p.host, p.port, tls, self.me, p.password, p.secret_bytes)
            c = self.clients[party_id] = RoamingClient(self.me, peer, clock=self.clock)
        return c

    def hop(self, message: str, to: str) -> str:
        """The party a request to `to` is sent to in the configured mode."""
        ch = self.cfg.clearing_house
        if self.role == "ch" or self.cfg.mode == "peer_to_peer" or ch is None or to == ch:
            return to
        if self.cfg.mode == "mixed" and message in DIRECT_IN_MIXED:
            return to
        return ch

    async def send(self, message: str, body: dict[str, Any], to: str, *, origin: str = "") -> dict[str, Any]:
        """Send a request to party `to`, directly or through the CH as the mode says."""
        hop = self.hop(message, to)
        answer = await self.client(hop).call(message, body, to=to, origin=origin)
        self.note_shared(message, body, to)
        return answer

    async def broadcast(self, message: str, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Send to every counterpart (CSO → CSPs, CSP → CSOs): once to the CH, or to each directly."""
        if self.hop(message, "") == self.cfg.clearing_house and self.cfg.clearing_house:
            answer = await self.client(self.cfg.clearing_house).call(message, body)
            for p in self.cfg.of_role(COUNTERPART[self.role]):  # the CH passed it on to each of them
                self.note_shared(message, body, p.party_id)
            return {self.cfg.clearing_house: answer}
        out = {}
        for p in self.cfg.counterparts(COUNTERPART[self.role]):  # with a home CSP's visited CSP
            out[p.party_id] = await self.send(message, body, p.party_id)
        return out

    def note_shared(self, message: str, body: dict[str, Any], to: str) -> None:
        if message not in PERSONAL or not to or to == self.me:
            return
        if message == "ContractCertificate":
            uids = [body["contract_id"]] if "contract_id" in body else []
        elif "token_uid" in body:
            uids = [body["token_uid"]]
        else:
            uids = [t["token_uid"] for t in body.get("tokens", [])]
        with self.store.tx() as db:
            for uid in uids:
                db.execute("INSERT OR REPLACE INTO shared VALUES(?,?,?)", (uid, to, int(self.clock())))

    # ---- privacy (M10, retention)
    def forget(self, token_uid: str) -> int:
        """Delete or blank this endpoint's records of a token; the count of records touched."""
        return 0

    def purge(self, now: float | None = None) -> int:
        """Drop personal data older than the retention period; returns the records touched."""
        now = self.clock() if now is None else now
        with self.store.tx() as db:
            db.execute("DELETE FROM login_tokens WHERE expiry <= ?", (int(now),))
            db.execute("DELETE FROM nonces WHERE ts < ?", (int(now) - auth.NONCE_KEEP,))
            cut = int(now) - self.cfg.retention_s
            n = db.execute("DELETE FROM shared WHERE at < ?", (cut,)).rowcount
            n += self.purge_personal(cut)
        return n

    def purge_personal(self, cut: int) -> int:
        return 0

    async def delete_user(self, token_uid: str, *, skip: str = "") -> int:
        """M10: delete the user's data here and at every party it was sent to (except `skip`).
        The hand-ons are durable jobs, written with the deletion and tried at once; a party
        that is unreachable gets it when it is back (the background loop retries)."""
        with self.store.tx() as db:
            parties = [r[0] for r in db.execute("SELECT party FROM shared WHERE token_uid=?", (token_uid,))]
            db.execute("DELETE FROM shared WHERE token_uid=?", (token_uid,))
            count = self.forget(token_uid)
            body = {"token_uid": token_uid, "party_id": self.me}
            ids = [self.enqueue("DeleteUserData", body, p, token_uid) for p in parties if p not in (skip, self.me)]
        for answer in (await self.run_jobs(ids)).values():
            count += int(answer["count"])
        return count

    def record_settlement(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """A Settlement from the CH (CSO and CSP), kept once: a repeated delivery changes nothing."""
        sdrs = json.dumps(body["sdrs"])
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM settlements WHERE party=? AND sdrs=?", (body["party_id"], sdrs)).fetchone():
                return {"status": "accepted"}
            db.execute(
                "INSERT INTO settlements VALUES(?,?,?,?,?)",
                (body["party_id"], sdrs, body["amount"], body["currency"], int(ctx.now)),
            )
        return {"status": "accepted"}

    def may_delete(self, token_uid: str, origin: str) -> bool:
        """M10: whether `origin` may have this endpoint delete a token's data — a party the token
        travelled to or from (`shared`); the roles add the token's home (its list, its contract),
        which stays entitled after the retention purged `shared`, and the CH its own rule."""
        return self.store.one("SELECT 1 FROM shared WHERE token_uid=? AND party=?", token_uid, origin) is not None

    def holds(self, token_uid: str) -> bool:
        """Whether this endpoint keeps anything of a token: a dry run of `forget`, rolled back."""
        with self.store.tx() as db:
            db.execute("SAVEPOINT dry_run")
            try:
                return self.forget(token_uid) > 0
            finally:
                db.execute("ROLLBACK TO dry_run")
                db.execute("RELEASE dry_run")

    @handles("DeleteUserData", senders=("cso", "csp", "ch"))
    async def _on_delete_user(self, body: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
        """M10 asked by another party: only one entitled to the token (`may_delete`) has us delete
        it and pass it on; else 403 `not_shared`, nothing changed — unless we hold nothing of it,
        then there is nothing to guard: `count: 0` (a repeat of a delivered deletion, whose
        sender's entitlement went with the data, must not end as a refused job)."""
        uid = body["token_uid"]
        if not self.may_delete(uid, ctx.origin):
            if self.holds(uid):
                raise Refused(403, "not_shared", f"{ctx.origin} never held this token with {self.me}", "token_uid")
            return {"status": "accepted", "count": 0}
        count = await self.deletion_asked(uid, ctx.origin)
        return {"status": "accepted", "count": count}

    async def deletion_asked(self, token_uid: str, origin: str) -> int:
        """M10 asked by an entitled `origin`: here all of it, passed on to every other party;
        a CSP narrows a CSO's to what it holds of that CSO (it cannot end the contract)."""
        return await self.delete_user(token_uid, skip=origin)


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number `attempts` (1, 2, ...): exponential, at most `cap`, jittered
    in [½, 1] of that so that many senders do not retry in step."""
    delay = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 30))
    return float(delay * random.uniform(0.5, 1.0))


def settlement_key(body: dict[str, Any]) -> str:
    """A Settlement's idempotency key: its SDRs (each SDR is settled once)."""
    return hashlib.sha256("\n".join(sorted(body["sdrs"])).encode()).hexdigest()


def _canon_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

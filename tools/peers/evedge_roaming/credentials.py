"""User credentials issued by the clearing house (IEC 63119-1: in clearing-house and mixed
modes "the user credentials may be issued by the CH or by each CSP").

A CSP asks its CH for a credential for one of its customers (IssueCredential, CSP → CH, keyed
by the CSP's `request_id`); the CH issues it under its **own** provider id, a standard eMAID
(`CC*PPP*C` + 8 characters, so that its ISO 15118 form carries a check digit, `Gid.emaid()`):
an RFID card's uid (the eMAID printed on the card) or a Plug & Charge contract id. The CH
keeps which CSP each credential belongs to (`issued_credentials`, personal data); a CSO sees
the CH as the credential's provider and asks the CH, which forwards the AuthorizeRoaming to
that CSP only (privacy: never to another CSP); the CSP's session id then names the home for
the session's updates and SDR, as when the CH finds the home of a listed card. The CSP adds the
credential to its customers and lists, authorizes and bills it like one of its own.

Bounds (CH configuration): at most `credential_quota` credentials held per CSP, each valid
`credential_max_lifetime_s` at most (none asked: that long), so every one is purged in the end.
Only the CH's check tells which CSP a credential is, so a list naming one reaches the CSOs
through the CH only (the CSO refuses it sent directly). Deletion (M10): the owner CSP deletes
it (the CSP tells the CH of its own by the credential's prefix; one started at the CH reaches the
owner); a CSO the CH passed it to (`credential_routes`, a keyed digest) may ask only for its own
part: its route row goes, the credential stays (its relayed deletion reaches the owner as a CSO's).

Sans I/O but for the CSP's request (`request`): the CH's side is a function of its store and
configuration, called by the CH's handler inside the request's transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.protocol import gid

from .config import EndpointConfig
from .endpoint import Refused
from .store import Store

DDL = """
-- credentials this CH issued on a CSP's behalf (personal data): the CSP each one belongs to, the
-- CSP's request key (its stored answer holds the credential too), until expiry + retention or M10
CREATE TABLE IF NOT EXISTS issued_credentials(token_uid TEXT PRIMARY KEY, csp TEXT NOT NULL, token_type TEXT NOT NULL,
    request_id INTEGER NOT NULL, expiry INTEGER, issued INTEGER NOT NULL, UNIQUE(csp, request_id));
CREATE INDEX IF NOT EXISTS issued_credentials_csp ON issued_credentials(csp);
-- the CSOs this CH passed each credential it issued to or from (a keyed digest of the credential,
-- no uid): they and its owner may delete it (M10), nobody else; dropped with the credential
CREATE TABLE IF NOT EXISTS credential_routes(digest TEXT NOT NULL, cso TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY(digest, cso));
"""

#: the credentials a CH issues: an RFID card (its uid an eMAID printed on it), a contract (ISO 15118)
TOKEN_TYPES = ("rfid", "iso15118")
#: an eMAID instance: C and 8 characters of [A-Z0-9]
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Issued:
    """One credential the CH issued."""

    token_uid: str  # canonical contract id (CC*PPP*C<8>), also the RFID card's uid
    csp: str  # the CSP it belongs to
    token_type: str
    expiry: int | None  # None: issued before every credential got one (the longest, by default)

    def answer(self) -> dict[str, Any]:
        """The IssueCredential response."""
        out: dict[str, Any] = {"token_uid": self.token_uid}
        if self.token_type == "iso15118":
            out["contract_id"] = self.token_uid
        if self.expiry is not None:
            out["expiry"] = self.expiry
        return out


def new_id(ch_party: str, taken: Store) -> str:
    """A fresh standard eMAID under the CH's provider id, not yet issued."""
    me = gid.parse(ch_party, expect="O")
    while True:
        cid = gid.make(me.country, me.party, "C", "".join(secrets.choice(_ALPHABET) for _ in range(8)))
        if taken.one("SELECT 1 FROM issued_credentials WHERE token_uid=?", cid) is None:
            return cid


def issue(cfg: EndpointConfig, store: Store, body: dict[str, Any], csp: str, now: float) -> Issued:
    """The CH's answer to a CSP's IssueCredential (the endpoint has checked the body against the
    schema, the sender's role, and that `request_id` is new or repeated with the same body)."""
    if cfg.mode == "peer_to_peer":
        raise Refused(403, "wrong_mode", "peer to peer, each CSP issues its own credentials")
    kind = body["token_type"]
    if kind not in TOKEN_TYPES:
        raise Refused(400, "unsupported_token_type", f"a CH issues {' or '.join(TOKEN_TYPES)} credentials",
                      "token_type")  # fmt: skip
    asked = body.get("expiry")
    repeated = _repeat(cfg, store, body, csp)  # before the checks of time: a repeat gets the same
    if repeated is not None:
        return repeated
    longest = int(now) + cfg.credential_max_lifetime_s
    if asked is not None and asked <= now:
        raise Refused(400, "expired", "the credential's expiry is in the past", "expiry")
    if asked is not None and asked > longest:
        raise Refused(400, "expiry_too_far", f"a credential is valid {cfg.credential_max_lifetime_s} s at most",
                      "expiry")  # fmt: skip
    held = int(store.get("SELECT COUNT(*) FROM issued_credentials WHERE csp=?", csp)[0])
    if held >= cfg.credential_quota:  # bounded: no CSP fills the CH's store
        raise Refused(403, "quota_exceeded", f"{csp} holds {held} credentials of this CH, the most it may")
    # every credential expires (none asked: the longest), so that retention drops it in the end
    out = Issued(new_id(cfg.party_id, store), csp, kind, longest if asked is None else asked)
    store.exec(
        "INSERT INTO issued_credentials VALUES(?,?,?,?,?,?)", out.token_uid, csp, kind, body["request_id"],
        out.expiry, int(now),
    )  # fmt: skip
    return out


def _repeat(cfg: EndpointConfig, store: Store, body: dict[str, Any], csp: str) -> Issued | None:
    """The credential a request issued already, its stored answer lost (a crash before it was
    kept): the same one, also once the asked expiry has passed; None for a new request. Another
    body under the same key is 409 `conflict` — an expiry the CH chose (none was asked: the
    longest from the issue) tells a request without one from one that asked for it."""
    q = "SELECT token_uid, token_type, expiry, issued FROM issued_credentials WHERE csp=? AND request_id=?"
    row = store.one(q, csp, body["request_id"])
    if row is None:
        return None
    asked = body.get("expiry")
    chosen = row[2] is None or row[2] == row[3] + cfg.credential_max_lifetime_s
    same_expiry = row[2] == asked if asked is not None else chosen
    if row[1] != body["token_type"] or not same_expiry:
        raise Refused(409, "conflict", f"request {body['request_id']} was already received with another body")
    return Issued(str(row[0]), csp, str(row[1]), row[2])


def canonical(token_uid: str) -> str | None:
    """A contract id in its canonical spelling (any standard one read), or None for another token."""
    try:
        return str(gid.parse(token_uid, expect="C"))
    except gid.GidError:
        return None


def owner(store: Store, token_uid: str) -> str | None:
    """The CSP a credential this CH issued belongs to (any standard spelling), or None."""
    cid = canonical(token_uid)
    if cid is None:
        return None
    row = store.one("SELECT csp FROM issued_credentials WHERE token_uid=?", cid)
    return None if row is None else str(row[0])


def carried(message: str, body: dict[str, Any]) -> list[str]:
    """The token uids a roaming request carries (a list's entries that remove a token: none)."""
    if message == "ContractCertificate":
        return [body["contract_id"]] if "contract_id" in body else []
    if message == "TokenList":
        return [t["token_uid"] for t in body["tokens"] if t["auth_status"] != "invalid"]
    return [body["token_uid"]] if isinstance(body.get("token_uid"), str) else []


def note_routes(store: Store, digest: Callable[[str], str], pair: tuple[str, str], cso: str,
                uids: list[str], now: float) -> None:  # fmt: skip
    """The CH passed these uids between `pair` (origin, destination): for each credential it
    issued to one of the two, the other one, a CSO (`cso`), now holds it and may delete it."""
    for uid in uids:
        cid, issued_to = canonical(uid), owner(store, uid)
        if cid is not None and issued_to is not None and issued_to in pair and issued_to != cso:
            store.exec("INSERT OR REPLACE INTO credential_routes VALUES(?,?,?)", digest(cid), cso, int(now))


def may_delete(store: Store, digest: Callable[[str], str], token_uid: str, origin: str) -> bool:
    """M10 of a credential this CH issued is its owner CSP's, or a CSO's it was passed to (which
    holds it); any uid else (not ours, no longer held) is no credential of ours to guard."""
    issued_to = owner(store, token_uid)
    if issued_to is None or issued_to == origin:
        return True
    cid = canonical(token_uid)
    assert cid is not None  # owner() found it
    return store.one("SELECT 1 FROM credential_routes WHERE digest=? AND cso=?", digest(cid), origin) is not None


def claims_foreign(store: Store, ch_party: str, token_uid: str, csp: str) -> bool:
    """Whether `csp` lists a credential the CH issued to another CSP: the CH refuses such a
    list. (One it no longer holds — purged after its expiry — is the CSP's business.)"""
    if owner_prefix(token_uid) != ch_party:
        return False
    issued_to = owner(store, token_uid)
    return issued_to is not None and issued_to != csp


def forget(store: Store, digest: Callable[[str], str], token_uid: str) -> int:
    """M10 at the CH: the credential, the stored answer that holds it and where it was passed
    to; the rows touched."""
    cid = canonical(token_uid)
    if cid is None:
        return 0
    with store.tx() as db:
        row = db.execute("SELECT csp, request_id FROM issued_credentials WHERE token_uid=?", (cid,)).fetchone()
        if row is None:
            return 0
        db.execute("DELETE FROM idempotency WHERE origin=? AND message='IssueCredential' AND key=?",
                   (row[0], str(row[1])))  # fmt: skip
        db.execute("DELETE FROM credential_routes WHERE digest=?", (digest(cid),))
        return int(db.execute("DELETE FROM issued_credentials WHERE token_uid=?", (cid,)).rowcount)


def drop_route(store: Store, digest: Callable[[str], str], token_uid: str, cso: str) -> int:
    """M10 asked by a CSO that held a credential: only its route row goes (it no longer holds
    it); the credential is its owner CSP's customer's, which a CSO cannot end. The rows dropped."""
    cid = canonical(token_uid)
    if cid is None:
        return 0
    q = "DELETE FROM credential_routes WHERE digest=? AND cso=?"
    with store.tx() as db:
        return int(db.execute(q, (digest(cid), cso)).rowcount)


def purge(store: Store, digest: Callable[[str], str], cut: int, max_lifetime_s: int) -> int:
    """Retention: a credential expired before `cut` (now − retention_s) is dropped; one issued
    before every credential got an expiry lives `max_lifetime_s` at most (else it would never
    go, and count against its CSP's quota for good)."""
    n = 0
    q = "SELECT token_uid FROM issued_credentials WHERE expiry < ? OR (expiry IS NULL AND issued + ? < ?)"
    for (uid,) in store.all(q, cut, max_lifetime_s, cut):
        n += forget(store, digest, str(uid))
    return n


class Holder(Protocol):
    """What the CSP side needs of its endpoint (CspEndpoint)."""

    cfg: EndpointConfig
    store: Store

    def clock(self) -> float: ...

    async def send(self, message: str, body: dict[str, Any], to: str, *, origin: str = "") -> dict[str, Any]: ...

    def add_customer(self, token_uid: str, *, contract_id: str | None = None, status: str = "accepted",
                     expiry: int | None = None) -> None: ...  # fmt: skip


async def request(csp: Holder, token_type: str, request_id: int, expiry: int | None) -> dict[str, Any]:
    """The CSP asks its CH for a credential and makes it a customer's (the answer): authorized,
    listed (R4-2) and billed like its own; a deletion (M10) started here reaches the CH by the
    credential's prefix (`issuer`). Peer to peer there is no CH to issue: refused by name."""
    ch = csp.cfg.clearing_house
    if csp.cfg.mode == "peer_to_peer" or ch is None:
        raise Refused(403, "wrong_mode", "peer to peer, the CSP issues its own credentials")
    body: dict[str, Any] = {"request_id": request_id, "token_type": token_type}
    if expiry is not None:
        body["expiry"] = expiry
    answer = await csp.send("IssueCredential", body, ch)
    uid = str(answer["token_uid"])
    if owner_prefix(uid) != ch:  # a CH issues under its own provider id only
        raise Refused(502, "bad_credential", f"{ch} issued {uid}, not under its own provider id")
    # no `shared` row for the CH (the retention would purge it): a deletion finds it by the
    # credential's prefix (`issuer`)
    csp.add_customer(uid, contract_id=answer.get("contract_id"), expiry=answer.get("expiry"))
    return answer


def issuer(csp: Holder, token_uid: str, skip: str) -> str | None:
    """M10 at a CSP: the CH that issued a credential under its prefix (told of the deletion
    whenever one is configured, for as long as the credential lives; not the sender `skip`),
    else None."""
    ch = csp.cfg.clearing_house
    return ch if ch is not None and ch != skip and owner_prefix(token_uid) == ch else None


def canonical_if_issued(csp: Holder, token_uid: str) -> str:
    """A credential of the CSP's CH in the canonical spelling it was issued (and is stored) in,
    however it was spelt; any other token as it is."""
    ch = csp.cfg.clearing_house
    return (canonical(token_uid) or token_uid) if ch is not None and owner_prefix(token_uid) == ch else token_uid


def owner_prefix(token_uid: str) -> str | None:
    """The provider (operator id) a contract id is issued under, or None for another token."""
    try:
        return gid.parse(token_uid, expect="C").operator
    except gid.GidError:
        return None

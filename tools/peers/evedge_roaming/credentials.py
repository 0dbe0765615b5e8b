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

Sans I/O but for the CSP's request (`request`): the CH's side is a function of its store and
configuration, called by the CH's handler inside the request's transaction.
"""

from __future__ import annotations

import secrets
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
    expiry: int | None

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
    expiry = body.get("expiry")
    if expiry is not None and expiry <= now:
        raise Refused(400, "expired", "the credential's expiry is in the past", "expiry")
    q = "SELECT token_uid, token_type, expiry FROM issued_credentials WHERE csp=? AND request_id=?"
    row = store.one(q, csp, body["request_id"])
    if row is not None:  # issued, but its stored answer was lost (a crash before it was kept)
        if (row[1], row[2]) != (kind, expiry):
            raise Refused(409, "conflict", f"request {body['request_id']} was already received with another body")
        return Issued(str(row[0]), csp, kind, expiry)
    out = Issued(new_id(cfg.party_id, store), csp, kind, expiry)
    store.exec(
        "INSERT INTO issued_credentials VALUES(?,?,?,?,?,?)", out.token_uid, csp, kind, body["request_id"], expiry,
        int(now),
    )  # fmt: skip
    return out


def owner(store: Store, token_uid: str) -> str | None:
    """The CSP a credential this CH issued belongs to (any standard spelling), or None."""
    try:
        cid = str(gid.parse(token_uid, expect="C"))
    except gid.GidError:
        return None
    row = store.one("SELECT csp FROM issued_credentials WHERE token_uid=?", cid)
    return None if row is None else str(row[0])


def claims_foreign(store: Store, ch_party: str, token_uid: str, csp: str) -> bool:
    """Whether `csp` lists a credential the CH issued to another CSP: the CH refuses such a
    list. (One it no longer holds — purged after its expiry — is the CSP's business.)"""
    if owner_prefix(token_uid) != ch_party:
        return False
    issued_to = owner(store, token_uid)
    return issued_to is not None and issued_to != csp


def forget(store: Store, token_uid: str) -> int:
    """M10 at the CH: the credential and the stored answer that holds it; the rows touched."""
    try:
        cid = str(gid.parse(token_uid, expect="C"))
    except gid.GidError:
        return 0
    with store.tx() as db:
        row = db.execute("SELECT csp, request_id FROM issued_credentials WHERE token_uid=?", (cid,)).fetchone()
        if row is None:
            return 0
        db.execute("DELETE FROM idempotency WHERE origin=? AND message='IssueCredential' AND key=?",
                   (row[0], str(row[1])))  # fmt: skip
        return int(db.execute("DELETE FROM issued_credentials WHERE token_uid=?", (cid,)).rowcount)


def purge(store: Store, cut: int) -> int:
    """Retention: a credential expired before `cut` (now − retention_s) is dropped."""
    n = 0
    for (uid,) in store.all("SELECT token_uid FROM issued_credentials WHERE expiry IS NOT NULL AND expiry < ?", cut):
        n += forget(store, str(uid))
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
    listed (R4-2) and billed like its own; the CH is recorded as holding it, so that a deletion
    (M10) started here reaches it. Peer to peer there is no CH to issue: refused by name."""
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
    with csp.store.tx() as db:
        csp.add_customer(uid, contract_id=answer.get("contract_id"), expiry=answer.get("expiry"))
        db.execute("INSERT OR REPLACE INTO shared VALUES(?,?,?)", (uid, ch, int(csp.clock())))
    return answer


def owner_prefix(token_uid: str) -> str | None:
    """The provider (operator id) a contract id is issued under, or None for another token."""
    try:
        return gid.parse(token_uid, expect="C").operator
    except gid.GidError:
        return None

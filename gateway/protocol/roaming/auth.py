"""Platform login tokens (R1-1) and HMAC source authentication of every roaming request.

Every request carries these headers (lower case, as HTTP/3 wants them):

    x-ev-party   global id of the sending party (its operator id, e.g. DE*ABC*O)
    x-ev-origin  global id of the party that wrote the request ("" = x-ev-party); differs
                 from x-ev-party only when a clearing house relays it
    x-ev-to      global id of the party the request is meant for ("" = the receiver or,
                 at a clearing house, every counterpart: docs/roaming.md)
    x-ev-ts      Unix time of the sender, integer seconds
    x-ev-nonce   16 to 64 characters of [A-Za-z0-9_-], never reused by the sender
    x-ev-mac     hex HMAC-SHA256(shared secret, canonical request)
    authorization  "Bearer <token>" from PlatformLogin (every path but the login itself)

    canonical request = method \n path \n party \n origin \n to \n ts \n nonce \n hex(sha256(body))

The receiver rejects a timestamp more than `MAX_SKEW` seconds away from its clock and a
nonce it has seen from that party within the window (it remembers nonces for twice the
window, so a replay is always either stale or a repeat). Tokens are random, 256 bits;
stores keep only their SHA-256, so a leaked database does not leak live tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.protocol import gid

MAX_SKEW: Final = 300
NONCE_KEEP: Final = 2 * MAX_SKEW
DEFAULT_TOKEN_LIFETIME: Final = 20 * 60

H_PARTY: Final = "x-ev-party"
H_ORIGIN: Final = "x-ev-origin"
H_TO: Final = "x-ev-to"
H_TS: Final = "x-ev-ts"
H_NONCE: Final = "x-ev-nonce"
H_MAC: Final = "x-ev-mac"
H_AUTH: Final = "authorization"

_NONCE: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
_MAC: Final = re.compile(r"[0-9a-f]{64}")


class AuthError(Exception):
    """A request is not authenticated. `cause` is a stable code, `status` the HTTP status."""

    def __init__(self, cause: str, detail: str, status: int = 401) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail
        self.status = status

    def to_json(self) -> dict[str, str]:
        return {"error": self.cause, "detail": self.detail}


@dataclass(frozen=True)
class Route:
    """Who signs a request (`party`), who wrote it (`origin`, "" = party) and who it is for."""

    party: str
    origin: str = ""
    to: str = ""


def canonical(method: str, path: str, route: Route, *, ts: int, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    parts = (method.upper(), path, route.party, route.origin, route.to, str(ts), nonce, digest)
    return "\n".join(parts).encode("utf-8")


def mac(secret: bytes, method: str, path: str, route: Route, *, ts: int, nonce: str, body: bytes) -> str:
    return hmac.new(secret, canonical(method, path, route, ts=ts, nonce=nonce, body=body), hashlib.sha256).hexdigest()


def sign(
    secret: bytes, method: str, path: str, route: Route, body: bytes, *, now: float, nonce: str | None = None
) -> dict[str, str]:
    """The authentication headers of one request."""
    ts = int(now)
    nonce = nonce or secrets.token_urlsafe(18)
    return {
        H_PARTY: route.party,
        H_ORIGIN: route.origin,
        H_TO: route.to,
        H_TS: str(ts),
        H_NONCE: nonce,
        H_MAC: mac(secret, method, path, route, ts=ts, nonce=nonce, body=body),
    }


@dataclass(frozen=True)
class Signed:
    """The checked authentication headers of a request."""

    route: Route
    ts: int
    nonce: str

    @property
    def party(self) -> str:
        return self.route.party

    @property
    def origin(self) -> str:
        """The party that wrote the request."""
        return self.route.origin or self.route.party


def claimed_party(headers: dict[str, str]) -> str:
    """The sender named by a request, syntax checked (before its secret is looked up)."""
    party = headers.get(H_PARTY)
    if not party:
        raise AuthError("missing_party", f"header {H_PARTY} is absent")
    try:
        gid.parse(party, expect="O")
    except gid.GidError as exc:
        raise AuthError("bad_party", f"{H_PARTY}: {exc}", status=400) from None
    return party


def verify(headers: dict[str, str], secret: bytes, method: str, path: str, *, body: bytes, now: float) -> Signed:
    """Check the MAC and the timestamp of a request (the nonce is the store's to remember)."""
    party = claimed_party(headers)
    route = Route(party, headers.get(H_ORIGIN, ""), headers.get(H_TO, ""))
    for name, value in ((H_ORIGIN, route.origin), (H_TO, route.to)):
        if value:
            try:
                gid.parse(value, expect="O")
            except gid.GidError as exc:
                raise AuthError("bad_party", f"{name}: {exc}", status=400) from None
    ts_text, nonce, got = headers.get(H_TS), headers.get(H_NONCE), headers.get(H_MAC)
    if ts_text is None or nonce is None or got is None:
        missing = [h for h in (H_TS, H_NONCE, H_MAC) if h not in headers]
        raise AuthError("missing_signature", f"header(s) {', '.join(missing)} absent")
    if not ts_text.isdigit() or len(ts_text) > 12:
        raise AuthError("bad_timestamp", f"{H_TS} must be Unix seconds")
    if not _NONCE.fullmatch(nonce):
        raise AuthError("bad_nonce", f"{H_NONCE} must be 16-64 characters of [A-Za-z0-9_-]")
    if not _MAC.fullmatch(got):
        raise AuthError("bad_mac", f"{H_MAC} must be 64 lower-case hex digits")
    ts = int(ts_text)
    want = mac(secret, method, path, route, ts=ts, nonce=nonce, body=body)
    if not hmac.compare_digest(want, got):
        raise AuthError("bad_mac", "HMAC does not verify under the secret shared with " + party)
    if abs(now - ts) > MAX_SKEW:
        raise AuthError("stale_timestamp", f"timestamp {ts} is {int(now - ts)} s from the receiver's clock")
    return Signed(route, ts, nonce)


class NonceStore(Protocol):
    def remember_nonce(self, party: str, nonce: str, ts: int, now: float) -> bool:
        """Record a nonce; False if the party used it within the window already."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer(headers: dict[str, str]) -> str:
    value = headers.get(H_AUTH)
    if not value:
        raise AuthError("missing_token", "no authorization header; log in with PlatformLogin first")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("bad_token", "authorization must be 'Bearer <token>'")
    return token


def check_token(record: tuple[str, int] | None, party: str, now: float) -> None:
    """Check a stored (party, expiry) against the party that signed the request."""
    if record is None:
        raise AuthError("unknown_token", "token unknown (never issued or purged); log in again")
    owner, expiry = record
    if now >= expiry:
        raise AuthError("token_expired", f"token expired at {expiry}; log in again")
    if owner != party:
        raise AuthError("token_party_mismatch", f"token was issued to {owner}, request signed by {party}", status=403)


def password_ok(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))

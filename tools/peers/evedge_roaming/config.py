"""Configuration of one roaming endpoint: a dataclass, loadable from TOML.

    party_id = "DE*CSO*O"
    role = "cso"                      # cso | csp | ch
    mode = "clearing_house"           # peer_to_peer | clearing_house | mixed
    clearing_house = "DE*CHX*O"       # the CH's party id (clearing_house and mixed modes)
    host = "127.0.0.1"
    port = 4433
    db = "data/cso.sqlite"
    cert = "data/pki/cso.pem"
    key = "data/pki/cso.key"
    ca = "data/pki/ca.pem"
    retention_s = 2592000             # personal data (token uids, contract ids) kept 30 days
    token_lifetime_s = 1200           # PlatformLogin tokens: 20 minutes
    credential_quota = 100000         # CH: credentials held per CSP (IssueCredential)
    credential_max_lifetime_s = 63072000  # CH: longest credential validity, 2 years (also the default)
    max_list_pages = 4096             # CSO, visited CSP: pages of one token list version (256 tokens
                                      # each: ~1 M tokens); more is 413 too_large
    currency = "EUR"

    [[party]]                         # every party this endpoint talks to or accepts
    party_id = "DE*CSP*O"
    role = "csp"                      # cso | csp | ch | site (a gateway of this CSO)
    host = "127.0.0.1"
    port = 4434
    password = "..."                  # the pair's login password (both directions)
    secret = "hex..."                 # the pair's HMAC key (both directions)
    # CSP↔CSP roaming (docs/roaming.md "CSP↔CSP roaming (a visited CSP)"), on a `csp` party:
    visited = false                   # at a home CSP: this CSP is our visited CSP; toward us it
                                      # acts as the CSO does (its CSOs' locations, status, tariffs,
                                      # AuthorizeRoaming, SessionUpdate, PutSdr; we send it our
                                      # token list and remote commands for its CSOs' EVSEs)
    partner = false                   # at a visited CSP: this CSP is a home CSP roaming through
                                      # us (its token list goes into ours; its cards are asked of it)
    serves = ["DE*HC3*O"]             # at a CSO: the home CSPs (providers) this CSP brings, so a
                                      # contract id of theirs is asked of this CSP (privacy routing)

Relative paths are relative to the TOML file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway import schema
from gateway.protocol import gid
from gateway.protocol.roaming.auth import DEFAULT_TOKEN_LIFETIME

ROLES = ("cso", "csp", "ch")
PARTY_ROLES = (*ROLES, "site")
"""A `site` party is a site gateway of the CSO itself (mixed mode: it asks its CSO endpoint to
authorize unknown tokens online, docs/roaming.md "Sites behind the CSO endpoint")."""
MODES = ("peer_to_peer", "clearing_house", "mixed")
TOKEN_DISCOVERY = ("private", "ask_every_csp")
#: the largest `pages` a TokenList can state (the schema's field)
MAX_PAGES = int(schema.FIELD_BY_NAME["pages"].max)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PartyConfig:
    """A party this endpoint knows: where it listens and the secrets the pair shares."""

    party_id: str
    role: str
    password: str
    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    visited: bool = False
    """At a home CSP: this `csp` party is our visited CSP (it acts toward us as a CSO)."""
    partner: bool = False
    """At a visited CSP: this `csp` party is a home CSP that roams through us."""
    serves: tuple[str, ...] = ()
    """At a CSO: the providers (party ids) whose customers this `csp` party brings as a visited CSP."""

    @property
    def secret_bytes(self) -> bytes:
        return bytes.fromhex(self.secret)

    @property
    def acts_as(self) -> str:
        """The role this party plays toward us: a visited CSP is the CSO of its partners."""
        return "cso" if self.role == "csp" and self.visited else self.role


@dataclass(frozen=True)
class EndpointConfig:
    party_id: str
    role: str
    db: Path
    cert: Path
    key: Path
    ca: Path
    mode: str = "peer_to_peer"
    clearing_house: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    retention_s: int = 30 * 86400
    token_lifetime_s: int = DEFAULT_TOKEN_LIFETIME
    currency: str = "EUR"
    #: where a CSO (or the CH) sends a card number whose home CSP it does not know — not from
    #: a token list (R4-2), not a contract id with its provider prefix: `private` (default)
    #: nowhere but through the CH, which knows the homes from the lists it passed on; the
    #: answer is `unknown` otherwise. `ask_every_csp` asks each CSP in turn (every one of them
    #: then sees the card number: only for a network whose CSPs all agreed to it).
    token_discovery: str = "private"
    #: CH only (docs/roaming.md "Credentials issued by the clearing house"): at most this many
    #: credentials issued to one CSP held at once (deleted ones free a place; expired ones once
    #: purged, `retention_s` after their expiry), so that no CSP fills the CH's store
    credential_quota: int = 100_000
    #: CH only: the longest validity of a credential it issues (default 2 years, as a contract
    #: certificate's); a request without `expiry` gets this one, a later expiry is refused
    credential_max_lifetime_s: int = 2 * 365 * 86400
    #: CSO and visited CSP: the pages (`TOKEN_PAGE` tokens each) of one version of a token list
    #: received (R4-2); more is 413 `too_large`. Pages are staged until a version is complete, so
    #: this bounds what one sender can make us hold; no fixed cap on a list, a configured one
    #: (default ~1 M tokens; a visited CSP's own list holds its partners' too: a CSO's bound
    #: must hold it)
    max_list_pages: int = 4096
    parties: tuple[PartyConfig, ...] = field(default=())

    def __post_init__(self) -> None:
        try:
            gid.parse(self.party_id, expect="O")
            for p in self.parties:
                gid.parse(p.party_id, expect="O")
        except gid.GidError as exc:
            raise ConfigError(str(exc)) from None
        if self.role not in ROLES or any(p.role not in PARTY_ROLES for p in self.parties):
            raise ConfigError(f"role must be one of {ROLES} (a party's also 'site')")
        if self.role != "cso" and self.of_role("site"):
            raise ConfigError("only a CSO endpoint has site parties")
        for p in self.parties:
            if (p.visited or p.partner) and (p.role != "csp" or self.role != "csp" or p.visited == p.partner):
                raise ConfigError(f"{p.party_id}: visited/partner are for one CSP party of a CSP, not both")
            if p.serves and (p.role != "csp" or self.role != "cso"):
                raise ConfigError(f"{p.party_id}: serves is for a CSP party of a CSO")
            try:
                for s in p.serves:
                    gid.parse(s, expect="O")
            except gid.GidError as exc:
                raise ConfigError(f"{p.party_id}: serves: {exc}") from None
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.role != "ch" and self.mode != "peer_to_peer":
            ch = self.party(self.clearing_house or "")
            if ch is None or ch.role != "ch":
                raise ConfigError(f"mode {self.mode} needs clearing_house = the party id of a configured CH")
        if self.token_discovery not in TOKEN_DISCOVERY:
            raise ConfigError(f"token_discovery must be one of {TOKEN_DISCOVERY}, not {self.token_discovery!r}")
        if self.token_lifetime_s <= 0 or self.retention_s <= 0:
            raise ConfigError("token_lifetime_s and retention_s must be positive")
        if self.credential_quota <= 0 or self.credential_max_lifetime_s <= 0:
            raise ConfigError("credential_quota and credential_max_lifetime_s must be positive")
        if not 0 < self.max_list_pages <= MAX_PAGES:
            raise ConfigError(f"max_list_pages must be 1…{MAX_PAGES} (a TokenList's page count field)")

    def party(self, party_id: str) -> PartyConfig | None:
        for p in self.parties:
            if p.party_id == party_id:
                return p
        return None

    def of_role(self, role: str) -> list[PartyConfig]:
        return [p for p in self.parties if p.role == role]

    def counterparts(self, role: str) -> list[PartyConfig]:
        """The parties that play `role` toward us (a visited CSP plays the CSO)."""
        return [p for p in self.parties if p.acts_as == role]

    def provider(self, party_id: str) -> PartyConfig | None:
        """The CSP party that answers for the customers of provider `party_id`: that provider,
        or (at a CSO) the visited CSP that `serves` it."""
        p = self.party(party_id)
        if p is not None:
            return p if p.role == "csp" else None
        return next((p for p in self.of_role("csp") if party_id in p.serves), None)

    def partners(self) -> list[PartyConfig]:
        """The home CSPs that roam through us (we are their visited CSP)."""
        return [p for p in self.parties if p.partner]

    def with_port(self, port: int) -> EndpointConfig:
        return replace(self, port=port)


def load(path: Path) -> EndpointConfig:
    data: dict[str, Any] = tomllib.loads(path.read_text())
    base = path.parent
    known = {f.name for f in fields(EndpointConfig)}
    unknown = set(data) - known - {"party"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    parties = tuple(PartyConfig(**(p | {"serves": tuple(p.get("serves", ()))})) for p in data.pop("party", []))
    for k in ("db", "cert", "key", "ca"):
        if k in data:
            data[k] = base / data[k]
    return EndpointConfig(**data, parties=parties)


def dump(cfg: EndpointConfig, relative_to: Path | None = None) -> str:
    """TOML text of a configuration (what the testbed writes and `load` reads back); with
    `relative_to` (the folder the file goes to) its paths are written relative to it, as
    `load` reads them."""

    def value(v: object) -> str:
        if isinstance(v, Path) and relative_to is not None:
            v = Path(os.path.relpath(v.absolute(), relative_to.absolute()))
        if isinstance(v, str | Path):
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name != "parties" and v is not None:
            lines.append(f"{f.name} = {value(v)}")
    for p in cfg.parties:
        lines.append("\n[[party]]")
        lines += [f"{f.name} = {value(getattr(p, f.name))}" for f in fields(p) if getattr(p, f.name) != f.default]
    return "\n".join(lines) + "\n"

"""Global identifiers (IEC 63119-2, B12): one syntax for operators, sites, EVSEs, tokens, sessions, SDRs.

    <country>*<party>*<type><local>      e.g.  DE*ABC*E1234-1   (an EVSE of operator ABC in Germany)

- country: two upper-case letters (ISO 3166-1 alpha-2);
- party: three upper-case letters or digits (the operator's or provider's party id);
- type: one letter — O operator, L location/site, E EVSE, C contract/token, S session, R SDR;
- local: 1 to 32 characters of A–Z, a–z, 0–9 and '-' (for O it may be empty).

The style is that of ISO 15118 EVSE ids and eMAIDs with a type letter, so that the kind of
an identifier is visible and checked wherever it is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

TYPES: Final = {"O": "operator", "L": "location", "E": "evse", "C": "contract", "S": "session", "R": "sdr"}
_RE: Final = re.compile(r"([A-Z]{2})\*([A-Z0-9]{3})\*([OLECSR])([A-Za-z0-9-]{0,32})")


class GidError(ValueError):
    """An identifier does not follow the syntax; the message says which part is wrong."""


@dataclass(frozen=True)
class Gid:
    country: str
    party: str
    type: str
    local: str

    def __str__(self) -> str:
        return f"{self.country}*{self.party}*{self.type}{self.local}"

    @property
    def operator(self) -> str:
        """The identifier of the party that issued this one."""
        return f"{self.country}*{self.party}*O"


def parse(text: object, expect: str | None = None) -> Gid:
    """Parse and check a global id; `expect` is the required type letter, if any."""
    if not isinstance(text, str):
        raise GidError(f"global id must be a string, not {type(text).__name__}")
    m = _RE.fullmatch(text)
    if m is None:
        raise GidError(f"{text[:60]!r} is not a global id (expected CC*PPP*T<local>, e.g. DE*ABC*E1234)")
    gid = Gid(*m.groups())
    if expect is not None and gid.type != expect:
        raise GidError(f"{text!r} is a {TYPES[gid.type]} id, expected a {TYPES[expect]} id")
    if gid.type != "O" and not gid.local:
        raise GidError(f"{text!r} has no local part")
    return gid


def make(country: str, party: str, type_: str, local: str = "") -> str:
    """Build a global id and check it by parsing it back."""
    return str(parse(f"{country}*{party}*{type_}{local}", expect=type_))


_BAD = re.compile(r"[^A-Za-z0-9-]")


def evse_gid(site_id: str, device_id: str, evse: int = 1) -> str:
    """The global EVSE id of one board's EVSE: the site's country and party, type E, local
    part `<site local>-<device id>-<evse>` (characters outside [A-Za-z0-9-] become '-')."""
    site = parse(site_id, expect="L")
    local = _BAD.sub("-", f"{site.local}-{device_id}-{evse}")[:32]
    return make(site.country, site.party, "E", local)

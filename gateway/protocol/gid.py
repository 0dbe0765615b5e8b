"""Global identifiers (IEC 63119-2, B12): one syntax for operators, sites, EVSEs, tokens, sessions, SDRs.

    <country>*<party>*<type><local>      e.g.  DE*ABC*E1234-1   (an EVSE of operator ABC in Germany)

- country: two upper-case letters (ISO 3166-1 alpha-2);
- party: three upper-case letters or digits (the operator's or provider's party id);
- type: one letter — O operator, L location/site, E EVSE, C contract/token, S session, R SDR;
- local: 1 to 32 characters of A–Z, a–z, 0–9 and '-' (for O it may be empty).

This is the canonical form, the one stored and compared. `parse` also reads the standard
spellings of ISO 15118-2 Annex H / eMI3 (DIN SPEC 91286) and returns them in canonical form:

- EVSE ids with `*` inside the power outlet id, or with no separator at all:
  ``DE*AB7*E840*6487`` and ``DEAB7E8406487`` are both ``DE*AB7*E8406487`` (the separators
  are presentation only, so the ones inside the local part are dropped);
- eMAIDs (contract ids) with `-`, `*` or no separator, with or without the check digit:
  ``DE8AACA2B3C4D5L``, ``DE-8AA-CA2B3C4D5-L``, ``DE*8AA*CA2B3C4D5*L`` are all
  ``DE*8AA*CA2B3C4D5``. A check digit present is verified (`check_digit`, the eMI3
  algorithm) and a wrong one is refused; canonical ids carry none (`emaid()` adds it back).

Country, party and type are upper case; the local part keeps its case (the project's own
local parts, session and device ids, are case-sensitive).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Final

TYPES: Final = {"O": "operator", "L": "location", "E": "evse", "C": "contract", "S": "session", "R": "sdr"}
LOCAL_MAX: Final = 32
_HEAD: Final = r"([A-Z]{2})([*-]?)([A-Z0-9]{3})\2([OLECSR])"
_RE: Final = re.compile(_HEAD + r"([A-Za-z0-9*-]{0,40})")
# an eMAID's 9-character instance (the type letter C and 8 more) and its check digit
_EMAID_CHECKED: Final = re.compile(r"([A-Za-z0-9]{8})[*-]?([A-Za-z0-9])")


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

    def emaid(self) -> str:
        """ISO 15118-2 form of a standard contract id (no separator, check digit appended)."""
        if self.type != "C" or not _is_emaid_instance(self.local):
            raise GidError(f"{self} is not an eMAID (C and an 8-character instance)")
        body = f"{self.country}{self.party}C{self.local}"
        return body + check_digit(body)


def _is_emaid_instance(local: str) -> bool:
    return len(local) == 8 and local.isascii() and local.isalnum()


def parse(text: object, expect: str | None = None) -> Gid:
    """Parse, check and normalise a global id; `expect` is the required type letter, if any."""
    if not isinstance(text, str):
        raise GidError(f"global id must be a string, not {type(text).__name__}")
    m = _RE.fullmatch(text) if len(text) <= 64 else None
    if m is None:
        raise GidError(f"{text[:60]!r} is not a global id (expected CC*PPP*T<local>, e.g. DE*ABC*E1234)")
    country, sep, party, type_, raw = m.groups()
    local = raw
    if type_ == "C":
        local = _contract_local(text, sep, country, party, raw)
    if "*" in local:
        local = local.replace("*", "")  # ISO 15118 EVSE ids: '*' inside the outlet id is presentation
    if len(local) > LOCAL_MAX:
        raise GidError(f"{text[:60]!r}: local part longer than {LOCAL_MAX} characters")
    gid = Gid(country, party, type_, local)
    if expect is not None and gid.type != expect:
        raise GidError(f"{text!r} is a {TYPES[gid.type]} id, expected a {TYPES[expect]} id")
    if gid.type != "O" and not gid.local:
        raise GidError(f"{text!r} has no local part")
    return gid


def _contract_local(text: str, sep: str, country: str, party: str, raw: str) -> str:
    """The local part of a contract id without its check digit, which is verified.

    A check digit is recognised only after a standard 9-character eMAID instance: with a
    separator in the separated forms (…CA2B3C4D5-L), as the 15th character without one."""
    m = _EMAID_CHECKED.fullmatch(raw)
    if m is None:
        return raw
    instance, digit = m.groups()
    has_sep = len(raw) == 10
    if (sep and not has_sep) or (not sep and has_sep):
        return raw
    expected = check_digit(f"{country}{party}C{instance}")
    if digit.upper() != expected:
        raise GidError(f"{text[:60]!r}: eMAID check digit is {digit!r}, expected {expected!r}")
    return instance


# ---- the eMI3 / ISO 15118-1 check digit ("Check Digit Calculation for Contract-IDs")
# Each character's value v (0-9, A-Z = 0..35) is split into a pair over GF(2) (v // 18,
# v // 9 mod 2) and a pair over GF(3) (v // 3 mod 3, v mod 3). The pair of the i-th
# character (from 1) is multiplied by the i-th power of P1 (mod 2) and P2 (mod 3); the sums
# give the check character's pairs, the GF(3) one solved so the whole id sums to a fixed
# value. It catches single errors, adjacent and jump transpositions, twin and jump twin errors.
_M = tuple[tuple[int, int], tuple[int, int]]
_P1: Final[_M] = ((0, 1), (1, 1))
_P2: Final[_M] = ((0, 1), (1, 2))
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _matmul(a: _M, b: _M, p: int) -> _M:
    (a00, a01), (a10, a11) = a
    (b00, b01), (b10, b11) = b
    return (
        ((a00 * b00 + a01 * b10) % p, (a00 * b01 + a01 * b11) % p),
        ((a10 * b00 + a11 * b10) % p, (a10 * b01 + a11 * b11) % p),
    )


def check_digit(emaid14: str) -> str:
    """The check character of a 14-character eMAID (country, provider, instance; any case)."""
    text = emaid14.upper()
    if len(text) != 14 or any(ch not in _ALPHABET for ch in text):
        raise GidError(f"{emaid14[:40]!r}: a check digit is computed over 14 characters of [A-Z0-9]")
    m1, m2 = _P1, _P2
    q1 = q2 = r1 = r2 = 0
    for ch in text:
        v = _ALPHABET.index(ch)
        a, b = v // 18, (v // 9) % 2
        c, d = (v // 3) % 3, v % 3
        q1, q2 = (q1 + a * m1[0][0] + b * m1[1][0]) % 2, (q2 + a * m1[0][1] + b * m1[1][1]) % 2
        r1, r2 = (r1 + c * m2[0][0] + d * m2[1][0]) % 3, (r2 + c * m2[0][1] + d * m2[1][1]) % 3
        m1, m2 = _matmul(m1, _P1, 2), _matmul(m2, _P2, 3)
    t1 = -r2 % 3
    t2 = -(r1 + t1) % 3
    return _ALPHABET[18 * q1 + 9 * q2 + 3 * t1 + t2]


def canonical(text: object, expect: str | None = None) -> str:
    """The canonical spelling of a global id in any accepted form."""
    return str(parse(text, expect))


def make(country: str, party: str, type_: str, local: str = "") -> str:
    """Build a global id and check it by parsing it back."""
    return str(parse(f"{country}*{party}*{type_}{local}", expect=type_))


_BAD = re.compile(r"[^A-Za-z0-9-]")
_HASH_LEN: Final = 7


def evse_gid(site_id: str, device_id: str, evse: int = 1) -> str:
    """The global EVSE id of one board's EVSE: the site's country and party, type E, local
    part `<site local>-<device id>-<evse>`.

    Characters outside [A-Za-z0-9-] become '-'. When that changed the text or it is longer
    than 32 characters, the local part is cut and ends with '-' and a 7-character hash of
    the exact (site, device, evse): two devices never share an id because their names were
    long or differed only in such characters."""
    site = parse(site_id, expect="L")
    raw = f"{site.local}-{device_id}-{evse}"
    local = _BAD.sub("-", raw)
    if local != raw or len(local) > LOCAL_MAX:
        digest = hashlib.sha256(f"{site}\0{device_id}\0{evse}".encode()).digest()
        tag = base64.b32encode(digest).decode("ascii")[:_HASH_LEN]
        local = f"{local[: LOCAL_MAX - _HASH_LEN - 1]}-{tag}"
    return make(site.country, site.party, "E", local)

"""R1-2: the operator's records of its sites and of their EVSEs' connectors: what the roaming
partners see as a location (`Csms.set_site`, `Csms.set_connector`; published by
evedge_roaming's `CsmsOperator.locations`). The rules live here once: the values a partner
understands, the bounds of PutLocation, and which record names an EVSE's connector (its own,
else its site's, else the chain's default)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from evedge_csms.errors import CsmsError
from evedge_csms.store import Row

CONNECTOR_STANDARDS = ("IEC_62196_T1", "IEC_62196_T2", "IEC_62196_T2_COMBO", "IEC_62196_T1_COMBO", "CHADEMO",
                       "DOMESTIC_F", "GBT_AC", "GBT_DC", "TESLA")  # fmt: skip
"""A connector's standard, as the roaming partners name it."""
CONNECTOR_FORMATS = ("SOCKET", "CABLE")
POWER_TYPES = ("AC_1_PHASE", "AC_3_PHASE", "DC")
CAPABILITIES = ("RFID_READER", "REMOTE_START_STOP", "RESERVABLE", "CHARGING_PROFILE", "PLUG_AND_CHARGE",
                "UNLOCK", "CREDIT_CARD_PAYABLE")  # fmt: skip
"""What a location offers its roaming customers."""
CONNECTOR_KEYS = ("connector_standard", "connector_format", "power_type")
"""The columns naming a connector's kind, in a site's record and in an EVSE's."""
_LONGEST = {"name": 128, "address": 128, "city": 64, "postal_code": 16}
"""PutLocation's bounds of the texts of a site's record."""


def connector_kind(standard: str | None, fmt: str | None, power_type: str | None) -> dict[str, str]:
    """The kind of connector given (None: not given), each value checked; `CsmsError` names
    the first value a partner would not understand."""
    given = {"connector_standard": standard, "connector_format": fmt, "power_type": power_type}
    allowed = {"connector_standard": CONNECTOR_STANDARDS, "connector_format": CONNECTOR_FORMATS,
               "power_type": POWER_TYPES}  # fmt: skip
    for k, v in given.items():
        if v is not None and v not in allowed[k]:
            raise CsmsError(f"{k} {v!r}: one of {', '.join(allowed[k])}")
    return {k: v for k, v in given.items() if v is not None}


def site_row(
    old: Row | None,
    site_id: str,
    place: Mapping[str, str | None],
    lat: float | None,
    lon: float | None,
    kind: Mapping[str, str],
    capabilities: Sequence[str] | None,
) -> Row:
    """The site's record after an update: `old` (None before the first) with the values given;
    `place` holds name, address, city, postal_code and country. Refused (`CsmsError`, nothing
    changed): a latitude or longitude out of range or one without the other, a country not ISO
    3166-1 alpha-2, a text out of PutLocation's bounds, an unknown capability."""
    for c in capabilities or ():
        if c not in CAPABILITIES:
            raise CsmsError(f"capability {c!r}: one of {', '.join(CAPABILITIES)}")
    if lat is not None and not -90.0 <= lat <= 90.0:
        raise CsmsError(f"latitude {lat}: not within -90 … 90")
    if lon is not None and not -180.0 <= lon <= 180.0:
        raise CsmsError(f"longitude {lon}: not within -180 … 180")
    country = place.get("country")
    if country is not None and not re.fullmatch(r"[A-Z]{2}", country):
        raise CsmsError(f"country {country!r}: an ISO 3166-1 alpha-2 code (two capital letters)")
    for k, longest in _LONGEST.items():
        v = place.get(k)
        if v is not None and not 0 < len(v) <= longest:
            raise CsmsError(f"{k}: 1 to {longest} characters")
    row = dict(old or {"site_id": site_id})
    new: dict[str, Any] = {**place, **kind, "latitude": lat, "longitude": lon,
                           "capabilities": None if capabilities is None else list(capabilities)}  # fmt: skip
    row.update({k: v for k, v in new.items() if v is not None})
    if (row.get("latitude") is None) != (row.get("longitude") is None):
        raise CsmsError("coordinates: latitude and longitude together")
    return row


def meter_key(key: bytes) -> bytes:
    """An EVSE meter's public key as recorded: the 32 bytes of an Ed25519 key (what the meters'
    signed readings are sealed with, docs/roaming.md "Signed meter readings")."""
    if len(key) != 32:
        raise CsmsError(f"meter_key: an Ed25519 public key is 32 bytes, not {len(key)}")
    return bytes(key)


def evse_connector(evse_record: Mapping[str, Any] | None, site_record: Mapping[str, Any] | None,
                   default: Mapping[str, str]) -> dict[str, str]:  # fmt: skip
    """An EVSE's connector kind: each value from the EVSE's own record, else its site's, else
    `default` (a site may mix kinds: an AC wallbox beside a DC charger)."""
    out = {}
    for k in CONNECTOR_KEYS:
        own = (evse_record or {}).get(k) or (site_record or {}).get(k)
        out[k] = str(own or default[k])
    return out

"""Signed meter readings (R3-9, evedge_roaming/meter.py): the `EDM1` format the emulated meters
write, and the home CSP's audit of an SDR's reading against the meter key its location
publishes (the real chain: tests/scenarios/test_roaming_connectors.py)."""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evedge_roaming import meter, pricing

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def reading(key: Ed25519PrivateKey, wh: int, evse: int = 1, t: int = 1_700_000_000) -> bytes:
    body = meter.TAG + wh.to_bytes(8, "big") + bytes((evse,)) + t.to_bytes(4, "big")
    return body + key.sign(body)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_r3_9_a_signed_reading_states_its_register_evse_and_time_and_its_seal_is_the_meters() -> None:
    key = Ed25519PrivateKey.generate()
    got = meter.parse(b64(reading(key, 12_345, evse=2)))
    assert got is not None and (got.register_wh, got.evse, got.time) == (12_345, 2, 1_700_000_000)
    assert got.sealed_by(key.public_key().public_bytes(*RAW))
    assert not got.sealed_by(Ed25519PrivateKey.generate().public_key().public_bytes(*RAW))
    assert not got.sealed_by(b"short")  # not a key: no seal, no exception


def test_r3_9_what_is_not_a_reading_of_this_format_is_none() -> None:
    key = Ed25519PrivateKey.generate()
    good = reading(key, 1)
    for bad in (None, "", "@@not base64", b64(good[:-1]), b64(good + b"x"), b64(b"OCMF" + good[4:]),
                b64(secrets.token_bytes(81))):  # fmt: skip
        assert meter.parse(bad) is None, bad


def test_r3_9_the_audit_checks_the_seal_when_the_evse_publishes_its_meter_key() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(*RAW)
    tariffs = {1: pricing.Tariff(1, 300, "EUR")}
    sdr = {"energy_wh": 1000, "meter_start_wh": 500, "meter_stop_wh": 1500, "cost": 300, "tariff_id": 1,
           "started": 0, "stopped": 60, "signed_meter": b64(reading(key, 1500))}  # fmt: skip
    readings = [(60, 1000)]
    assert pricing.audit_sdr(sdr, readings, tariffs, pub).verdict == "matched"
    assert pricing.audit_sdr(sdr, readings, tariffs).verdict == "matched"  # no key published: the register only
    other = Ed25519PrivateKey.generate()
    forged = dict(sdr, signed_meter=b64(reading(other, 1500)))
    assert pricing.audit_sdr(forged, readings, tariffs, pub).problems == (
        "the signed meter reading's seal is not the EVSE meter's",
    )
    assert pricing.audit_sdr(forged, readings, tariffs).verdict == "matched"  # what a key-less check cannot see
    bare = {k: v for k, v in sdr.items() if k != "signed_meter"}
    assert pricing.audit_sdr(bare, readings, tariffs, pub).problems == (
        "no signed meter reading, though the EVSE's meter seals its readings",
    )
    moved = dict(sdr, signed_meter=b64(reading(key, 1400)))  # sealed, but not the SDR's meter stop
    assert pricing.audit_sdr(moved, readings, tariffs, pub).problems == (
        "meter stop 1500 Wh, the signed meter reading 1400 Wh",
    )

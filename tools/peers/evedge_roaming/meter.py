"""Signed meter readings (R3-9), as an SDR carries them (`signed_meter`, base64): the meter's
word on the energy, sealed by the meter's own key, which neither the board nor the CSO holds.
An SDR carries two (`publish.signed_meter`): the reading of its meter start, then the one of
its meter stop, each `SIZE` bytes, concatenated (`readings`).

The format the emulated meters write (firmware/boards/sim.py), `EDM1`:

    tag b"EDM1" | register, Wh (8 bytes, big endian) | EVSE (1 byte) | meter clock, Unix s (4 bytes)
    | Ed25519 signature (64 bytes) of the 17 bytes before it

The key is the meter's; which key that is, is the CSO's statement (the operator records the
public key from the meter's label, `Csms.set_connector(meter_key=…)`, and publishes it with the
location's connectors: checkable against the label, not proven by it); other
formats (e.g. OCMF from a real eichrecht meter) are not read here (None)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TAG = b"EDM1"
_BODY = 17
_SIGNATURE = 64
SIZE = _BODY + _SIGNATURE
"""The bytes of one reading."""


@dataclass(frozen=True)
class Reading:
    """One signed reading: what it states and what seals it."""

    register_wh: int
    evse: int
    time: int
    body: bytes
    signature: bytes

    def sealed_by(self, public_key: bytes) -> bool:
        """True when the reading's seal is `public_key`'s Ed25519 signature of its body."""
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.body)
        except (InvalidSignature, ValueError):
            return False
        return True


def parse(signed_meter: str | None) -> Reading | None:
    """The reading of an `EDM1` value of one reading (base64, as PutSdr carries it); None for no
    value, another format or a value cut short."""
    found = readings(signed_meter)
    return found[0] if len(found) == 1 else None


def readings(signed_meter: str | None) -> list[Reading]:
    """Every reading of an `EDM1` value (base64): readings of `SIZE` bytes each, concatenated,
    in their order; [] for no value, another format, or a value not made of whole readings."""
    if not signed_meter:
        return []
    try:
        raw = base64.b64decode(signed_meter, validate=True)
    except (binascii.Error, ValueError):
        return []
    if not raw or len(raw) % SIZE:
        return []
    chunks = [raw[i : i + SIZE] for i in range(0, len(raw), SIZE)]
    if any(c[:4] != TAG for c in chunks):
        return []
    return [_reading(c) for c in chunks]


def _reading(raw: bytes) -> Reading:
    return Reading(int.from_bytes(raw[4:12], "big"), raw[12], int.from_bytes(raw[13:17], "big"), raw[:_BODY],
                   raw[_BODY:])  # fmt: skip

"""Text fields as the schema bounds them, for every side of every wire."""

from __future__ import annotations

from typing import Final

from gateway.schema import FIELDS, Key

REASON_MAX: Final = FIELDS[Key.REASON].max_len
"""Bytes of UTF-8 a `reason` may hold (the schema's bound)."""


def clip_reason(text: str) -> str:
    """`text` cut to what a `reason` field may hold (`REASON_MAX` bytes of UTF-8, never
    half a character)."""
    raw = text.encode()
    return text if len(raw) <= REASON_MAX else raw[:REASON_MAX].decode(errors="ignore")

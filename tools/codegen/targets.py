"""Where each generated file goes, and what it holds."""

from __future__ import annotations

from pathlib import Path

from . import emit_docs, emit_firmware, emit_gateway, emit_rust, emit_usecases
from .model import load

ROOT = Path(__file__).resolve().parents[2]

RUST = ROOT / "rust_core" / "evcore" / "src" / "schema.rs"
GATEWAY = ROOT / "gateway" / "schema.py"
FIRMWARE = ROOT / "firmware" / "csc" / "schema.py"
DOCS = ROOT / "docs" / "schema.md"
USECASES = ROOT / "docs" / "usecases.md"


def render() -> dict[Path, str]:
    s = load()
    return {
        RUST: emit_rust.emit(s),
        GATEWAY: emit_gateway.emit(s),
        FIRMWARE: emit_firmware.emit(s),
        DOCS: emit_docs.emit(s),
        USECASES: emit_usecases.emit(s),
    }

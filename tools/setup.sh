#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv holding the project (its Rust core built
# by maturin in release mode) and every tool the checks use, all from PyPI and crates.io.
# Safe to run again: it rebuilds the Rust core when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "setup: needs a Rust toolchain (cargo) on PATH" >&2; exit 1; }
if command -v rustup >/dev/null; then
    rustup component add clippy rustfmt >/dev/null 2>&1 || true
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# MicroPython's typeshed, kept apart from site-packages: firmware/mypy.ini points mypy at it.
[ -d .venv/mpy-typeshed/stdlib ] ||
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --target .venv/mpy-typeshed "micropython-typeshed==0.1.0"

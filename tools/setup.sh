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
# The upstream programs (the CSMS, the roaming endpoints: evedge-csms, evedge-roaming) are a
# distribution of their own, evedge-peers, on top of the root project (tools/peers/pyproject.toml).
# (setuptools' notice that an editable install maps the packages' folders is expected: muted.)
PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e tools/peers
# MicroPython's typeshed, kept apart from site-packages: firmware/mypy.ini points mypy at it.
[ -d .venv/mpy-typeshed/stdlib ] ||
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --target .venv/mpy-typeshed "micropython-typeshed==0.1.0"
# The board image (tools/board/image.py; the emulated boards run on it): MicroPython's unix port
# built 32-bit with the firmware frozen in. It needs make and a gcc that links 32-bit programs: on
# Debian, as root, gcc-multilib is installed when `gcc -m32` cannot link; elsewhere this says what
# is missing. Built here (about a minute, then cached in .venv/board-image) so tests find it ready.
if ! .venv/bin/python -m tools.board.image --check-toolchain 2>/dev/null &&
    [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
    echo "setup: installing gcc-multilib and make (the 32-bit board image)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-multilib make >/dev/null
fi
if ! { .venv/bin/python -m tools.board.image --check-toolchain && .venv/bin/python -m tools.board.image; }; then
    echo "setup: the board image cannot be built (above); the emulated boards need it," \
        "or run them on the 64-bit build: EVEDGE_BOARD=bytecode" >&2
fi

#!/usr/bin/env bash
# Every check, in one command: generated files fresh, lint, format, types, stubs, Rust
# and Python tests. Expects tools/setup.sh to have run (tools/test.sh does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH"
step() { printf '\n== %s\n' "$*"; }

step "generated files are fresh";   python -m tools.codegen --check && python -m tools.make_vectors --check
step "ruff";                        ruff check . && ruff format --check .
step "mypy (strict, host code)";    mypy
step "stubs match the Rust module"; python -m mypy.stubtest gateway._core
step "cargo fmt";                   cargo fmt --all --check
step "clippy";                      cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test";                  cargo test -p evcore --quiet
step "pytest";                      python -m pytest -q

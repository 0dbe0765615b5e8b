#!/usr/bin/env bash
# Every check, in one command: generated files fresh, lint, format, types, stubs, Rust
# and Python tests. Expects tools/setup.sh to have run (tools/test.sh does both).
# Runs every step even when one fails, then exits non-zero naming the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH"
failed=()
step() {
    local name=$1
    shift
    printf '\n== %s\n' "$name"
    "$@" || failed+=("$name")
}

step "generated code is fresh"      python -m tools.codegen --check
step "golden vectors are fresh"     python -m tools.make_vectors --check
step "ruff check"                   ruff check .
step "ruff format"                  ruff format --check .
step "mypy (strict, host code)"     mypy
step "firmware vs MicroPython stubs" mypy --config-file firmware/mypy.ini firmware
step "stubs match the Rust module"  python -m mypy.stubtest gateway._core
step "cargo fmt"                    cargo fmt --all --check
step "clippy"                       cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test"                   cargo test -p evcore --quiet
step "pytest"                       python -m pytest -q

if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '\nall checks passed\n'

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
# the boards above run on the 32-bit board image (firmware frozen); the firmware tests that start
# boards again on the 64-bit build with its bytecode in the heap (tools/board/runner.py), ~1 min
step "firmware boards, 64-bit build" env EVEDGE_BOARD=bytecode python -m pytest -q tests/test_fw_build.py \
    tests/test_fw_footprint.py tests/test_fw_outbox.py tests/test_fw_station.py tests/test_fw_usecases.py

if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '\nall checks passed\n'

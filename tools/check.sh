#!/usr/bin/env bash
# Every check, in one command: generated files fresh, lint, format, types, stubs, Rust
# and Python tests. Expects tools/setup.sh to have run (tools/test.sh does both).
# Runs every step even when one fails, then exits non-zero naming the failed steps.
#
# `tools/check.sh --stress`: instead, the whole pytest suite twice in a row while CPU burners
# (one busy loop per core, at the same niceness as the tests) keep every core busy; the
# burners are started and always killed here. Fails if either run fails. Not run by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH"

if [[ ${1:-} == --stress ]]; then
    shift
    burners=()
    stop_burners() {
        ((${#burners[@]})) || return 0
        kill "${burners[@]}" 2>/dev/null
        wait "${burners[@]}" 2>/dev/null
        burners=()
    }
    tests=""
    trap stop_burners EXIT
    # interrupted: the burners go, and the running suite gets an interrupt (it stops its fixtures)
    trap 'stop_burners; [[ -n $tests ]] && kill -INT "$tests" 2>/dev/null; exit 130' INT TERM
    cores=$(nproc)
    for ((i = 0; i < cores; i++)); do
        (while :; do :; done) &
        burners+=($!)
    done
    printf '== stress: %d CPU burners (pids %s) on %d cores; the pytest suite twice\n' \
        "${#burners[@]}" "${burners[*]}" "$cores"
    logs=$(mktemp -d "${TMPDIR:-/tmp}/evedge-stress.XXXXXX")
    results=()
    status=0
    for run in 1 2; do
        printf '\n== stress run %d (log %s/run%d.log)\n' "$run" "$logs" "$run"
        start=$SECONDS
        python -m pytest -q "$@" > >(tee "$logs/run$run.log") 2>&1 &
        tests=$!
        wait "$tests"
        rc=$?
        tests=""
        summary=$(grep -E '^=*.* in [0-9.]+s' "$logs/run$run.log" | tail -1 | tr -d '=')
        results+=("run $run: exit $rc, $((SECONDS - start)) s wall;${summary}")
        ((rc == 0)) || status=1
    done
    stop_burners
    printf '\n== stress summary\n'
    printf '%s\n' "${results[@]}"
    ((status == 0)) && printf 'both runs passed under CPU load\n' || printf 'FAILED under CPU load\n'
    exit "$status"
fi

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

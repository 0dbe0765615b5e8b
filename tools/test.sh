#!/usr/bin/env bash
# Set up, then prove both README commands (what CI runs): the main command, `tools/run.sh`,
# as a newcomer would run it (a bare PATH: it must find everything in the project's own
# environment), then every check and every test. Runs both even when the first fails, and
# exits non-zero naming what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || exit 1
failed=()
printf '\n== the README main command, bash tools/run.sh, with a bare PATH\n'
env -i HOME="$HOME" PATH=/usr/bin:/bin bash tools/run.sh --boards 2 || failed+=("tools/run.sh")
bash tools/check.sh || failed+=("tools/check.sh")
if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "${failed[*]}"
    exit 1
fi

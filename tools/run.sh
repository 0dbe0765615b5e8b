#!/usr/bin/env bash
# The main job: set up, then run the site smoke run (frames built, tagged, verified,
# queued by priority, with the figures printed). Extra arguments go to the smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m tools.smoke "$@"

#!/usr/bin/env bash
# The main job: set up, then run the whole site (boards, gateway, CSMS) through a short
# scenario with a live view and a summary. Extra arguments go to `python -m tools.site`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m tools.site "$@"   # the foundation's smoke run: python -m tools.smoke

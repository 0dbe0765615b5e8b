#!/usr/bin/env bash
# Set up, then run every check and every test (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec bash tools/check.sh

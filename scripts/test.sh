#!/usr/bin/env bash
# The README's test command: set up from scratch if needed (with the dev extra), then run
# the test suite.   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
exec "${DGXTRAIN_VENV:-.venv}/bin/python" -m pytest "$@"

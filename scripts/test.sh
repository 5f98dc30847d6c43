#!/usr/bin/env bash
# The README's test command: set up from scratch if needed (with the dev extra), start the
# local SLURM cluster for the SLURM tests when root (they skip, saying why, otherwise),
# then run the test suite.   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
if [[ $(id -u) == 0 && ${DGXTRAIN_SLURM_TESTS:-1} == 1 ]] && ! slurm/local/cluster.sh is-up; then
  slurm/local/cluster.sh up
  trap 'slurm/local/cluster.sh down' EXIT  # stop what this run started, and only that
fi
"${DGXTRAIN_VENV:-.venv}/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# The README's train command: set up from scratch if needed, then train on every GPU
# (or 2 CPU processes).   scripts/train.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/launch.sh "$@"

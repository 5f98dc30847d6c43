#!/usr/bin/env bash
# The README's train command: set up from scratch if needed, then train on every GPU
# (or 2 CPU processes).   scripts/train.sh [hydra overrides...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# Set up in the repository, train from where the user stands: relative paths they give
# (--config-dir my_conf, hydra.run.dir=runs/a) and outputs/ are then theirs.
(cd "$root" && scripts/setup.sh)
exec "$root/scripts/launch.sh" "$@"

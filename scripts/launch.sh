#!/usr/bin/env bash
# Train on every GPU of this machine, or on CPU processes where there is none:
#   scripts/launch.sh [hydra overrides...]
# NPROC overrides the process count; DGXTRAIN_PYTHON the interpreter (default: the venv's
# python, else python3). --standalone picks a free rendezvous port, so two jobs on one
# machine never collide on a fixed 29500.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DGXTRAIN_VENV:-.venv}
PY=${DGXTRAIN_PYTHON:-$([[ -x "$VENV/bin/python" ]] && echo "$VENV/bin/python" || echo python3)}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
nproc=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
# Share the cores between processes (torchrun would otherwise force 1 thread and warn).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
# A readable run dir name that every rank agrees on.
export DGXTRAIN_RUN_ID=${DGXTRAIN_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m dgxtrain "$@"

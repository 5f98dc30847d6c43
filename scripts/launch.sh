#!/usr/bin/env bash
# Train on every GPU of this machine, or on CPU processes where there is none:
#   scripts/launch.sh [hydra overrides...]
# NPROC overrides the process count; DGXTRAIN_PYTHON the interpreter (default: the venv's
# python, else python3); TORCHRUN_ARGS adds torchrun options (e.g. --numa-binding=node);
# DGXTRAIN_MODULE runs another entry point the same way (dgxtrain.tools.doctor, bench.train_bench).
# Alone, --standalone picks a free rendezvous port, so two jobs on one machine never
# collide on a fixed 29500. As one task per node of an srun step (slurm/train.sbatch), the
# nodes meet at MASTER_ADDR:MASTER_PORT, node rank = SLURM_NODEID.
set -euo pipefail
# From where the user stands (relative paths are theirs), with the repository's venv.
root="$(cd "$(dirname "$0")/.." && pwd)"
VENV=${DGXTRAIN_VENV:-.venv}
[[ $VENV == /* ]] || VENV="$root/$VENV"
# The entry points of bench/ and tests/ live in the repository, not in the installed package.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$root"
PY=${DGXTRAIN_PYTHON:-$([[ -x "$VENV/bin/python" ]] && echo "$VENV/bin/python" || echo python3)}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
nproc=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
# Share the cores between processes (torchrun would otherwise force 1 thread and warn).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
if [[ -n ${SLURM_STEP_ID:-} && -n ${MASTER_ADDR:-} ]]; then
  rdzv=(--nnodes="${SLURM_STEP_NUM_NODES:-$SLURM_NNODES}" --node-rank="$SLURM_NODEID"
        --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
else
  rdzv=(--standalone)
fi
# After a SIGTERM torchrun waits this long for its workers before it kills them. They stop
# after the step in progress and checkpoint; torchrun's own 30 s may not cover a large save.
# Under SLURM the grace is the cluster's (GraceTime, KillWait): this only must not cut it.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# The trainer reports its first step's time from here: set-up before this is not start-up.
DGXTRAIN_LAUNCH_TIME=$(date +%s.%N)
export DGXTRAIN_LAUNCH_TIME
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$nproc" ${TORCHRUN_ARGS:-} \
  -m "${DGXTRAIN_MODULE:-dgxtrain}" "$@"

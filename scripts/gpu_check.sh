#!/usr/bin/env bash
# GPU checks for a CUDA machine (run by hand, or on a lent GPU machine): the gpu-marked
# tests, the default command on the GPU, torchrun over NCCL on every GPU, the doctor, and
# the benchmark (bf16 + compile on a wide MLP, printing MFU; the trainer against a plain
# DDP loop, Lightning Fabric and Accelerate where installed). Target: 8 minutes on one H200;
# each part prints its time.
#   scripts/gpu_check.sh [output dir]
# On a bare GPU machine: run scripts/gpu_wheels.sh here first and bring .whl/ along.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
VENV=${DGXTRAIN_VENV:-.venv}
PY=${DGXTRAIN_PYTHON:-$([[ -x "$VENV/bin/python" ]] && echo "$VENV/bin/python" || echo python3)}
export PYTHONUNBUFFERED=1
# A bare GPU machine (torch, no network, no .venv): dgxtrain from the checkout, and what it
# needs beside torch from the wheels scripts/gpu_wheels.sh put in .whl/ (carried along).
if ! "$PY" -c 'import hydra, omegaconf, wandb' 2>/dev/null; then
  [[ -d .whl ]] || { echo "no hydra/omegaconf/wandb here and no .whl/: run scripts/gpu_wheels.sh where pip works, and bring .whl/ along" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dgxtrain-site .whl/*.whl || exit 2
  # The configuration is the package dgxtrain.conf, which the wheel and an editable
  # install map to conf/; from the source tree a link does it.
  [[ -e src/dgxtrain/conf ]] || ln -s ../../conf src/dgxtrain/conf
  export PYTHONPATH=/tmp/dgxtrain-site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export WANDB_MODE=${WANDB_MODE:-offline}
part() { echo "[gpu_check] ${SECONDS}s: $*"; }
nvidia-smi -L
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
part "the gpu tests"
# Required here: a GPU test that would skip fails instead.
DGXTRAIN_REQUIRE_GPU=1 "$PY" -m pytest -q -m gpu tests bench/tests 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
part "the default job"
# The default job on one process (device auto -> cuda), then on every GPU via torchrun.
"$PY" -m dgxtrain hydra.run.dir="$out/single" 2>&1 | tail -3
DGXTRAIN_PYTHON=$PY DGXTRAIN_RUN_ID=gpu_check DGXTRAIN_OUTPUT_ROOT="$out" scripts/launch.sh 2>&1 | grep -E "joined|start:|step 1000/|summary"
# The same job again, longer: it resumes from its last checkpoint over NCCL.
DGXTRAIN_PYTHON=$PY DGXTRAIN_RUN_ID=gpu_check DGXTRAIN_OUTPUT_ROOT="$out" scripts/launch.sh \
  trainer.max_steps=1200 2>&1 | grep -E "resumed from|step 1200/|rror"
part "the doctor"
# Preflight: devices, versions, GEMM per GPU, NCCL all-reduce busbw, and the scaling
# prediction for the dgx_8gpu experiment.
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m dgxtrain.tools.doctor \
  --json "$out/doctor.json" --predict experiment=dgx_8gpu 2>&1 | tee "$out/doctor.txt" |
  grep -vE "^W[0-9]"
part "the benchmarks"
# The benchmark on the wide MLP (hidden 8192), bf16 autocast + torch.compile: MFU against
# the data sheet's dense bf16 peak (989 TFLOP/s on H100/H200), and the standard workload.
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m bench.train_bench \
  model.hidden_dim=8192 trainer.precision=bf16 trainer.compile=true --micro-batch 4096 \
  --rounds 5 --steps 20 --no-memory --json "$out/bench_wide_bf16.json" 2>&1 | grep -vE "^W[0-9]|INFO"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m bench.train_bench \
  --rounds 3 --json "$out/bench_standard.json" 2>&1 | grep -vE "^W[0-9]|INFO"
# bf16 gradient compression changes the numerics: benchmarked on its own, never a default.
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m bench.train_bench \
  dist.comm_hook=bf16 --rounds 2 --no-memory --json "$out/bench_bf16_hook.json" 2>&1 |
  grep -E "^trainer|^reference|speedup|parameters"
for f in "$out"/*/summary.json; do echo "$f: $(cat "$f" | tr -d '\n ')"; done
part "done (target: 480 s)"
# One table to end with: MFU and the loops against each other, from the benchmarks' JSON.
"$PY" - "$out" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'benchmark':<20} {'trainer over: reference':>23} {'fabric':>7} {'accelerate':>10} "
      f"{'TFLOP/s/GPU':>11} {'of matmul peak':>14} {'MFU (data sheet)':>16}")
for name in ("bench_wide_bf16", "bench_standard", "bench_bf16_hook"):
    f = out / f"{name}.json"
    if not f.exists():
        print(f"{name:<20} (did not run)")
        continue
    r = json.loads(f.read_text())
    t = r["loops"]["trainer"]
    mfu = r.get("mfu_vs_data_sheet")
    peers = [f"{r.get('trainer_vs', {}).get(p, float('nan')):.3f}" for p in ("fabric", "accelerate")]
    print(f"{name:<20} {r['speedup']:>23.3f} {peers[0]:>7} {peers[1]:>10} "
          f"{t['tflops_per_device']:>11.1f} {t['fraction_of_matmul_peak']:>14.2f} "
          f"{mfu if mfu is None else round(mfu, 3)!s:>16}")
    for loop, why in r["workload"].get("loops_left_out", {}).items():
        print(f"  left out: {loop} ({why})")
print("trainer over X: the trainer's samples/s over X's, same model, data and GPU (above 1: "
      "faster). Target: the wide bf16 MLP at >= 0.6 of the measured bf16 matmul peak.")
PYEOF
exit "$status"

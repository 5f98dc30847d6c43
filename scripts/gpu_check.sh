#!/usr/bin/env bash
# GPU checks for a CUDA machine (run by hand, or on a lent GPU machine): the gpu-marked
# tests, the default command on the GPU, and torchrun over NCCL on every GPU.
#   scripts/gpu_check.sh [output dir]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
VENV=${DGXTRAIN_VENV:-.venv}
PY=${DGXTRAIN_PYTHON:-$([[ -x "$VENV/bin/python" ]] && echo "$VENV/bin/python" || echo python3)}
export PYTHONUNBUFFERED=1
nvidia-smi -L
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
"$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
# The default job on one process (device auto -> cuda), then on every GPU via torchrun.
"$PY" -m dgxtrain hydra.run.dir="$out/single" 2>&1 | tail -3
DGXTRAIN_PYTHON=$PY DGXTRAIN_RUN_ID=gpu_check DGXTRAIN_OUTPUT_ROOT="$out" scripts/launch.sh 2>&1 | grep -E "joined|start:|step 1000/|summary"
# The same job again, longer: it resumes from its last checkpoint over NCCL.
DGXTRAIN_PYTHON=$PY DGXTRAIN_RUN_ID=gpu_check DGXTRAIN_OUTPUT_ROOT="$out" scripts/launch.sh \
  trainer.max_steps=1200 2>&1 | grep -E "resumed from|step 1200/|rror"
# Throughput of a DGX-sized model per GPU: fp32 eager vs bf16 + compile.
for prec in fp32 bf16; do
  compile=$([[ $prec == bf16 ]] && echo true || echo false)
  "$PY" -m dgxtrain experiment=dgx_8gpu trainer.global_batch_size=8192 trainer.micro_batch_size=8192 \
    trainer.max_steps=300 trainer.eval_every=0 data.eval_samples=8192 trainer.precision=$prec \
    trainer.compile=$compile hydra.run.dir="$out/bench_$prec" 2>&1 | grep -E "error|step 300/|summary" | tail -2
done
for f in "$out"/*/summary.json; do echo "$f: $(cat "$f" | tr -d '\n ')"; done
exit "$status"

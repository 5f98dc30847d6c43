#!/usr/bin/env bash
# Set up .venv with dgxtrain (editable) and its dependencies. Idempotent and quick when
# nothing changed.   scripts/setup.sh [--dev]
#
# torch: a torch that python3 can already import (an NGC container's CUDA build) is kept
# and pinned; otherwise a GPU machine gets PyPI's CUDA build and a CPU-only machine the
# CPU build, so that no multi-GB CUDA wheel lands where it cannot be used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DGXTRAIN_VENV:-.venv}
TORCH_VERSION=${DGXTRAIN_TORCH_VERSION:-2.13.0}
extras="[examples]"  # the example tasks' data (docs/tasks.md)
[[ "${1:-}" == "--dev" ]] && extras="[dev,examples]"
say() { echo "[setup] $*" >&2; }

stamp="$VENV/.dgxtrain-setup"
want="$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)$extras"
if [[ -f "$stamp" ]] && grep -qxF "$want" "$stamp"; then exit 0; fi

# --system-site-packages: the venv sees a preinstalled torch instead of downloading one.
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
constraints="$VENV/constraints.txt"
: >"$constraints"

if have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  say "keeping torch $have"
  echo "torch==$have" >"$constraints"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  say "GPU found: installing torch $TORCH_VERSION (CUDA build)"
  "${pip[@]}" "torch==$TORCH_VERSION"
elif [[ "$(uname -s)" == "Darwin" ]]; then
  "${pip[@]}" "torch==$TORCH_VERSION"   # macOS wheels are CPU builds
else
  say "no GPU: installing torch $TORCH_VERSION+cpu"
  # The +cpu local version never matches PyPI's CUDA wheel. Try the configured indexes
  # first (a mirror or wheel cache may hold it), then PyTorch's CPU index.
  "${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
    "${pip[@]}" "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
[[ -s "$constraints" ]] || "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

say "installing dgxtrain$extras"
"${pip[@]}" -c "$constraints" -e ".$extras"
echo "$want" >>"$stamp"
say "ready: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "| CUDA GPUs:", torch.cuda.device_count())')"

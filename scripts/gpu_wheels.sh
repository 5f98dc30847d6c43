#!/usr/bin/env bash
# Wheels for a bare GPU machine (torch there, no network): what dgxtrain needs beside torch,
# for its Python (default 3.12) on x86-64 Linux, into .whl/ (git-ignored). They travel with
# the checkout; scripts/gpu_check.sh installs them there when hydra, omegaconf or wandb is
# missing.   scripts/gpu_wheels.sh [python version]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
         manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# Pinned to what the CPU venv runs here, so both machines test the same versions.
pins=$("${DGXTRAIN_VENV:-.venv}/bin/python" -m pip freeze 2>/dev/null |
       grep -iE '^(hydra-core|omegaconf|wandb)==' || echo "hydra-core omegaconf wandb")
rm -rf .whl && mkdir -p .whl
# omegaconf's parser runtime exists only as a source package: built here (pure Python).
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
# shellcheck disable=SC2086  # one requirement per word
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --find-links .whl -d .whl $pins
echo "[gpu_wheels] $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ for Python $py" >&2

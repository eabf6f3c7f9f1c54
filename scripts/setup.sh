#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch and the test and benchmark
# dependencies, then builds lora_ext from source (CUDA kernels too when torch is a CUDA build and
# nvcc is found; LORA_EXT_BUILD_CUDA=0/1 forces either way). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# A recent pip builds the editable install without build isolation correctly (old pip does not).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch
.venv/bin/python -m pip install -q numpy safetensors ninja pytest hypothesis transformers peft matplotlib tqdm
if [ "${LORA_EXT_BUILD_CUDA:-}" = "" ] && command -v nvcc >/dev/null 2>&1; then
  # nvcc is here: build the CUDA kernels and fail loudly if they cannot be built.
  export LORA_EXT_BUILD_CUDA=1
fi
.venv/bin/python -m pip install --no-build-isolation -e . 2>&1 | tail -n 3
.venv/bin/python -c "import lora_ext; print('lora_ext build:', lora_ext.build_info())"

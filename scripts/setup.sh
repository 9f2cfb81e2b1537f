#!/usr/bin/env bash
# Create .venv and install dflow-trl with its test tools.
# On machines without an NVIDIA GPU the CPU build of torch is installed first, so that the
# package's plain `torch` requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.4"
  else
    "$VPY" -m pip install -q "torch==${DFLOW_TORCH_VERSION:-2.13.0}" \
      || "$VPY" -m pip install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VPY" -m pip install -q -e ".[dev]"
echo "dflow-trl installed in .venv ($("$VPY" -c 'import torch, trl; print("torch", torch.__version__, "| trl", trl.__version__)'))"

#!/usr/bin/env bash
# Installs asset_dist and everything its tests need. Idempotent; safe to re-run.
# torch goes first and pinned on a CPU machine (a bare `torch` requirement would pull a multi-GB CUDA
# build); a machine that already has a torch (a GPU cluster's own CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
DS_BUILD_OPS=0 $PY -m pip install -q -e ".[dev]"
$PY -c "import torch, deepspeed, webdataset; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, webdataset ok')" 2>&1 | grep -v "real_accelerator"

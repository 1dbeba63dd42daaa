#!/usr/bin/env bash
# One prepared script for a lent GPU (a 15-minute device budget): the editing figures BENCHMARKS.md lacks.
#   1. bench/edit.py: cached vs official re-run decode steps, paper size, bf16, batch 1 and 16
#   2. bench/edit_batching.py: union vs continuous batching, paper size, bf16, real encoders, tokens/s at batch 16
#      on 16 training-style edits at 1024 (plus the steps-per-hole-token table, model-free)
#   3. bench/gpu_check.sh: the attention kernels vs the oracle, then timings up to L = 16384 (last: the longest)
# Each step writes into OUT (default $OUT, else ./gpu_results) as soon as it ends; a step that fails does not
# stop the next; the limits keep the whole script under 9 minutes (the device tool allows 10 per call).
# Usage: bench/gpu_edit_check.sh [OUT]
set -uo pipefail
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
run() { local name=$1; shift; echo "== $name: $*"; timeout "$LIMIT" "$@" > "$out/$name.log" 2>&1; echo "   exit $?"; }
LIMIT=140 run edit_paper python bench/edit.py --models paper --device cuda --dtype bf16 --batches 1 16 \
    --cached-tokens 256 --rerun-tokens 32 --json "$out/edit_paper.json"
LIMIT=220 run edit_batching python bench/edit_batching.py --models paper --device cuda --dtype bf16 \
    --speed-batch 16 --speed-rows 16 --prefills fused --batches 1 4 8 16 32 --json "$out/edit_batching.json"
LIMIT=150 run attention bash bench/gpu_check.sh "$out/gpu_attention.md"
ls -l "$out"

#!/usr/bin/env bash
# One-shot GPU check of the attention kernels (run once on a lent GPU; about 5-10 minutes, mostly compiles):
# every kernel vs the dense masked oracle in fp32 (outputs and grads), then bf16 timings and peak memory of
# flex / sdpa_gather / gather vs dense SDPA at L = 256, 1024, 4096, 16384. Results go to $1 (markdown) and
# the same name with .json; they are rewritten after every size, so a run cut short keeps what it measured.
# Usage: bench/gpu_check.sh OUT.md [extra bench/attention.py args, e.g. --flex-tiles 128 64]
set -euo pipefail
out="${1:?usage: bench/gpu_check.sh OUT.md [extra args]}"
shift
cd "$(dirname "$0")/.."
python bench/attention.py --device cuda --check --reps 10 --out "$out" "$@"

#!/usr/bin/env bash
# Does the guide matter? The long-range benchmark end to end on CPU: generate scenes whose holes can only be
# filled from a far-away region (data_tools/make_longrange.py: the bottom half repeats the top half under a
# rule, a mosaic of 4 random colours in 16 px cells = one token each), shard them, train the VQGAN, seg
# tokenizer, guide and SGA stages through the real trainer (torchrun, DeepSpeed ZeRO-2,
# configs/longrange_*.yaml; every stage at 256 px), then `asset-dist evaluate ablation`: hole-token NLL / top-1
# with guided, window-only and random picks, bootstrap 95 % intervals, the guide's pick hit rate per rule, and
# a figure.
#   bash bench/longrange.sh                      (OUT=runs/longrange; about 39 minutes on 2 cores)
# Optional: STEPS="vqgan seg guide sga" training steps, COUNT (scenes per rule), RULES, SIZE, COLOURS, NPROC,
# PORT, EVAL_SAMPLES (held-out samples scored; 0 = all), SKIP_TRAIN=1 (evaluate existing exports). Re-running
# resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/longrange}
NPROC=${NPROC:-2}
PORT=${PORT:-29531}
COUNT=${COUNT:-1200}
RULES=${RULES:-copy_v,mirror_v,rot180}
SIZE=${SIZE:-256}
COLOURS=${COLOURS:-4}
EVAL_SAMPLES=${EVAL_SAMPLES:-0}
FIGURE=${FIGURE:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
read -r VQ_STEPS SEG_STEPS GUIDE_STEPS SGA_STEPS <<< "${STEPS:-400 60 4300 150}"
t0=$(date +%s)
phase() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }
NOISE="real_accelerator\|FutureWarning\|warnings.warn\|UserWarning\|for batch in\|return func(\*args"
quiet() { grep --line-buffered -v "$NOISE" >&2 || true; }
dist() {
  python -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$PORT" -m asset_dist.cli "$@" \
    2> >(quiet) | { grep --line-buffered -v "$NOISE" || true; }
}

phase "1/4 scenes ($COUNT per rule: $RULES, ${SIZE} px) -> $OUT/raw, shards -> $OUT/shards"
[ -f "$OUT/raw/sources.json" ] || python data_tools/make_longrange.py --out "$OUT/raw" --count "$COUNT" \
  --size "$SIZE" --rules "$RULES" --background mosaic --textures flat,mosaic --cell 16 --colours "$COLOURS" --seed 0
python data_tools/shard.py --images "$OUT/raw/images" --labels "$OUT/raw/labels" --out "$OUT/shards" \
  --samples-per-shard 100 --val-fraction 0.1 --seed 0 --workers 2 --resume

train() {  # train CONFIG RUN_NAME STEPS [--set ...]
  local cfg=$1 name=$2 steps=$3; shift 3
  phase "train $name ($cfg, $steps steps, $NPROC processes) -> $OUT/$name"
  dist train --config "configs/$cfg" --resume auto --set "data.train_shards=$OUT/shards" \
    --set "data.val_shards=$OUT/shards" --set "paths.run_dir=$OUT/$name" --set train.max_steps="$steps" "$@"
}
W=(--set "train.vqgan_weights=$OUT/vqgan/export/vqgan.pt" --set "train.seg_weights=$OUT/seg/export/seg.pt")
if [ -z "${SKIP_TRAIN:-}" ]; then
  phase "2/4 tokenizers"
  train longrange_vqgan.yaml vqgan "$VQ_STEPS"
  train longrange_seg.yaml seg "$SEG_STEPS"
  phase "3/4 guide (dense attention), then SGA (picks from the frozen guide)"
  train longrange_guide.yaml guide "$GUIDE_STEPS" "${W[@]}"
  train longrange_sga.yaml sga "$SGA_STEPS" "${W[@]}" --set "train.guide_weights=$OUT/guide/export/guide.pt" \
    --set "train.init_from=$OUT/guide/export/guide.pt"
fi

phase "4/4 ablation on the held-out scenes -> $OUT/eval"
python -m asset_dist.cli evaluate ablation --config "$OUT/sga/config.yaml" --weights "$OUT/sga/export/sga.pt" \
  --sources "$OUT/raw/sources.json" --max-samples "$EVAL_SAMPLES" --figure "$FIGURE" --out "$OUT/eval" 2> >(quiet)
echo
echo "done in $(( $(date +%s) - t0 )) s: $OUT/eval/eval_ablation.md, eval_ablation.json, eval_ablation.png"

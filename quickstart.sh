#!/usr/bin/env bash
# The main job on the bundled sample data, on CPU, end to end: install; shard the photos; train the tiny
# tokenizers, guide and SGA-512 stages with 2 processes under DeepSpeed ZeRO-2; build an edit set (the two
# official ASSET edits at 512 + edits drawn from held-out photos); precompute the guides and run the batch
# editor with 2 processes; evaluate the tokenizers, the SGA attention settings and the edits; write
# gallery.html + a PNG contact sheet. The same commands and code a cluster run uses, at toy sizes (quality
# is poor at this scale). Re-running resumes: finished stages, edit sets, guides and edits are kept.
#   bash quickstart.sh            (OUT=runs/quickstart by default; NPROC=2)
# Optional: STEPS="400 300 120 20" (vqgan seg guide sga training steps; BENCHMARKS.md "The quickstart's edits"
# has minutes vs label-following for other budgets), SKIP_INSTALL=1 (already installed).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/quickstart}
NPROC=${NPROC:-2}
PORT=${PORT:-29511}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
read -r VQ_STEPS SEG_STEPS GUIDE_STEPS SGA_STEPS <<< "${STEPS:-400 300 120 20}"
t0=$(date +%s)
phase() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }
NOISE="real_accelerator\|FutureWarning\|warnings.warn\|UserWarning\|for batch in\|return func(\*args"
quiet() { grep --line-buffered -v "$NOISE" >&2 || true; }
dist() {  # dist ARGS...: an asset-dist command on NPROC processes (torchrun; srun on a cluster)
  python -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$PORT" -m asset_dist.cli "$@" \
    2> >(quiet) | { grep --line-buffered -v "$NOISE" || true; }
}

phase "0/7 install"
[ -n "${SKIP_INSTALL:-}" ] || bash scripts/install.sh

phase "1/7 shard the bundled photos -> $OUT/shards"
python data_tools/shard.py --images sample_data/sflckr/images --labels sample_data/sflckr/segmentations \
  --out "$OUT/shards" --samples-per-shard 4 --val-fraction 0.2 --seed 0 --workers 2 --resume

train() {  # train STAGE_CONFIG RUN_NAME STEPS [--set ...]
  local cfg=$1 name=$2 steps=$3; shift 3
  # a stage whose last checkpoint is its final step and whose export exists is kept without starting the
  # processes (the trainer would find the same and exit: tests/test_train_engine.py a_finished_run_is_kept)
  if [ "$(cat "$OUT/$name/checkpoints/latest" 2>/dev/null)" = "$(printf 'step_%08d' "$steps")" ] &&
     compgen -G "$OUT/$name/export/*.pt" >/dev/null; then
    phase "$name: already finished at step $steps (kept: $(ls "$OUT/$name"/export/*.pt))"; return 0
  fi
  phase "train $name ($cfg, $steps steps, $NPROC processes, ZeRO-2) -> $OUT/$name"
  dist train --config "configs/$cfg" --resume auto --set "data.train_shards=$OUT/shards" \
    --set "data.val_shards=$OUT/shards" --set "paths.run_dir=$OUT/$name" --set deepspeed.zero_stage=2 \
    --set logging.image_every=10 --set train.max_steps="$steps" "$@"
}
phase "2/7 tokenizers"
train tiny_vqgan.yaml vqgan "$VQ_STEPS"
train tiny_seg.yaml seg "$SEG_STEPS"
W="--set train.vqgan_weights=$OUT/vqgan/export/vqgan.pt --set train.seg_weights=$OUT/seg/export/seg.pt"
phase "3/7 guide transformer at 256 (full attention)"
# shellcheck disable=SC2086
train tiny_guide.yaml guide "$GUIDE_STEPS" $W
phase "4/7 SGA transformer at 512 (sparsified guided attention, starts from the guide)"
# shellcheck disable=SC2086
train tiny_sga.yaml sga512 "$SGA_STEPS" $W --set "train.guide_weights=$OUT/guide/export/guide.pt" \
  --set "train.init_from=$OUT/guide/export/guide.pt"

phase "5/7 edit set: the official edits at 512 + edits from held-out photos -> $OUT/edits"
CONF="$OUT/sga512/config.yaml"  # the trained run's resolved config: every weight path is in it
E="$OUT/edits"
for which in landscape coco; do  # the COCO case's labels are converted to this model's landscape convention
  [ -f "$E/official_$which/manifest.json" ] || python data_tools/make_edits.py official --which "$which" \
    --root sample_data/edits --resolution 512 --config "$CONF" --out "$E/official_$which"
done
[ -f "$E/heldout/manifest.json" ] || python data_tools/make_edits.py dataset --shards "$OUT/shards" --split val \
  --classes waterother,snow,tree,mountain --resolution 512 --limit 3 --seed 0 --config "$CONF" --out "$E/heldout"
EDITS="$E/official_landscape/edits-000000.tar::$E/official_coco/edits-000000.tar::$E/heldout/edits-000000.tar"
I=(--config "$CONF" --set "infer.sga_weights=$OUT/sga512/export/sga.pt" --set infer.samples=2)

phase "6/7 precompute the guides, then the batch editor ($NPROC processes) -> $OUT/edit_results"
dist precompute-guides "${I[@]}" --edits "$EDITS" --out "$OUT/guides"
dist edit-batch "${I[@]}" --edits "$EDITS" --guides "$OUT/guides" --out "$OUT/edit_results"

phase "7/7 evaluate (held-out photos and the edits) and the gallery -> $OUT/eval, $OUT/gallery.html"
python -m asset_dist.cli evaluate tokenizer --config "$CONF" --out "$OUT/eval" 2> >(quiet)
python -m asset_dist.cli evaluate transformer --config "$CONF" --weights "$OUT/sga512/export/sga.pt" \
  --out "$OUT/eval" 2> >(quiet)
python -m asset_dist.cli evaluate edits --edit-out "$OUT/edit_results" --edits "$EDITS" 2> >(quiet)
python -m asset_dist.cli gallery "${I[@]}" --edits "$EDITS" --results "$OUT/edit_results" --out "$OUT"

echo
echo "done in $(( $(date +%s) - t0 )) s. Everything is under $OUT/:"
echo "  shards + manifest:   $OUT/shards/manifest.json"
for s in vqgan seg guide sga512; do
  echo "  $s: exported weights $(ls "$OUT/$s"/export/*.pt), TensorBoard $OUT/$s/tensorboard"
done
echo "  edit set:            $E (official_landscape, official_coco, heldout)"
echo "  guide block picks:   $OUT/guides"
echo "  edited images:       $OUT/edit_results/<edit>/sample_<k>.png, manifest.jsonl, eval_edits.md"
echo "  evaluation:          $OUT/eval/eval_tokenizer.md, eval_transformer.md (guided vs window vs random picks)"
echo "  gallery:             $OUT/gallery.html and $OUT/contact_sheet.png"
echo "  view the logs:       tensorboard --logdir $OUT"

#!/usr/bin/env bash
# The main job on the bundled sample data, on CPU: install, shard, then train the tiny tokenizers,
# guide and SGA-512 stages with 2 processes under DeepSpeed ZeRO-2. The same commands and code a
# cluster run uses, at toy sizes. Re-running resumes (finished stages are skipped).
#   bash quickstart.sh            (OUT=runs/quickstart by default; NPROC=2)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/quickstart}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
t0=$(date +%s)
bash scripts/install.sh

echo "== 1/5 shard the bundled photos -> $OUT/shards"
python data_tools/shard.py --images sample_data/sflckr/images --labels sample_data/sflckr/segmentations \
  --out "$OUT/shards" --samples-per-shard 4 --val-fraction 0.2 --seed 0 --workers 2 --resume

train() {  # train STAGE_CONFIG RUN_NAME [--set ...]
  local cfg=$1 name=$2; shift 2
  echo "== $name ($cfg, $NPROC processes, ZeRO-2)"
  python -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${PORT:-29511}" \
    -m asset_dist.cli train --config "configs/$cfg" --resume auto \
    --set "data.train_shards=$OUT/shards" --set "paths.run_dir=$OUT/$name" --set deepspeed.zero_stage=2 "$@" \
    2> >(grep -v "real_accelerator\|FutureWarning\|warnings.warn\|UserWarning\|for batch in" >&2)
}
train tiny_vqgan.yaml vqgan --set train.max_steps=40
train tiny_seg.yaml seg --set train.max_steps=40
P="--set train.vqgan_weights=$OUT/vqgan/export/vqgan.pt --set train.seg_weights=$OUT/seg/export/seg.pt"
# shellcheck disable=SC2086
train tiny_guide.yaml guide $P --set train.max_steps=40
# shellcheck disable=SC2086
train tiny_sga.yaml sga512 $P --set "train.guide_weights=$OUT/guide/export/guide.pt" \
  --set "train.init_from=$OUT/guide/export/guide.pt" --set train.max_steps=20

echo
echo "done in $(( $(date +%s) - t0 )) s. Everything is under $OUT/:"
echo "  shards + manifest:     $OUT/shards/manifest.json"
for s in vqgan seg guide sga512; do
  echo "  $s: exported weights $(ls "$OUT/$s"/export/*.pt), TensorBoard $OUT/$s/tensorboard"
done
echo "  view the logs: tensorboard --logdir $OUT"

#!/bin/bash
#SBATCH --job-name=asset-edit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#
# Batch editing: `asset-dist edit-batch` on every task (one per GPU). The tasks claim chunks of
# infer.claim_chunk edits on the shared filesystem as they need work (RUN_DIR/claims/), so each edit is done
# once and fast and slow GPUs finish together; each writes RUN_DIR/<edit_id>/sample_<k>.png, a preview and a
# record; the last worker to finish writes RUN_DIR/manifest.jsonl and summary.json (per worker and node:
# edits, busy and idle time). The output folder is the run folder (edit-batch --out defaults to paths.run_dir).
#
# More workers for a running batch (another job, an array, other nodes): the same config and overrides, the
# batch's run folder, and --join (a different config or edit set is refused by name):
#   RUN_DIR=runs/asset-edit-1234 TRAIN_CMD="python -m asset_dist.cli edit-batch --join" \
#       sbatch -N 2 slurm/edit_batch.sh configs/landscape_sga1024.yaml infer.edits=... infer.sga_weights=...
# A worker that dies (node loss, scancel of a helper job) leaves claims whose heartbeat stops: after
# infer.claim_lease_s the others take them over and redo the edits without a record.
#
# Submit from the repository root (relative paths - config, run folder, log - start there):
#   sbatch slurm/edit_batch.sh [CONFIG] [KEY=VALUE ...]
#   sbatch slurm/edit_batch.sh configs/landscape_sga1024.yaml infer.edits=data/edits/mine \
#       infer.sga_weights=runs/landscape_sga1024/export/sga.pt [infer.guides=data/edits/mine_guides]
# The config's model sizes must match the exports; weights: infer.{vqgan,seg,guide,sga}_weights (the first
# three fall back to train.*_weights). infer.samples, infer.batch_size, infer.seed: see asset_dist/config.py.
# Any #SBATCH default above can be changed on the sbatch command line, e.g. a CPU-only smoke run:
#   sbatch -N1 --ntasks-per-node=2 --gpus-per-node=0 -c1 -t 00:10:00 slurm/edit_batch.sh CONFIG infer.edits=...
# (one task per GPU: keep --ntasks-per-node equal to --gpus-per-node; CPU nodes run on the CPU).
# Large runs write WebDataset shards instead of a folder per edit:
#   TRAIN_CMD="python -m asset_dist.cli edit-batch --out-format shards --shard-size 200" sbatch slurm/edit_batch.sh ...
#
# Environment: CONFIG, OVERRIDES, RUN_DIR (default runs/<job-name>-<job-id>), TRAIN_CMD (the command
# each task runs; default "python -m asset_dist.cli edit-batch"), SRUN_ARGS, MAX_RESTARTS - see
# slurm/common.sh. Output: slurm/logs/<job-name>-<job-id>.out (linked from the run folder); edited
# images, records, manifest.jsonl and the resolved config go to the run folder.
#
# Preemption: USR1 300 s before the time limit -> every rank finishes its current batch of edits and
# exits 99 -> the job is requeued under the same id and run folder and skips the edits already recorded.
# Any other failure (bad config, missing weights) ends the job without a requeue; a bad edit is recorded
# as failed in its record and the manifest, and the run goes on.

# sbatch runs a copy of this file from the spool folder: find the repository from the job record.
for _d in "${ASSET_DIST_ROOT:-}" \
          "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." \
          "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
    [[ -n $_d && -f $_d/slurm/common.sh ]] && break
done
# shellcheck source=slurm/common.sh
source "$_d/slurm/common.sh" || { echo "cannot find slurm/common.sh; set ASSET_DIST_ROOT" >&2; exit 2; }

asset_main "configs/landscape_sga1024.yaml" "python -m asset_dist.cli edit-batch" "" "$@"
exit $?

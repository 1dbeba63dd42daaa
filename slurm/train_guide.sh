#!/bin/bash
#SBATCH --job-name=asset-guide
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#
# Stage 2: the dense 256x256 guide transformer.
#
# Submit from the repository root (relative paths - config, run folder, log - start there):
#   sbatch slurm/train_guide.sh [CONFIG] [KEY=VALUE ...]
#   CONFIG=configs/landscape_guide.yaml OVERRIDES="train.max_steps=1000 data.batch_size=4" sbatch slurm/train_guide.sh
# Any #SBATCH default above can be changed on the sbatch command line, e.g. a CPU-only smoke run:
#   sbatch -N1 --ntasks-per-node=2 --gpus-per-node=0 -c1 -t 00:10:00 slurm/train_guide.sh CONFIG train.max_steps=10
# (one task per GPU: keep --ntasks-per-node equal to --gpus-per-node; CPU nodes use gloo).
#
# Environment: CONFIG, OVERRIDES, RUN_DIR (default runs/<job-name>-<job-id>), TRAIN_CMD (default
# "python -m asset_dist.cli train"), SRUN_ARGS, MAX_RESTARTS - see slurm/common.sh.
# Output: slurm/logs/<job-name>-<job-id>.out (linked from the run folder); the run folder holds the
# resolved config, checkpoints and logs.
#
# Preemption: USR1 300 s before the time limit -> every rank checkpoints and exits 99 -> the job is
# requeued under the same id and resumes from the run folder's latest checkpoint (--resume auto).
# Any other failure (bad config, NaN, crash) ends the job without a requeue.

# sbatch runs a copy of this file from the spool folder: find the repository from the job record.
for _d in "${ASSET_DIST_ROOT:-}" \
          "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." \
          "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
    [[ -n $_d && -f $_d/slurm/common.sh ]] && break
done
# shellcheck source=slurm/common.sh
source "$_d/slurm/common.sh" || { echo "cannot find slurm/common.sh; set ASSET_DIST_ROOT" >&2; exit 2; }

asset_main "configs/landscape_guide.yaml" "python -m asset_dist.cli train" "--resume auto" "$@"
exit $?

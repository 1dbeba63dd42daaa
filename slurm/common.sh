# shellcheck shell=bash
# Shared launch logic for slurm/train_*.sh and slurm/edit_batch.sh. Sourced, never run directly.
#
# One srun step, one task per GPU; each task runs the asset_dist command, which reads its rank from
# SLURM's variables (asset_dist/distenv.py). Preemption: `#SBATCH --signal=B:USR1@N` warns only this
# batch shell N seconds before the time limit; we forward USR1 to every task through srun, the trainer
# checkpoints on all ranks and exits EXIT_REQUEUE, and we `scontrol requeue` the job. The requeued job
# keeps its id, so it reuses the same run folder, and `--resume auto` picks up the `latest` checkpoint.
#
# Environment (all optional unless noted):
#   CONFIG          YAML config (or the first positional argument); the script's DEFAULT_CONFIG otherwise
#   OVERRIDES       "key=value key=value" passed as --set key=value (positional KEY=VALUE args are added after)
#   RUN_DIR         run folder; default runs/<job-name>-<job-id> under the submit directory
#   TRAIN_CMD       the command each task runs (word-split); default: the script's DEFAULT_CMD
#   SRUN_ARGS       extra srun flags (word-split), e.g. "--kill-on-bad-exit=1"
#   MAX_RESTARTS    stop requeueing after this many restarts (default 100; guards a trainer that exits
#                   EXIT_REQUEUE at once every time)
#   ASSET_DIST_ROOT repository root, if the scripts cannot find it themselves

EXIT_REQUEUE=99  # keep equal to asset_dist.distenv.EXIT_REQUEUE (tests/test_launch_env.py checks)
EXIT_USAGE=2     # bad arguments or missing config: never requeued

_log() { echo "[asset-launch $(date +%H:%M:%S)] $*" >&2; }

_got_usr1=0
_got_term=0
_trapped=0
_child=""

_on_usr1() {
    _got_usr1=1
    _trapped=1
    # srun forwards the signals it receives to all tasks of its step, on every node.
    if [[ -n $_child ]]; then
        _log "USR1: time limit near; asking the tasks to checkpoint (signal to pid $_child)"
        kill -USR1 "$_child" 2>/dev/null || true
    else
        _log "USR1 before the tasks started: they cannot take it; the TERM at the time limit will stop them"
    fi
}

_on_term() {
    # scancel, the time limit and preemption send TERM to every process of the job, the tasks
    # included, so there is nothing to forward; remember it for the requeue decision.
    _got_term=1
    _trapped=1
    _term_at=$(date +%s)
    _log "TERM received; waiting for the tasks to exit"
}

# Seconds since the epoch at which the job's time limit ends, or empty (no limit / not under SLURM).
_job_end_epoch() {
    local end
    [[ -n ${SLURM_JOB_ID:-} ]] || return 0
    end=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*EndTime=\([0-9T:-]*\).*/\1/p' | head -n1)
    if [[ -n $end ]]; then
        date -d "$end" +%s 2>/dev/null || true
    fi
}

# asset_main DEFAULT_CONFIG DEFAULT_CMD RESUME_FLAG [positional args of the sbatch script]
#   RESUME_FLAG: extra arguments every (re)start passes, e.g. "--resume auto" ("" for none)
asset_main() {
    local default_config=$1 default_cmd=$2 resume_flag=$3
    shift 3

    if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # the calling script's header comment
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        return 0
    fi
    # ---- arguments: [CONFIG] [KEY=VALUE ...]
    local config=${CONFIG:-}
    if [[ $# -gt 0 && $1 != *=* ]]; then
        config=$1
        shift
    fi
    config=${config:-$default_config}
    if [[ -z $config ]]; then
        _log "no config: pass CONFIG=path.yaml or the config as the first argument"
        return $EXIT_USAGE
    fi
    if [[ ! -f $config ]]; then
        _log "config file not found: $config (relative to $(pwd)); set CONFIG=... or pass it as the first argument"
        return $EXIT_USAGE
    fi
    local -a sets=() words=()
    read -r -a words <<<"${OVERRIDES:-}"
    words+=("$@")
    local kv
    for kv in "${words[@]}"; do
        if [[ $kv != *=* ]]; then
            _log "override '$kv' is not KEY=VALUE"
            return $EXIT_USAGE
        fi
        sets+=(--set "$kv")
    done

    # ---- run folder: one per job id, so a requeued run (same id) continues in the same place
    local job_tag
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        job_tag=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    else
        job_tag=${SLURM_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)}
    fi
    local run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME:-$(basename "$0" .sh)}-$job_tag}
    mkdir -p "$run_dir" || { _log "cannot create run folder $run_dir"; return $EXIT_USAGE; }
    run_dir=$(cd "$run_dir" && pwd)

    # ---- command
    local -a cmd=() launcher=() extra=()
    read -r -a cmd <<<"${TRAIN_CMD:-$default_cmd}"
    read -r -a extra <<<"${SRUN_ARGS:-}"
    local -a resume=()
    read -r -a resume <<<"$resume_flag"
    cmd+=(--config "$config" "${sets[@]}" --set "paths.run_dir=$run_dir" "${resume[@]}")

    # sbatch passes the submitting shell's environment on. Rank variables left there would make every
    # task rank 0 (they win over SLURM's), and a stale MASTER_ADDR=localhost would hang a multi-node
    # job: the rendezvous comes from the job itself (asset_dist/distenv.py).
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK CROSS_RANK CROSS_SIZE LOCAL_SIZE \
        MASTER_ADDR MASTER_PORT

    local restarts=${SLURM_RESTART_COUNT:-0}
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        # srun in 22.05-23.02 does not inherit --cpus-per-task from the batch job; pass it explicitly.
        launcher=(srun --label ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "${extra[@]}")
        local stdout
        stdout=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n1)
        [[ -n $stdout && -e $stdout ]] && ln -sfn "$stdout" "$run_dir/slurm-$SLURM_JOB_ID.out"
    fi
    printf '%s\tjob=%s\trestart=%s\tnodes=%s\ttasks=%s\t%s\n' "$(date -Is)" "${SLURM_JOB_ID:-local}" \
        "$restarts" "${SLURM_JOB_NODELIST:-$(hostname)}" "${SLURM_NTASKS:-1}" "${cmd[*]}" >>"$run_dir/launches.tsv"
    _log "job ${SLURM_JOB_ID:-local} restart $restarts on ${SLURM_JOB_NODELIST:-$(hostname)}: ${SLURM_NTASKS:-1} task(s)"
    _log "run folder $run_dir"
    _log "command ${cmd[*]}"

    local end_epoch
    end_epoch=$(_job_end_epoch)

    trap _on_usr1 USR1
    trap _on_term TERM
    # Tasks start with USR1 ignored (inherited through exec) until the trainer installs its handler:
    # a warning during python start-up is dropped instead of killing a half-started task (the TERM at
    # the time limit still reaches the handler). Not under SLURM the same line runs one local process.
    "${launcher[@]}" bash -c 'trap "" USR1; exec "$@"' asset-task "${cmd[@]}" &
    _child=$!

    # `wait` returns early (status > 128) when a trapped signal arrives: wait again for the real status.
    # A second wait answers 127 when the first one had already collected it.
    local rc again
    wait "$_child"
    rc=$?
    while [[ $_trapped == 1 ]]; do
        _trapped=0
        wait "$_child"
        again=$?
        [[ $again == 127 ]] && break
        rc=$again
    done
    _child=""
    _log "tasks exited with status $rc"

    # Killed by the very signal that asked for a checkpoint: a trainer without a handler, or one that
    # was already exiting (Python restores the default action while it shuts down). Resuming is still
    # right: `--resume auto` continues from the last checkpoint, or finds the run already finished.
    local status=$rc
    if { [[ $_got_usr1 == 1 && $rc == $((128 + $(kill -l USR1))) ]]; } ||
       { [[ $_got_term == 1 && $rc == $((128 + $(kill -l TERM))) ]]; }; then
        _log "tasks were killed by the signal itself: treating it as a requeue request"
        rc=$EXIT_REQUEUE
    fi
    if [[ $rc -ne $EXIT_REQUEUE ]]; then
        return "$rc"
    fi
    # EXIT_REQUEUE: the trainer saved a checkpoint and asks to continue. Requeue unless this is a
    # user's scancel (or a preemption SLURM requeues by itself): both arrive as TERM before the
    # time limit. TERM at the time limit (warning missed or save too slow) still requeues.
    if [[ $_got_term == 1 ]]; then
        if [[ -z $end_epoch || $_term_at -lt $((end_epoch - 10)) ]]; then
            _log "stopped by TERM before the time limit (scancel or preemption): not requeueing"
            return "$status"
        fi
    fi
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        _log "not under SLURM: resume with the same command (it passes ${resume_flag:-no resume flag})"
        return "$status"
    fi
    if [[ $restarts -ge ${MAX_RESTARTS:-100} ]]; then
        _log "restart $restarts reached MAX_RESTARTS=${MAX_RESTARTS:-100}: not requeueing"
        return "$status"
    fi
    _log "checkpoint written; requeueing job $SLURM_JOB_ID (it keeps its id and run folder)"
    # `scontrol requeue` ends this job (this shell gets TERM); the requeued job starts after a short pause.
    _got_term=0
    trap '' TERM
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        _log "scontrol requeue failed; resubmit by hand (the run folder is $run_dir)"
        return "$status"
    fi
    return 0
}

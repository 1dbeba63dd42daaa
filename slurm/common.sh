# shellcheck shell=bash
# Shared launch logic for slurm/train_*.sh and slurm/edit_batch.sh. Sourced, never run directly.
#
# One srun step over the whole allocation, one task per GPU; each task runs the asset_dist command, which
# reads its rank from SLURM's variables (asset_dist/distenv.py). This batch shell runs on the allocation's
# first node: it picks the rendezvous there (MASTER_ADDR = that node, MASTER_PORT probed free on it) and
# sets OMP_NUM_THREADS from --cpus-per-task. Each task prints its host first, so the job log shows which
# rank ran where.
#
# Checkpoint and requeue (asset_dist/launch/contract.py holds the rule, shared with submitit):
# - `#SBATCH --signal=B:USR1@N` warns only this batch shell N seconds before the time limit (and at
#   preemption, where the cluster sets PreemptParameters=send_user_signal); we forward USR1 to every task
#   through srun, the trainer checkpoints on all ranks and exits EXIT_REQUEUE (99), and we
#   `scontrol requeue` the job. The requeued job keeps its id, so it reuses the same run folder, and
#   `--resume auto` picks up the `latest` checkpoint.
# - scancel, `scontrol requeue`, the time limit and a preemption's GraceTime send TERM to the tasks through
#   their own slurmstepd; the trainer checkpoints on it too (within the cluster's KillWait, 30 s by
#   default). A TERM to the batch shell well before the time limit is a user's scancel: not requeued. A
#   preemption is requeued only where the cluster's PreemptMode has REQUEUE (CANCEL makes it final).
# - The second run in a row that made no progress (same checkpoint, same edit records as at its start) is
#   not requeued: a time limit shorter than start-up plus the warning would loop forever.
# - A node that dies (or stops answering) is SLURM's business: after SlurmdTimeout it is DOWN and a
#   `--requeue` job is requeued by slurmctld itself; the surviving ranks fail their next collective within
#   `dist.timeout_s` instead of hanging, and the restart resumes from the last checkpoint.
# - `--nodes=MIN-MAX` lets a requeued job start on another node count: the step always takes the whole
#   allocation. Edit batches continue on any count; training needs the same world size for now (a resume
#   on another one stops with a named error).
#
# Environment (all optional unless noted):
#   CONFIG          YAML config (or the first positional argument); the script's DEFAULT_CONFIG otherwise
#   OVERRIDES       "key=value key=value" passed as --set key=value (positional KEY=VALUE args are added after)
#   RUN_DIR         run folder; default runs/<job-name>-<job-id> under the submit directory
#   TRAIN_CMD       the command each task runs (word-split); default: the script's DEFAULT_CMD
#   SRUN_ARGS       extra srun flags (word-split), e.g. "--kill-on-bad-exit=1"
#   MAX_RESTARTS    stop requeueing after this many restarts (default 100)
#   ASSET_NODES     MIN-MAX: the node range to come back with after a requeue (see _restore_node_range)
#   ASSET_PYTHON    the python that has asset_dist (default: python on PATH)
#   ASSET_DIST_ROOT repository root, if the scripts cannot find it themselves

# Exit codes, the stale launcher variables and the requeue decision come from asset_dist itself
# (asset_dist/launch/contract.py, shared with submitit): `python -m asset_dist.launch.contract shell`.
ASSET_PYTHON=${ASSET_PYTHON:-python}

_log() { echo "[asset-launch $(date +%H:%M:%S)] $*" >&2; }

# TERM ignored: a job being stopped signals every process of this shell's step, the helper included
_contract() { ( trap '' TERM; exec "$ASSET_PYTHON" -m asset_dist.launch.contract "$@" ); }

_got_usr1=0
_got_term=0
_term_at=""
_trapped=0
_child=""
_resender=""
RESEND_USR1_S=${RESEND_USR1_S:-5}

# srun forwards the signals it receives to all tasks of its step, on every node (USR1 is one of them; a
# TERM to srun instead makes it kill its tasks, so TERM is never forwarded this way). A task that is still
# starting ignores USR1 until the trainer's handler is in place, so the request is repeated every
# RESEND_USR1_S seconds until the tasks exit (the handler only sets a flag: repeats are harmless).
_start_resender() {
    [[ -n $_child && -z $_resender ]] || return 0
    kill -USR1 "$_child" 2>/dev/null || true
    ( while sleep "$RESEND_USR1_S" && kill -0 "$1" 2>/dev/null; do kill -USR1 "$1" 2>/dev/null; done ) &
    _resender=$!
}

_on_usr1() {
    _trapped=1
    [[ $_got_usr1 == 1 ]] && return 0
    _got_usr1=1
    if [[ -n $_child ]]; then
        _log "USR1: time limit near (or preemption notice); asking the tasks to checkpoint (signal to pid $_child)"
        _start_resender "$_child"
    else
        _log "USR1: time limit near (or preemption notice); passed to the tasks once they have started"
    fi
}

# SLURM (22.05) pins a requeued job to the node and task counts of its first run, whatever range it was
# submitted with. ASSET_NODES=MIN-MAX (the range given to `sbatch --nodes=MIN-MAX -n TASKS`) puts the range
# back after every requeue this shell sees, with this run's task count: the job keeps its world size and may
# come back on fewer nodes (where a node has room for more tasks) or more.
_restore_node_range() {
    [[ -n ${ASSET_NODES:-} && -n ${SLURM_JOB_ID:-} ]] || return 0
    local i
    for i in $(seq 20); do
        if scontrol update JobId="$SLURM_JOB_ID" NumNodes="$ASSET_NODES" NumTasks="${SLURM_NTASKS:-1}" 2>/dev/null; then
            _log "the next run may use $ASSET_NODES nodes for its ${SLURM_NTASKS:-1} task(s) (ASSET_NODES)"
            return 0
        fi
        sleep 0.5
    done
    _log "could not put the node range ASSET_NODES=$ASSET_NODES back: the next run asks for $SLURM_JOB_NUM_NODES nodes"
}

_on_term() {
    # scancel, `scontrol requeue`, the time limit and node failure reach the tasks through their own
    # slurmstepd (TERM, then KILL after the cluster's KillWait); remember it for the requeue decision.
    _got_term=1
    _trapped=1
    _term_at=$(date +%s)
    _log "TERM received; waiting for the tasks to exit"
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
    local contract
    if ! contract=$(_contract shell 2>&1); then
        _log "cannot run '$ASSET_PYTHON -m asset_dist.launch.contract' (is asset_dist installed for this python? set ASSET_PYTHON): $contract"
        return 2
    fi
    eval "$contract"  # EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE, ..., STALE_VARS

    # ---- arguments: [CONFIG] [KEY=VALUE ...]
    local config=${CONFIG:-}
    if [[ $# -gt 0 && $1 != *=* ]]; then
        config=$1
        shift
    fi
    config=${config:-$default_config}
    if [[ -z $config ]]; then
        _log "no config: pass CONFIG=path.yaml or the config as the first argument"
        return "$EXIT_BAD_INPUT"
    fi
    if [[ ! -f $config ]]; then
        _log "config file not found: $config (relative to $(pwd)); set CONFIG=... or pass it as the first argument"
        return "$EXIT_BAD_INPUT"
    fi
    local -a sets=() words=()
    read -r -a words <<<"${OVERRIDES:-}"
    words+=("$@")
    local kv
    for kv in "${words[@]}"; do
        if [[ $kv != *=* ]]; then
            _log "override '$kv' is not KEY=VALUE"
            return "$EXIT_BAD_INPUT"
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
    mkdir -p "$run_dir" || { _log "cannot create run folder $run_dir"; return "$EXIT_BAD_INPUT"; }
    run_dir=$(cd "$run_dir" && pwd)

    # ---- command
    local -a cmd=() launcher=() extra=()
    read -r -a cmd <<<"${TRAIN_CMD:-$default_cmd}"
    read -r -a extra <<<"${SRUN_ARGS:-}"
    local -a resume=()
    read -r -a resume <<<"$resume_flag"
    cmd+=(--config "$config" "${sets[@]}" --set "paths.run_dir=$run_dir" "${resume[@]}")

    # sbatch passes the submitting shell's environment on. Rank variables left there would make every
    # task rank 0 (they win over SLURM's), and a stale MASTER_ADDR=localhost would hang a multi-node job.
    # shellcheck disable=SC2086
    unset $STALE_VARS
    # One thread per CPU SLURM gave each task (not the submitting shell's setting, not every core).
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
    else
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi

    local restarts=${SLURM_RESTART_COUNT:-0}
    # ASSET_PROGRESS (what a restart would resume from), ASSET_JOB_END (the time limit) and, under SLURM,
    # the rendezvous: this shell runs on the allocation's first node, where rank 0 (and its TCP store)
    # runs too, so MASTER_PORT is probed free here, below the ephemeral range.
    local start
    start=$(_contract start "$run_dir") || { _log "cannot prepare the run: $start"; return 1; }
    eval "$start"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        # srun in 22.05-23.02 does not inherit --cpus-per-task from the batch job; pass it explicitly. No
        # -N/-n: the step takes the whole allocation, whatever node count this (re)start was given.
        launcher=(srun --label ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "${extra[@]}")
        local stdout
        stdout=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n1)
        [[ -n $stdout && -e $stdout ]] && ln -sfn "$stdout" "$run_dir/slurm-$SLURM_JOB_ID.out"
    fi
    printf '%s\tjob=%s\trestart=%s\tnodes=%s\ttasks=%s\trdzv=%s\t%s\n' "$(date -Is)" "${SLURM_JOB_ID:-local}" \
        "$restarts" "${SLURM_JOB_NODELIST:-$(hostname)}" "${SLURM_NTASKS:-1}" "${ASSET_RDZV:--}" "${cmd[*]}" \
        >>"$run_dir/launches.tsv"
    _log "job ${SLURM_JOB_ID:-local} restart $restarts on ${SLURM_JOB_NODELIST:-$(hostname)}: ${SLURM_NTASKS:-1} task(s), ${SLURM_JOB_NUM_NODES:-1} node(s)"
    _log "run folder $run_dir (progress $ASSET_PROGRESS); rendezvous ${ASSET_RDZV:-none}; OMP_NUM_THREADS=$OMP_NUM_THREADS"
    _log "command ${cmd[*]}"

    trap _on_usr1 USR1
    trap _on_term TERM
    # Tasks start with USR1 ignored (inherited through exec) until the trainer installs its handler:
    # a warning during python start-up is dropped instead of killing a half-started task (the TERM at
    # the time limit still reaches the handler). Each task names its host first (the launch log shows
    # where every rank ran). Not under SLURM the same line runs one local process.
    "${launcher[@]}" bash -c 'trap "" USR1
        echo "[asset-launch] task ${SLURM_PROCID:-0} of ${SLURM_NTASKS:-1} on $(hostname) (node ${SLURM_NODEID:-0}), pid $$" >&2
        exec "$@"' asset-task "${cmd[@]}" &
    _child=$!
    [[ $_got_usr1 == 1 ]] && _start_resender "$_child"

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
    if [[ -n $_resender ]]; then
        kill "$_resender" 2>/dev/null
        wait "$_resender" 2>/dev/null
    fi
    _log "tasks exited with status $rc"

    local sig="" decision
    [[ $_got_usr1 == 1 ]] && sig=usr1
    [[ $_got_term == 1 ]] && sig=term
    decision=$(_contract decide --rc "$rc" --signal "$sig" ${_term_at:+--term-at "$_term_at"} \
               ${ASSET_JOB_END:+--end-at "$ASSET_JOB_END"} --run-dir "$run_dir" --progress-before="$ASSET_PROGRESS" \
               --restarts "$restarts" --max-restarts "${MAX_RESTARTS:-100}")
    local requeue=$?
    if [[ $requeue == 3 ]]; then  # slurmctld requeued it (scontrol requeue, node failure, preemption)
        _log "$decision"
        _restore_node_range
        return "$rc"
    fi
    if [[ $requeue -ne 0 ]]; then
        [[ $rc -ne 0 ]] && _log "${decision:-no requeue decision (the helper exited $requeue)}"
        return "$rc"
    fi
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        _log "not under SLURM: resume with the same command (it passes ${resume_flag:-no resume flag})"
        return "$rc"
    fi
    _log "$decision job $SLURM_JOB_ID (it keeps its id and run folder)"
    # `scontrol requeue` ends this job (this shell gets TERM); the requeued job starts after a short pause.
    trap '' TERM
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        _log "scontrol requeue failed; resubmit by hand (the run folder is $run_dir)"
        return "$rc"
    fi
    _restore_node_range
    return 0
}

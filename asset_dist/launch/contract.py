"""The launch contract: one copy of what the sbatch scripts (slurm/common.sh) and submitit (submit.py) agree on.

- Exit codes (asset_dist.exitcodes) and the launcher variables a submitting shell may leave behind
  (STALE_VARS): `python -m asset_dist.launch.contract shell` prints both for the batch shell's `eval`.
- The rendezvous of a job: the first node of the allocation (where rank 0 runs) and a port probed free on
  that node (`rendezvous`, run by the batch shell, which SLURM starts on that node).
- Progress: what a restart would continue from (the latest complete checkpoint tag; the number of edit
  records), compared before and after a run.
- The requeue decision (`decide`): given how the tasks ended, requeue the job or stop, with the reason.
  The rule, for both launchers:
    * exit 0, 2 (bad config or input), 3 (non-finite loss), or any other failure: stop (a node that dies is
      SLURM's business: it requeues a `--requeue` job by itself once the node is DOWN);
    * exit 99 (checkpointed on a signal), or killed by the very signal that asked for the checkpoint:
      - a TERM to the batch shell well before the time limit that is not a preemption: a user's scancel, stop;
      - a preemption (the job record has a PreemptTime) where the cluster's PreemptMode has no REQUEUE
        (e.g. CANCEL): preemption is final there, stop;
      - no progress since this run started (same checkpoint, same number of edit records) for the second
        run in a row (RUN/.asset_dist.stalled counts them; one slow start is forgiven): the time limit leaves
        no room between start-up and the warning, stop instead of looping;
      - `max_restarts` restarts already: stop;
      - otherwise requeue (the job keeps its id and run folder; `--resume auto` continues).

No torch import: the batch shell runs this before any heavy work.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from asset_dist.distenv import expand_hostlist, slurm_master_port
from asset_dist.exitcodes import CODES, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE

# Launcher variables a submitting shell may have left behind: they would win over the job's own placement
# (asset_dist.distenv reads RANK/WORLD_SIZE first; CROSS_RANK means "deepspeed launcher"), and a stale
# MASTER_ADDR=localhost would hang a multi-node job.
STALE_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "CROSS_RANK",
              "CROSS_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
RDZV_VAR = "ASSET_RDZV"  # HOST:PORT, set by our launchers only (never trusted from a user's shell otherwise)
TERM_AT_LIMIT_S = 10.0  # a TERM this close to the job's end time is the time limit, not a scancel


def shell() -> str:
    """Lines for `eval` in a shell: EXIT_*=N and STALE_VARS="A B ..."."""
    return "".join(f"{k}={v}\n" for k, v in CODES.items()) + f'STALE_VARS="{" ".join(STALE_VARS)}"\n'


# ---- SLURM queries ---------------------------------------------------------------------------------------

def _scontrol(*args: str) -> str:
    try:
        p = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout if p.returncode == 0 else ""


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (works without accounting/sacct); {} once slurmctld forgot the job."""
    return dict(re.findall(r"(\S+?)=(\S*)", _scontrol("show", "job", "-o", str(job_id))))


def slurm_time(text: str) -> Optional[float]:
    """slurmctld's local time (2026-11-28T09:10:30) -> epoch seconds; None for Unknown/None/empty."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def preempt_mode(job: Mapping[str, str]) -> str:
    """The PreemptMode that applies to `job`: its partition's, else the cluster's (upper case, e.g. REQUEUE,
    CANCEL, OFF, SUSPEND,GANG)."""
    part = job.get("Partition", "")
    if part:
        m = re.search(r"\bPreemptMode=(\S+)", _scontrol("show", "partition", "-o", part))
        if m and m.group(1).upper() not in ("", "(NULL)"):
            return m.group(1).upper()
    m = re.search(r"^PreemptMode\s*=\s*(\S+)", _scontrol("show", "config"), re.M)
    return m.group(1).upper() if m else "OFF"


def preemption_requeues() -> bool:
    """Does a preempted job come back on this cluster (PreemptMode with REQUEUE)? A PREEMPTED job is final
    otherwise, so waiting for it would never end."""
    m = re.search(r"^PreemptMode\s*=\s*(\S+)", _scontrol("show", "config"), re.M)
    return bool(m and "REQUEUE" in m.group(1).upper())


# ---- rendezvous ------------------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken, to stay clear of a previous run's store
        s.bind(("", port))
        return True
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        s.close()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(seed: int = 0, low: int = 20000) -> int:
    """A TCP port free on this host right now, below the ephemeral range (outgoing connections never take
    it meanwhile), tried from a seeded random start so that jobs starting together spread out."""
    high = _ephemeral_low()
    if high - low < 1000:  # a machine with an unusual ephemeral range: probe inside it
        low, high = 10000, 65535
    rng = random.Random(seed)
    start = rng.randrange(low, high)
    for i in range(high - low):
        port = low + (start - low + i) % (high - low)
        if _port_free(port):
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high - 1} on {socket.gethostname()}")


def rendezvous(environ: Optional[Mapping[str, str]] = None) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for the job this process belongs to. Run by the batch shell: SLURM starts it
    on the first node of the allocation, which also runs rank 0 (and its TCP store), so the port is probed
    free where it will be bound. Elsewhere (not the first node) the port derives from the job id."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or 0)
    if not nodelist:
        return "127.0.0.1", free_port(os.getpid())
    first = expand_hostlist(nodelist)[0]
    me = socket.gethostname()
    if first in (me, me.split(".")[0]):
        return first, free_port(job_id * 1000 + int(env.get("SLURM_RESTART_COUNT") or 0))
    return first, slurm_master_port(job_id)


# ---- progress --------------------------------------------------------------------------------------------

def progress(run_dir: str | os.PathLike) -> str:
    """What a restart would continue from: '<latest checkpoint tag>/<edit records>' ('-' for no checkpoint)."""
    run = Path(run_dir)
    try:
        tag = (run / "checkpoints" / "latest").read_text().strip() or "-"
    except OSError:
        tag = "-"
    try:
        records = sum(1 for _ in run.glob("*/record.json"))
    except OSError:
        records = 0
    return f"{tag}/{records}"


# ---- the requeue decision --------------------------------------------------------------------------------

def describe_exit(rc: int) -> str:
    if rc == EXIT_OK:
        return "exit 0: finished"
    if rc == EXIT_BAD_INPUT:
        return "exit 2: bad config or input (not requeued; fix it and submit again)"
    if rc == EXIT_NONFINITE:
        return "exit 3: non-finite loss (not requeued; the last good checkpoint is kept)"
    if rc == EXIT_REQUEUE:
        return "exit 99: checkpointed on a signal"
    if rc < 0 or rc > 128:
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return f"killed by {name}"
    return f"exit {rc}"


@dataclass
class Decision:
    requeue: bool
    reason: str
    stalled: int = 0  # consecutive runs without progress, this one included (kept in the run folder)
    by_slurm: bool = False  # slurmctld requeued the job itself: it comes back without us


STALLED_FILE = ".asset_dist.stalled"  # in the run folder: consecutive runs that ended without progress
MAX_STALLED = 2  # the second run in a row without progress stops (one slow start is forgiven)


def stalled_runs(run_dir: str | os.PathLike) -> int:
    try:
        return int((Path(run_dir) / STALLED_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def record_stalled(run_dir: str | os.PathLike, n: int) -> None:
    from asset_dist.utils import atomic_write_text

    path = Path(run_dir) / STALLED_FILE
    if n:
        atomic_write_text(path, f"{n}\n")
    else:
        path.unlink(missing_ok=True)


def decide(rc: int, *, signal_seen: str = "", term_at: Optional[float] = None, end_time: Optional[float] = None,
           preempted: bool = False, mode: str = "OFF", progress_before: Optional[str] = None,
           progress_after: Optional[str] = None, restarts: int = 0, max_restarts: int = 100,
           stalled_before: int = 0, max_stalled: int = MAX_STALLED) -> Decision:
    """Requeue or stop, and why. rc: the tasks' exit status (shell style: 128+N for a signal; Popen style -N
    is accepted too). signal_seen: 'usr1' (the checkpoint request went to the tasks), 'term' (the launcher
    itself got TERM) or ''. term_at/end_time: epoch seconds of that TERM and of the job's time limit.
    progress_*: `progress()` at the start of this run and now (None: unknown, not checked); stalled_before:
    how many runs in a row before this one ended without progress."""
    killed_by = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
    asked = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM}.get(signal_seen)
    if asked is not None and killed_by == asked:
        # killed by the very signal that asked for a checkpoint (no handler yet, or already exiting):
        # `--resume auto` continues from the last checkpoint, or finds the run finished
        rc = EXIT_REQUEUE
    if rc != EXIT_REQUEUE:
        return Decision(False, describe_exit(rc))
    at_limit = end_time is not None and term_at is not None and term_at >= end_time - TERM_AT_LIMIT_S
    if signal_seen == "term" and not at_limit and not preempted:
        return Decision(False, "stopped by TERM before the time limit (scancel): not requeued; submit the same "
                               "command again to resume")
    if preempted and "REQUEUE" not in mode:
        return Decision(False, f"preempted, and this cluster's PreemptMode={mode} makes preemption final: not "
                               "requeued; submit the same command again to resume")
    stalled = 0
    if progress_before is not None and progress_after is not None and progress_after == progress_before:
        stalled = stalled_before + 1
        if stalled >= max_stalled:
            return Decision(False, f"no progress in {stalled} runs in a row (still at {progress_before}: "
                                   "checkpoint/edit records): the time limit leaves no time between start-up and "
                                   "the warning; not requeued. Raise the time limit or lower the warning time "
                                   "(--signal)", stalled)
    if restarts >= max_restarts:
        return Decision(False, f"restart {restarts} reached the limit of {max_restarts}: not requeued", stalled)
    why = "preempted" if preempted else ("time limit" if at_limit or signal_seen == "usr1" else "signal")
    if stalled:
        why += f"; no progress in this run, {stalled} of {max_stalled} allowed in a row"
    return Decision(True, f"checkpoint written ({why}); requeueing", stalled)


def requeued_by_slurm(job: Mapping[str, str], restarts: int) -> bool:
    """Has slurmctld requeued the job while this run was stopping? Its Restarts count moves on at once."""
    try:
        return int(job.get("Restarts", "0")) > restarts
    except ValueError:
        return False


def decide_for_job(rc: int, job_id: str, *, signal_seen: str = "", term_at: Optional[float] = None,
                   end_time: Optional[float] = None, progress_before: Optional[str] = None, run_dir: str = "",
                   restarts: int = 0, max_restarts: int = 100) -> Decision:
    """decide() with preemption and PreemptMode read from slurmctld, and the count of runs without progress kept
    in the run folder. end_time: the time limit as read when the run started (a scancel moves the job's
    EndTime to the moment of the cancel)."""
    job = scontrol_job(job_id) if job_id else {}
    if requeued_by_slurm(job, restarts):
        if run_dir:
            record_stalled(run_dir, 0)
        return Decision(False, "SLURM has requeued this job itself (scontrol requeue, a node failure or a "
                               "preemption): it comes back by itself and resumes", by_slurm=True)
    preempted = slurm_time(job.get("PreemptTime", "")) is not None
    res = decide(rc, signal_seen=signal_seen, term_at=term_at, end_time=end_time,
                 preempted=preempted, mode=preempt_mode(job) if preempted else "OFF",
                 progress_before=progress_before, progress_after=progress(run_dir) if run_dir else None,
                 restarts=restarts, max_restarts=max_restarts,
                 stalled_before=stalled_runs(run_dir) if run_dir else 0)
    if run_dir:
        record_stalled(run_dir, res.stalled)
    return res


# ---- command line (the batch shell) ----------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asset_dist.launch.contract",
                                description="The launch contract for shell launchers (slurm/common.sh).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("shell", help="print EXIT_*=N and STALE_VARS=... lines for eval")
    sub.add_parser("rendezvous", help="print `export ASSET_RDZV=HOST:PORT MASTER_ADDR=HOST MASTER_PORT=PORT` for "
                   "this job (run on its first node)")
    st = sub.add_parser("start", help="print shell lines for the start of a run: ASSET_PROGRESS (what RUN_DIR "
                        "would resume from), ASSET_JOB_END (epoch of the time limit, or empty) and, under SLURM, "
                        "`export ASSET_RDZV=... MASTER_ADDR=... MASTER_PORT=...`")
    st.add_argument("run_dir")
    pr = sub.add_parser("progress", help="print what a restart of RUN_DIR would continue from")
    pr.add_argument("run_dir")
    d = sub.add_parser("decide", help="requeue or stop? prints the reason; exit 0 = requeue, 1 = stop, "
                       "3 = SLURM requeued the job itself")
    d.add_argument("--rc", type=int, required=True, help="the tasks' exit status")
    d.add_argument("--signal", default="", choices=["", "usr1", "term"], help="what the launcher received")
    d.add_argument("--term-at", type=float, default=None, help="epoch seconds of that TERM")
    d.add_argument("--end-at", type=float, default=None, help="epoch seconds of the time limit (ASSET_JOB_END)")
    d.add_argument("--run-dir", default="", help="run folder (progress is read from it)")
    d.add_argument("--progress-before", default=None, help="`progress` at the start of the run")
    d.add_argument("--restarts", type=int, default=0)
    d.add_argument("--max-restarts", type=int, default=100)
    a = p.parse_args(argv)
    if a.cmd == "shell":
        print(shell(), end="")
    elif a.cmd == "rendezvous":
        host, port = rendezvous()
        print(f"export {RDZV_VAR}={host}:{port} MASTER_ADDR={host} MASTER_PORT={port}")
    elif a.cmd == "start":
        job_id = os.environ.get("SLURM_JOB_ID", "")
        end = slurm_time(scontrol_job(job_id).get("EndTime", "")) if job_id else None
        print(f"ASSET_PROGRESS={shlex.quote(progress(a.run_dir))}")
        print(f"ASSET_JOB_END={'' if end is None else int(end)}")
        if job_id:
            host, port = rendezvous()
            print(f"export {RDZV_VAR}={host}:{port} MASTER_ADDR={host} MASTER_PORT={port}")
    elif a.cmd == "progress":
        print(progress(a.run_dir))
    else:
        res = decide_for_job(a.rc, os.environ.get("SLURM_JOB_ID", ""), signal_seen=a.signal, term_at=a.term_at,
                             end_time=a.end_at, progress_before=a.progress_before, run_dir=a.run_dir,
                             restarts=a.restarts, max_restarts=a.max_restarts)
        print(res.reason)
        return 0 if res.requeue else (3 if res.by_slurm else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

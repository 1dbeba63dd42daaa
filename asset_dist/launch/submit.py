"""`asset-dist submit`: one training run through submitit, on a SLURM cluster or on this machine.

The submitted callable, `TrainJob`, runs in every task of the job (one task per GPU, or CPU tasks for
gloo). It places the task in the job from submitit's `JobEnvironment` (rank, world size, rendezvous
address, exported as torch variables through asset_dist.distenv) and runs the trainer,
`python -m asset_dist.cli train --config C --set ... --resume auto`, as a child process.

Why a child process. submitit 1.5.4 asks for a checkpoint with SIGUSR2 (`#SBATCH --signal=USR2@delay`,
sent to every process of the step) and calls `checkpoint()` on global rank 0 only; SIGTERM is merely
logged. The trainer checkpoints on SIGUSR1/SIGTERM and all-reduces its stop flag, so one rank's signal
makes every rank save. So: the children ignore USR2; on rank 0, `checkpoint()` forwards USR1 to its
trainer, waits until all ranks have saved and exited EXIT_REQUEUE (99), and returns a resubmission of
the same job (`--resume auto` continues from RUN/checkpoints/latest); submitit then requeues it. Other
ranks exit when their trainer does. A warning that never reached the trainer (it was still starting) is
covered by the TERM at the time limit: the trainer saves on it, and rank 0 resubmits through submitit's
handler. A TERM well before the limit (scancel) is not resubmitted. Non-transient failures (exit 2 bad
config/input, 3 non-finite loss, any crash) raise, so submitit records the error and does not resubmit.

The local executor (one machine, `tasks_per_node` processes) runs the very same callable, with the
time-limit signal sent by submitit's local controller: tests and `asset-dist pipeline --executor local`.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import submitit

from asset_dist.distenv import DistEnv, export_torch_env, slurm_master_port
from asset_dist.exitcodes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE

EXECUTORS = ("auto", "local", "slurm")
TRAIN_COMMAND = (sys.executable, "-m", "asset_dist.cli", "train")
# Launcher variables a submitting shell may have left behind: they would win over the job's own
# placement (asset_dist.distenv reads RANK/WORLD_SIZE first; CROSS_RANK means "deepspeed launcher").
STALE_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "CROSS_RANK",
              "CROSS_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
RESEND_USR1_S = 5.0  # a checkpoint request is repeated until the trainer takes it (it may still be starting)
# How each task's python starts: with USR2 ignored until submitit installs its handler. SLURM may send the
# time-limit warning up to 30 s before it is due (its check period), so a requeued run with a short limit
# can get it while python is still starting, which would kill the task (USR2's default action).
TASK_PYTHON = "bash -c " + shlex.quote('trap "" USR2; exec "$0" "$@"') + " " + shlex.quote(sys.executable)


def log(msg: str) -> None:
    print(f"[asset-submit {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- resources ------------------------------------------------------------------------------------------

def time_seconds(spec: str | int | float) -> int:
    """A SLURM time limit in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (a bare number is minutes)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return int(round(float(spec) * 60))
    text = str(spec).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"time limit {spec!r}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        secs = int(days) * 86400 + a * 3600 + b * 60 + c
    elif c or m.group(4) is not None:  # H:M:S
        secs = a * 3600 + b * 60 + c
    elif m.group(3) is not None:  # M:S
        secs = a * 60 + b
    else:  # M
        secs = a * 60
    if secs <= 0:
        raise ValueError(f"time limit {spec!r} must be positive")
    return secs


@dataclass
class Resources:
    """What one job asks for. The pipeline files use these names as YAML keys."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one task per GPU, or 1 on a CPU node
    cpus_per_task: int = 0  # 0: the cluster's default
    time: str = "01:00:00"  # SLURM syntax (minutes, H:M:S, D-H:M:S)
    mem: str = ""  # per node, SLURM syntax (64G); "" = the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 0  # checkpoint request this long before the limit; 0: min(300 s, limit / 4)
    max_timeouts: int = 20  # requeues after a time limit (preemptions do not count)
    array_parallelism: int = 0  # several configs in one `submit`: at most this many run at once (0: all)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def seconds(self) -> int:
        return time_seconds(self.time)

    @property
    def minutes(self) -> int:
        return max(1, math.ceil(self.seconds / 60))

    @property
    def signal_delay(self) -> int:
        return self.signal_delay_s or max(1, min(300, self.seconds // 4))

    def check(self) -> "Resources":
        for name in ("nodes", "max_timeouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"resources: {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s", "array_parallelism"):
            if getattr(self, name) < 0:
                raise ValueError(f"resources: {name} must be >= 0 (got {getattr(self, name)})")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"resources: one task per GPU: tasks_per_node ({self.tasks_per_node}) must equal "
                             f"gpus_per_node ({self.gpus_per_node}) or be left at 0")
        if self.signal_delay >= self.seconds:
            raise ValueError(f"resources: signal_delay_s ({self.signal_delay}) must be shorter than the time "
                             f"limit ({self.time} = {self.seconds} s)")
        return self

    @classmethod
    def from_dict(cls, data: dict, base: Optional["Resources"] = None, src: str = "resources") -> "Resources":
        names = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{src}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(names)})")
        out = {}
        for k, v in data.items():
            want = int if names[k] in ("int", int) else str
            if want is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{src}: '{k}' must be an integer, got {v!r}")
            out[k] = v if want is int else str(v)
        return replace(base or cls(), **out)


def add_resource_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Resource flags, shared by `submit` (defaults: Resources()) and `pipeline` (defaults=False: a flag given
    overrides that resource for every stage, the pipeline file's value otherwise)."""
    d = Resources()

    def arg(flag: str, name: str, text: str, typ: type = str, shown: Any = None) -> None:
        if defaults:
            text += f" (default {shown if shown is not None else getattr(d, name)})"
        g.add_argument(flag, dest=name, type=typ, default=getattr(d, name) if defaults else None, help=text)

    g = p.add_argument_group("resources" if defaults else "resources (override every stage's)")
    arg("--nodes", "nodes", "nodes", int)
    arg("--gpus-per-node", "gpus_per_node", "GPUs per node; one task per GPU", int, "0: CPU tasks, gloo")
    arg("--tasks-per-node", "tasks_per_node", "tasks per node", int, "the GPU count, or 1 without GPUs")
    arg("--cpus-per-task", "cpus_per_task", "CPUs per task", int, "the cluster's")
    arg("--time", "time", "time limit, SLURM syntax: minutes, HH:MM:SS or D-HH:MM:SS")
    arg("--mem", "mem", "memory per node, SLURM syntax, e.g. 64G", str, "the cluster's")
    arg("--partition", "partition", "SLURM partition", str, "the cluster's")
    arg("--account", "account", "SLURM account", str, "yours")
    arg("--qos", "qos", "SLURM quality of service", str, "the cluster's")
    arg("--constraint", "constraint", "SLURM node constraint, e.g. a100", str, "none")
    arg("--signal-delay", "signal_delay_s", "ask for a checkpoint this many seconds before the time limit", int,
        "min(300, limit/4)")
    arg("--max-timeouts", "max_timeouts", "resubmissions after a time limit before giving up (preemptions do "
        "not count)", int)
    if defaults:
        arg("--slurm-array-parallelism", "array_parallelism",
            "with several --config (one SLURM array): at most this many run at once", int, "all")


def resources_from_args(args: argparse.Namespace, base: Optional[Resources] = None) -> Resources:
    """Flags given on the command line (not None) over `base`."""
    given = {f.name: getattr(args, f.name) for f in fields(Resources) if getattr(args, f.name, None) is not None}
    return replace(base or Resources(), **given)


# ---- executors ------------------------------------------------------------------------------------------

def resolve_executor(kind: str) -> str:
    if kind not in EXECUTORS:
        raise ValueError(f"executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") and shutil.which("srun") else "local"
    return kind


def make_executor(kind: str, folder: str | Path, res: Resources, name: str,
                  after: Sequence[str] = (), dependency: str = ""):
    """A submitit executor for `res`. `after`: job ids this job starts after (afterok); `dependency`: a raw
    SLURM dependency string (both SLURM only)."""
    res.check()
    kind = resolve_executor(kind)
    if kind == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=res.max_timeouts,
                                   slurm_python=TASK_PYTHON)
        extra: dict[str, Any] = {"requeue": True}  # submitit requeues with `scontrol requeue`
        deps = [dependency] if dependency else []
        if after:
            deps.append("afterok:" + ":".join(str(j) for j in after))
            # a failed parent cancels its dependents instead of leaving them pending forever
            extra["kill-on-invalid-dep"] = "yes"
        params: dict[str, Any] = dict(name=name, timeout_min=res.minutes, nodes=res.nodes,
                                      tasks_per_node=res.tasks, stderr_to_stdout=True,
                                      slurm_signal_delay_s=res.signal_delay, slurm_additional_parameters=extra)
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if res.cpus_per_task:
            params["cpus_per_task"] = res.cpus_per_task
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        if deps:
            params["slurm_dependency"] = ",".join(deps)
        if res.array_parallelism:
            params["slurm_array_parallelism"] = res.array_parallelism
        ex.update_parameters(**params)
        return ex
    if res.nodes != 1:
        raise ValueError(f"the local executor runs on this machine only: nodes must be 1 (got {res.nodes})")
    if after or dependency:
        raise ValueError("job dependencies need SLURM (the local executor runs jobs one at a time)")
    ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=res.max_timeouts, python=TASK_PYTHON)
    ex.update_parameters(timeout_min=res.seconds / 60, tasks_per_node=res.tasks, gpus_per_node=res.gpus_per_node,
                         signal_delay_s=res.signal_delay, stderr_to_stdout=True, nodes=1)
    return ex


# ---- the job ----------------------------------------------------------------------------------------------

class TrainingFailed(RuntimeError):
    """The trainer exited with an error; submitit records it and does not resubmit."""


def describe_exit(rc: int) -> str:
    if rc == EXIT_BAD_INPUT:
        return "exit 2: bad config or input (not resubmitted; fix it and submit again)"
    if rc == EXIT_NONFINITE:
        return "exit 3: non-finite loss (not resubmitted; the last good checkpoint is kept)"
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"killed by signal {-rc}"
    return f"exit {rc}"


def task_place(job_env: Any) -> DistEnv:
    """This task's place in the job, from a submitit JobEnvironment (SLURM or local)."""
    world = job_env.num_tasks
    nodes = max(job_env.num_nodes, 1)
    local = job_env.cluster == "local"
    return DistEnv(
        rank=job_env.global_rank,
        local_rank=job_env.local_rank,
        world_size=world,
        # the first host of the allocation; every task (and a requeued run) derives the same address and port
        master_addr="127.0.0.1" if local else list(job_env.hostnames)[0],
        master_port=slurm_master_port(int(job_env.raw_job_id)),
        node_rank=job_env.node,
        num_nodes=nodes,
        launcher="submitit",
        local_world_size=max(world // nodes, 1),
    )


def child_env(place: DistEnv, base: Optional[dict] = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in STALE_VARS:
        env.pop(k, None)
    export_torch_env(place, env)
    env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _child_preexec(libc: Optional[Any]):
    def setup() -> None:
        # submitit's checkpoint request (USR2) reaches every process of a SLURM step; it is ours to act on.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        # Ignored until the trainer installs its handler: a request during start-up is dropped, not fatal
        # (checkpoint() repeats it until the trainer exits).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if libc is not None:  # the task dies (local controller's SIGKILL): the trainer gets TERM and saves
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def _peek_exit(pid: int) -> Optional[int]:
    """A child's exit status without reaping it (Popen-style: -N for death by signal N), or None if running.

    Peeking (WNOWAIT) instead of Popen.poll(): checkpoint() runs inside a signal handler that may interrupt
    __call__'s own wait, and Popen's wait lock is not re-entrant.
    """
    res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if res is None or res.si_pid == 0:
        return None
    return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (works without accounting/sacct); {} once slurmctld forgot the job."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(\S+?)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def slurm_state(job_id: str) -> str:
    """A job's state (PENDING, RUNNING, COMPLETED, ...); "" once the job is forgotten."""
    return scontrol_job(job_id).get("JobState", "")


def near_time_limit(margin_s: float = 10.0) -> bool:
    """True when this SLURM job is at (or past) its time limit: a TERM now is the limit, not a scancel."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    end = scontrol_job(job_id).get("EndTime", "")
    try:  # slurmctld writes local time, e.g. 2026-11-28T09:10:30
        return time.time() >= datetime.datetime.fromisoformat(end).timestamp() - margin_s
    except ValueError:
        return False


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit callable: pickled at submission, called in every task of the job."""

    def __init__(self, config: str | Path, overrides: Sequence[str] = (), run_dir: str | Path = "",
                 command: Optional[Sequence[str]] = None, cwd: Optional[str | Path] = None,
                 term_grace_s: float = 30.0):
        self.cwd = str(Path(cwd or os.getcwd()).resolve())
        self.config = str((Path(self.cwd) / config).resolve())
        self.overrides = list(overrides)
        self.run_dir = str((Path(self.cwd) / run_dir).resolve()) if run_dir else ""
        self.command = list(command or TRAIN_COMMAND)
        self.term_grace_s = term_grace_s
        self._proc: Optional[subprocess.Popen] = None
        self._rc: Optional[int] = None  # the trainer's exit status, once seen

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = state["_rc"] = None  # a resubmission starts its own trainer
        return state

    def argv(self) -> list[str]:
        cmd = [*self.command, "--config", self.config]
        for o in self.overrides:
            cmd += ["--set", o]
        if self.run_dir:
            cmd += ["--set", f"paths.run_dir={self.run_dir}"]
        return cmd + ["--resume", "auto"]

    def _status(self) -> Optional[int]:
        """The trainer's exit status, or None while it runs (safe inside a signal handler)."""
        if self._rc is None and self._proc is not None:
            try:
                self._rc = _peek_exit(self._proc.pid)
            except ChildProcessError:  # already reaped by Popen
                self._rc = self._proc.returncode
        return self._rc

    def _wait(self) -> int:
        while (rc := self._status()) is None:
            time.sleep(0.5)
        return rc

    def __call__(self) -> dict[str, Any]:
        place = task_place(submitit.JobEnvironment())
        try:
            libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
        except OSError:
            libc = None
        if place.rank == 0:
            log(f"{place.world_size} task(s) on {place.num_nodes} node(s), rendezvous "
                f"{place.master_addr}:{place.master_port}; run folder {self.run_dir or '(from the config)'}")
            log("command " + " ".join(self.argv()))
        proc = subprocess.Popen(self.argv(), cwd=self.cwd, env=child_env(place), preexec_fn=_child_preexec(libc))
        self._proc, self._rc = proc, None
        try:
            rc = self._wait()
        finally:
            self._stop()
        if rc == 0:
            return {"rank": place.rank, "exit_code": 0, "run_dir": self.run_dir}
        if rc in (EXIT_REQUEUE, -signal.SIGTERM):  # saved on a signal, or killed by TERM while starting
            if place.rank != 0:
                # rank 0 saw the same: it resubmits the whole job, or not (scancel)
                log(f"rank {place.rank}: trainer stopped ({describe_exit(rc)}); rank 0 decides on resubmission")
                sys.exit(EXIT_REQUEUE)
            # Nobody asked rank 0 for a checkpoint: the trainer stopped on a TERM.
            if near_time_limit():
                # The TERM at the time limit (the warning came too early to be taken, or too late): resubmit
                # through submitit's own handler, as if its warning had arrived now.
                log(f"trainer stopped on the TERM at the time limit ({describe_exit(rc)}): resubmitting")
                os.kill(os.getpid(), signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG])
                time.sleep(60)  # the handler requeues and exits; this is not reached
            # scancel, or a preemption (a USR2 may still follow and resubmit from its handler during the pause)
            log(f"trainer stopped on a TERM before the time limit ({describe_exit(rc)}); waiting "
                f"{self.term_grace_s:.0f} s for a preemption notice")
            time.sleep(self.term_grace_s)
            raise TrainingFailed(f"trainer stopped by TERM before the time limit ({describe_exit(rc)}), run folder "
                                 f"{self.run_dir}; not resubmitted (scancel?). Submit the same command again "
                                 "to resume from its last checkpoint.")
        raise TrainingFailed(f"trainer failed: {describe_exit(rc)}; logs in this job's submitit folder")

    def _stop(self) -> None:
        """Reap the trainer; if it still runs (this task is being stopped), let it save first."""
        proc = self._proc
        if self._status() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on global rank 0 before a time limit or on preemption (USR2).

        Ask the trainer to save (USR1; it all-reduces the request, so every rank saves), wait for it to exit,
        and resubmit this job unchanged: `--resume auto` continues from the checkpoint. None = no resubmission.
        """
        proc = self._proc
        if proc is None:
            log("checkpoint requested before the trainer started: resubmitting")
            return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
        rc = self._status()
        if rc is None:
            log(f"checkpoint requested: asking the trainer (pid {proc.pid}) to save on every rank")
            while rc is None:
                try:
                    proc.send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + RESEND_USR1_S
                while rc is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    rc = self._status()
        if rc in (EXIT_REQUEUE, 0) or rc < 0:
            # 99: saved. 0: finished just now (the rerun sees that and exits at once). Killed by a signal:
            # resume from the last checkpoint.
            log(f"trainer stopped ({describe_exit(rc)}); resubmitting with --resume auto")
            return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
        log(f"trainer failed ({describe_exit(rc)}): not resubmitting")
        return None


# ---- submitting and waiting -----------------------------------------------------------------------------

def submit_jobs(jobs: Sequence[TrainJob], res: Resources, executor: str = "auto", name: str = "asset",
                folder: Optional[str | Path] = None, after: Sequence[str] = (), dependency: str = "") -> list:
    """Submit `jobs` with one set of resources (several jobs: one SLURM array); returns submitit Jobs.

    folder: submitit's folder (pickles, per-task logs); default RUN/submitit of the first job."""
    if not jobs:
        raise ValueError("nothing to submit")
    folder = Path(folder or Path(jobs[0].run_dir) / "submitit")
    ex = make_executor(executor, folder, res, name, after=after, dependency=dependency)
    if len(jobs) == 1:
        return [ex.submit(jobs[0])]
    with ex.batch():
        out = [ex.submit(j) for j in jobs]
    return out


def log_path(job: Any) -> Path:
    """Task 0's log (stdout and stderr) of a submitit job."""
    return job.paths.stdout if job.num_tasks == 1 else job.task(0).paths.stdout


SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


def job_outcome(job: Any) -> tuple[bool, str]:
    """(success, message) from the result files every task writes when its callable returns or raises."""
    from submitit.core.utils import pickle_load

    tasks = [job] if job.num_tasks == 1 else [job.task(t) for t in range(job.num_tasks)]
    for t, task in enumerate(tasks):
        path = task.paths.result_pickle
        if not path.exists():
            return False, f"task {t} left no result (killed, or still requeued?); see {log_path(job)}"
        outcome, value = pickle_load(path)
        if outcome != "success":
            lines = str(value).strip().splitlines()
            return False, f"task {t} failed: {lines[-1] if lines else value}; see {log_path(job)}"
    return True, "completed"


def wait_job(job: Any, poll_s: float = 5.0) -> tuple[bool, str]:
    """Block until a submitit job has ended (requeues included); return job_outcome."""
    if isinstance(job, submitit.LocalJob):
        while not job.done():
            time.sleep(min(poll_s, 1.0))
    else:
        while slurm_state(job.job_id) in SLURM_ACTIVE:
            time.sleep(poll_s)
    return job_outcome(job)


# ---- command line -----------------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Submit a training run through submitit: one task per GPU (or CPU tasks with gloo), "
                     "checkpoint + resubmission before the time limit or on preemption, `--resume auto`.")
    p.add_argument("--config", action="append", required=True,
                   help="stage config (YAML); give several for one job per config (a SLURM array)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every job, e.g. --set train.max_steps=1000 (repeatable)")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="slurm, local (this machine, tasks as processes) or auto: slurm when sbatch is found")
    p.add_argument("--run-dir", default="", help="run folder (default: the config's paths.run_dir; one config only)")
    p.add_argument("--name", default="", help="job name (default asset-<stage>)")
    p.add_argument("--after", action="append", default=[], metavar="JOB_ID",
                   help="start after this job has completed successfully (afterok; repeatable)")
    p.add_argument("--dependency", default="", help="a raw SLURM --dependency string, e.g. afterany:123")
    p.add_argument("--wait", action="store_true",
                   help="block until the job has ended and exit 0/1 with its outcome (always so with local)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs that would be submitted, submit nothing")
    add_resource_args(p)


def main(args: argparse.Namespace) -> int:
    from asset_dist.config import ConfigError, load_config

    try:
        res = resources_from_args(args).check()
        kind = resolve_executor(args.executor)
        if args.run_dir and len(args.config) > 1:
            raise ValueError("--run-dir takes one --config (each config names its own paths.run_dir)")
        jobs, stages = [], []
        for config in args.config:
            sets = list(args.overrides) + ([f"paths.run_dir={args.run_dir}"] if args.run_dir else [])
            cfg = load_config(config, sets)  # fail here, not in the queue
            jobs.append(TrainJob(config, args.overrides, cfg.paths.run_dir))
            stages.append(cfg.train.stage)
        dirs = [j.run_dir for j in jobs]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"two configs share a run folder ({dirs}): give each its own paths.run_dir")
        if kind == "local" and (args.after or args.dependency):
            raise ValueError("--after/--dependency need SLURM (the local executor runs jobs one at a time)")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    name = args.name or f"asset-{stages[0]}"
    for job, stage in zip(jobs, stages):
        print(f"{stage}: {res.nodes} node(s) x {res.tasks} task(s), {res.gpus_per_node} GPU(s)/node, "
              f"time {res.time}, run folder {job.run_dir}")
        print("  " + " ".join(job.argv()))
    if args.dry_run:
        print(f"(dry run: nothing submitted; executor {kind})")
        return 0

    try:
        if kind == "local" and len(jobs) > 1:  # one machine: one job after the other
            ok = True
            for job in jobs:
                (sub,) = submit_jobs([job], res, kind, name)
                ok &= _report(sub, job.run_dir, wait=True)
            return 0 if ok else 1
        folder = Path(jobs[0].run_dir if len(jobs) == 1 else os.path.commonpath(dirs)) / "submitit"
        subs = submit_jobs(jobs, res, kind, name, folder=folder, after=args.after, dependency=args.dependency)
    except Exception as e:  # noqa: BLE001 - sbatch refused (partition, account, dependency...): say so plainly
        print(f"error: submission failed: {e}", file=sys.stderr)
        return 1
    ok = all([_report(sub, job.run_dir, wait=args.wait or kind == "local") for sub, job in zip(subs, jobs)])
    return 0 if ok else 1


def _report(sub: Any, run_dir: str, wait: bool) -> bool:
    print(f"submitted job {sub.job_id}: run folder {run_dir}, log {log_path(sub)}", flush=True)
    if not wait:
        return True
    ok, msg = wait_job(sub)
    print(f"job {sub.job_id}: {msg}", flush=True)
    return ok


"""The sbatch scripts on a real one-node SLURM cluster, with tests/fake_trainer.py as the trainer.

What is checked: `sbatch slurm/train_sga.sh` with its defaults overridden for a CPU node starts one task
per rank with distinct ranks and one rendezvous address; the time-limit warning (USR1) leads to a
checkpoint, a requeue under the same id, and a resume with no step lost or repeated; a trainer that
misses the warning is stopped by the TERM at the time limit and still requeued; a failing trainer, a
missing config and a user's scancel are not requeued. The two requeue tests take 1-3 minutes (a requeued job pauses
before it starts again, and SLURM checks time limits only every 30 s); they are submitted first and run
while the other tests do.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

try:
    from .slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401
except ImportError:
    from slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401

FAKE = f"{sys.executable} {REPO / 'tests' / 'fake_trainer.py'} train"
# a CPU node: two tasks on one node, no GPUs, one core each (every other #SBATCH default stays)
CPU = ["-N1", "--ntasks-per-node=2", "--gpus-per-node=0", "-c1"]
# SLURM checks time limits every 30 s, so with -t 1:00 --signal=B:USR1@20 the warning comes 10-40 s
# after a run starts. 170 x 0.25 s is more than any first run can do; each later run adds ~20 s.
REQUEUE_STEPS = 170
# The time limit itself is enforced at one of those 30 s checks: a run ends 60-90 s after it starts.
# 380 x 0.25 s needs exactly one restart.
TIMEOUT_STEPS = 380


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    config = tmp / "config.yaml"
    config.write_text("name: fake\n")  # the fake trainer only needs the file to exist
    return {"TRAIN_CMD": FAKE, "CONFIG": str(config), **extra}


def _launches(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "launches").glob("*.json"))]


def _steps(run_dir: Path, rank: int) -> list[int]:
    return [int(x) for x in (run_dir / "steps" / f"rank{rank}.log").read_text().split()]


def _submit(cluster: SlurmCluster, tmp: Path, name: str, overrides: str, *sbatch_args: str) -> tuple[int, Path]:
    env = _env(tmp, RUN_DIR=str(tmp / "run"), OVERRIDES=overrides)
    # the long jobs stay off the last node, which the preemption tests take over
    pin = ["-w", cluster.nodes[0]] if len(cluster.nodes) > 1 else []
    job = cluster.sbatch(*CPU, *pin, "-J", name, *sbatch_args, f"--output={tmp}/%x-%j.out", "slurm/train_sga.sh",
                         env=env)
    return job, tmp / "run"


def _wait_steps(cluster: SlurmCluster, job: int, run_dir: Path, n: int, timeout: float = 120) -> None:
    steps = run_dir / "steps" / "rank0.log"
    deadline = time.monotonic() + timeout
    while not (steps.exists() and len(steps.read_text().split()) >= n):
        assert time.monotonic() < deadline, f"job {job} made no {n} steps: {cluster.job(job)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def requeue_job(slurm_cluster: SlurmCluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("requeue")
    job, run_dir = _submit(slurm_cluster, tmp, "asset-test-requeue",
                           f"train.max_steps={REQUEUE_STEPS} fake.step_seconds=0.25 fake.dist=false",
                           "-t", "00:01:00", "--signal=B:USR1@20")
    yield job, run_dir, tmp
    slurm_cluster.cancel(job)


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster: SlurmCluster, tmp_path_factory):
    """A trainer that misses the warning (USR1 ignored): only the TERM at the time limit stops it."""
    tmp = tmp_path_factory.mktemp("timeout")
    job, run_dir = _submit(slurm_cluster, tmp, "asset-test-timeout",
                           f"train.max_steps={TIMEOUT_STEPS} fake.step_seconds=0.25 fake.dist=false "
                           "fake.ignore_usr1=true",
                           "-t", "00:01:00")
    yield job, run_dir, tmp
    slurm_cluster.cancel(job)


@pytest.fixture(scope="module")
def stalled_job(slurm_cluster: SlurmCluster, tmp_path_factory):
    """A run whose time limit leaves no room after start-up: the warning (USR1, sent as soon as the job runs:
    300 s before a one-minute limit) arrives while it starts, it saves where it resumed (step 5); after two
    such runs the launcher stops requeueing."""
    tmp = tmp_path_factory.mktemp("stalled")
    run = tmp / "run"
    for r in (0, 1):  # an earlier run's checkpoint at step 5
        (run / "ckpt").mkdir(parents=True, exist_ok=True)
        (run / "ckpt" / f"rank{r}.json").write_text(json.dumps({"step": 5, "signal": None}))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000005\n")
    job, run_dir = _submit(slurm_cluster, tmp, "asset-test-stalled",
                           "train.max_steps=100 fake.startup_seconds=40 fake.dist=false", "-t", "00:01:00")
    yield job, run_dir, tmp
    slurm_cluster.cancel(job)


@pytest.fixture(autouse=True)
def _submit_long_jobs_first(requeue_job, timeout_job, stalled_job):
    """The long jobs start with the module, so their waits overlap the other tests."""


def test_sbatch_defaults_two_ranks(slurm_cluster: SlurmCluster, tmp_path):
    """Default output and run folder (relative to the submit directory), 2 tasks, torch.distributed works."""
    name = f"asset-test-ranks-{int(time.time())}"
    env = _env(tmp_path, OVERRIDES="train.max_steps=5")
    job = slurm_cluster.sbatch(*CPU, "-J", name, "-t", "00:10:00", "slurm/train_sga.sh", env=env)
    run_dir = REPO / "runs" / f"{name}-{job}"
    log = REPO / "slurm" / "logs" / f"{name}-{job}.out"
    try:
        info = slurm_cluster.wait(job, timeout=180)
        text = log.read_text() if log.exists() else "(no log)"
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
        assert Path(info["StdOut"]) == log
        assert "tasks exited with status 0" in text
        assert (run_dir / f"slurm-{job}.out").resolve() == log.resolve()
        assert len((run_dir / "launches.tsv").read_text().splitlines()) == 1

        launches = _launches(run_dir)
        assert sorted(x["rank"] for x in launches) == [0, 1]
        assert sorted(x["local_rank"] for x in launches) == [0, 1]
        host = info["NodeList"]
        rdzv = (run_dir / "launches.tsv").read_text().split("\trdzv=")[1].split("\t")[0]
        assert rdzv.rsplit(":", 1)[0] == host and 20000 <= int(rdzv.rsplit(":", 1)[1]) < 32768, rdzv
        for x in launches:
            assert (x["world_size"], x["launcher"], x["num_nodes"], x["restart"]) == (2, "slurm", 1, 0)
            # the port the batch shell probed free on the first node, not one derived from the job id
            assert f"{x['master_addr']}:{x['master_port']}" == rdzv
            assert x["allreduce_rank_sum"] == 1.0  # gloo all-reduce over both tasks: 0 + 1
            assert x["argv"][-2:] == ["--resume", "auto"]
            assert f"paths.run_dir={run_dir}" in x["argv"]
            assert x["config"] == env["CONFIG"]
            assert _steps(run_dir, x["rank"]) == [1, 2, 3, 4, 5]
    finally:
        slurm_cluster.cancel(job)
        shutil.rmtree(run_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        try:
            run_dir.parent.rmdir()  # runs/ only if this test made it and nothing else is in it
        except OSError:
            pass


def test_failed_trainer_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path):
    """Exit 2 (bad config) ends the job: FAILED, no restart. Config and override given as arguments."""
    env = _env(tmp_path, RUN_DIR=str(tmp_path / "run"))
    config = env.pop("CONFIG")
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-fail", "-t", "00:05:00", f"--output={tmp_path}/%j.out",
                               "slurm/train_sga.sh", config, "fake.exit_code=2", env=env)
    info = slurm_cluster.wait(job, timeout=180)
    log = (tmp_path / f"{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert "tasks exited with status 2" in log and "requeueing" not in log
    assert "exit 2: bad config or input (not requeued" in log
    launches = _launches(tmp_path / "run")
    assert [x["exit_code"] for x in launches] == [2, 2]
    assert all(x["config"] == config for x in launches)


def test_missing_config_fails_before_launch(slurm_cluster: SlurmCluster, tmp_path):
    env = {"TRAIN_CMD": FAKE, "CONFIG": str(tmp_path / "nope.yaml"), "RUN_DIR": str(tmp_path / "run")}
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-noconfig", "-t", "00:05:00",
                               f"--output={tmp_path}/%j.out", "slurm/train_sga.sh", env=env)
    info = slurm_cluster.wait(job, timeout=120)
    log = (tmp_path / f"{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in log
    assert not (tmp_path / "run").exists()


def test_scancel_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path):
    """A user's scancel: the trainer still checkpoints (TERM) but the job stays cancelled."""
    run_dir = tmp_path / "run"
    env = _env(tmp_path, RUN_DIR=str(run_dir), OVERRIDES="train.max_steps=100000 fake.step_seconds=0.1")
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-scancel", "-t", "00:10:00",
                               f"--output={tmp_path}/%j.out", "slurm/train_sga.sh", env=env)
    _wait_steps(slurm_cluster, job, run_dir, 3)
    slurm_cluster.cancel(job)
    info = slurm_cluster.wait(job, states={"CANCELLED", "COMPLETED", "FAILED", "PENDING"}, timeout=120)
    log = (tmp_path / f"{job}.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "scancel): not requeued" in log
    for r in (0, 1):
        saved = json.loads((run_dir / "ckpt" / f"rank{r}.json").read_text())
        assert saved["step"] == _steps(run_dir, r)[-1]  # saved exactly where it stopped


def test_time_limit_checkpoint_requeue_resume(slurm_cluster: SlurmCluster, requeue_job):
    """USR1 before the limit -> save + exit 99 -> requeue (same id, same folder) -> resume -> finish."""
    job, run_dir, tmp = requeue_job
    info = slurm_cluster.wait(job, timeout=420)
    log = next(tmp.glob("*.out")).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    restarts = int(info["Restarts"])
    assert restarts >= 1, log
    assert log.count("USR1: time limit near") >= restarts
    assert len((run_dir / "launches.tsv").read_text().splitlines()) == restarts + 1

    launches = _launches(run_dir)
    assert sorted((x["restart"], x["rank"]) for x in launches) == [(k, r) for k in range(restarts + 1) for r in (0, 1)]
    for r in (0, 1):
        # every step exactly once across all runs: nothing lost at the save, nothing redone on resume
        assert _steps(run_dir, r) == list(range(1, REQUEUE_STEPS + 1))
        starts = [x["start_step"] for x in sorted(launches, key=lambda x: x["restart"]) if x["rank"] == r]
        assert starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:]))
        assert (run_dir / "done" / f"rank{r}").read_text().strip() == str(REQUEUE_STEPS)
    assert all(x["argv"][-2:] == ["--resume", "auto"] for x in launches)
    assert all(x["master_addr"] == x["hostname"] for x in launches if x["rank"] == 0)  # rank 0 hosts the store


def test_time_limit_term_still_requeues(slurm_cluster: SlurmCluster, timeout_job):
    """Warning missed: the TERM at the time limit still saves, and a TERM at the limit (not scancel) requeues."""
    job, run_dir, tmp = timeout_job
    info = slurm_cluster.wait(job, timeout=420)
    log = next(tmp.glob("*.out")).read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "TERM received" in log and "requeueing job" in log
    for r in (0, 1):
        assert _steps(run_dir, r) == list(range(1, TIMEOUT_STEPS + 1))
        first = json.loads((run_dir / "launches" / f"restart1-rank{r}.json").read_text())
        assert 0 < first["start_step"] < TIMEOUT_STEPS


def test_scontrol_requeue_checkpoints_and_resumes(slurm_cluster: SlurmCluster, tmp_path):
    """`scontrol requeue` of a running job: every rank gets TERM from its slurmstepd and saves; SLURM brings the
    job back and it resumes from that step (the launcher leaves the requeue to SLURM)."""
    run_dir, steps = tmp_path / "run", 120
    env = _env(tmp_path, RUN_DIR=str(run_dir), OVERRIDES=f"train.max_steps={steps} fake.step_seconds=0.1")
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-scontrol-requeue", "-t", "00:10:00",
                               f"--output={tmp_path}/%j.out", "--open-mode=append", "slurm/train_sga.sh", env=env)
    try:
        _wait_steps(slurm_cluster, job, run_dir, 5)
        slurm_cluster.run("scontrol", "requeue", str(job))
        info = slurm_cluster.wait(job, timeout=300)
        log = (tmp_path / f"{job}.out").read_text()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
        assert "SLURM has requeued this job itself" in log and "scancel" not in log, log
        saved = re.findall(r"rank 0: SIGTERM at step (\d+): saved, exit 99", log)
        assert len(saved) == 1, log
        for r in (0, 1):
            assert _steps(run_dir, r) == list(range(1, steps + 1))  # nothing lost, nothing redone
            first = json.loads((run_dir / "launches" / f"restart1-rank{r}.json").read_text())
            assert first["start_step"] == int(saved[0])
    finally:
        slurm_cluster.cancel(job)


@pytest.mark.parametrize("partition", ["debug", "scavenger"])
def test_preemption_checkpoints_and_requeues_only_where_preemptmode_says_so(slurm_cluster: SlurmCluster, tmp_path,
                                                                           partition):
    """A job in `urgent` preempts the run (local_slurm.sh: PreemptMode REQUEUE for `debug`, CANCEL for
    `scavenger`, a GraceTime, preempt_send_user_signal). The tasks are told at once (on 22.05: TERM from their
    own slurmstepd; elsewhere the batch shell's USR1 warning, passed on through srun), every rank saves; in
    `debug` the job is requeued and resumes, in `scavenger` the preemption is final."""
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("needs a node of its own: start the cluster with ASSET_SLURM_NODES>=2")
    node = slurm_cluster.nodes[-1]
    run_dir, steps = tmp_path / "run", 150
    env = _env(tmp_path, RUN_DIR=str(run_dir), OVERRIDES=f"train.max_steps={steps} fake.step_seconds=0.1")
    job = slurm_cluster.sbatch(*CPU, "-p", partition, "-w", node, "-J", f"asset-test-preempt-{partition}",
                               "-t", "00:10:00", f"--output={tmp_path}/%j.out", "slurm/train_sga.sh", env=env)
    urgent = None
    try:
        _wait_steps(slurm_cluster, job, run_dir, 5)
        urgent = slurm_cluster.sbatch("-p", "urgent", "-w", node, "--exclusive", "-t", "00:02:00",
                                      "-o", "/dev/null", "--wrap", "sleep 2")
        info = slurm_cluster.wait(job, timeout=300)
        log = (tmp_path / f"{job}.out").read_text()
        # the tasks got the notice (TERM from their slurmstepd, or USR1 through the batch shell) and saved
        saved_at = re.findall(r"rank 0: SIG(?:TERM|USR1) at step (\d+): saved, exit 99", log)
        assert len(saved_at) == 1, log
        if partition == "debug":
            assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
            assert "checkpoint written (preempted); requeueing job" in log
            for r in (0, 1):  # nothing lost at the save, nothing redone after the requeue
                assert _steps(run_dir, r) == list(range(1, steps + 1))
                first = json.loads((run_dir / "launches" / f"restart1-rank{r}.json").read_text())
                assert first["start_step"] == int(saved_at[0])
        else:
            assert info["Restarts"] == "0" and info["JobState"] != "COMPLETED", (info, log)
            assert "PreemptMode=CANCEL makes preemption final: not requeued" in log
            for r in (0, 1):
                assert json.loads((run_dir / "ckpt" / f"rank{r}.json").read_text())["step"] == _steps(run_dir, r)[-1]
    finally:
        slurm_cluster.cancel(job)
        if urgent is not None:
            slurm_cluster.cancel(urgent)


def test_a_run_without_progress_stops_requeueing(slurm_cluster: SlurmCluster, stalled_job):
    """The warning comes during start-up, every time: each run saves the step it resumed from; the launcher
    forgives one such run (a slow start) and stops at the second instead of requeueing forever."""
    job, run_dir, tmp = stalled_job
    info = slurm_cluster.wait(job, timeout=420)
    log = next(tmp.glob("*.out")).read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "99:0", "1"), (info, log)
    assert log.count("rank 0: SIGUSR1 at step 5: saved") == 2, log  # once per run
    assert "no progress in this run, 1 of 2 allowed in a row); requeueing job" in log, log
    assert "no progress in 2 runs in a row (still at step_00000005/0" in log, log

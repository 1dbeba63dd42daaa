"""The real trainer on a real one-node SLURM cluster (scripts/local_slurm.sh): sbatch scripts, the submitit
launcher and the stage pipeline, with the tiny configs on CPU (2 tasks, gloo).

- `sbatch slurm/train_sga.sh` trains tiny SGA from tiny exported parents and exports it;
- a tiny_seg job with a one-minute limit and an early warning (`--signal=B:USR1@10`) checkpoints on every
  rank, requeues, resumes and finishes with the step count, metrics and weights of an uninterrupted
  torchrun run of the same config (bitwise: same world size). After the first requeue the test raises the
  job's limit, so the resumed run finishes instead of repeating the same cycle;
- `asset-dist submit --executor slurm` runs tiny_seg through submitit and exports it;
- a submitit job preempted (TERM, then submitit's USR2, as `job._interrupt()` does) checkpoints on every
  rank through TrainJob.checkpoint, is requeued by submitit and resumes (tests/fake_trainer.py as trainer);
- `asset-dist pipeline --config configs/tiny_pipeline.yaml` submits vqgan + seg -> guide -> sga with afterok
  dependencies, every stage reads its parents' exports, and a second invocation submits nothing.

Every job is submitted when the module starts, so they share the cluster (and the 2 cores) instead of
queueing behind each other; the tests then wait for their own job. Expect 4-6 minutes on 2 free cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch

from asset_dist.config import load_config
from asset_dist.launch.submit import Resources, TrainJob, job_outcome, submit_jobs, wait_job
from asset_dist.models.transformer import AssetTransformer
from asset_dist.artifacts import read_export

try:
    from .slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401
    from .train_utils import make_tiny_parents, metrics, train_env
except ImportError:
    from slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401
    from train_utils import make_tiny_parents, metrics, train_env

CPU = ["-N1", "--ntasks-per-node=2", "--gpus-per-node=0", "-c1"]  # a CPU node: 2 tasks, gloo
FAKE = [sys.executable, str(REPO / "tests" / "fake_trainer.py"), "train"]
# The requeue job: with -t 1:00 --signal=B:USR1@10 the warning comes 20-50 s after a run starts (SLURM checks
# every 30 s and signals up to one period early), or is dropped if the trainer is still starting, and then
# the TERM at the limit (60-90 s) stops it. Either way the first run ends within ~70 s of training: at most
# ~100 steps even at 1.5 steps/s, so 150 steps always need a restart.
REQUEUE_STEPS = 150
PREEMPT_STEPS = 300
REQUEUE_SETS = ["data.batch_size=1", f"train.max_steps={REQUEUE_STEPS}", "train.ckpt_every=1000",
                "logging.image_every=0", "logging.log_every=10"]


def _env(**extra: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _log(tmp: Path) -> str:
    logs = sorted(tmp.glob("*.out"))
    return logs[0].read_text() if logs else "(no log)"


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_parents(tmp_path_factory.mktemp("parents"))


@pytest.fixture(scope="module")
def requeue_job(slurm_cluster: SlurmCluster, sflckr_shards, tmp_path_factory):
    """The one-minute-limit job, and alongside it the uninterrupted reference run (torchrun, 2 processes)."""
    tmp = tmp_path_factory.mktemp("requeue")
    sets = [f"data.train_shards={sflckr_shards}", *REQUEUE_SETS]
    env = _env(CONFIG="configs/tiny_seg.yaml", RUN_DIR=str(tmp / "run"), OVERRIDES=" ".join(sets))
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-seg-requeue", "-t", "00:01:00", "--signal=B:USR1@10",
                               f"--output={tmp}/%x-%j.out", "slurm/train_seg.sh", env=env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(28500 + os.getpid() % 1000), "-m", "asset_dist.cli", "train",
           "--config", str(REPO / "configs" / "tiny_seg.yaml")]
    for o in sets + [f"paths.run_dir={tmp / 'ref'}"]:
        cmd += ["--set", o]
    with open(tmp / "ref.log", "w") as out:
        ref = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=out, stderr=subprocess.STDOUT)
    yield job, tmp, ref
    slurm_cluster.cancel(job)
    if ref.poll() is None:
        ref.kill()
        ref.wait()


@pytest.fixture(scope="module")
def sga_job(slurm_cluster: SlurmCluster, sflckr_shards, parents, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sga")
    sets = [f"data.train_shards={sflckr_shards}", "train.max_steps=2", "logging.image_every=0",
            "logging.log_every=1", f"train.vqgan_weights={parents['vqgan']}", f"train.seg_weights={parents['seg']}",
            f"train.guide_weights={parents['guide']}", f"train.init_from={parents['guide']}"]
    env = _env(CONFIG="configs/tiny_sga.yaml", RUN_DIR=str(tmp / "run"), OVERRIDES=" ".join(sets))
    job = slurm_cluster.sbatch(*CPU, "-J", "asset-test-sga", "-t", "00:15:00", f"--output={tmp}/%x-%j.out",
                               "slurm/train_sga.sh", env=env)
    yield job, tmp
    slurm_cluster.cancel(job)


@pytest.fixture(scope="module")
def submitit_job(slurm_cluster: SlurmCluster, sflckr_shards, tmp_path_factory):
    """`asset-dist submit` (the command line) on the cluster: tiny_seg, 4 steps, 2 tasks."""
    tmp = tmp_path_factory.mktemp("submitit")
    p = slurm_cluster.run(sys.executable, "-m", "asset_dist.cli", "submit", "--executor", "slurm",
                          "--config", "configs/tiny_seg.yaml", "--run-dir", str(tmp / "run"),
                          "--name", "asset-test-submit",
                          "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "15",
                          "--set", f"data.train_shards={sflckr_shards}", "--set", "train.max_steps=4",
                          "--set", "logging.image_every=0", env=_env())
    job = int(re.search(r"submitted job (\d+)", p.stdout).group(1))
    yield job, tmp / "run", p.stdout
    slurm_cluster.cancel(job)


def _preempt_when_training(cluster: SlurmCluster, job: int, steps: Path, report: dict) -> None:
    """Once the job has taken 20 steps, preempt it as submitit's job._interrupt() fakes it: TERM to every
    process of the job, then submitit's USR2. Runs beside the other tests, so it does not wait for its turn."""
    try:
        deadline = time.monotonic() + 400
        while not (steps.exists() and len(steps.read_text().split()) >= 20):
            state = cluster.job(job).get("JobState")
            if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
                report["error"] = f"job {job} is {state} and took no 20 steps"
                return
            time.sleep(0.5)
        report["at_step"] = len(steps.read_text().split())
        cluster.run("scancel", "--signal=TERM", str(job))
        cluster.run("scancel", f"--signal={submitit.JobEnvironment.USR_SIG}", str(job))
    except Exception as e:  # noqa: BLE001 - reported by the test
        report["error"] = repr(e)


@pytest.fixture(scope="module")
def preempt_job(slurm_cluster: SlurmCluster, tmp_path_factory):
    """A submitit job (fake trainer, 2 tasks, 300 steps of 0.1 s) that is preempted once it is training."""
    tmp = tmp_path_factory.mktemp("preempt")
    (tmp / "config.yaml").write_text("name: fake\n")
    job = TrainJob(tmp / "config.yaml", [f"train.max_steps={PREEMPT_STEPS}", "fake.step_seconds=0.1"], tmp / "run",
                   command=FAKE, cwd=REPO)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_cluster.conf  # submitit calls sbatch from this process
    try:
        (sub,) = submit_jobs([job], Resources(tasks_per_node=2, cpus_per_task=1, time="15"), "slurm",
                             name="asset-test-preempt")
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = old
    report: dict = {}
    thread = threading.Thread(target=_preempt_when_training,
                              args=(slurm_cluster, int(sub.job_id), tmp / "run" / "steps" / "rank1.log", report),
                              daemon=True)
    thread.start()
    yield sub, tmp / "run", thread, report
    slurm_cluster.cancel(int(sub.job_id))


@pytest.fixture(scope="module")
def pipeline_run(slurm_cluster: SlurmCluster, sflckr_shards, tmp_path_factory):
    """`asset-dist pipeline` for the tiny chain (1 task per stage, 2 steps each, to spare the 2 cores)."""
    root = tmp_path_factory.mktemp("pipeline") / "runs"
    cmd = [sys.executable, "-m", "asset_dist.cli", "pipeline", "--config", "configs/tiny_pipeline.yaml",
           "--executor", "slurm", "--run-root", str(root), "--tasks-per-node", "1", "--time", "15",
           "--set", f"data.train_shards={sflckr_shards}", "--set", "train.max_steps=2"]
    p = slurm_cluster.run(*cmd, env=_env(), timeout=120)
    ids = {k: int(v) for k, v in re.findall(r"^(\w+): submitted job (\d+)", p.stdout, re.M)}
    # the dependencies as slurmctld holds them, read before the parents can have finished
    deps = {k: slurm_cluster.job(v).get("Dependency", "") for k, v in ids.items()}
    yield cmd, root, ids, deps, p.stdout
    for j in ids.values():
        slurm_cluster.cancel(j)


@pytest.fixture(autouse=True)
def _everything_submitted_first(requeue_job, preempt_job, sga_job, submitit_job, pipeline_run):
    """All jobs start with the module, so their waits overlap."""


def test_sbatch_train_sga_from_tiny_parents(slurm_cluster: SlurmCluster, sga_job, parents):
    job, tmp = sga_job
    info = slurm_cluster.wait(job, timeout=480)
    log, run = _log(tmp), tmp / "run"
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert "tasks exited with status 0" in log and f"exported {run / 'export' / 'sga.pt'}" in log
    rec = read_export(run / "export" / "sga.pt", expect_stage="sga")
    assert rec["step"] == 2 and [m["step"] for m in metrics(run)] == [1, 2]
    assert rec["lineage"]["parents"]["guide_weights"] == str(parents["guide"])
    cfg = load_config(REPO / "configs" / "tiny_sga.yaml")
    AssetTransformer(cfg.model.transformer).load_state_dict(rec["state_dict"])
    guide = read_export(parents["guide"])["state_dict"]
    assert any(not torch.equal(rec["state_dict"][k], guide[k]) for k in guide), "SGA weights never moved"
    launches = (run / "launches.tsv").read_text().splitlines()
    assert len(launches) == 1 and "\ttasks=2\t" in launches[0]


def test_time_limit_requeue_resumes_to_the_uninterrupted_weights(slurm_cluster: SlurmCluster, requeue_job):
    job, tmp, ref = requeue_job
    # Once the first run was stopped and requeued, give the resumed run room to finish: it keeps the test
    # to two runs (the first one had the one-minute limit; further limits would only repeat the same path).
    deadline = time.monotonic() + 300
    while int(slurm_cluster.job(job).get("Restarts", "0")) < 1:
        info = slurm_cluster.job(job)
        assert info["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), \
            f"the first run was not interrupted: {info['JobState']}\n{_log(tmp)}"
        assert time.monotonic() < deadline, f"no requeue after 300 s: {info}"
        time.sleep(1)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=00:15:00")
    info = slurm_cluster.wait(job, timeout=600)
    log, run = _log(tmp), tmp / "run"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    restarts = int(info["Restarts"])
    assert restarts >= 1 and "checkpoint written; requeueing job" in log, log
    assert "signal received: checkpointed at step" in log and "resumed from" in log, log
    assert len((run / "launches.tsv").read_text().splitlines()) == restarts + 1

    assert ref.wait(timeout=600) == 0, (tmp / "ref.log").read_text()[-4000:]
    a = read_export(run / "export" / "seg.pt", expect_stage="seg")
    b = read_export(tmp / "ref" / "export" / "seg.pt", expect_stage="seg")
    assert a["step"] == b["step"] == REQUEUE_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs from the uninterrupted run"
    # every logged step exactly once, with the uninterrupted run's values
    got, want = metrics(run), metrics(tmp / "ref")
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(10, REQUEUE_STEPS + 1, 10))
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if not k.startswith("perf/")} == \
               {k: v for k, v in w.items() if not k.startswith("perf/")}


def test_submit_command_trains_through_submitit(slurm_cluster: SlurmCluster, submitit_job):
    job, run, out = submitit_job
    sub = submitit.SlurmJob(folder=run / "submitit", job_id=str(job), tasks=[0, 1])
    ok, msg = wait_job(sub, poll_s=2)
    info = slurm_cluster.job(job)
    log0 = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert ok and (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), msg + log0
    assert f"2 task(s) on 1 node(s), rendezvous {info['NodeList']}:{20000 + job}" in log0
    script = (run / "submitit" / f"{job}_submission.sh").read_text().splitlines()
    for flag in ("--requeue", "--signal=USR2@225", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15",
                 "--job-name=asset-test-submit"):
        assert f"#SBATCH {flag}" in script
    rec = read_export(run / "export" / "seg.pt", expect_stage="seg")
    assert rec["step"] == 4 and [m["step"] for m in metrics(run)][-1] == 4
    assert [r["exit_code"] for r in sub.results()] == [0, 0]


def test_submitit_preemption_checkpoints_every_rank_and_resumes(slurm_cluster: SlurmCluster, preempt_job):
    sub, run, thread, report = preempt_job
    job = int(sub.job_id)
    thread.join(timeout=420)
    assert "error" not in report and "at_step" in report, report
    info = slurm_cluster.wait(job, timeout=300)
    log0 = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log0
    assert f"Requeued job {job}" in log0 and "resubmitting with --resume auto" in log0
    for r in (0, 1):
        taken = [int(x) for x in (run / "steps" / f"rank{r}.log").read_text().split()]
        assert taken == list(range(1, PREEMPT_STEPS + 1)), f"rank {r}: steps lost or redone"
        first = json.loads((run / "launches" / f"restart1-rank{r}.json").read_text())
        assert report["at_step"] <= first["start_step"] < PREEMPT_STEPS  # resumed from the preemption's save
    assert job_outcome(sub) == (True, "completed")


def test_pipeline_chains_stages_with_afterok_and_skips_finished(slurm_cluster: SlurmCluster, pipeline_run):
    cmd, root, ids, deps, out = pipeline_run
    assert set(ids) == {"vqgan", "seg", "guide", "sga"}, out
    assert deps["vqgan"] in ("", "(null)") and deps["seg"] in ("", "(null)")
    for parent in ("vqgan", "seg"):
        assert f"afterok:{ids[parent]}" in deps["guide"], deps
    assert f"afterok:{ids['guide']}" in deps["sga"], deps
    info = slurm_cluster.wait(ids["sga"], timeout=540)
    logs = {s: (root / s / "submitit" / f"{ids[s]}_0_log.out") for s in ids}
    states = {s: slurm_cluster.job(j)["JobState"] for s, j in ids.items()}
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (states, logs["sga"].read_text()[-3000:])
    for stage in ids:
        assert slurm_cluster.job(ids[stage])["JobState"] == "COMPLETED", logs[stage].read_text()[-3000:]
        rec = read_export(root / stage / "export" / f"{stage}.pt", expect_stage=stage)
        assert rec["step"] == 2
        assert json.loads((root / stage / "submitted.json").read_text())["job_id"] == str(ids[stage])
    lineage = read_export(root / "sga" / "export" / "sga.pt")["lineage"]["parents"]
    assert lineage["guide_weights"] == str(root / "guide" / "export" / "guide.pt")
    assert read_export(root / "guide" / "export" / "guide.pt")["lineage"]["parents"]["vqgan_weights"] == \
        str(root / "vqgan" / "export" / "vqgan.pt")

    again = slurm_cluster.run(*cmd, env=_env(), timeout=120)
    assert "every stage is finished: nothing to submit" in again.stdout and "submitted job" not in again.stdout
    assert all(f"{s:<10} done" in again.stdout for s in ids), again.stdout

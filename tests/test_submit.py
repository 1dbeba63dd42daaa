"""The submitit launcher and the pipeline, without a cluster: sbatch text, task placement, the checkpoint
hand-off to the trainer, pipeline files, skip/afterok logic, and a two-task job on submitit's local executor
(tests/fake_trainer.py as the trainer) that is interrupted by its time limit, checkpoints on every rank,
is resubmitted and finishes with every step taken exactly once.

The same paths on a real SLURM cluster, with the real trainer: tests/test_slurm_train.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from asset_dist.cli import main as cli_main
from asset_dist.launch import pipeline as pl
from asset_dist.distenv import dist_env
from asset_dist.exitcodes import EXIT_REQUEUE
from asset_dist.jobspec import Resources, time_seconds
from asset_dist.launch.submit import TASK_PYTHON, TrainJob, child_env, make_executor, submit_jobs, task_place, wait_job

REPO = Path(__file__).resolve().parents[1]
FAKE = [sys.executable, str(REPO / "tests" / "fake_trainer.py"), "train"]


@pytest.mark.parametrize("spec, seconds", [
    ("90", 5400), (90, 5400), ("1:30", 90), ("48:00:00", 172800), ("1-0", 86400), ("1-02:03", 93780),
    ("2-03:04:05", 183845), ("00:01:00", 60),
])
def test_time_limits_in_slurm_syntax(spec, seconds):
    assert time_seconds(spec) == seconds


@pytest.mark.parametrize("spec", ["", "1h", "0", "1:2:3:4", "-5"])
def test_bad_time_limits_fail(spec):
    with pytest.raises(ValueError, match="time limit"):
        time_seconds(spec)


def test_resources_defaults_and_checks():
    r = Resources(gpus_per_node=8, time="48:00:00")
    assert (r.tasks, r.minutes, r.signal_delay) == (8, 2880, 300)
    assert Resources(time="00:01:00").signal_delay == 15  # a quarter of a short limit
    assert Resources().tasks == 1  # a CPU node: one task unless asked
    with pytest.raises(ValueError, match="one task per GPU"):
        Resources(gpus_per_node=8, tasks_per_node=4).check()
    with pytest.raises(ValueError, match="shorter than the time limit"):
        Resources(time="1", signal_delay_s=60).check()
    with pytest.raises(ValueError, match="unknown key"):
        Resources.from_dict({"gpus": 8})
    with pytest.raises(ValueError, match="'nodes' must be an integer"):
        Resources.from_dict({"nodes": "2"})


@pytest.fixture
def slurm_executor_available(monkeypatch):
    """SlurmExecutor refuses to exist without srun on PATH; building the sbatch text does not need it."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))


def _sbatch_lines(ex, map_count=None) -> list[str]:
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(ex._executor.parameters)
    if map_count:
        params["map_count"] = map_count
    return _make_sbatch_string(command=ex._executor._submitit_command_str, folder=ex._executor.folder,
                               **params).splitlines()


def test_sbatch_text_carries_every_resource_and_dependency(tmp_path, slurm_executor_available):
    res = Resources(nodes=2, gpus_per_node=8, cpus_per_task=8, time="48:00:00", mem="64G", partition="gpu",
                    account="proj", qos="high", constraint="a100", max_timeouts=7)
    ex = make_executor("slurm", tmp_path, res, "asset-guide", after=["11", "12"])
    lines = _sbatch_lines(ex)
    for flag in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--time=2880",
                 "--mem=64G", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100",
                 "--job-name=asset-guide", "--requeue", "--signal=USR2@300", "--dependency=afterok:11:12",
                 "--kill-on-invalid-dep=yes", "--open-mode=append"]:
        assert f"#SBATCH {flag}" in lines, (flag, lines)
    assert not any("--error" in x for x in lines)  # stderr goes to the task's log with stdout
    # the batch script probes the rendezvous port on the first node before srun starts the tasks
    setup = next(i for i, x in enumerate(lines) if "asset_dist.launch.contract rendezvous" in x)
    assert setup < next(i for i, x in enumerate(lines) if x.startswith("srun "))
    srun = next(x for x in lines if x.startswith("srun "))
    assert srun.endswith(f"{TASK_PYTHON} -u -m submitit.core._submit {tmp_path}")
    assert ex._executor.max_num_timeout == 7

    # CPU tasks, no GPU line; several configs make an array throttled by array_parallelism
    ex = make_executor("slurm", tmp_path, Resources(tasks_per_node=2, time="10", array_parallelism=1), "x")
    lines = _sbatch_lines(ex, map_count=3)
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --array=0-2%1" in lines
    assert not any("gpus" in x or "dependency" in x for x in lines)


def test_a_node_range_lets_the_job_come_back_on_another_node_count(tmp_path, slurm_executor_available):
    res = Resources(nodes=4, min_nodes=1, tasks_per_node=1, time="10")
    assert res.nodes_spec == "1-4" and Resources(nodes=2, min_nodes=2).nodes_spec == "2"
    lines = _sbatch_lines(make_executor("slurm", tmp_path, res, "x"))
    assert "#SBATCH --nodes=1-4" in lines and not any(x.startswith("#SBATCH --nodes=4") for x in lines)
    with pytest.raises(ValueError, match="min_nodes .3. must not exceed nodes .2."):
        Resources(nodes=2, min_nodes=3).check()


def test_local_executor_limits():
    with pytest.raises(ValueError, match="nodes must be 1"):
        make_executor("local", "/tmp/x", Resources(nodes=2), "x")
    with pytest.raises(ValueError, match="need SLURM"):
        make_executor("local", "/tmp/x", Resources(), "x", after=["3"])


def test_task_place_from_submitit_environment(monkeypatch):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ASSET_RDZV", raising=False)
    place = task_place(submitit.JobEnvironment())
    assert (place.rank, place.local_rank, place.world_size, place.node_rank, place.num_nodes,
            place.local_world_size) == (9, 1, 16, 1, 2, 8)
    assert (place.master_addr, place.master_port) == ("gpu07", 20000 + 1234)  # no probe: from the job id
    monkeypatch.setenv("ASSET_RDZV", "gpu07:24680")  # what the batch script's setup line probed
    place = task_place(submitit.JobEnvironment())
    assert (place.master_addr, place.master_port) == ("gpu07", 24680)
    # stale launcher variables of the submitting shell do not leak into the trainer's placement
    stale = {"RANK": "0", "WORLD_SIZE": "1", "CROSS_RANK": "0", "MASTER_ADDR": "localhost"}
    child = child_env(place, base={**env, **stale})
    seen = dist_env(child)
    assert (seen.rank, seen.world_size, seen.local_rank, seen.master_addr, seen.master_port, seen.launcher) == \
        (9, 16, 1, "gpu07", 24680, "torchrun")
    assert child["OMP_NUM_THREADS"] == "1" and "CROSS_RANK" not in child
    # threads: the task's CPUs from SLURM win over a setting inherited from the submitting shell
    child = child_env(place, base={**env, "OMP_NUM_THREADS": "32", "SLURM_CPUS_PER_TASK": "6"})
    assert child["OMP_NUM_THREADS"] == "6"


def test_train_job_command_and_pickle(tmp_path):
    import cloudpickle

    job = TrainJob("configs/tiny_seg.yaml", ["train.max_steps=3"], "runs/x", cwd=REPO)
    assert job.argv() == [*job.command, "--config", str(REPO / "configs/tiny_seg.yaml"), "--set", "train.max_steps=3",
                          "--set", f"paths.run_dir={REPO / 'runs/x'}", "--resume", "auto"]
    job._proc = subprocess.Popen(["true"])
    job._proc.wait()
    back = cloudpickle.loads(cloudpickle.dumps(job))
    assert back._proc is None and back.argv() == job.argv() and isinstance(back, submitit.helpers.Checkpointable)


# A stand-in trainer for checkpoint(): USR1 ignored for `delay` seconds (start-up), then USR1 -> exit CODE.
SIGNAL_CHILD = r"""
import signal, sys, time
delay, code = float(sys.argv[1]), int(sys.argv[2])
time.sleep(delay)
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(code))
open(sys.argv[3], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def _child(tmp_path, delay: float, code: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD)
    from asset_dist.launch.submit import _child_preexec

    return subprocess.Popen([sys.executable, str(script), str(delay), str(code), str(tmp_path / "ready")],
                            preexec_fn=_child_preexec(None))


def test_checkpoint_forwards_usr1_until_taken_then_resubmits(tmp_path, monkeypatch):
    monkeypatch.setattr("asset_dist.launch.submit.RESEND_USR1_S", 0.5)
    job = TrainJob("c.yaml", [], str(tmp_path), cwd=tmp_path)
    job._proc = _child(tmp_path, delay=1.5, code=EXIT_REQUEUE)  # USR1 during its start-up is dropped
    t0 = time.monotonic()
    out = job.checkpoint()
    assert isinstance(out, submitit.helpers.DelayedSubmission) and out.function is job
    assert (tmp_path / "ready").exists() and time.monotonic() - t0 >= 1.5  # it waited for the save
    job._proc.wait()
    assert job._proc.returncode == EXIT_REQUEUE


@pytest.mark.parametrize("code", [2, 3])
def test_checkpoint_does_not_resubmit_a_failed_trainer(tmp_path, code):
    job = TrainJob("c.yaml", [], str(tmp_path), cwd=tmp_path)
    job._proc = _child(tmp_path, delay=0, code=code)
    while not (tmp_path / "ready").exists():
        time.sleep(0.05)
    assert job.checkpoint() is None
    job._proc.wait()


def test_children_ignore_submitits_usr2(tmp_path):
    """SLURM sends the USR2 warning to every process of the step: the trainer must survive it."""
    p = _child(tmp_path, delay=0, code=EXIT_REQUEUE)
    while not (tmp_path / "ready").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR2)
    time.sleep(0.3)
    assert p.poll() is None
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=10) == EXIT_REQUEUE


# ---- the local executor, end to end --------------------------------------------------------------------

def _fake_job(tmp_path: Path, *sets: str) -> TrainJob:
    (tmp_path / "config.yaml").write_text("name: fake\n")
    return TrainJob(tmp_path / "config.yaml", list(sets), tmp_path / "run", command=FAKE, cwd=REPO)


def _steps(run: Path, rank: int) -> list[int]:
    return [int(x) for x in (run / "steps" / f"rank{rank}.log").read_text().split()]


def _task_pids(controller: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(controller)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_local_timeout_signal_checkpoints_all_ranks_resubmits_and_finishes(tmp_path):
    """USR2 to every task, as submitit's local controller (or SLURM's --signal) sends before the time limit."""
    steps = 80
    job = _fake_job(tmp_path, f"train.max_steps={steps}", "fake.step_seconds=0.05")
    (sub,) = submit_jobs([job], Resources(tasks_per_node=2, time="10"), "local", name="fake")
    run = tmp_path / "run"
    deadline = time.monotonic() + 120
    while not ((run / "steps" / "rank1.log").exists() and len(_steps(run, 1)) >= 10):
        assert time.monotonic() < deadline and not sub.done(), sub.task(0).paths.stdout.read_text()
        time.sleep(0.2)
    tasks = _task_pids(sub._process.pid)
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    ok, msg = wait_job(sub)
    log0, log1 = sub.task(0).paths.stdout.read_text(), sub.task(1).paths.stdout.read_text()
    assert ok, msg + "\n" + log0
    for r in (0, 1):
        assert _steps(run, r) == list(range(1, steps + 1))  # nothing lost at the save, nothing redone
        assert (run / "done" / f"rank{r}").read_text().strip() == str(steps)
    assert log0.count("checkpoint requested: asking the trainer") == 1
    assert "checkpoint written (time limit); requeueing" in log0 and "Requeued job" in log0
    assert "SIGUSR1 at step" in log0  # rank 0's trainer took the forwarded request...
    assert "peer signal at step" in log1  # ...and rank 1's saved with it (all-reduced stop flag)
    saved = json.loads((run / "ckpt" / "rank1.json").read_text())
    assert saved == {"step": steps, "signal": None}
    assert [r["exit_code"] for r in sub.results()] == [0, 0]


def test_local_bad_config_exit_is_not_resubmitted(tmp_path):
    job = _fake_job(tmp_path, "fake.exit_code=2")
    (sub,) = submit_jobs([job], Resources(tasks_per_node=2, time="5"), "local", name="fake")
    ok, msg = wait_job(sub)
    assert not ok and "exit 2: bad config or input (not requeued" in msg
    launches = sorted((tmp_path / "run" / "launches").glob("*.json"))
    assert len(launches) == 2  # one start per rank: no retry


# ---- pipelines ----------------------------------------------------------------------------------------------

def test_landscape_pipeline_wires_parents_and_resources():
    p = pl.load_pipeline(REPO / "configs" / "pipelines" / "landscape.yaml", cwd=REPO,
                         resources={"partition": "big"})
    assert [s.name for s in p.stages] == ["vqgan", "seg", "guide", "sga512", "sga1024"]
    by = {s.name: s for s in p.stages}
    assert by["vqgan"].after == [] and by["seg"].after == []
    assert by["guide"].after == ["vqgan", "seg"]
    assert by["sga1024"].after == ["vqgan", "seg", "guide", "sga512"]
    runs = REPO / "runs"
    assert f"train.init_from={runs / 'landscape_sga512' / 'export' / 'sga.pt'}" in by["sga1024"].overrides
    assert f"train.guide_weights={runs / 'landscape_guide' / 'export' / 'guide.pt'}" in by["sga1024"].overrides
    assert f"train.seg_weights={runs / 'landscape_seg' / 'export' / 'seg.pt'}" in by["guide"].overrides
    assert by["sga1024"].export == runs / "landscape_sga1024" / "export" / "sga.pt"
    assert (by["seg"].resources.time, by["seg"].resources.nodes, by["guide"].resources.nodes) == ("24:00:00", 1, 2)
    assert {s.resources.partition for s in p.stages} == {"big"}
    assert {s.resources.tasks for s in p.stages} == {8}


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("body, message", [
    ("stages: {a: {config: {cfg}, run_dir: r/a, after: [b]}, b: {config: {cfg}, run_dir: r/b, after: [a]}}",
     "cycle: a -> b -> a"),
    ("stages: {a: {config: {cfg}, run_dir: r/a, inputs: {train.seg_weights: nope}}}", "parent 'nope' is not a stage"),
    ("stages: {a: {config: {cfg}, run_dir: r/a, gpus: 3}}", "stage 'a': unknown key(s) gpus"),
    ("stages: {a: {config: {cfg}, run_dir: r/a, set: [train.stagee=x]}}", "stage 'a': "),
    ("stages: {a: {config: {cfg}}}", "'run_dir' is required"),
    ("stages: {a: {config: {cfg}, run_dir: r/a}, b: {config: {cfg}, run_dir: r/a}}", "same export"),
    ("resources: {time: soon}\nstages: {a: {config: {cfg}, run_dir: r/a}}", "time limit 'soon'"),
])
def test_pipeline_file_errors_name_the_problem(tmp_path, body, message):
    f = _write(tmp_path, body.replace("{cfg}", str(REPO / "configs" / "tiny_seg.yaml")))
    with pytest.raises(ValueError) as e:
        pl.load_pipeline(f, cwd=tmp_path)
    assert message in str(e.value) and str(f) in str(e.value)


def _tiny(tmp_path: Path) -> pl.Pipeline:
    return pl.load_pipeline(REPO / "configs" / "pipelines" / "tiny.yaml", run_root=str(tmp_path / "runs"),
                            cwd=tmp_path, overrides=["data.train_shards=/data/shards"])


def _finish(stage: pl.StageJob) -> None:
    stage.export.parent.mkdir(parents=True, exist_ok=True)
    stage.export.write_bytes(b"x")


def test_plan_skips_finished_stages_and_chains_the_rest(tmp_path, monkeypatch):
    p = _tiny(tmp_path)
    assert [(s.name, s.kind, s.resources.tasks) for s in p.stages] == \
        [("vqgan", "vqgan", 2), ("seg", "seg", 2), ("guide", "guide", 2), ("sga", "sga", 2)]
    assert "data.train_shards=/data/shards" in p.stage("sga").overrides
    submitted = []

    def fake_submit(jobs, res, executor, name, after=()):
        submitted.append((name, list(after), jobs[0].run_dir))
        return [type("J", (), {"job_id": str(100 + len(submitted)), "num_tasks": 1,
                               "paths": type("P", (), {"stdout": "log"})})()]

    monkeypatch.setattr(pl, "submit_jobs", fake_submit)
    ids = pl.submit_slurm(p, pl.plan(p, "slurm"))
    assert submitted == [("tiny-vqgan", [], str(tmp_path / "runs" / "vqgan")),
                         ("tiny-seg", [], str(tmp_path / "runs" / "seg")),
                         ("tiny-guide", ["101", "102"], str(tmp_path / "runs" / "guide")),
                         ("tiny-sga", ["101", "102", "103"], str(tmp_path / "runs" / "sga"))]
    assert ids == {"vqgan": "101", "seg": "102", "guide": "103", "sga": "104"}
    assert json.loads((tmp_path / "runs" / "guide" / "submitted.json").read_text())["job_id"] == "103"

    # tokenizers finished, the guide's job still queued: only the SGA is submitted, after the guide's job
    _finish(p.stage("vqgan"))
    _finish(p.stage("seg"))
    monkeypatch.setattr(pl, "slurm_state", lambda job_id: "PENDING" if job_id == "103" else "")
    steps = pl.plan(p, "slurm")
    assert [(s.stage.name, s.status, s.job_id) for s in steps] == \
        [("vqgan", "done", ""), ("seg", "done", ""), ("guide", "queued", "103"), ("sga", "submit", "")]
    submitted.clear()
    pl.submit_slurm(p, steps)
    assert submitted == [("tiny-sga", ["103"], str(tmp_path / "runs" / "sga"))]

    # the guide's job is gone without an export (failed): it is submitted again, without dependencies
    monkeypatch.setattr(pl, "slurm_state", lambda job_id: "")
    assert [s.status for s in pl.plan(p, "slurm")] == ["done", "done", "submit", "submit"]
    _finish(p.stage("guide"))
    _finish(p.stage("sga"))
    assert {s.status for s in pl.plan(p, "slurm")} == {"done"}


def test_pipeline_cli_dry_run_and_errors(tmp_path, capsys):
    rc = cli_main(["pipeline", "--config", str(REPO / "configs" / "pipelines" / "tiny.yaml"), "--dry-run",
                   "--executor", "slurm", "--run-root", str(tmp_path), "--time", "10", "--partition", "cpu",
                   "--set", "data.train_shards=/data/s"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "guide      submit   vqgan,seg" in out and "(dry run: nothing submitted)" in out
    assert f"--set train.init_from={tmp_path / 'guide' / 'export' / 'guide.pt'}" in out
    assert "10, " not in out and "1x2 task(s), 0 GPU/node, 10 " in out
    assert not (tmp_path / "vqgan").exists()

    assert cli_main(["pipeline", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "pipeline file not found" in capsys.readouterr().err


def test_submit_cli_checks_before_submitting(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny_seg.yaml")
    assert cli_main(["submit", "--config", cfg, "--set", "train.stagee=seg", "--executor", "local"]) == 2
    assert "train.stagee" in capsys.readouterr().err
    assert cli_main(["submit", "--config", cfg, "--executor", "local", "--after", "5"]) == 2
    assert "need SLURM" in capsys.readouterr().err
    assert cli_main(["submit", "--config", cfg, "--gpus-per-node", "8", "--tasks-per-node", "2"]) == 2
    assert "one task per GPU" in capsys.readouterr().err
    rc = cli_main(["submit", "--config", cfg, "--run-dir", str(tmp_path / "r"), "--executor", "local",
                   "--tasks-per-node", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "seg: 1 node(s) x 2 task(s)" in out and f"paths.run_dir={tmp_path / 'r'}" in out
    assert not (tmp_path / "r").exists()


# A stand-in trainer for the local pipeline: records what it was asked, writes RUN/export/<stage>.pt.
FAKE_STAGE = r"""
import argparse, json, os, sys
from pathlib import Path
from asset_dist.config import load_config
p = argparse.ArgumentParser()
p.add_argument("command")
p.add_argument("--config")
p.add_argument("--set", dest="sets", action="append", default=[])
p.add_argument("--resume")
a = p.parse_args()
cfg = load_config(a.config, a.sets)
if os.environ.get("FAKE_FAIL_STAGE") == cfg.train.stage:
    sys.exit(2)
with open(os.environ["FAKE_ORDER"], "a") as f:
    f.write(json.dumps({"stage": cfg.train.stage, "world": os.environ["WORLD_SIZE"], "sets": a.sets}) + "\n")
out = Path(cfg.paths.run_dir) / "export" / f"{cfg.train.stage}.pt"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("x")
"""


def test_local_pipeline_runs_stage_after_stage_and_stops_at_a_failure(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    order = tmp_path / "order.jsonl"
    monkeypatch.setattr("asset_dist.launch.submit.TRAIN_COMMAND", (sys.executable, str(script), "train"))
    monkeypatch.setenv("FAKE_ORDER", str(order))
    root = tmp_path / "runs"
    p = pl.load_pipeline(REPO / "configs" / "pipelines" / "tiny.yaml", run_root=str(root), cwd=tmp_path,
                         overrides=["data.train_shards=/data/shards"], resources={"tasks_per_node": 1})
    assert pl.run_local(p, pl.plan(p, "local"))
    ran = [json.loads(x) for x in order.read_text().splitlines()]
    assert [r["stage"] for r in ran] == ["vqgan", "seg", "guide", "sga"] and {r["world"] for r in ran} == {"1"}
    assert f"train.init_from={root / 'guide' / 'export' / 'guide.pt'}" in ran[3]["sets"]
    assert all((root / s / "export" / f"{s}.pt").is_file() for s in ("vqgan", "seg", "guide", "sga"))

    # the guide fails (exit 2): the SGA is not run; finished stages are skipped
    (root / "guide" / "export" / "guide.pt").unlink()
    (root / "sga" / "export" / "sga.pt").unlink()
    order.unlink()
    monkeypatch.setenv("FAKE_FAIL_STAGE", "guide")
    capsys.readouterr()
    assert not pl.run_local(p, pl.plan(p, "local"))
    out, err = capsys.readouterr()
    assert "vqgan: done" in out and "seg: done" in out and "exit 2: bad config" in out
    assert "stage guide failed; not running what depends on it (sga)" in err
    assert not order.exists() and not (root / "sga" / "export" / "sga.pt").exists()


def test_a_stage_still_running_locally_is_not_started_twice(tmp_path, capsys):
    p = _tiny(tmp_path)
    for s in ("vqgan", "seg"):
        _finish(p.stage(s))
    # a live process that looks like submitit's local controller of the guide's job
    ctrl = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"])
    cmdline = Path(f"/proc/{ctrl.pid}/cmdline")
    for _ in range(200):  # until the child has exec'ed (its cmdline is what the pipeline inspects)
        if b"submitit.local._local" in cmdline.read_bytes():
            break
        time.sleep(0.05)
    try:
        guide = p.stage("guide")
        guide.run_dir.mkdir(parents=True)
        (guide.run_dir / "submitted.json").write_text(json.dumps({"job_id": str(ctrl.pid), "executor": "local"}))
        steps = pl.plan(p, "local")
        assert [(s.status, s.executor) for s in steps][2:] == [("queued", "local"), ("submit", "")]
        assert pl.blocked(steps, "slurm") == pl.blocked(steps, "local") == [f"guide (local job {ctrl.pid})"]
        assert not pl.run_local(p, steps)
        assert f"still running: guide (local job {ctrl.pid})" in capsys.readouterr().err
    finally:
        ctrl.kill()
        ctrl.wait()
    assert [s.status for s in pl.plan(p, "local")] == ["done", "done", "submit", "submit"]


class _FakeJobEnv:
    """What TrainJob reads from submitit.JobEnvironment() in a SLURM task."""
    USR_SIG = "USR2"
    cluster, raw_job_id, num_tasks, num_nodes, node, hostnames = "slurm", "77", 2, 1, 0, ["n1"]
    global_rank = local_rank = 0


@pytest.mark.parametrize("rank, at_limit", [(0, True), (0, False), (1, True)])
def test_trainer_stopped_by_term_resubmits_only_at_the_time_limit(tmp_path, monkeypatch, rank, at_limit):
    """The trainer saved on a TERM nobody announced (exit 99): at the time limit rank 0 resubmits through
    submitit's handler (the USR2 it raises itself); before it (scancel) nothing is resubmitted."""
    from asset_dist.launch import submit as sm

    env = type("Env", (_FakeJobEnv,), {"global_rank": rank, "local_rank": rank})
    monkeypatch.setattr(submitit, "JobEnvironment", env)
    end = time.time() + (0 if at_limit else 3600)
    monkeypatch.setattr(sm, "job_end_time", lambda: end)
    monkeypatch.setattr(sm, "job_preemption", lambda: (False, "OFF"))
    # the trainer saves (the run folder's checkpoint moves on) and exits 99
    save = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]) / 'checkpoints'; p.mkdir(exist_ok=True); "
            f"(p / 'latest').write_text('step_00000007'); raise SystemExit({EXIT_REQUEUE})")
    job = TrainJob("c.yaml", [], str(tmp_path), command=[sys.executable, "-c", save, str(tmp_path)],
                   cwd=tmp_path, term_grace_s=0)
    job.argv = lambda: job.command
    calls = []

    def handler(signum, frame):  # what submitit's handler does on rank 0: checkpoint(), then requeue + exit
        calls.append(job.checkpoint())
        raise SystemExit(-1)

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        if rank != 0:
            with pytest.raises(SystemExit) as e:
                job()
            assert e.value.code == EXIT_REQUEUE and calls == []
        elif at_limit:
            with pytest.raises(SystemExit):
                job()
            assert len(calls) == 1 and isinstance(calls[0], submitit.helpers.DelayedSubmission)
        else:
            with pytest.raises(sm.TrainingFailed, match="before the time limit .scancel.: not requeued"):
                job()
            assert calls == []
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_job_end_time_reads_slurmctld(monkeypatch):
    import datetime

    from asset_dist.launch import submit as sm

    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    end = datetime.datetime.now().replace(microsecond=0) + datetime.timedelta(seconds=60)
    monkeypatch.setattr(sm, "scontrol_job", lambda job_id: {"EndTime": end.strftime("%Y-%m-%dT%H:%M:%S")})
    assert sm.job_end_time() == end.timestamp()
    monkeypatch.setattr(sm, "scontrol_job", lambda job_id: {"EndTime": "Unknown"})
    assert sm.job_end_time() is None

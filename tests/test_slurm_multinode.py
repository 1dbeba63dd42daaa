"""Jobs across nodes of the local SLURM cluster (scripts/local_slurm.sh with 3 nodes: every node has its own
hostname, address and network namespace, so ranks on two nodes talk over a real network path, gloo over the
bridge), with the real trainer and edit-batch on tiny configs.

- `sbatch -N2 --ntasks-per-node=1 slurm/train_sga.sh` trains tiny SGA from tiny parents with one rank on each
  of two nodes (the launch log names both hosts), rendezvous on the first node;
- node loss: a tiny_seg training job and an edit-batch job run on two nodes each, sharing one node; that node is
  killed mid-way through both (the edit batch is suspended while the training catches up; link cut first, so the
  survivors hear nothing: a power cut, not a clean exit). The surviving training rank fails its collective within
  `dist.timeout_s` instead of hanging; slurmctld finds the node DOWN after SlurmdTimeout and requeues both
  `--requeue` jobs. The training job resumes on the two other nodes from its last checkpoint (nothing lost beyond
  the checkpoint interval) and finishes; the edit batch, three ranks submitted with `--nodes=2-3 -n 3` (and
  ASSET_NODES=2-3), started on three nodes and comes back on the two left (same world size, two ranks on one
  node): it redoes the edits nobody finished, every edit exactly once, its images equal to a one-process run.

The killed node comes back at the end (revive-node), so later modules have all three. Expect ~4-5 minutes.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from asset_dist.artifacts import read_export

try:
    from .slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401
    from .test_infer_common import check, cli, make_exports, png, rect_mask, square
    from .train_utils import make_tiny_parents, metrics
except ImportError:
    from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401
    from test_infer_common import check, cli, make_exports, png, rect_mask, square
    from train_utils import make_tiny_parents, metrics

TWO_NODES = ["-N2", "--ntasks-per-node=1", "--gpus-per-node=0", "-c1"]
LOSS_STEPS, CKPT_EVERY, DIST_TIMEOUT_S = 60, 10, 20
N_EDITS = 24


def _env(**extra: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _log(tmp: Path) -> str:
    logs = sorted(tmp.glob("*.out"))
    return logs[0].read_text() if logs else "(no log)"


def _task_hosts(log: str) -> dict[int, set[str]]:
    """rank -> the hosts it ran on, from the `[asset-launch] task R of W on HOST` lines of the job log."""
    out: dict[int, set[str]] = {}
    for rank, host in re.findall(r"\[asset-launch\] task (\d+) of \d+ on (\S+)", log):
        out.setdefault(int(rank), set()).add(host)
    return out


def _nodes(cluster: SlurmCluster, job: int) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", cluster.job(job)["NodeList"]).stdout.split()


def _wait(cond, what: str, timeout: float, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    if len(slurm_cluster.nodes) < 3:
        msg = (f"the multi-node tests need 3 nodes, the cluster has {slurm_cluster.nodes}: "
               "ASSET_SLURM_NODES=3 bash scripts/local_slurm.sh start (root, network namespaces)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " (CI is set: this must work)")
        pytest.skip(msg)
    return slurm_cluster


@pytest.fixture(scope="module")
def sga_job(cluster: SlurmCluster, sflckr_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sga2n")
    parents = make_tiny_parents(tmp / "parents")
    sets = [f"data.train_shards={sflckr_shards}", "train.max_steps=2", "logging.image_every=0",
            "logging.log_every=1", f"train.vqgan_weights={parents['vqgan']}", f"train.seg_weights={parents['seg']}",
            f"train.guide_weights={parents['guide']}", f"train.init_from={parents['guide']}"]
    env = _env(CONFIG="configs/tiny_sga.yaml", RUN_DIR=str(tmp / "run"), OVERRIDES=" ".join(sets))
    job = cluster.sbatch(*TWO_NODES, "-J", "asset-test-sga-2nodes", "-t", "00:15:00", f"--output={tmp}/%x-%j.out",
                         "slurm/train_sga.sh", env=env)
    yield job, tmp
    cluster.cancel(job)


def _edit_set(out: Path) -> list[str]:
    """N_EDITS 256 px edits of the sflckr samples (different holes and classes); returns their ids."""
    from asset_dist.infer.classes import ClassTable
    from asset_dist.infer.edits import make_record, write_edit_shards

    table, recs, ids = ClassTable(182), [], []
    classes = ["waterother", "snow", "tree", "sea", "grass", "rock"]
    for k in range(N_EDITS):
        img, lab = square(k % 6, 256)
        y0, x0 = 16 * (k % 8), 24 * (k % 5)
        cid = table.lookup(classes[k % len(classes)])
        eid = f"e{k:02d}"
        recs.append(make_record(eid, png(img), png(lab), png(rect_mask(256, y0, y0 + 96, x0, x0 + 112)), class_id=cid,
                                class_name=table.name(cid), num_classes=182, label_shift=0))
        ids.append(eid)
    write_edit_shards(out, recs, samples_per_shard=4)
    return ids


@pytest.fixture(scope="module")
def node_loss(cluster: SlurmCluster, sflckr_shards, tmp_path_factory):
    """Both jobs started, one shared node killed mid-way, requeued, the node revived; returns what the tests
    check. The training job goes first (two nodes); the edit batch then takes all three (`--nodes=2-3 -n 3`:
    as many nodes as it can; ASSET_NODES=2-3 gives the range back after SLURM's requeue, which pins the first
    run's count), so killing the training job's second node hits both (and neither batch shell)."""
    tmp = tmp_path_factory.mktemp("nodeloss")
    seg_sets = [f"data.train_shards={sflckr_shards}", "data.batch_size=1", f"train.max_steps={LOSS_STEPS}",
                f"train.ckpt_every={CKPT_EVERY}", "logging.image_every=0", "logging.log_every=1",
                f"dist.timeout_s={DIST_TIMEOUT_S}"]
    seg_run = tmp / "seg"
    seg = cluster.sbatch(*TWO_NODES, "-J", "asset-test-seg-nodeloss", "-t", "00:20:00", f"--output={tmp}/seg-%j.out",
                         "slurm/train_seg.sh",
                         env=_env(CONFIG="configs/tiny_seg.yaml", RUN_DIR=str(seg_run), OVERRIDES=" ".join(seg_sets)))
    edit_run, jobs = tmp / "edits_out", [seg]
    report: dict = {"tmp": tmp, "seg": seg, "seg_run": seg_run, "edit_run": edit_run}
    try:
        cfg = make_exports(tmp / "w")
        ids = _edit_set(tmp / "edits")
        report.update(cfg=cfg, ids=ids)
        _wait(lambda: cluster.job(seg)["JobState"] == "RUNNING", "the training job to start", 120)
        seg_nodes = _nodes(cluster, seg)
        victim = seg_nodes[1]  # rank 1's node; rank 0 and the batch shell stay alive on seg_nodes[0]
        # three ranks on 2 or 3 nodes: it starts on all three and comes back on the two left (3 CPUs a node: the
        # 4-CPU nodes keep one each for the training job, so both jobs run side by side)
        edit = cluster.sbatch("--nodes=2-3", "-n", "3", "--ntasks-per-node=3", "--gpus-per-node=0", "-c1",
                              "-J", "asset-test-edit-nodeloss", "-t", "00:20:00", f"--output={tmp}/edit-%j.out",
                              "slurm/edit_batch.sh", "infer.batch_size=2",
                              env=_env(RUN_DIR=str(edit_run), CONFIG=str(cfg), ASSET_NODES="2-3",
                                       OVERRIDES=f"infer.edits={tmp / 'edits'}"))
        jobs.append(edit)
        _wait(lambda: cluster.job(edit)["JobState"] == "RUNNING", "the edit batch to start", 120)
        report.update(edit=edit, victim=victim, seg_nodes=seg_nodes, edit_nodes=_nodes(cluster, edit))
        assert victim in report["edit_nodes"], report

        def records() -> int:
            return sum(1 for _ in edit_run.glob("*/record.json"))

        def seg_step() -> int:
            try:
                return metrics(seg_run)[-1]["step"]
            except (OSError, ValueError, IndexError):
                return 0

        # mid-way: the edit batch has done some edits (not all), the training is past two checkpoints. Which
        # one gets there first depends on the machine, so the edit batch is held (`scontrol suspend`: SIGSTOP
        # to its tasks; it has no collectives to time out) from its second record until the training catches
        # up, and let go just before the node dies.
        _wait(lambda: records() >= 2, "the edit batch's first records", 400, 0.2)
        cluster.run("scontrol", "suspend", str(edit))
        report["records_held"] = records()
        _wait(lambda: seg_step() >= 2 * CKPT_EVERY + 3, "the training to pass two checkpoints", 400, 0.5)
        cluster.run("scontrol", "resume", str(edit))
        done_before = records()
        assert done_before < len(ids), "the edit batch finished before the node loss: give it more edits"
        report.update(kill_step=seg_step(), latest_at_kill=(seg_run / "checkpoints" / "latest").read_text().strip(),
                      records_at_kill=done_before)
        assert cluster.job(seg)["JobState"] == "RUNNING", "the training job ended before the node loss"
        cluster.script("kill-node", victim)
        report["killed_at"] = time.time()
        # slurmctld: the node stops answering -> DOWN after SlurmdTimeout -> both --requeue jobs requeued
        _wait(lambda: all(int(cluster.job(j).get("Restarts", "0")) >= 1 for j in jobs), "the requeues", 180)
        report["down_after_s"] = time.time() - report["killed_at"]
        report["victim_state"] = cluster.node_state(victim)
        # both come back on the two nodes left while the lost node is still down
        _wait(lambda: all(cluster.job(j)["JobState"] in ("RUNNING", "COMPLETED") for j in jobs), "the restarts", 180)
        report["seg_nodes_after"], report["edit_nodes_after"] = _nodes(cluster, seg), _nodes(cluster, edit)
        report["seg_info"] = cluster.wait(seg, timeout=600)
        report["edit_info"] = cluster.wait(edit, timeout=600)
        cluster.script("revive-node", victim)
        yield report
    finally:
        for j in jobs:
            cluster.cancel(j)
        for n in cluster.nodes:  # every node back, whatever happened above
            if cluster.node_state(n).rstrip("*") in ("down", "drain", "drained", "fail"):
                cluster.script("revive-node", n)


@pytest.fixture(autouse=True)
def _jobs_first(sga_job):
    """The SGA job runs while the node-loss scenario is set up."""


def test_sbatch_train_sga_across_two_nodes(cluster: SlurmCluster, sga_job):
    job, tmp = sga_job
    info = cluster.wait(job, timeout=600)
    log, run = _log(tmp), tmp / "run"
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    nodes = _nodes(cluster, job)
    hosts = _task_hosts(log)
    assert len(nodes) == 2 and hosts == {0: {nodes[0]}, 1: {nodes[1]}}, (nodes, hosts, log)  # one rank per node
    launch = (run / "launches.tsv").read_text().splitlines()
    assert len(launch) == 1 and "\ttasks=2\t" in launch[0] and f"\trdzv={nodes[0]}:" in launch[0]
    rec = read_export(run / "export" / "sga.pt", expect_stage="sga")
    assert rec["step"] == 2 and [m["step"] for m in metrics(run)] == [1, 2]


def test_node_loss_training_resumes_from_its_last_checkpoint(cluster: SlurmCluster, node_loss):
    r = node_loss
    log = "".join(p.read_text() for p in sorted(r["tmp"].glob("seg-*.out")))
    info = r["seg_info"]
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    assert int(info["Restarts"]) >= 1 and r["victim_state"].startswith("down"), (info, r["victim_state"])
    # the surviving rank did not hang: it gave up on its silent peer within dist.timeout_s (gloo names the bound),
    # or SLURM declared the node down and ended the step first (SlurmdTimeout 30 s; a rank that was computing
    # enters its next collective late). The bound itself: test_launch_contract.py collective_timeout.
    assert f"{DIST_TIMEOUT_S * 1000}ms" in log or "DUE TO NODE FAILURE" in log, log[-6000:]
    # the restart ran on the two nodes left, without the lost one
    assert r["victim"] not in r["seg_nodes_after"] and len(r["seg_nodes_after"]) == 2
    hosts = _task_hosts(log)
    assert r["victim"] in hosts[1] and len(set().union(*hosts.values())) == 3, hosts
    # resumed from the last checkpoint before the loss: nothing lost beyond the checkpoint interval
    resumed = [int(x) for x in re.findall(r"resumed from \S+ at step (\d+)", log)]
    latest_at_kill = int(r["latest_at_kill"].split("_")[-1])
    assert resumed and resumed[0] >= latest_at_kill >= r["kill_step"] - CKPT_EVERY, (resumed, r)
    rec = read_export(r["seg_run"] / "export" / "seg.pt", expect_stage="seg")
    assert rec["step"] == LOSS_STEPS
    steps = [m["step"] for m in metrics(r["seg_run"])]
    assert steps[-1] == LOSS_STEPS and set(steps) == set(range(1, LOSS_STEPS + 1))
    launches = (r["seg_run"] / "launches.tsv").read_text().splitlines()
    assert len(launches) == int(info["Restarts"]) + 1


def test_node_loss_edit_batch_redoes_the_lost_edits_exactly_once(cluster: SlurmCluster, node_loss):
    r = node_loss
    out, ids = r["edit_run"], r["ids"]
    log = "".join(p.read_text() for p in sorted(r["tmp"].glob("edit-*.out")))
    info = r["edit_info"]
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    assert int(info["Restarts"]) >= 1
    # another node count after the requeue: three nodes, then the two left, three ranks on both
    assert len(r["edit_nodes"]) == 3 and len(r["edit_nodes_after"]) == 2 and r["victim"] not in r["edit_nodes_after"]
    assert set(re.findall(r"\[rank \d+/(\d+)\] \d+ edit\(s\) of", log)) == {"3"}
    assert re.search(r"job \d+ restart 1 on \S+: 3 task\(s\), 2 node\(s\)", log), log[-4000:]
    assert "the next run may use 2-3 nodes for its 3 task(s)" in log, log[-4000:]
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["edit"] for m in manifest] == sorted(ids)  # every edit once, none twice
    assert {m["status"] for m in manifest} == {"ok"}
    done = [json.loads(x)["edit"] for p in sorted((out / "logs").glob("rank*.jsonl"))
            if not p.name.endswith(".stats.jsonl") for x in p.read_text().splitlines()]  # (.stats: busy/idle)
    assert sorted(done) == sorted(ids)  # each edit computed to its record exactly once, across both runs
    assert r["records_at_kill"] < len(ids)
    for eid in ids:
        files = sorted(p.name for p in (out / eid).iterdir())
        assert files == ["preview.png", "record.json", "sample_0.png", "sample_1.png"], (eid, files)  # no leftovers
    # the images equal a one-process run's (per-edit seeds): redone edits included
    one = r["tmp"] / "one"
    check(cli(["edit-batch", "--config", str(r["cfg"]), "--edits", str(r["tmp"] / "edits"), "--out", str(one),
               "--set", "infer.batch_size=2"], timeout=900))
    for eid in ids:
        for k in (0, 1):
            assert (out / eid / f"sample_{k}.png").read_bytes() == (one / eid / f"sample_{k}.png").read_bytes(), eid

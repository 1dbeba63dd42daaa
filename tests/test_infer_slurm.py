"""`sbatch slurm/edit_batch.sh` on the local SLURM cluster: two srun tasks on two nodes (one task each; on a
one-node cluster both on it) split the edits (ranks from SLURM's variables), the run folder gets every edit
once and the manifest; the images equal a 1-process run."""
from __future__ import annotations

import json
import re

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401
from tests.test_infer_common import check, cli, make_exports, many_edits, small_edit_set

def test_sbatch_edit_batch_two_tasks(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    two_nodes = len(slurm_cluster.nodes) >= 2
    cpu = ["-N2", "--ntasks-per-node=1"] if two_nodes else ["-N1", "--ntasks-per-node=2"]
    cfg = make_exports(tmp_path / "w")
    ok = small_edit_set(tmp_path / "edits", with_512=False)
    run = tmp_path / "run"
    env = {"RUN_DIR": str(run), "CONFIG": str(cfg), "OVERRIDES": f"infer.edits={tmp_path / 'edits'}"}
    job = slurm_cluster.sbatch(*cpu, "--gpus-per-node=0", "-c1", "-J", "asset-test-edit", "-t", "00:10:00",
                               f"--output={tmp_path}/%x-%j.out",
                               "slurm/edit_batch.sh", "infer.batch_size=3", env=env)
    try:
        info = slurm_cluster.wait(job, timeout=400)
        log = (tmp_path / f"asset-test-edit-{job}.out")
        text = log.read_text() if log.exists() else "(no log)"
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    finally:
        slurm_cluster.cancel(job)
    recs = {r["edit"]: r for r in map(json.loads, (run / "manifest.jsonl").read_text().splitlines())}
    assert sorted(recs) == sorted(ok + ["zbad"]) and recs["zbad"]["status"] == "failed"
    assert {r["world_size"] for r in recs.values()} == {2} and {r["rank"] for r in recs.values()} == {0, 1}
    logs = [json.loads(x)["edit"] for r in (0, 1) for x in (run / "logs" / f"rank{r}.jsonl").read_text().splitlines()]
    assert sorted(logs) == sorted(recs)  # each edit once
    one = tmp_path / "one"
    check(cli(["edit-batch", "--config", str(cfg), "--edits", str(tmp_path / "edits"), "--out", str(one)]))
    for eid in ok:
        assert (run / eid / "sample_0.png").read_bytes() == (one / eid / "sample_0.png").read_bytes()
    assert "edit-batch" in text and "[rank 1/2]" in text
    hosts = dict(re.findall(r"\[asset-launch\] task (\d) of 2 on (\S+)", text))
    assert sorted(hosts) == ["0", "1"] and (hosts["0"] != hosts["1"]) == two_nodes, hosts


def test_sbatch_join_two_jobs_share_one_batch(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    """Two sbatch jobs of one task each (on two nodes where the cluster has them), both `edit-batch --join` into
    one run folder: the first to start runs the batch, the other joins it and claims chunks beside it. Every edit
    is written once, the images equal a one-process run's, summary.json names both workers (and nodes)."""
    nodes = slurm_cluster.nodes[:2]
    cfg = make_exports(tmp_path / "w")
    ids = many_edits(tmp_path / "edits", 16)
    run = tmp_path / "run"
    env = {"RUN_DIR": str(run), "CONFIG": str(cfg), "OVERRIDES": f"infer.edits={tmp_path / 'edits'}",
           "TRAIN_CMD": "python -m asset_dist.cli edit-batch --join"}
    jobs = [slurm_cluster.sbatch("-N1", "--ntasks-per-node=1", "--gpus-per-node=0", "-c1", "-w", node, "-J",
                                 f"asset-test-join{k}", "-t", "00:10:00", f"--output={tmp_path}/%x-%j.out",
                                 "slurm/edit_batch.sh", "infer.batch_size=2", env=env)
            for k, node in enumerate(nodes * (2 // len(nodes)))]
    try:
        for job in jobs:
            info = slurm_cluster.wait(job, timeout=400)
            text = "".join(p.read_text() for p in sorted(tmp_path.glob("asset-test-join*.out")))
            assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:]
    finally:
        for job in jobs:
            slurm_cluster.cancel(job)
    assert "(joined the running batch)" in text, text[-6000:]
    man = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    assert [m["edit"] for m in man] == ids and {m["status"] for m in man} == {"ok"}
    done = [json.loads(x) for p in sorted((run / "logs").glob("rank*.jsonl")) if not p.name.endswith(".stats.jsonl")
            for x in p.read_text().splitlines()]
    assert sorted(d["edit"] for d in done) == ids  # each edit written once, by one of the two jobs
    assert len({d["worker"] for d in done}) == 2, {d["worker"] for d in done}  # both jobs edited
    summ = json.loads((run / "summary.json").read_text())
    assert len(summ["ranks"]) == 2 and summ["total"]["edits"] == len(ids)
    assert len(summ["nodes"]) == len(nodes)
    one = tmp_path / "one"
    check(cli(["edit-batch", "--config", str(cfg), "--edits", str(tmp_path / "edits"), "--out", str(one),
               "--set", "infer.batch_size=2"]))
    for eid in ids:
        for k in (0, 1):
            assert (run / eid / f"sample_{k}.png").read_bytes() == (one / eid / f"sample_{k}.png").read_bytes()

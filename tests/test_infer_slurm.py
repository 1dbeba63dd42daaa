"""`sbatch slurm/edit_batch.sh` on the local SLURM cluster: two srun tasks on two nodes (one task each; on a
one-node cluster both on it) split the edits (ranks from SLURM's variables), the run folder gets every edit
once and the manifest; the images equal a 1-process run."""
from __future__ import annotations

import json
import re

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401
from tests.test_infer_common import check, cli, make_exports, small_edit_set

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

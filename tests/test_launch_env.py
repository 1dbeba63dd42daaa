"""asset_dist.distenv: launcher detection, hostlist expansion, torch variables. Pure: no cluster needed."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asset_dist.distenv import (
    EXIT_REQUEUE,
    DistEnv,
    dist_env,
    expand_hostlist,
    expand_tasks_per_node,
    export_torch_env,
    slurm_master_port,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu-a100-[3,5],login", ["gpu-a100-3", "gpu-a100-5", "login"]),
    ("host.domain[1-2].org", ["host.domain1.org", "host.domain2.org"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "node[a-b]", "node[5-3]", "n[1-2],x]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="bad hostlist"):
        expand_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_expand_hostlist_matches_scontrol(tmp_path):
    # scontrol wants some slurm.conf even for this offline command; a two-line one is enough
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    hostlist = "node[01-03,7],gpu5,rack[1-2]-n[09-10],n[8-11]"
    out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "SLURM_CONF": str(conf)})
    assert expand_hostlist(hostlist) == out.stdout.split()


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8") == [8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4,8(x2)") == [4, 8, 8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2x3")


def test_single_process_defaults():
    env = dist_env({})
    assert env == DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500,
                          node_rank=0, num_nodes=1, launcher="none", local_world_size=1)
    assert not env.is_distributed and env.is_main


def test_torchrun_variables():
    env = dist_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                    "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
                    "TORCHELASTIC_RUN_ID": "x"})
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, master_addr="10.0.0.1", master_port=1234,
                          node_rank=1, num_nodes=2, launcher="torchrun", local_world_size=4)


def test_deepspeed_launcher_variables():
    env = dist_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "6", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                    "CROSS_SIZE": "3", "MASTER_ADDR": "h0", "MASTER_PORT": "29501"})
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.num_nodes, env.local_world_size,
            env.launcher) == (3, 1, 6, 1, 3, 2, "deepspeed")


SLURM_STEP = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
    "SLURM_NTASKS": "16", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
}


def test_slurm_step_variables():
    env = dist_env(SLURM_STEP)
    assert env == DistEnv(rank=11, local_rank=3, world_size=16, master_addr="gpu07",
                          master_port=20000 + 123456 % 20000, node_rank=1, num_nodes=2, launcher="slurm",
                          local_world_size=8)
    assert env.master_port == 23456 == slurm_master_port(123456)


def test_slurm_uneven_tasks_per_node_and_step_nodelist():
    env = dist_env({**SLURM_STEP, "SLURM_NTASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "0",
                    "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
                    "SLURM_JOB_NODELIST": "c[1-9]", "SLURM_STEP_NODELIST": "c[4-6]"})
    assert (env.world_size, env.node_rank, env.local_world_size, env.master_addr) == (5, 2, 1, "c4")


def test_slurm_explicit_master_wins():
    env = dist_env({**SLURM_STEP, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 4000)


def test_slurm_batch_shell_is_single_process():
    # The batch script itself has SLURM_PROCID/SLURM_NTASKS but no step id: no srun, one process.
    batch = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    env = dist_env(batch)
    assert (env.world_size, env.rank, env.launcher) == (1, 0, "none")


def test_torch_variables_win_over_slurm():
    # torchrun inside an srun task: the per-process torch variables are the truth.
    env = dist_env({**SLURM_STEP, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "gpu07", "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.launcher) == (2, 4, "torchrun")


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        dist_env({**SLURM_STEP, "SLURM_PROCID": "x"})


def test_export_torch_env_round_trips():
    slurm = dist_env(SLURM_STEP)
    target: dict[str, str] = {}
    export_torch_env(slurm, target)
    assert target == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                      "NODE_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}
    again = dist_env({**SLURM_STEP, **target})  # what the process sees after exporting
    assert again == DistEnv(**{**slurm.__dict__, "launcher": "torchrun"})


def test_torch_init_process_group_from_exported_env(monkeypatch):
    """export_torch_env is enough for torch.distributed's env:// rendezvous (one process, gloo)."""
    import torch.distributed as dist

    env = dist_env({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                    "SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
                    "SLURM_JOB_NODELIST": "localhost"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so the values exported below are removed after the test
    export_torch_env(DistEnv(**{**env.__dict__, "master_port": _free_port()}))
    dist.init_process_group("gloo")
    try:
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exit_requeue_matches_common_sh():
    text = (REPO / "slurm" / "common.sh").read_text()
    m = re.search(r"^EXIT_REQUEUE=(\d+)", text, re.M)
    assert m and int(m.group(1)) == EXIT_REQUEUE == 99


def test_module_prints_json():
    out = subprocess.run([sys.executable, "-m", "asset_dist.distenv"], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0",
                                          "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[3-4]"})
    got = json.loads(out.stdout)
    assert (got["rank"], got["world_size"], got["master_addr"], got["master_port"]) == (1, 2, "n3", 20005)

"""Who am I in the job? Rank, world size and rendezvous address from whichever launcher started us.

Order: torchrun / deepspeed launcher variables (RANK, WORLD_SIZE, ...), then an `srun` step's SLURM
variables, then a single process. Pure functions of an environment mapping, so they are unit-tested
without a cluster; `export_torch_env` then writes the torch names so `torch.distributed` (env://) and
`deepspeed.init_distributed` work under `srun` with one task per GPU.

No torch import at module level: the sbatch scripts call `python -m asset_dist.distenv` before any heavy
work. This is the ground layer: train/, infer/, eval/ and launch/ all take rank, device and process group
from here (one copy of each).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, Optional


# MASTER_PORT under SLURM: a function of the job id, so every task (and a requeued run, which keeps its
# id) agrees without talking, and two jobs sharing a node rarely collide.
PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    node_rank: int = 0
    num_nodes: int = 1
    launcher: str = "none"  # torchrun | deepspeed | slurm | none
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad hostlist {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"bad hostlist {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_range(body: str, whole: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; the width of the low bound sets zero padding, as SLURM does."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad hostlist {whole!r}: cannot read range {item!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"bad hostlist {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    """'rack[1-2]-n[01-02]' -> rack1-n01, rack1-n02, rack2-n01, rack2-n02 (leftmost bracket varies slowest)."""
    start = name.find("[")
    if start < 0:
        if "]" in name:
            raise ValueError(f"bad hostlist {whole!r}: unbalanced ']'")
        return [name]
    end = name.find("]", start)
    prefix, body, rest = name[:start], name[start + 1:end], name[end + 1:]
    tails = _expand_one(rest, whole)
    return [prefix + v + t for v in _expand_range(body, whole) for t in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: 'node[01-03,7],gpu5' -> node01..node03, node7, gpu5.

    Same result as `scontrol show hostnames`, without needing SLURM installed.
    """
    hosts: list[str] = []
    for part in _split_top(hostlist.strip()):
        hosts.extend(_expand_one(part.strip(), hostlist))
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node string -> one count per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node string {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {key} is required here but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the process's place in the job from `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ

    # torchrun (GROUP_RANK, LOCAL_WORLD_SIZE), deepspeed's launcher (CROSS_RANK/SIZE, LOCAL_SIZE), or our
    # own export_torch_env inside an srun task
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
        per_node = max(local_world, 1)
        node_rank = _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", _int(env, "NODE_RANK", rank // per_node)))
        return DistEnv(
            rank=rank,
            local_rank=_int(env, "LOCAL_RANK", rank % per_node),
            world_size=world,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", 29500),
            node_rank=node_rank,
            num_nodes=_int(env, "CROSS_SIZE", max(1, -(-world // per_node))),
            launcher="deepspeed" if "CROSS_RANK" in env else "torchrun",
            local_world_size=local_world,
        )

    # an srun step. The batch shell itself also has SLURM_PROCID/SLURM_NTASKS but no step id: a
    # python started there without srun is one process, not rank 0 of a world that never comes.
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if "SLURM_PROCID" in env and step is not None and step != "":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master node")
        hosts = expand_hostlist(nodelist)
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", len(hosts))))
        node_rank = _int(env, "SLURM_NODEID", 0)
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = world // max(num_nodes, 1)
        if tpn:
            per_node = expand_tasks_per_node(tpn)
            if 0 <= node_rank < len(per_node):
                local_world = per_node[node_rank]
        job_id = _int(env, "SLURM_JOB_ID", _int(env, "SLURM_JOBID", 0))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world,
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=_int(env, "MASTER_PORT", slurm_master_port(job_id)),
            node_rank=node_rank,
            num_nodes=num_nodes,
            launcher="slurm",
            local_world_size=max(local_world, 1),
        )

    return DistEnv(master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=_int(env, "MASTER_PORT", 29500))


def export_torch_env(env: DistEnv, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Write the variables torch.distributed's env:// rendezvous and deepspeed read."""
    target = os.environ if environ is None else environ
    target.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "NODE_RANK": str(env.node_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


def torch_backend() -> str:
    """nccl when this process can see a GPU, else gloo (CPU nodes, tests)."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


class DeviceError(ValueError):
    """The requested device does not exist on this node (the message says what to change)."""


def pick_device(env: DistEnv, want: str = "auto"):
    """This rank's device: `want` is auto | cpu | cuda. On a GPU node rank r of the node takes GPU local_rank
    (more ranks than GPUs is an error, never a silent share); on CPU the process uses its task's cores
    (OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK), not every core of the node: several ranks per node would
    otherwise oversubscribe it."""
    import torch

    if want not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device {want!r}: use auto, cpu or cuda")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        cpus = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit() and int(cpus) > 0:
            torch.set_num_threads(int(cpus))
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device cuda: no CUDA device is visible on this node")
    n = torch.cuda.device_count()
    if env.local_rank >= n:
        raise DeviceError(f"local rank {env.local_rank} needs GPU {env.local_rank}, but this node has {n}: "
                          "lower --ntasks-per-node / --nproc_per_node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init_process_group(env: DistEnv, device, timeout_s: Optional[float] = None) -> bool:
    """Join the job's process group (env:// rendezvous) when there is more than one rank; returns whether a
    group is up. `timeout_s` bounds every collective: a rank whose peer went silent fails within it instead
    of waiting torch's default 30 minutes (torch reads no environment variable for it)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if env.world_size <= 1:
        return False
    export_torch_env(env)  # srun: torch's env:// rendezvous reads the torch names
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
    dist.init_process_group(backend="nccl" if getattr(device, "type", device) == "cuda" else "gloo", **kwargs)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m asset_dist.distenv",
                            description="Print this process's place in the job as JSON "
                                        "(e.g. `srun python -m asset_dist.distenv` checks a cluster).").parse_args(argv)
    print(json.dumps(asdict(dist_env())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

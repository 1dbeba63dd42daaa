"""What a job asks for (`Resources`: the submit/pipeline flags and a pipeline file's `resources:`) and the keys
of a pipeline file: the one description the launchers, their --help and docs/CONFIG.md share.

Ground layer, like config.py (no submitit import): asset_dist.config_reference renders these into
docs/CONFIG.md, asset_dist/launch/ submits jobs with them.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

# A pipeline file's keys (asset_dist/launch/pipeline.py), with what each means.
PIPELINE_KEYS = {
    "name": "the pipeline's name: job names are <name>-<stage> (default: the file name)",
    "run_root": "stage run folders become RUN_ROOT/<stage> (relative to where the command runs); or give each "
                "stage a run_dir. --run-root overrides it",
    "set": "config overrides (KEY=VALUE) for every stage, before the stage's own and the command line's",
    "resources": "resources of every stage (keys: the table below); a stage's own `resources` and the command "
                 "line's flags win",
    "stages": "stage name -> its settings (keys: the next table), parents before children or in any order",
}
STAGE_KEYS = {
    "config": "the stage config (YAML), relative to the pipeline file; required",
    "run_dir": "the stage's run folder (relative to where the command runs); required without run_root",
    "inputs": "config key -> parent stage: the key gets the parent's export (RUN/export/<stage>.pt), and the "
              "stage starts after that parent's job completed (afterok)",
    "after": "more parent stages to wait for, without wiring an export",
    "set": "config overrides (KEY=VALUE) for this stage",
    "resources": "this stage's resources, over the file's",
}


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
    """What one job asks for: `asset-dist submit` / `asset-dist pipeline` flags (--gpus-per-node ...) and, with
    the same names, a pipeline file's `resources:` (for every stage, or per stage)."""

    nodes: int = 1  # nodes (the most, with min_nodes)
    # > 0: the job may start (and come back after a requeue) on min_nodes..nodes nodes (`--nodes=MIN-MAX`);
    # an edit batch continues on any count, training needs the same world size for now (named error)
    min_nodes: int = 0
    gpus_per_node: int = 0  # GPUs per node, one task per GPU; 0: CPU tasks (gloo)
    tasks_per_node: int = 0  # 0: one task per GPU, or 1 on a CPU node
    cpus_per_task: int = 0  # 0: the cluster's default
    time: str = "01:00:00"  # time limit, SLURM syntax (minutes, H:M:S, D-H:M:S)
    mem: str = ""  # per node, SLURM syntax (64G); "" = the cluster's default
    partition: str = ""  # "" = the cluster's default
    account: str = ""  # "" = yours by default
    qos: str = ""  # quality of service; "" = the cluster's default
    constraint: str = ""  # node features, e.g. a100
    signal_delay_s: int = 0  # checkpoint request this long before the limit; 0: min(300 s, limit / 4)
    max_timeouts: int = 20  # requeues after a time limit (preemptions do not count)
    array_parallelism: int = 0  # several configs in one `submit`: at most this many run at once (0: all)

    @property
    def nodes_spec(self) -> str:
        """sbatch's --nodes value: N, or MIN-MAX."""
        return f"{self.min_nodes}-{self.nodes}" if self.min_nodes and self.min_nodes != self.nodes else str(self.nodes)

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
        for name in ("min_nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s",
                     "array_parallelism"):
            if getattr(self, name) < 0:
                raise ValueError(f"resources: {name} must be >= 0 (got {getattr(self, name)})")
        if self.min_nodes > self.nodes:
            raise ValueError(f"resources: min_nodes ({self.min_nodes}) must not exceed nodes ({self.nodes})")
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
    arg("--nodes", "nodes", "nodes (the most, with --min-nodes)", int)
    arg("--min-nodes", "min_nodes", "start, and come back after a requeue, on as few as this many nodes "
        "(--nodes=MIN-MAX)", int, "0: exactly --nodes")
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



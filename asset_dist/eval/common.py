"""What the evaluations share: the process group (optional), devices, summed counters and report files.

Evaluation runs in one process by default. Under torchrun / srun (WORLD_SIZE > 1) every rank reads its own
share of the val shards (the loader splits them by rank) and the ranks add their sums with one all_reduce at
the end, so the numbers equal a single-process run over the same samples.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from asset_dist.distenv import DeviceError, DistEnv, dist_env, init_process_group, pick_device
from asset_dist.utils import atomic_write_json, atomic_write_text


class EvalError(ValueError):
    """A bad input of an evaluation (missing weights, empty split, unreadable folder); the message says which."""


def start(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group when launched with several ranks; pick this rank's device."""
    env = dist_env()
    try:
        dev = pick_device(env, device)
    except DeviceError as e:
        raise EvalError(str(e)) from None
    init_process_group(env, dev)
    return env, dev


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_share(total: int, env: DistEnv) -> Optional[int]:
    """This rank's part of a global sample budget (total <= 0: None = no limit); the first total % world ranks
    take one more, so a rank may get 0."""
    if total <= 0:
        return None
    return total // env.world_size + int(env.rank < total % env.world_size)


class Sums:
    """Named float64 / int64 tensors that are added over ranks in one go (`reduce`)."""

    def __init__(self) -> None:
        self.t: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: float | torch.Tensor) -> None:
        v = torch.as_tensor(value).detach().cpu()
        v = v.to(torch.int64) if not v.is_floating_point() else v.to(torch.float64)
        self.t[name] = self.t[name] + v if name in self.t else v.clone()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]

    def get(self, name: str, default: float = 0.0) -> float:
        return float(self.t[name]) if name in self.t else default

    def reduce(self, device: torch.device) -> None:
        """Sum every tensor over ranks (no-op in one process). All ranks must hold the same names: callers
        register every name before the first batch."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        names = sorted(self.t)
        gathered: list[Optional[list[str]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        if any(g != names for g in gathered):
            raise RuntimeError(f"evaluation sums differ between ranks: {gathered}")
        dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        for n in names:
            x = self.t[n].to(dev)
            dist.all_reduce(x)
            self.t[n] = x.cpu()


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plain(x: Any) -> Any:
    """NaN / inf -> None: strict JSON readers reject them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def write_report(out: str | Path, name: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """OUT/eval_<name>.json and OUT/eval_<name>.md, written atomically (a partial report is never left)."""
    out = Path(out)
    js, md = out / f"eval_{name}.json", out / f"eval_{name}.md"
    atomic_write_json(js, _plain(json.loads(json.dumps(report, default=str))))
    atomic_write_text(md, markdown)
    return js, md

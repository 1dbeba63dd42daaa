"""Rank-0 logging: TensorBoard scalars and image grids, plus one progress line with ETA on stdout.

A run that resumes from step S drops what an earlier run logged after S (it crashed or was killed after its
last checkpoint; those steps are trained again): metrics.jsonl is cut back to steps <= S and TensorBoard is
told to purge events from step S + 1 on (SummaryWriter's purge_step), so no step appears twice.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from asset_dist.utils import atomic_write_text


def make_grid(images: torch.Tensor, ncol: int = 4, pad: int = 2) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [3, rows*(H+pad), ncol*(W+pad)] (white padding)."""
    n, c, h, w = images.shape
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i].float().clamp(0, 1).cpu()
    return grid


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (atomically; a torn last line is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.writer = None
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            truncate_metrics(self.metrics_path, start_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.t0 = time.time()
        self.step0: Optional[int] = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:  # a plain-text copy for scripts and tests: one JSON object per logged step
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def images(self, step: int, grids: dict[str, torch.Tensor]) -> None:
        if self.writer is not None:
            for k, v in grids.items():
                self.writer.add_image(k, make_grid(v), step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.step0 is None:
            self.step0, self.t0 = step, time.time()
        done = step - self.step0
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items() if k.startswith("loss"))
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        wait = values.get("perf/data_wait_frac")
        data = f" data-wait {wait:.0%}" if wait is not None else ""  # high = the loader is the bottleneck
        print(f"step {step}/{self.total} {shown} {rate:.2f} it/s{data} eta {eta_s}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

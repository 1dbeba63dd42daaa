"""Launch real training processes from tests (single process or `torchrun --nproc_per_node N`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_train(config: str, overrides: list[str], nproc: int = 1, timeout: int = 600,
              extra: list[str] | None = None) -> subprocess.CompletedProcess:
    args = ["--config", str(REPO / "configs" / config)]
    for o in overrides:
        args += ["--set", o]
    args += extra or []
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "asset_dist.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "asset_dist.cli", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc})\n--- stdout\n{proc.stdout[-4000:]}" \
                                  f"\n--- stderr\n{proc.stderr[-6000:]}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def early_late(values: list[float], n: int) -> tuple[float, float]:
    return sum(values[:n]) / n, sum(values[-n:]) / n


def make_tiny_parents(out: Path, seed: int = 0) -> dict[str, Path]:
    """Random-weight exports of the tiny tokenizers and guide (configs/tiny_base.yaml sizes), written in the
    real export format: the parents a guide / SGA test run consumes."""
    import torch

    from asset_dist.config import load_config, to_dict
    from asset_dist.models.seg_vq import SegVQModel
    from asset_dist.models.transformer import AssetTransformer
    from asset_dist.models.vqgan import VQModel
    from asset_dist.artifacts import write_export

    cfg = load_config(REPO / "configs" / "tiny_guide.yaml")
    torch.manual_seed(seed)
    models = {"vqgan": VQModel(cfg.model.vqgan), "seg": SegVQModel(cfg.model.seg),
              "guide": AssetTransformer(cfg.model.transformer)}
    paths = {}
    for stage, m in models.items():
        paths[stage] = out / f"{stage}.pt"
        write_export(paths[stage], stage=stage, network="model", state_dict=m.state_dict(), config=to_dict(cfg),
                     lineage={"test": "random weights"}, step=0)
    return paths

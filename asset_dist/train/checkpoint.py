"""Checkpoint layout and the `latest` pointer.

    RUN/checkpoints/step_00000100/<network>/...   DeepSpeed's own files (model, optimizer, scheduler)
    RUN/checkpoints/step_00000100/rank<r>.pt      per-rank state: step, RNG states, loader position
    RUN/checkpoints/step_00000100/COMPLETE        written after every rank finished the tag
    RUN/checkpoints/latest                        name of the newest complete tag, written last, atomically

A tag without COMPLETE (a run killed while saving) is never pointed to and is ignored on resume.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from asset_dist.utils import atomic_write_text, torch_load, torch_save_atomic


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> Optional[str]:
    root = ckpt_root(run_dir)
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    tag = ptr.read_text().strip()
    if not (root / tag / "COMPLETE").is_file():
        raise RuntimeError(f"{ptr} points to '{tag}', which is not a complete checkpoint")
    return tag


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),  # the key array; plain lists load with weights_only
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(run_dir: str | Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    torch_save_atomic(state, ckpt_root(run_dir) / tag / f"rank{rank}.pt")


def load_rank_state(run_dir: str | Path, tag: str, rank: int) -> dict[str, Any]:
    path = ckpt_root(run_dir) / tag / f"rank{rank}.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the checkpoint was written by a job with a different world size?")
    return torch_load(path)


def mark_complete(run_dir: str | Path, tag: str, keep_last: int) -> None:
    """Rank 0, after a barrier: seal the tag, move `latest`, prune old tags."""
    root = ckpt_root(run_dir)
    atomic_write_text(root / tag / "COMPLETE", "ok\n")
    atomic_write_text(root / "latest", tag + "\n")
    if keep_last > 0:
        tags = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in tags[:-keep_last]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

"""Checkpoint layout, the `latest` pointer and the per-rank state.

    RUN/checkpoints/step_00000100/<network>/...   the backend's files (model, optimizer, scheduler)
    RUN/checkpoints/step_00000100/rank<r>.pt      per-rank state: step, RNG, loader position, backend and
                                                  stage extras (weights-only: plain tensors and containers)
    RUN/checkpoints/step_00000100/meta.json       backend, world size, step, the resolved config (rank 0)
    RUN/checkpoints/step_00000100/COMPLETE        written after every rank finished the tag
    RUN/checkpoints/latest                        name of the newest complete tag, written last, atomically

A tag without COMPLETE (a run killed while saving) is never pointed to and is ignored on resume. Tags
written before meta.json existed are DeepSpeed tags; their world size is the number of rank files.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from asset_dist.utils import atomic_write_json, atomic_write_text, torch_load, torch_save_atomic

META_FORMAT = "asset_dist.checkpoint/2"
TAG_RE = re.compile(r"step_\d{8}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message names the file and the reason (exit 2)."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that would need full unpickling (arbitrary code): refused."""


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> Optional[str]:
    """The tag `checkpoints/latest` names, after checking it is one of this folder's complete tags."""
    root = ckpt_root(run_dir)
    ptr = root / "latest"
    if not ptr.exists():
        return None
    if ptr.is_symlink() or not ptr.is_file():
        raise CheckpointError(f"{ptr}: not a plain file")
    tag = ptr.read_text(errors="replace").strip()
    if not TAG_RE.fullmatch(tag):
        raise CheckpointError(f"{ptr} names {tag[:80]!r}, not a tag of this folder (step_NNNNNNNN)")
    folder = root / tag
    if folder.is_symlink() or not folder.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{ptr} names {tag}, which lies outside {root}")
    if not (folder / "COMPLETE").is_file():
        raise CheckpointError(f"{ptr} points to '{tag}', which is not a complete checkpoint")
    return tag


def read_meta(folder: Path) -> dict[str, Any]:
    """The tag's meta.json; for tags older than it, what can be inferred (DeepSpeed, world = rank files)."""
    path = folder / "meta.json"
    if path.is_file():
        try:
            meta = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            raise CheckpointError(f"{path}: not an asset_dist checkpoint record")
        return meta
    ranks = sorted(int(p.stem[4:]) for p in folder.glob("rank*.pt") if p.stem[4:].isdigit())
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(f"{folder}: no meta.json and rank files {ranks}: not a checkpoint this trainer wrote")
    return {"format": "legacy", "backend": "deepspeed", "world_size": len(ranks)}


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(folder / "meta.json", {"format": META_FORMAT, **meta})


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


def save_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    torch_save_atomic(state, folder / f"rank{rank}.pt")


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch_load(path)
    except RuntimeError as e:
        raise UnsafeCheckpoint(f"{path}: refused to load: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a rank state file")
    return state


def mark_complete(run_dir: str | Path, tag: str, keep_last: int) -> None:
    """Rank 0, after a barrier: seal the tag, move `latest`, prune old tags."""
    root = ckpt_root(run_dir)
    atomic_write_text(root / tag / "COMPLETE", "ok\n")
    atomic_write_text(root / "latest", tag + "\n")
    if keep_last > 0:
        tags = sorted(p for p in root.glob("step_*") if p.is_dir() and TAG_RE.fullmatch(p.name))
        for old in tags[:-keep_last]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

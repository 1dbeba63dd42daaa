"""Artefacts every layer reads and writes: the single-file export and its lineage (the ground layer).

    {"format": "asset_dist.export/1", "stage": ..., "network": ..., "state_dict": {name: fp32 tensor},
     "config": <resolved config as a plain dict>, "lineage": {...}, "step": int}

Plain tensors, dicts, lists and strings only, so it loads with `torch.load(..., weights_only=True)`.
How a backend consolidates its sharded checkpoint into the fp32 state dict is the trainer's business
(asset_dist/train/); this module only knows the file.
"""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module loads torch lazily through utils
    import torch

from asset_dist.utils import torch_load, torch_save_atomic

FORMAT = "asset_dist.export/1"


def write_export(path: Path, *, stage: str, network: str, state_dict: dict[str, "torch.Tensor"],
                 config: dict[str, Any], lineage: dict[str, Any], step: int) -> None:
    record = {
        "format": FORMAT,
        "stage": stage,
        "network": network,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "state_dict": state_dict,
        "config": config,
        "lineage": lineage,
    }
    torch_save_atomic(record, path)


def read_export(path: str | Path, expect_stage: str | None = None) -> dict[str, Any]:
    rec = torch_load(path)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ValueError(f"{path}: not an asset_dist export (format {rec.get('format') if isinstance(rec, dict) else '?'})")
    if expect_stage and rec["stage"] != expect_stage:
        raise ValueError(f"{path}: exported by stage '{rec['stage']}', expected '{expect_stage}'")
    return rec


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parent_record(path: str | Path) -> dict[str, Any]:
    """Lineage entry for a parent export: where it is, its digest and its own lineage."""
    rec = read_export(path)
    return {"path": str(Path(path).resolve()), "sha256": file_digest(path), "stage": rec["stage"],
            "step": rec["step"], "lineage": rec.get("lineage", {})}

"""The single-file export every later stage consumes.

    {"format": "asset_dist.export/1", "stage": ..., "network": ..., "state_dict": {name: fp32 tensor},
     "config": <resolved config as a plain dict>, "lineage": {...}, "step": int}

Plain tensors, dicts, lists and strings only, so it loads with `torch.load(..., weights_only=True)`.
The fp32 weights are consolidated from DeepSpeed's checkpoint files (any ZeRO stage), so a bf16 run
exports its fp32 master weights, not the bf16 copies.
"""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

import torch

from asset_dist.utils import torch_load, torch_save_atomic

FORMAT = "asset_dist.export/1"


def consolidate_fp32(net_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from one network's DeepSpeed checkpoint folder (RUN/checkpoints/TAG/NET)."""
    if zero_stage == 0:
        files = sorted(net_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{net_dir}: no mp_rank_*_model_states.pt")
        sd = torch_load(files[0])["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 wants (folder holding the tag, tag)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(net_dir.parent), tag=net_dir.name)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def write_export(path: Path, *, stage: str, network: str, state_dict: dict[str, torch.Tensor],
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

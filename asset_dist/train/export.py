"""Consolidating DeepSpeed's checkpoint files (any ZeRO stage) into the fp32 state dict an export holds, so
a bf16 run exports its fp32 master weights, not the bf16 copies. The file format: asset_dist/artifacts.py."""
from __future__ import annotations

from pathlib import Path

import torch

from asset_dist.utils import torch_load


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

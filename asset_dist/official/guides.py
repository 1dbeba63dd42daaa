"""Official block picks <-> the model's guide layout.

The official code returns causal picks for query blocks 5..63 only (`get_topK_causal`); its decoder lets the
warm-up blocks b < 5 see all of blocks 0..b. The model's guides have one row per query block, so the warm-up rows
hold the blocks < b-2 as picks: their union with the window {b-2, b-1, b} is exactly 0..b
(`attention.guide.warmup_rows`, which the "official" pick mode fills the same way).
"""
from __future__ import annotations

import torch

from asset_dist.attention.guide import OFFICIAL_CAUSAL_FIRST_ROW, warmup_rows
from asset_dist.models.transformer import Guides


def causal_rows_from_official(picks: torch.Tensor, n_blocks: int = 64) -> torch.Tensor:
    """Official causal picks [..., n_blocks - 5, k] (row r = block r+5) -> our layout [..., n_blocks, k]."""
    first = OFFICIAL_CAUSAL_FIRST_ROW
    if picks.shape[-2] != n_blocks - first:
        raise ValueError(f"official causal picks need {n_blocks - first} rows, got {tuple(picks.shape)}")
    warm = warmup_rows(picks.shape[-1], first, picks.device).expand(*picks.shape[:-2], first, picks.shape[-1])
    return torch.cat([warm, picks.long()], -2)


def causal_rows_to_official(picks: torch.Tensor) -> torch.Tensor:
    """Our causal layout [..., n_blocks, k] -> the official one [..., n_blocks - 5, k] (rows 5..)."""
    return picks[..., OFFICIAL_CAUSAL_FIRST_ROW:, :]


def official_guides(e_self: torch.Tensor, d_causal: torch.Tensor, d_cross: torch.Tensor,
                    n_blocks: int = 64) -> Guides:
    """Official picks [n_layers, B, H, rows, K] -> the model's guide dict. The official causal picks cover query
    blocks 5..63; the official decoder lets the warm-up blocks b < 5 see all of blocks 0..b, so those rows get the
    blocks < b-2 as picks (`causal_rows_from_official`): their union with the window
    {b-2,b-1,b} is then exactly 0..b."""
    e_self, d_causal, d_cross = (torch.as_tensor(t).long() for t in (e_self, d_causal, d_cross))
    for name, t in (("e_self", e_self), ("d_cross", d_cross)):
        if t.shape[-2] != n_blocks:
            raise ValueError(f"official {name} picks have {t.shape[-2]} rows, expected {n_blocks}")
    return {"e_self": e_self, "d_causal": causal_rows_from_official(d_causal, n_blocks), "d_cross": d_cross}

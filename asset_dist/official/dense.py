"""Dense O(L^2) reference of the official SGA rule (tests and fidelity checks; asset_dist/official/attention.py is
the sparse kernel models run). It differs from this package's union rule only where the official causal picks of
blocks 5/6 hit their own window (docs/ASSET_NOTES.md §10.1)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def official_sga_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: torch.Tensor, grid,
                           causal: bool = False, prefix_k: Optional[torch.Tensor] = None,
                           prefix_v: Optional[torch.Tensor] = None, impl: str = "auto",
                           validate: bool = True) -> torch.Tensor:
    """Dense reference of the official SGA semantics (same signature as asset_dist.attention.sga_attention): keys are
    the concatenation of the window copy (causal mask inside the own block only) and the picked blocks (always fully
    visible), so a block listed twice has weight x2 in the softmax and a causal pick of the own block leaks, as in the
    official code. O(L^2): for tests and fidelity checks only."""
    B, H, L, d = q.shape
    nb = int(grid[0]) * int(grid[1])
    nt = L // nb
    blk = torch.arange(nb, device=q.device)
    delta = blk.view(-1, 1) - blk.view(1, -1)  # query block - key block
    window = ((delta >= 0) & (delta <= 2)) if causal else (delta.abs() <= 1)
    g = guide.to(q.device)
    picks = (F.one_hot(g.clamp(min=0), nb) * (g >= 0).unsqueeze(-1)).sum(-2)  # [B, H, nb, nb] multiplicity
    tok_causal = torch.ones(nt, nt, dtype=torch.bool, device=q.device).tril()
    win = window.to(q.dtype).repeat_interleave(nt, 0).repeat_interleave(nt, 1)
    if causal:  # inside the own block the window copy is causal
        own = torch.block_diag(*[tok_causal.to(q.dtype)] * nb)
        win = torch.where(torch.eye(nb, dtype=torch.bool, device=q.device)
                          .repeat_interleave(nt, 0).repeat_interleave(nt, 1), own, win)
    count = win + picks.to(q.dtype).repeat_interleave(nt, -2).repeat_interleave(nt, -1)
    s = (q @ k.transpose(-1, -2)) * (d ** -0.5) + torch.log(count)  # log 0 = -inf: invisible
    if prefix_k is not None:
        s = torch.cat([(q @ prefix_k.transpose(-1, -2)) * (d ** -0.5), s], -1)
        v = torch.cat([prefix_v, v], 2)
    return s.softmax(-1) @ v


"""From low-resolution (guide) attention to SGA block picks (docs/ASSET_NOTES.md §5.2, §10.1).

`guide_blocks(attn)` = `pick_blocks(pool_blocks(attn))`: average each block x block tile of the strip-order
attention map, then keep per query block the k key blocks of largest mean affinity.

mode="fixed" (default): never a window block; causal: only blocks before b-2; -1 pads where fewer than k
  blocks qualify. With the window+guide union of `sga_attention`, causal query blocks 0..k+2 (0..5 for
  k=3) therefore see every earlier block, i.e. dense causal attention. For blocks 0-4 that is exactly the
  official warm-up (dense causal over blocks 0..b); block 5 is dense causal here, while the official code
  gives it window {3,4,5} plus unmasked picks (which may repeat window blocks or pick block 5 itself - the
  causality leak of docs/ASSET_NOTES.md §10.1); from block 6 on both pick 3 of the earlier blocks, the official one
  still unmasked at row 6.
mode="official": the official picks bit for bit - pooled map + the -10000 additive mask (non-causal: the
  window; causal: blocks >= b-2, but only from row 7 on), then torch.topk order. The official causal output
  has rows 5..63 only; here rows 0-4 hold the warm-up (every block before b-2, -1 padded), so the kernels
  reproduce the official dense warm-up (asset_dist/official/guides.py converts the official row layout).
  sga_attention never lets a key after the query position through, so the official leak's picks of
  blocks >= b-2 only duplicate window blocks there (no leak, fewer distinct keys).
"""
from __future__ import annotations

import torch

from .layout import Grid, n_blocks_of

MODES = ("fixed", "official")
OFFICIAL_CAUSAL_FIRST_ROW = 5  # official get_topK_causal returns query blocks 5..63
OFFICIAL_CAUSAL_MASK_ROW = 7  # ...but its -10000 mask only starts at row 7 (rows 5 and 6 unmasked)
OFFICIAL_PENALTY = -10000.0


def pool_blocks(attn: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean of every block tile: [..., L, L] (strip order) -> float32 [..., n_blocks, n_blocks].

    Drop the [start] query row / key column before calling. At L=256 this equals avg_pool2d(4, 4).
    """
    nb = n_blocks_of(grid)
    L = attn.shape[-1]
    if attn.shape[-2] != L or L % nb:
        raise ValueError(f"attention map must be [..., L, L] with L a multiple of {nb}, got {tuple(attn.shape)}")
    bs = L // nb
    a = attn if attn.dtype in (torch.float32, torch.float64) else attn.float()
    return a.reshape(*a.shape[:-2], nb, bs, nb, bs).mean(dim=(-3, -1), dtype=torch.float32)


def forbidden_blocks(n_blocks: int, causal: bool, mode: str = "fixed",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [n_blocks, n_blocks]: [b, c] true when query block b may not pick key block c."""
    if mode not in MODES:
        raise ValueError(f"unknown pick mode {mode!r}; choose one of {', '.join(MODES)}")
    b = torch.arange(n_blocks, device=device)[:, None]
    c = torch.arange(n_blocks, device=device)[None, :]
    if not causal:
        return (c - b).abs() <= 1
    out = c >= b - 2
    if mode == "official":
        out = out & (b >= OFFICIAL_CAUSAL_MASK_ROW)
    return out


def official_mask(n_blocks: int, causal: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The official additive mask (generate_rand_full_mask / generate_rand_causal_mask): 0 or -10000."""
    f = forbidden_blocks(n_blocks, causal, "official", device)
    return torch.zeros(f.shape, device=device).masked_fill_(f, OFFICIAL_PENALTY)


def warmup_rows(k: int, n_rows: int = OFFICIAL_CAUSAL_FIRST_ROW, device=None) -> torch.Tensor:
    """Long [n_rows, k]: for causal block b every block before b-2, ascending, -1 padded (dense warm-up)."""
    rows = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
    for b in range(n_rows):
        earlier = torch.arange(max(b - 2, 0), device=device)
        if earlier.numel() > k:
            raise ValueError(f"k={k} cannot hold the {earlier.numel()} warm-up blocks of causal block {b}")
        rows[b, :earlier.numel()] = earlier
    return rows


def pick_blocks(pooled: torch.Tensor, k: int = 3, causal: bool = False, mode: str = "fixed") -> torch.Tensor:
    """Top-k key blocks per query block from pooled maps [..., n_blocks, n_blocks] -> long [..., n_blocks, k]."""
    nb = pooled.shape[-1]
    if pooled.shape[-2] != nb:
        raise ValueError(f"pooled map must be square [..., n_blocks, n_blocks], got {tuple(pooled.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(k, nb)
    if mode == "official":
        scores = pooled + official_mask(nb, causal, pooled.device).to(pooled.dtype)
        idx = torch.topk(scores, kk, dim=-1).indices
        if causal:
            n_warm = min(OFFICIAL_CAUSAL_FIRST_ROW, nb)
            idx[..., :n_warm, :] = warmup_rows(kk, n_warm, pooled.device)
    else:
        scores = pooled.masked_fill(forbidden_blocks(nb, causal, mode, pooled.device), float("-inf"))
        vals, idx = torch.topk(scores, kk, dim=-1)
        idx = idx.masked_fill(vals == float("-inf"), -1)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - kk), -1)], -1)
    return idx


def guide_blocks(attn: torch.Tensor, grid: Grid, k: int = 3, causal: bool = False,
                 mode: str = "fixed") -> torch.Tensor:
    """Block picks from attention probabilities [..., L, L] in strip order: long [..., n_blocks, k]."""
    return pick_blocks(pool_blocks(attn, grid), k, causal, mode)

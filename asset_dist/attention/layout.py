"""Strip order, block ids and the SGA window rule (docs/ASSET_NOTES.md §5.1, §5.3, §5.4).

The h x w token grid is cut into a fixed grid of blocks (16 rows x 4 columns by default); the sequence is
block-major (blocks in raster order, raster order inside a block), so every block is a contiguous run of
`block_size = h*w / n_blocks` tokens.

The window rule lives here and only here: `window_table` feeds `block_table`, which the kernels, the dense
oracle mask (`sga.sga_mask`) and the sampler helper `visible_key_blocks` all use.
"""
from __future__ import annotations

from typing import Sequence

import torch

Grid = Sequence[int]  # (block rows, block cols)

# Key-block offsets of the window around query block b; SELF_SLOT is the slot of b itself.
WINDOW_OFFSETS = {False: (-1, 0, 1), True: (-2, -1, 0)}
SELF_SLOT = {False: 1, True: 2}


def n_blocks_of(grid: Grid) -> int:
    return int(grid[0]) * int(grid[1])


def block_shape(h: int, w: int, grid: Grid = (16, 4)) -> tuple[int, int]:
    """Tokens per block as (rows, cols); the grid must divide the token grid."""
    gr, gc = int(grid[0]), int(grid[1])
    if h <= 0 or w <= 0 or h % gr or w % gc:
        raise ValueError(f"token grid {h}x{w} is not divisible by the block grid {gr}x{gc}")
    return h // gr, w // gc


def strip_order(h: int, w: int, grid: Grid = (16, 4)) -> torch.Tensor:
    """LongTensor `perm` of length h*w with x_strip = x_raster[..., perm] (perm[s] = raster index at s)."""
    th, tw = block_shape(h, w, grid)
    gr, gc = int(grid[0]), int(grid[1])
    raster = torch.arange(h * w).view(gr, th, gc, tw)  # (block row, row in block, block col, col in block)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def inverse_strip_order(h: int, w: int, grid: Grid = (16, 4)) -> torch.Tensor:
    """LongTensor `inv` with x_raster = x_strip[..., inv]."""
    perm = strip_order(h, w, grid)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def block_ids(h: int, w: int, grid: Grid = (16, 4)) -> torch.Tensor:
    """Block id (4*br + bc for the 16x4 grid) of every token, in raster order: LongTensor [h*w]."""
    th, tw = block_shape(h, w, grid)
    rows = torch.arange(h).div(th, rounding_mode="floor")
    cols = torch.arange(w).div(tw, rounding_mode="floor")
    return (rows[:, None] * int(grid[1]) + cols[None, :]).reshape(-1)


def window_table(n_blocks: int, causal: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """Long [n_blocks, 3]: the window key blocks of every query block, -1 where they fall off the ends."""
    b = torch.arange(n_blocks, device=device)[:, None]
    win = b + torch.tensor(WINDOW_OFFSETS[bool(causal)], device=device)
    return torch.where((win >= 0) & (win < n_blocks), win, torch.full_like(win, -1))


def block_table(guide: torch.Tensor, n_blocks: int, causal: bool) -> torch.Tensor:
    """Key blocks each query block sees: long [..., n_blocks, 3 + K] = window slots then guide slots.

    Semantics: the union of the window set and the guide set. A slot is -1 (masked) when it is off the ends,
    a -1 pad, a duplicate of an earlier slot (a guide pick inside the window, or a repeated pick), or, causal,
    a guide block after the query block. So no key is counted twice and nothing in the future is reachable
    through the guide; inside the query's own block the kernels apply the token-level causal triangle.
    """
    if guide.shape[-2] != n_blocks:
        raise ValueError(f"guide has {guide.shape[-2]} query-block rows, expected {n_blocks}")
    g = guide.long()
    win = window_table(n_blocks, causal, g.device).expand(*g.shape[:-1], 3)
    if causal:
        b = torch.arange(n_blocks, device=g.device)[:, None]
        g = torch.where(g > b, torch.full_like(g, -1), g)
    t = torch.cat([win, g], dim=-1)
    s = t.shape[-1]
    earlier = torch.ones(s, s, dtype=torch.bool, device=g.device).tril(-1)  # [j, i]: i < j
    dup = ((t.unsqueeze(-1) == t.unsqueeze(-2)) & earlier).any(-1)
    return torch.where(dup | (t < 0), torch.full_like(t, -1), t)


def check_guide(guide: torch.Tensor, n_blocks: int) -> None:
    """Raise a clear error for guide ids outside [-1, n_blocks) (they would index the wrong memory)."""
    if guide.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"guide must be an integer tensor of block ids, got {guide.dtype}")
    if guide.numel() and (int(guide.min()) < -1 or int(guide.max()) >= n_blocks):
        raise ValueError(f"guide block ids must lie in [-1, {n_blocks}); got min {int(guide.min())}, "
                         f"max {int(guide.max())}")


def visible_key_blocks(b: int, guide_row: torch.Tensor | Sequence[int] | None, n_blocks: int,
                       causal: bool) -> torch.Tensor:
    """Sorted block ids query block `b` may see (window + guide union), for a KV-cached decoder step.

    `guide_row` is that block's K picks (-1 = unused), or None for no guide. In causal mode the own block
    `b` is included and the caller must still hide keys after the query position inside it.
    """
    if not 0 <= b < n_blocks:
        raise ValueError(f"query block {b} outside [0, {n_blocks})")
    g = torch.as_tensor([] if guide_row is None else guide_row, dtype=torch.long).cpu().reshape(1, -1)
    check_guide(g, n_blocks)
    rows = torch.full((n_blocks, g.shape[-1]), -1, dtype=torch.long)
    rows[b] = g
    t = block_table(rows, n_blocks, causal)[b]
    return t[t >= 0].sort().values


def visible_key_positions(pos: int, guide_row: torch.Tensor | Sequence[int] | None, n_blocks: int,
                          block_size: int, causal: bool) -> torch.Tensor:
    """Sorted sequence positions (strip order, prefix keys excluded) the query at `pos` may see.

    For a decoder step over a KV cache: gather only these cached keys (plus the prefix, e.g. [start]).
    Every query of a block sees the same blocks; causal queries also stop at their own position.
    """
    blocks = visible_key_blocks(pos // block_size, guide_row, n_blocks, causal)
    keys = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
    return keys[keys <= pos] if causal else keys

"""The official ASSET SGA semantics, block-sparse: per query block gather the window and the picked blocks.

What the official code computes (DifanLiu/ASSET `forward_sparse_*`; docs/ASSET_NOTES.md §5.3-5.5, §10.1), per query
block b of nb blocks, nt tokens each, strip order:
- the keys are the CONCATENATION of the window copy and the K picked blocks, so a block that is both in the
  window and picked (or picked twice) enters the softmax twice (weight x2);
- encoder self / decoder cross (non-causal): window {b-1, b, b+1} (ends: {0, 1}, {nb-2, nb-1}), picks fully
  visible;
- decoder causal, blocks b >= 5: window {b-2, b-1, b} with the token-level causal triangle inside the own window
  copy only; the picks are fully visible, so a pick of b itself shows the whole own block, future tokens included
  (the official leak: the causal top-k mask only starts at row 7, so rows 5 and 6 may pick themselves);
- decoder causal, warm-up blocks b < 5: dense causal over blocks 0..b; their picks are ignored (the official
  guide has no rows for them);
- prefix keys (the decoder's [start]) are visible to every query.
`official.dense.official_sga_attention` is the dense O(L^2) statement of the same rule (tests).

Here every query block gets one slot table row [window (3 slots), picks (K slots)], slots -1 = nothing; the
kernel gathers those key blocks (duplicates are gathered twice, which IS the official weighting) and runs SDPA
with a boolean mask over [prefix, gathered], a chunk of query blocks at a time: memory O(chunk), never L x L.
Gradients come from autograd (the gather's backward adds into repeated blocks); training keeps each chunk's
gathered keys/values (about 6x K and V per layer). The union semantics of this package live in
asset_dist/attention/sga.py.

Importing this module registers the rule as `transformer.sga_semantics: official` (`OFFICIAL`,
asset_dist.attention.semantics): the model layer reaches it through that registry, never by importing it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from asset_dist.attention.layout import Grid, check_guide, window_table
from asset_dist.attention.semantics import Semantics, register_semantics
from asset_dist.attention.sga import check_inputs

WARMUP_BLOCKS = 5  # official: n_rand_blocks (3) + n_neighbor_blocks (3) - 1 causal blocks run dense
OWN_SLOT = {False: 1, True: 2}  # slot of the own block in the window part of a table row
# largest per-chunk temporary (gathered K or V, or the scores) in bytes: small on CPU (cache), large on GPU
_CHUNK_BYTES = {"cpu": 8 << 20}
_CHUNK_BYTES_OTHER = 256 << 20


def official_table(guide: torch.Tensor, n_blocks: int, causal: bool) -> torch.Tensor:
    """Long [..., n_blocks, 3 + K]: the window slots (-1 off the ends) then the picks as given (-1 = none).

    Causal rows b < 5 are replaced by the warm-up: window {b-2, b-1, b} + every block before b-2, i.e. exactly
    the blocks 0..b once each. Repeats are kept on purpose (official weighting)."""
    if guide.shape[-2] != n_blocks:
        raise ValueError(f"guide has {guide.shape[-2]} query-block rows, expected {n_blocks}")
    g = guide.long()
    if causal:
        n_warm = min(WARMUP_BLOCKS, n_blocks)
        need = max(n_warm - 3, 0)  # blocks before b-2 for b = n_warm-1
        if g.shape[-1] < need:
            g = torch.cat([g, g.new_full((*g.shape[:-1], need - g.shape[-1]), -1)], -1)
        warm = torch.full((n_warm, g.shape[-1]), -1, dtype=torch.long, device=g.device)
        for b in range(3, n_warm):
            warm[b, :b - 2] = torch.arange(b - 2, device=g.device)
        g = torch.cat([warm.expand(*g.shape[:-2], n_warm, g.shape[-1]), g[..., n_warm:, :]], -2)
    win = window_table(n_blocks, causal, g.device).expand(*g.shape[:-1], 3)
    return torch.cat([win, g], -1)


def _chunk_rows(n_rows: int, row_bytes: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_OTHER)
    return max(1, min(n_rows, budget // max(row_bytes, 1)))


def _attend_blocks(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, table: torch.Tensor, causal: bool,
                   prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor],
                   key_limit: Optional[int] = None) -> torch.Tensor:
    """qb [B,H,m,nt,d] query blocks; kb, vb [B,H,nb,nt,d] key/value blocks; table [B,H,m,S] key-block slots
    (-1 = empty; slot OWN_SLOT[causal] holds the query's own block, causal triangle there when causal);
    prefix [B,H,P,d] or None; key_limit: keys at sequence positions after it are hidden (not computed yet).
    Returns [B,H,m,nt,d]."""
    B, H, m, nt, d = qb.shape
    S = table.shape[-1]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    nb = kb.shape[2]
    q = qb.reshape(B * H * m, nt, d)
    kf, vf = kb.reshape(B * H * nb, nt, d), vb.reshape(B * H * nb, nt, d)  # one copy at most: gather source
    t = table.reshape(B * H * m, S)
    bh = torch.arange(B * H * m, device=qb.device) // m  # row -> b * H + h
    tri = torch.ones(nt, nt, dtype=torch.bool, device=qb.device).tril()
    n = _chunk_rows(B * H * m, (S * nt + P) * max(d, nt) * qb.element_size(), qb.device)
    outs = []
    for r0 in range(0, B * H * m, n):
        r1 = min(r0 + n, B * H * m)
        tc = t[r0:r1]
        idx = tc.clamp(min=0)  # empty slots read block 0 and are masked below
        flat = (bh[r0:r1, None] * nb + idx).reshape(-1)
        kg = kf.index_select(0, flat).view(r1 - r0, S * nt, d)
        vg = vf.index_select(0, flat).view(r1 - r0, S * nt, d)
        vis = (tc >= 0)[:, None, :, None].expand(-1, nt if causal else 1, S, nt)
        if causal:  # the triangle inside the own window copy only
            vis = vis.clone()
            vis[:, :, OWN_SLOT[True]] &= tri
        vis = vis.reshape(r1 - r0, -1, S * nt)
        if key_limit is not None:
            pos = (idx[:, :, None] * nt + torch.arange(nt, device=qb.device)).reshape(r1 - r0, 1, S * nt)
            vis = vis & (pos <= key_limit)
        if P:
            kg = torch.cat([prefix_k.reshape(B * H, P, d).index_select(0, bh[r0:r1]), kg], 1)
            vg = torch.cat([prefix_v.reshape(B * H, P, d).index_select(0, bh[r0:r1]), vg], 1)
            vis = torch.cat([vis.new_ones(r1 - r0, vis.shape[1], P), vis], -1)
        outs.append(F.scaled_dot_product_attention(q[r0:r1], kg, vg, attn_mask=vis))
    return torch.cat(outs, 0).view(B, H, m, nt, d)


def official_sga_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: torch.Tensor, grid: Grid,
                           causal: bool = False, prefix_k: Optional[torch.Tensor] = None,
                           prefix_v: Optional[torch.Tensor] = None, impl: str = "auto",
                           validate: bool = True) -> torch.Tensor:
    """Block-sparse attention with the official semantics; the signature of `sga.sga_attention` (the model's
    `sga_fn`). q, k, v: [B, H, L, d] strip order; guide: long [B|1, H|1, nb, K] picks or -1; prefix_k/v:
    [B, H, P, d]. `impl` is accepted for that signature and ignored: there is one (gather) kernel. validate:
    as `sga_attention`'s."""
    B, H, L, d = q.shape
    nb = check_inputs(q, k, v, guide, grid, prefix_k, prefix_v)
    if validate:
        check_guide(guide, nb)
    nt = L // nb
    table = official_table(guide.to(q.device).expand(B, H, nb, guide.shape[-1]), nb, causal)
    blocks = [x.reshape(B, H, nb, nt, d) for x in (q, k, v)]
    return _attend_blocks(*blocks, table, causal, prefix_k, prefix_v).reshape(B, H, L, d)


def official_block_attention(q: torch.Tensor, qtok: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             guide: torch.Tensor, nt: int, causal: bool,
                             prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Incremental-decoding form (the signature of `attention.decode.block_attention`): queries q [B,H,n,d]
    at consecutive strip tokens qtok [n]; k, v [B,H,L,d] the cached keys/values in strip order.

    Causal: only the own window copy hides keys after the query; a pick of the own block (the official leak,
    rows 5/6 with official picks) shows the own block up to the LAST query of this run, never cache entries
    after it (not computed yet, or computed from replaced tokens). Runs that cover whole blocks, as the official
    sampler's block re-runs, therefore give exactly the official (teacher-forced) outputs, leak included."""
    B, H, n, d = q.shape
    L = k.shape[2]
    nb = L // nt
    b0, b1 = int(qtok[0]) // nt, int(qtok[-1]) // nt
    m = b1 - b0 + 1
    Q = q.new_zeros(B, H, m * nt, d)
    Q[:, :, qtok - b0 * nt] = q
    g = guide.to(q.device)
    table = official_table(g.expand(B, H, nb, g.shape[-1]), nb, causal)[:, :, b0:b1 + 1]
    pk, pv = (None, None) if prefix is None else prefix
    out = _attend_blocks(Q.view(B, H, m, nt, d), k.reshape(B, H, nb, nt, d), v.reshape(B, H, nb, nt, d), table,
                         causal, pk, pv, int(qtok[-1]) if causal else None)
    return out.view(B, H, m * nt, d)[:, :, qtok - b0 * nt]


OFFICIAL = register_semantics(Semantics("official", official_sga_attention, official_block_attention, official_table))

"""SGA for incremental decoding (KV-cached sampling): the key blocks of a query block, gathered once.

In causal SGA every query of block b sees the same key blocks (window + picks, both semantics); only the own
block grows token by token. So a sampler that enters block b gathers, per decoder layer, the self- and
cross-attention keys/values of those blocks ONCE into contiguous buffers (`BlockKV`, [B, H, P + W*nt, d]),
writes each new token's key/value into the cache and into the buffer's own-block columns, and every token
step is a plain matmul over the buffer with an additive mask (`block_kv_attention`). A token step then reads
each visible key once instead of gathering (copying) 6 blocks per layer and reading them again.

`StepTable` (built once per image and layer) holds each query block's distinct key blocks, own block first
(causal), valid ones before the -1 pads, and the additive bias of each slot:
- union (`layout.block_table`): 0 visible, -inf unused;
- other rules give their own slot table (`semantics.Semantics.table`), repeats kept. The official one
  (asset_dist.official.attention, imported weights): a block listed twice enters the official softmax
  twice, which is the same as one copy with bias log(2); a causal self-pick (the rows-5/6 leak) shows the own
  block up to the run's last query, the window copy only up to each query (`own_picks` extra copies);
  picks of a later block (never produced by our guides) are hidden, and a run from such a block into the
  picked one must take the block kernel (`StepTable.spill`), as the official run kernel shows it there.
  Union tables never hold such repeats or later blocks, so the same code gives no extras for them.
`block_attention` is the kernel for runs of whole blocks (known chunks, the official re-run strategy): it
pads the run to its blocks and shares one gather per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .layout import SELF_SLOT, block_table

_NEG_INF = float("-inf")


def gather_rows(x: torch.Tensor, idx: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, H, L, d] (any strides), idx [b, H, M] positions along L -> [b, H, M, d]; batch [b]: which rows of
    x idx refers to (default: all B, b = B).

    One index_select of d-float rows over x's storage (row copies) when the layout allows it: ~3-4x faster on
    CPU than advanced indexing or torch.gather, which copy element by element."""
    B, H, L, d = x.shape
    s0, s1, s2, s3 = x.stride()
    off0 = x.storage_offset()
    dev = x.device
    rows_b = torch.arange(B, device=dev) if batch is None else batch.to(dev)
    if s3 != 1 or any(st % d for st in (s0, s1, s2, off0)):
        xs = x if batch is None else x[rows_b]
        return torch.gather(xs, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
    rows = x.untyped_storage().nbytes() // x.element_size() // d
    base = x.as_strided((rows, d), (d, 1), 0)
    r = (off0 + rows_b.view(-1, 1, 1) * s0 + torch.arange(H, device=dev).view(1, H, 1) * s1 + idx * s2) // d
    return torch.index_select(base, 0, r.reshape(-1)).view(rows_b.numel(), H, -1, d)


# ----------------------------------------------------------------------------------------------------------
# Per-image tables


@dataclass(frozen=True)
class StepTable:
    """Key blocks per query block for token steps of one attention layer."""

    blocks: torch.Tensor  # long [B, H, nb, J]: distinct key blocks, own block first if causal, -1 pads last
    bias: torch.Tensor  # float64 [B, H, nb, J]: 0 / log(copies) visible, -inf unused (own block: 0)
    width: list[int]  # per query block: slots in use (max over rows and heads); W <= J
    own_picks: Optional[torch.Tensor]  # [B, H, nb] extra copies of the own block (official causal)
    spill: list[bool]  # per query block: a row picks block b+1 (official causal) -> runs into it: block kernel
    causal: bool


def _sorted_slots(t: torch.Tensor, first: torch.Tensor, own: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Order slots: the own block's slot, then the other kept slots (`first`), then the rest (-1)."""
    rank = torch.where(first, 1, 2)
    if own is not None:
        rank = torch.where(own, 0, rank)
    order = torch.sort(rank, dim=-1, stable=True).indices
    return order, torch.gather(rank, -1, order)


def step_table(guide: torch.Tensor, n_blocks: int, causal: bool,
               table: Callable[[torch.Tensor, int, bool], torch.Tensor] = block_table) -> StepTable:
    """guide: long [B|1, H, nb, K] picks (-1 = none) of one layer -> its StepTable (see the module doc);
    table: the semantics' slot table (`Semantics.table`; default the union's)."""
    B, H, nb, K = guide.shape
    t = table(guide, n_blocks, causal)
    S = t.shape[-1]
    valid = t >= 0
    same = (t.unsqueeze(-1) == t.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)  # [.., S, S]
    first = valid & ~(same & torch.ones(S, S, dtype=torch.bool, device=t.device).tril(-1)).any(-1)
    copies = same.sum(-1)  # how often each slot's block is listed
    b = torch.arange(nb, device=t.device).view(nb, 1)
    own = None
    own_picks = None
    spill = [False] * nb
    if causal:
        own = torch.zeros_like(first)
        own[..., SELF_SLOT[True]] = True  # the window slot of b itself: always valid, always the first copy
        later = valid & (t > b)
        extra = (t[..., SELF_SLOT[True] + 1:] == b).sum(-1)  # picks of b: see it up to the run's last query
        own_picks = extra.float() if bool(extra.any()) else None
        nxt = (t == b + 1).any(-1).reshape(-1, nb).any(0)
        spill = [bool(x) for x in nxt.tolist()]
        first = first & ~later  # later blocks: invisible to token steps (union tables never have them)
    order, rank = _sorted_slots(t, first, own)
    blocks = torch.gather(torch.where(first, t, -1), -1, order)
    logc = torch.where(first, copies.double().log(), _NEG_INF)  # float64: exact enough for any dtype
    if causal:
        logc = torch.where(own, 0.0, logc)
    bias = torch.gather(logc, -1, order)
    width = (rank < 2).sum(-1).reshape(-1, nb).amax(0).clamp(min=1).tolist()
    return StepTable(blocks, bias, [int(w) for w in width], own_picks, spill, causal)


# ----------------------------------------------------------------------------------------------------------
# Per-block buffers and the token-step kernel


@dataclass
class BlockKV:
    """One layer's keys/values of query block `block`: [prefix, W key blocks] contiguous, own block at `own`."""

    block: int
    k: torch.Tensor  # [B, H, P + W*nt, d]
    v: torch.Tensor
    bias: torch.Tensor  # [B, H, 1, P + W*nt] additive mask (q.dtype, float32 for half types)
    own: int  # column of the own block's first token (= P when causal)
    own_picks: Optional[torch.Tensor]  # [B, H, 1, 1] official causal self-pick copies, or None


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gather_block_kv(k: torch.Tensor, v: torch.Tensor, table: StepTable, b: int, nt: int,
                    prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> BlockKV:
    """Gather query block b's key/value blocks: k, v [B, H, L, d] strip order (any strides: the cache past
    [start], or the cross-attention keys); prefix keys/values [B, H, P, d] go first (seen by every query)."""
    B, H, _, d = k.shape
    W = table.width[b]
    blk = table.blocks[:, :, b, :W].to(k.device).expand(B, H, W)  # tables may have batch 1 (shared guides)
    idx = (blk.clamp(min=0).unsqueeze(-1) * nt + torch.arange(nt, device=k.device)).view(B, H, W * nt)
    kg, vg = gather_rows(k.expand(B, H, -1, d), idx), gather_rows(v.expand(B, H, -1, d), idx)
    sdt = _score_dtype(k.dtype)
    bias = table.bias[:, :, b, :W].to(k.device, sdt).expand(B, H, W).unsqueeze(-1).expand(B, H, W, nt)
    bias = bias.reshape(B, H, 1, W * nt)
    P = 0
    if prefix is not None:
        pk, pv = prefix
        P = pk.shape[2]
        kg, vg = torch.cat([pk.expand(B, H, P, d), kg], 2), torch.cat([pv.expand(B, H, P, d), vg], 2)
        bias = torch.cat([bias.new_zeros(B, H, 1, P), bias], -1)
    picks = None
    if table.own_picks is not None:
        picks = table.own_picks[:, :, b].to(k.device, sdt).expand(B, H).reshape(B, H, 1, 1)
    return BlockKV(b, kg, vg, bias.contiguous(), P, picks)


def write_own(buf: BlockKV, k: torch.Tensor, v: torch.Tensor, first: int) -> None:
    """New keys/values k, v [B, H, n, d] of the own block's tokens first..first+n-1 (offsets in the block)."""
    n = k.shape[2]
    buf.k[:, :, buf.own + first:buf.own + first + n] = k
    buf.v[:, :, buf.own + first:buf.own + first + n] = v


def block_kv_attention(q: torch.Tensor, buf: BlockKV, nt: int, first: Union[int, torch.Tensor, None] = None,
                       last: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """q [B, H, n, d]: queries of block buf.block at in-block offsets first..first+n-1 (causal), or any queries
    of that block (first=None: non-causal). Causal: the own block is visible up to each query; official
    self-pick copies up to `last` (the run's last query offset, >= first+n-1). first / last may be long
    tensors [B], one offset per row (continuous batching: every row in its own block). Returns [B, H, n, d]."""
    B, H, n, d = q.shape
    s = torch.matmul(q, buf.k.transpose(-1, -2)).to(buf.bias.dtype)  # [B, H, n, C]
    s.mul_(d ** -0.5).add_(buf.bias)
    if first is not None:
        own = s[..., buf.own:buf.own + nt]
        col = torch.arange(nt, device=q.device)
        qoff = torch.arange(n, device=q.device).view(n, 1)
        if isinstance(first, torch.Tensor):  # [B] -> [B, 1, n, nt]
            seen = col <= (first.view(B, 1, 1, 1) + qoff)
            upto = col <= last.view(B, 1, 1, 1)
        else:
            seen = col.view(1, nt) <= qoff + first  # [n, nt]
            upto = col <= last
        if buf.own_picks is None:
            own.masked_fill_(~seen, _NEG_INF)
        else:  # copies of each own key: window copy (<= query) + self-picks (<= last)
            own.add_((seen.to(s.dtype) + buf.own_picks * upto.to(s.dtype)).log())
    return torch.matmul(s.softmax(-1).to(buf.v.dtype), buf.v)


# ----------------------------------------------------------------------------------------------------------
# Runs of whole blocks


def block_attention(q: torch.Tensor, qtok: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: torch.Tensor,
                    nt: int, causal: bool, prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> torch.Tensor:
    """Union SGA for a run of consecutive query tokens qtok [n] (q [B,H,n,d]) over cached k, v [B,H,L,d] strip
    order (causal: only keys <= each query's token are read). Pads the run to its blocks, gathers each block's
    window and picks once (`layout.block_table`), O(n * 6 nt). The model's kernel for long runs."""
    B, H, n, d = q.shape
    nb = k.shape[2] // nt
    b0, b1 = int(qtok[0]) // nt, int(qtok[-1]) // nt
    qb = torch.arange(b0, b1 + 1, device=q.device)  # query blocks touched by this run
    m = qb.numel()
    Q = q.new_zeros(B, H, m * nt, d)
    Q[:, :, qtok - b0 * nt] = q
    Q = Q.view(B, H, m, nt, d)
    kb = block_table(guide.to(q.device).expand(B, H, nb, guide.shape[-1]), nb, causal)[:, :, qb]  # -1: unseen
    J = kb.shape[-1]
    idx = (kb.clamp(0, nb - 1).unsqueeze(-1) * nt + torch.arange(nt, device=q.device)).view(B, H, m * J * nt)
    Kg = gather_rows(k.expand(B, H, -1, d), idx).view(B, H, m, J * nt, d)
    Vg = gather_rows(v.expand(B, H, -1, d), idx).view(B, H, m, J * nt, d)
    vis = (kb >= 0).unsqueeze(-1).expand(B, H, m, J, nt).reshape(B, H, m, 1, J * nt)
    if causal:
        qpos = (qb.view(-1, 1) * nt + torch.arange(nt, device=q.device)).view(1, 1, m, nt, 1)
        vis = vis & (idx.view(B, H, m, 1, J * nt) <= qpos)
    if prefix is not None:
        pk, pv = prefix  # [B, H, P, d], visible to every query
        P = pk.shape[2]
        Kg = torch.cat([pk.unsqueeze(2).expand(B, H, m, P, d), Kg], 3)
        Vg = torch.cat([pv.unsqueeze(2).expand(B, H, m, P, d), Vg], 3)
        vis = torch.cat([vis.new_ones(B, H, m, 1, P).expand(-1, -1, -1, vis.shape[3], -1), vis], -1)
    s = (Q @ Kg.transpose(-1, -2)) * (d ** -0.5)
    out = s.masked_fill(~vis, _NEG_INF).softmax(-1) @ Vg  # [B, H, m, nt, d]
    return out.view(B, H, m * nt, d)[:, :, qtok - b0 * nt]

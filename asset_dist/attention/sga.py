"""Sparsified Guided Attention (SGA): block-sparse kernels behind one entry point, `sga_attention`.

Every query block b sees the key blocks of `layout.block_table` (window + guide union, duplicates masked),
plus optional prefix keys every query sees (the decoder's [start]). Causal: inside the own block only keys
at or before the query position; every other visible block lies strictly before b.

Kernels (all tested against the dense oracle `sga_mask` + `dense_attention`):
  gather       portable: gather the visible K/V blocks of a chunk of query blocks, matmul + softmax. A custom
               autograd.Function keeps only q, k, v, out and the log-sum-exp and regathers in backward, so
               memory stays O(chunk), not ~5x dense (gathered copies are never stored).
  sdpa_gather  CPU: the fused flash kernel on gathered blocks, forward and backward through the private aten
               ops that return / take the log-sum-exp (same recompute scheme). Chunks whose rows have every
               slot visible run without a per-row mask. Other devices: public SDPA per chunk under
               activation checkpointing.
  flex         FlexAttention with a BlockMask built from the block table (no L x L work); compiled. No
               backward on CPU in this torch.  flex_eager: uncompiled, materialises scores (debug only).
  dense_mask   SDPA with the exact L x L boolean SGA mask (oracle-grade; small L only).
impl="auto" picks per device (see `resolve_impl` and BENCHMARKS.md "Attention"). The sparse paths never
build an L x L tensor.
"""
from __future__ import annotations

import contextlib

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .layout import SELF_SLOT, Grid, block_table, check_guide, n_blocks_of

IMPLS = ("gather", "sdpa_gather", "flex", "flex_eager", "dense_mask")
# Budget for the largest per-chunk temporary (gathered K, mask or scores). CPU: small, so the chunk stays
# in cache and peak memory stays near dense SDPA's (BENCHMARKS.md); GPU: large, kernel launches dominate.
_CHUNK_BYTES = 2 << 20
_CHUNK_BYTES_GPU = 256 << 20
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: torch.Tensor, grid: Grid,
                 prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor]) -> int:
    """Shape checks shared by every SGA entry point (ours and the official-semantics kernel); returns n_blocks."""
    B, H, L, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    nb = n_blocks_of(grid)
    if L % nb:
        raise ValueError(f"sequence length {L} is not a multiple of the {nb} blocks of grid {tuple(grid)}")
    if guide.dim() != 4 or guide.shape[-2] != nb:
        raise ValueError(f"guide must be [B, heads, {nb}, K], got {tuple(guide.shape)}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None and (prefix_k.shape != prefix_v.shape or prefix_k.shape[:2] != (B, H)
                                 or prefix_k.shape[-1] != D):
        raise ValueError(f"prefix_k/v must be [{B}, {H}, P, {D}], got {tuple(prefix_k.shape)}, "
                         f"{tuple(prefix_v.shape)}")
    return nb


def sga_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: torch.Tensor, grid: Grid,
                  causal: bool = False, prefix_k: Optional[torch.Tensor] = None,
                  prefix_v: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """Block-sparse attention in strip order.

    q, k, v: [B, heads, L, head_dim], L = n_blocks * block_size; guide: long [B, heads, n_blocks, K] key-block
    ids or -1 (size-1 batch/head dims broadcast); prefix_k/v: [B, heads, P, head_dim] keys every query sees.
    Returns [B, heads, L, head_dim]. Scale 1/sqrt(head_dim). Differentiable (flex: not on CPU).
    """
    B, H, L, D = q.shape
    nb = check_inputs(q, k, v, guide, grid, prefix_k, prefix_v)
    if prefix_k is not None and prefix_k.shape[2] == 0:
        prefix_k = prefix_v = None
    if not torch.compiler.is_compiling():
        check_guide(guide, nb)
    guide = guide.to(q.device).expand(B, H, nb, guide.shape[-1])
    table = block_table(guide, nb, causal)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    name = resolve_impl(impl, q, L // nb)
    scale = 1.0 / math.sqrt(D)
    if name == "dense_mask":
        mask = _mask_from_table(table, L, causal, 0 if prefix_k is None else prefix_k.shape[2])
        if prefix_k is not None:
            k, v = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
        return dense_attention(q, k, v, mask)
    if name in ("flex", "flex_eager"):
        if needs_grad and q.device.type == "cpu":
            raise ValueError("impl='flex' has no backward on CPU in this torch; use 'sdpa_gather' or 'gather' "
                             "when gradients are needed")
        if not needs_grad:  # flex on CPU refuses inputs that merely require grad, even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
            prefix_k, prefix_v = (None, None) if prefix_k is None else (prefix_k.detach(), prefix_v.detach())
        return flex_sga(q, k, v, table, causal, prefix_k, prefix_v, compiled=name == "flex")
    if name == "sdpa_gather" and q.device.type != "cpu":
        return _sdpa_gather_checkpointed(q, k, v, table, causal, prefix_k, prefix_v)
    fn = _SdpaGatherCPU if name == "sdpa_gather" else _GatherMatmul
    return fn.apply(q, k, v, prefix_k, prefix_v, table, causal, scale)


def resolve_impl(impl: str, q: torch.Tensor, block_size: int = 64) -> str:
    """The kernel `impl` names for q's device; "auto" picks the fastest measured one (BENCHMARKS.md)."""
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; choose auto or one of {', '.join(IMPLS)}")
        return impl
    if q.device.type == "cpu":
        # BENCHMARKS.md "Attention": with 4-token blocks (L=256) the dense masked SDPA is the fastest exact
        # path; from 16-token blocks on the flash kernel on gathered blocks wins fwd and fwd+bwd. Compiled
        # flex only matches it in forward, after a ~20 s compile per shape, so it is never auto-selected.
        if block_size <= 4:
            return "dense_mask"
        if _has_cpu_flash() and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
            return "sdpa_gather"
        return "gather"
    if q.device.type == "cuda" and _has_flex():
        # Fused, tile-skipping kernel with a real backward on CUDA. No dense path is auto-selected on GPU
        # until a GPU run of bench/attention.py --device cuda in this repo shows one faster.
        return "flex"
    return "gather"


# ----------------------------------------------------------------------------------------------------------
# Dense oracle


def sga_mask(L: int, guide: torch.Tensor, grid: Grid, causal: bool, prefix: int = 0) -> torch.Tensor:
    """Dense boolean SGA mask [B, heads, L, prefix + L] (True = visible; prefix keys first). Tests/bench only."""
    nb = n_blocks_of(grid)
    if L % nb:
        raise ValueError(f"sequence length {L} is not a multiple of the {nb} blocks of grid {tuple(grid)}")
    check_guide(guide, nb)
    return _mask_from_table(block_table(guide, nb, causal), L, causal, prefix)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v with a boolean mask [.., Lq, Lk] (True = visible)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def block_visibility(table: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Bool [..., n_blocks, n_blocks]: [qb, kb] true when query block qb sees key block kb."""
    idx = torch.where(table < 0, torch.full_like(table, n_blocks), table)
    vis = torch.zeros(*table.shape[:-1], n_blocks + 1, dtype=torch.bool, device=table.device)
    return vis.scatter_(-1, idx, True)[..., :n_blocks]


def _mask_from_table(table: torch.Tensor, L: int, causal: bool, prefix: int) -> torch.Tensor:
    nb = table.shape[-2]
    bs = L // nb
    m = block_visibility(table, nb).repeat_interleave(bs, -2).repeat_interleave(bs, -1)
    if causal:
        m = m & torch.ones(L, L, dtype=torch.bool, device=table.device).tril()
    if prefix:
        m = torch.cat([m.new_ones(*m.shape[:-1], prefix), m], -1)
    return m


# ----------------------------------------------------------------------------------------------------------
# Shared pieces of the gather kernels


@contextlib.contextmanager
def _serial_on_cpu(t: torch.Tensor):
    """Run CPU index_add_ on one thread. Its multi-threaded path is a parallel scatter that was measured
    25x slower than the serial loop for these shapes (72 rows x 4096 floats: 2.1 ms vs 0.08 ms on 2 cores)
    and made the whole SGA backward slower than dense attention. Switching the thread count is ~µs."""
    if t.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Rows:
    """The problem as R = B*heads*n_blocks rows (query blocks), each with S key-block slots + P prefix keys.

    Kernels walk the rows in chunks sized by `_CHUNK_BYTES`, so gathered K/V, masks and scores only ever
    exist for one chunk; rows are contiguous in q/k/v, so a chunk is a plain slice.
    """

    def __init__(self, q, k, v, pk, pv, table, causal):
        B, H, L, D = q.shape
        self.nb = nb = table.shape[-2]
        self.bs = bs = L // nb
        self.D, self.causal = D, causal
        self.q, self.k, self.v = (x.contiguous().view(-1, bs, D) for x in (q, k, v))
        self.pk, self.pv = (None if x is None else x.contiguous().view(B * H, x.shape[2], D) for x in (pk, pv))
        self.P = 0 if pk is None else pk.shape[2]
        self.t = table.reshape(-1, table.shape[-1])
        self.R, self.S = self.t.shape
        self.n_kv = self.P + self.S * bs
        self.self_col = self.P + SELF_SLOT[causal] * bs
        self.head = torch.arange(self.R, device=q.device).div_(nb, rounding_mode="floor")  # row -> b*H + h

    def chunks(self, row_bytes: int) -> list[tuple[int, int, bool]]:
        """(r0, r1, clean) row ranges within the memory budget. When a chunk is smaller than a head anyway,
        chunks also split where rows change between clean (every slot visible) and not, so clean chunks
        run without a per-row mask (see `bias`)."""
        budget = _CHUNK_BYTES if self.t.device.type == "cpu" else _CHUNK_BYTES_GPU
        n = max(1, min(self.R, budget // max(row_bytes, 1)))
        if n >= self.nb:
            return [(r0, min(r0 + n, self.R), False) for r0 in range(0, self.R, n)]
        clean = (self.t >= 0).all(-1)
        edges = (torch.nonzero(clean[1:] != clean[:-1]).flatten() + 1).tolist()
        out = []
        for a, b in zip([0] + edges, edges + [self.R]):
            ok = bool(clean[a])
            out += [(r0, min(r0 + n, b), ok) for r0 in range(a, b, n)]
        return out

    def gather(self, x, pre, r0, r1):
        """Keys (or values) of rows r0:r1: [n, P + S*bs, D], prefix first; masked slots read block 0 of the head."""
        idx = self.t[r0:r1].clamp(min=0) + (self.head[r0:r1] * self.nb)[:, None]
        g = x.view(self.R, -1).index_select(0, idx.reshape(-1)).view(r1 - r0, self.S * self.bs, self.D)
        return g if pre is None else torch.cat([pre.index_select(0, self.head[r0:r1]), g], 1)

    def bias(self, r0, r1, dtype, clean=False):
        """Additive mask [n or 1, 1 or bs, n_kv]: -inf on masked slots and, causal, above the own-block
        diagonal. Clean rows need no slot mask: None (full) or one triangle shared by all rows (causal)."""
        if clean and not self.causal:
            return None
        visible = torch.ones(1 if clean else r1 - r0, self.n_kv, dtype=torch.bool, device=self.t.device)
        if not clean:
            visible[:, self.P:] = (self.t[r0:r1] >= 0).repeat_interleave(self.bs, -1)
        visible = visible.unsqueeze(1)
        if self.causal:
            tri = torch.ones(self.bs, self.bs, dtype=torch.bool, device=self.t.device).tril_()
            visible = visible.expand(-1, self.bs, -1).clone()
            visible[..., self.self_col:self.self_col + self.bs] &= tri
        return torch.zeros(visible.shape, dtype=dtype, device=self.t.device).masked_fill_(~visible, _NEG_INF)

    def scatter(self, grad, gpre, r0, r1, dg):
        """Add gathered-key grads dg [n, n_kv, D] back into grad [R, bs, D] and the prefix grad [B*H, P, D].
        Masked slots point at block 0 of the head and carry exactly zero grad, so adding them is harmless
        (and much cheaper than selecting the visible ones first)."""
        idx = self.t[r0:r1].clamp(min=0) + (self.head[r0:r1] * self.nb)[:, None]
        with _serial_on_cpu(grad):
            grad.view(self.R, -1).index_add_(0, idx.reshape(-1), dg[:, self.P:].reshape(idx.numel(), -1))
            if self.P:
                gpre.index_add_(0, self.head[r0:r1], dg[:, :self.P])

    def grads(self, ctx, dq, dk, dv, dpk, dpv):
        need, shape = ctx.needs_input_grad, ctx.shape
        return (dq.view(shape) if need[0] else None, dk.view(shape) if need[1] else None,
                dv.view(shape) if need[2] else None, dpk.view(ctx.pshape) if self.P and need[3] else None,
                dpv.view(ctx.pshape) if self.P and need[4] else None, None, None, None)

    def zeros_like_prefix(self):
        return (None, None) if not self.P else (torch.zeros_like(self.pk), torch.zeros_like(self.pv))


def _save(ctx, q, k, v, pk, pv, table, out, lse, causal, scale):
    ctx.save_for_backward(q, k, v, pk, pv, table, out, lse)
    ctx.causal, ctx.scale, ctx.shape = causal, scale, q.shape
    ctx.pshape = None if pk is None else pk.shape


# ----------------------------------------------------------------------------------------------------------
# gather: portable matmul kernel, recompute in backward


def _scores(bias, q, k, scale):
    if bias is None:
        return torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: half types accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _GatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, table, causal, scale):
        r = _Rows(q, k, v, pk, pv, table, causal)
        acc = _acc(q.dtype)
        out = torch.empty_like(r.q)
        lse = torch.empty(r.R, r.bs, 1, dtype=acc, device=q.device)
        for r0, r1, clean in r.chunks(r.n_kv * max(r.D, r.bs) * q.element_size()):
            kg, vg = r.gather(r.k, r.pk, r0, r1), r.gather(r.v, r.pv, r0, r1)
            s = _scores(r.bias(r0, r1, q.dtype, clean), r.q[r0:r1], kg, scale).to(acc)
            m = torch.logsumexp(s, -1, keepdim=True)
            out[r0:r1] = torch.bmm(s.sub_(m).exp_().to(q.dtype), vg)
            lse[r0:r1] = m
        _save(ctx, q, k, v, pk, pv, table, out, lse, causal, scale)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, table, out, lse = ctx.saved_tensors
        r = _Rows(q, k, v, pk, pv, table, ctx.causal)
        acc = _acc(q.dtype)
        do = dout.contiguous().view(-1, r.bs, r.D)
        dq, dk, dv = torch.empty_like(r.q), torch.zeros_like(r.k), torch.zeros_like(r.v)
        dpk, dpv = r.zeros_like_prefix()
        for r0, r1, clean in r.chunks(r.n_kv * max(r.D, r.bs) * q.element_size()):
            qc, doc = r.q[r0:r1], do[r0:r1]
            kg, vg = r.gather(r.k, r.pk, r0, r1), r.gather(r.v, r.pv, r0, r1)
            p = _scores(r.bias(r0, r1, q.dtype, clean), qc, kg, ctx.scale).to(acc).sub_(lse[r0:r1]).exp_()
            delta = (doc.to(acc) * out[r0:r1].to(acc)).sum(-1, keepdim=True)
            ds = torch.bmm(doc, vg.transpose(1, 2)).to(acc).sub_(delta).mul_(p).mul_(ctx.scale).to(q.dtype)
            dq[r0:r1] = torch.bmm(ds, kg)
            r.scatter(dk, dpk, r0, r1, torch.bmm(ds.transpose(1, 2), qc))
            r.scatter(dv, dpv, r0, r1, torch.bmm(p.to(q.dtype).transpose(1, 2), doc))
        return r.grads(ctx, dq, dk, dv, dpk, dpv)


# ----------------------------------------------------------------------------------------------------------
# sdpa_gather on CPU: the fused flash kernel on gathered blocks. The private aten ops return the
# log-sum-exp and take it back in backward, so nothing but q, k, v, out and lse is kept between the passes.


@functools.cache
def _has_cpu_flash() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _4d(mask):
    return None if mask is None else mask[None]


class _SdpaGatherCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, table, causal, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        r = _Rows(q, k, v, pk, pv, table, causal)
        out = torch.empty_like(r.q)
        lse = None
        for r0, r1, clean in r.chunks(r.n_kv * r.D * q.element_size()):
            kg, vg = r.gather(r.k, r.pk, r0, r1), r.gather(r.v, r.pv, r0, r1)
            o, m = flash(r.q[None, r0:r1], kg[None], vg[None], 0.0, False,
                         attn_mask=_4d(r.bias(r0, r1, q.dtype, clean)), scale=scale)
            if lse is None:
                lse = torch.empty(r.R, r.bs, dtype=m.dtype, device=q.device)
            out[r0:r1], lse[r0:r1] = o[0], m[0]
        _save(ctx, q, k, v, pk, pv, table, out, lse, causal, scale)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, pk, pv, table, out, lse = ctx.saved_tensors
        r = _Rows(q, k, v, pk, pv, table, ctx.causal)
        do = dout.contiguous().view(-1, r.bs, r.D)
        dq, dk, dv = torch.empty_like(r.q), torch.zeros_like(r.k), torch.zeros_like(r.v)
        dpk, dpv = r.zeros_like_prefix()
        for r0, r1, clean in r.chunks(r.n_kv * r.D * q.element_size()):
            kg, vg = r.gather(r.k, r.pk, r0, r1), r.gather(r.v, r.pv, r0, r1)
            gq, gk, gv = flash_bwd(do[None, r0:r1], r.q[None, r0:r1], kg[None], vg[None], out[None, r0:r1],
                                   lse[None, r0:r1], 0.0, False, attn_mask=_4d(r.bias(r0, r1, q.dtype, clean)),
                                   scale=ctx.scale)
            dq[r0:r1] = gq[0]
            r.scatter(dk, dpk, r0, r1, gk[0])
            r.scatter(dv, dpv, r0, r1, gv[0])
        return r.grads(ctx, dq, dk, dv, dpk, dpv)


# ----------------------------------------------------------------------------------------------------------
# sdpa_gather elsewhere: public SDPA per chunk, recomputed in backward by activation checkpointing


def _sdpa_rows(q, k, v, pk, pv, table, causal, r0, r1, clean):
    r = _Rows(q, k, v, pk, pv, table, causal)
    kg, vg = r.gather(r.k, r.pk, r0, r1), r.gather(r.v, r.pv, r0, r1)
    return F.scaled_dot_product_attention(r.q[None, r0:r1], kg[None], vg[None],
                                          attn_mask=_4d(r.bias(r0, r1, q.dtype, clean)))[0]


def _sdpa_gather_checkpointed(q, k, v, table, causal, pk, pv):
    from torch.utils.checkpoint import checkpoint

    r = _Rows(q, k, v, pk, pv, table, causal)
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, pk, pv))
    outs = []
    for r0, r1, clean in r.chunks(4 * r.n_kv * max(r.D, r.bs) * q.element_size()):
        args = (q, k, v, pk, pv, table, causal, r0, r1, clean)
        outs.append(checkpoint(_sdpa_rows, *args, use_reentrant=False) if grad else _sdpa_rows(*args))
    return torch.cat(outs, 0).view(q.shape)


# ----------------------------------------------------------------------------------------------------------
# flex: FlexAttention with a BlockMask built from the block table


@functools.cache
def _has_flex() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _tile_cover(n_tiles: int, tile: int, n_blocks: int, bs: int, device) -> torch.Tensor:
    """Float [n_tiles, n_blocks]: 1 where token tile i overlaps block b."""
    t0 = torch.arange(n_tiles, device=device)[:, None] * tile
    b0 = torch.arange(n_blocks, device=device)[None, :] * bs
    return ((b0 < t0 + tile) & (b0 + bs > t0)).float()


def _indices(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many tiles are flagged, and their indices first (what BlockMask.from_kv_blocks takes)."""
    num = flags.sum(-1, dtype=torch.int32)
    idx = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def flex_block_mask(table: torch.Tensor, L: int, causal: bool, prefix: int = 0, tile: int = 128):
    """BlockMask for flex_attention from the block table, keys laid out as [sequence | prefix].

    Built at tile granularity from the n_blocks x n_blocks visibility (no L x L work): a tile pair is
    skipped when no block pair in it is visible, "full" when every key in it is visible, otherwise partial
    and resolved by a mask_mod that looks the visibility up in ONE indexing step (the CPU flex compiler
    miscompiled a two-step guide lookup, docs/ASSET_NOTES.md §9).
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = table.shape[-2]
    bs = L // nb
    dev = table.device
    vis = block_visibility(table, nb)  # [B, H, nb, nb]
    n_q, n_k = -(-L // tile), -(-(L + prefix) // tile)
    cq = _tile_cover(n_q, tile, nb, bs, dev)
    ck = _tile_cover(n_k, tile, nb, bs, dev)
    visf = vis.float()
    any_ = (cq @ visf @ ck.T) > 0
    none_hidden = (cq @ (1 - visf) @ ck.T) == 0
    qs = torch.arange(n_q, device=dev)[:, None] * tile
    ks = torch.arange(n_k, device=dev)[None, :] * tile
    qe, ke = (qs + tile).clamp(max=L), ks + tile
    in_seq = ke <= L  # kv tile holds sequence keys only
    full = none_hidden & in_seq & (qs + tile <= L)
    if causal:
        any_ = any_ & (ks < qe)  # some key at or before some query of the tile
        full = full & (ke - 1 <= qs)  # every key at or before every query
    if prefix:
        any_ = any_ | (ke > L)  # tiles holding prefix keys: partial, every query sees the prefix
    partial = any_ & ~full
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    vis_c = vis.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        kb = torch.clamp(kv_idx // bs, max=nb - 1)
        ok = vis_c[b, h, q_idx // bs, kb]
        if causal:
            ok = ok & (kv_idx <= q_idx)
        return ok | (kv_idx >= L) if prefix else ok

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(L, L + prefix))


def flex_sga(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, causal: bool,
             prefix_k: Optional[torch.Tensor] = None, prefix_v: Optional[torch.Tensor] = None, compiled: bool = True,
             tile: int = 128, kernel_options: Optional[dict] = None) -> torch.Tensor:
    """SGA through flex_attention; prefix keys are appended after the sequence to keep blocks tile-aligned."""
    from torch.nn.attention.flex_attention import flex_attention

    L = q.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    if P:
        k, v = torch.cat([k, prefix_k], 2), torch.cat([v, prefix_v], 2)
    bm = flex_block_mask(table, L, causal, P, tile)
    fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=bm, kernel_options=kernel_options)

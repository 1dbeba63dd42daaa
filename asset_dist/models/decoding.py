"""Incremental decoding of the ASSET transformer (sampling), apart from the model (models/transformer.py keeps
forward + loss): the encoder state, the key/value cache, token-granular decode steps, and continuous batching.

Conventions are the model's (strip order, decoder position p >= 1 holds strip token p-1, the output at position p
predicts strip token p).

- `encode` runs the encoder once per image (the guides' values are checked here, at the boundary: `forward`
  does not sync with the host to check them); `decode_step` feeds consecutive decoder positions s..s+n-1 of a
  batch whose rows share positions (the union sampler, `infer/sampler.py`). Runs shorter than a block (token
  steps) attend through per-block key/value buffers gathered once when the run enters a block
  (`attention.decode`); longer runs (known chunks, whole-block re-runs) use the block kernel (`block_kernel`).
  Both equal `AssetTransformer.forward` (tests/test_transformer.py, tests/test_infer_sampler.py).
- `Slots` holds B rows (images being sampled), each at its own decoder position, in one token geometry;
  `Slots.step` feeds every row its own run of consecutive positions in one call and returns the logits at the
  end of each run (continuous batching, `infer/scheduler.py`). A step's runs are flattened into one token
  list, so the linear layers (the weight reads) are shared by every row whatever its position; only attention
  is per row:
  - the LAST token of each run (the one whose logits are sampled) attends in one batched call over all slots:
    SGA through each slot's own per-block key/value buffers (gathered when the row's run enters a block,
    own-block keys written as they are computed), dense through the cache with a per-row causal limit;
  - the other tokens of a run (known tokens before a hole token) attend through the same buffer, one call per
    slot; the part of a run before a block boundary through a buffer gathered for it; runs of a block or more
    (a new row's known prefix) take the block kernel, as `decode_step` does;
  - the decoder's [start] (position 0) attends to itself (self) and to every encoder token (cross).
  A row enters a free slot with `Slots.admit` (the encoder runs once for the rows admitted together) and leaves
  by being overwritten. Every value equals `forward` up to float rounding (tests/test_infer_continuous.py).
- `small_gemm`: CPU decode steps run their 2-64 rows through the linear layers as one batched GEMM against
  256-row weight slices (switched on by the samplers for their loop; training never sees it).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from asset_dist.attention import decode as AD

from asset_dist.models.transformer import GUIDE_KEYS, Core, Guides

if TYPE_CHECKING:
    from asset_dist.models.transformer import AssetTransformer, Layout


# --------------------------------------------------------------------------------------------------------------
# Kernels chosen per model


def block_kernel(m: "AssetTransformer") -> Callable[..., torch.Tensor]:
    """The SGA kernel for runs of a block or more: the model's rule's (`attention.semantics`)."""
    return m.semantics.attend_run


SLICE = 256


def _sliced_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lin(x); 2-64 rows on the CPU without autograd run as one batched GEMM of the rows against 256-row slices
    of the weight: MKL's sgemm on the whole weight was measured 20-35% slower for 4-32 rows (BENCHMARKS.md
    "Editing"; one row is a GEMV either way). Same result up to float rounding (another summation blocking)."""
    o, i = lin.out_features, lin.in_features
    rows = x.numel() // i
    if not (2 <= rows <= 64 and o % SLICE == 0 and o > SLICE and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return F.linear(x, lin.weight, lin.bias)
    n = o // SLICE
    w = lin.weight.view(n, SLICE, i).transpose(1, 2)
    xs = x.reshape(rows, i).expand(n, rows, i)
    y = torch.bmm(xs, w) if lin.bias is None else torch.baddbmm(lin.bias.view(n, 1, SLICE), xs, w)
    return y.transpose(0, 1).reshape(*x.shape[:-1], o)


@contextlib.contextmanager
def small_gemm(m: "AssetTransformer") -> Iterator[None]:
    """While active, the decoder's linear layers and the LM head take `_sliced_linear` (CPU decode steps)."""
    mods = [x for x in m.decoder.modules() if isinstance(x, nn.Linear)] + [m.lm_head]
    patched = [x for x in mods if "forward" not in x.__dict__]  # nested use: patch once
    for x in patched:
        x.forward = functools.partial(_sliced_linear, x)
    try:
        yield
    finally:
        for x in patched:
            del x.forward


# --------------------------------------------------------------------------------------------------------------
# The union sampler's state: rows at the same positions


@dataclass
class EncoderState:
    """What `decode_step` needs from the encoder; computed once per image by `encode`."""

    layout: "Layout"
    enc: torch.Tensor  # [B, L, d] final encoder output, strip order
    mem: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: cross-attention k, v [B, H, L, hd]
    peg: list[Optional[torch.Tensor]]  # per decoder layer: PEG term [B, L, d] for decoder positions 1..L, or None
    guides: Optional[Guides]
    # SGA token-step tables {"self": [StepTable per decoder layer], "cross": [...]}: built by `encode`, or by the
    # first `decode_step` for a state built elsewhere
    tables: Optional[dict[str, list[AD.StepTable]]] = None


@dataclass
class DecodeCache:
    """Per decoder layer self-attention keys/values at token granularity, decoder positions 0..L, and (SGA) the
    key/value buffers of the query block token steps are in."""

    k: list[Optional[torch.Tensor]] = field(default_factory=list)  # [B, H, L+1, hd], allocated on first use
    v: list[Optional[torch.Tensor]] = field(default_factory=list)
    length: int = 0  # positions 0..length-1 are valid
    self_kv: list[Optional[AD.BlockKV]] = field(default_factory=list)  # per layer: [start] + the block's keys
    cross_kv: list[Optional[AD.BlockKV]] = field(default_factory=list)  # per layer: the block's encoder keys
    owner: Optional[EncoderState] = None  # the state cross_kv was gathered from


@torch.no_grad()
def encode(m: "AssetTransformer", image_ids: torch.Tensor, cond_ids: torch.Tensor, hole: torch.Tensor,
           guides: Optional[Guides] = None, hw: Optional[tuple[int, int]] = None) -> EncoderState:
    """Run the encoder once and precompute, per decoder layer, the cross-attention keys/values, PEG term and
    SGA token-step tables."""
    lay, image_s, cond_s, hole_s = m._inputs(image_ids, cond_ids, hole, guides, hw)
    if guides is not None:
        m.check_guides(guides, image_ids.shape[0])
    enc = m._encode(image_s, cond_s, hole_s, lay, guides)
    mem = [layer.cross_attn.project_kv(enc) for layer in m.decoder]
    state = EncoderState(lay, enc, mem, m._peg_terms(enc, lay), guides)
    _tables(m, state)
    return state

def new_cache(m: "AssetTransformer") -> DecodeCache:
    n = len(m.decoder)
    return DecodeCache([None] * n, [None] * n, 0, [None] * n, [None] * n, None)

def _tables(m: "AssetTransformer", state: EncoderState) -> Optional[dict[str, list[AD.StepTable]]]:
    """The state's token-step tables (once per image: not per token and layer)."""
    if state.guides is not None and state.tables is None:
        sem = m.semantics.table
        state.tables = {
            "self": [AD.step_table(g.to(state.enc.device), m.n_blocks, True, sem)
                     for g in state.guides["d_causal"]],
            "cross": [AD.step_table(g.to(state.enc.device), m.n_blocks, False, sem)
                      for g in state.guides["d_cross"]]}
    return state.tables

def _token_steps(m: "AssetTransformer", state: EncoderState, s: int, n: int) -> bool:
    """Whether the run s..s+n-1 goes through the per-block buffers (SGA, shorter than a block)."""
    nt = state.layout.nt
    if state.guides is None or n >= nt:
        return False
    tables = _tables(m, state)
    b0, b1 = max(s - 1, 0) // nt, (s + n - 2) // nt  # query blocks of the run's tokens
    return b0 == b1 or not any(t.spill[b0] for t in tables["self"])

@torch.no_grad()
def decode_step(m: "AssetTransformer", state: EncoderState, cache: DecodeCache, new_token_ids: torch.Tensor,
                positions: Union[int, Sequence[int], torch.Tensor]) -> torch.Tensor:
    """Feed tokens at consecutive decoder positions s..s+n-1 (s <= cache.length; feeding s < length rewinds the
    cache). new_token_ids [B, n]: at position p >= 1 the strip token p-1; at position 0 the id is ignored
    ([start]). Returns logits [B, n, V]; row i predicts strip token positions[i], equal to forward's
    logits[:, positions[i]] (same guides). Dense when state.guides is None, else the SGA pattern."""
    n = new_token_ids.shape[1]
    if isinstance(positions, int):
        s = positions
    else:
        pos_list = torch.as_tensor(positions).view(-1).tolist()
        s = int(pos_list[0]) if pos_list else 0
        if pos_list != list(range(s, s + len(pos_list))) or len(pos_list) != n:
            raise ValueError(f"positions must be {n} consecutive decoder positions, got {pos_list}")
    lay = state.layout
    if n < 1 or s < 0 or s > cache.length or s + n > lay.L + 1:
        raise ValueError(f"decode_step: positions {s}..{s + n - 1} invalid (cache holds 0..{cache.length - 1}, "
                         f"sequence 0..{lay.L})")
    steps = _token_steps(m, state, s, n)
    _sync_buffers(state, cache, s, steps)
    pos = torch.arange(s, s + n, device=new_token_ids.device)
    y = m._embed_decoder(new_token_ids, pos, lay)
    tok = (pos - 1).clamp(min=0)
    for i, layer in enumerate(m.decoder):
        peg = None
        if state.peg[i] is not None:
            peg = state.peg[i][:, tok] * (pos > 0).view(1, -1, 1).to(y.dtype)
        if steps:
            cores = _token_self_core(m, state, cache, i, s, n), _token_cross_core(m, state, cache, i, s, n)
        else:
            cores = _step_self_core(m, state, cache, i, pos), _step_cross_core(m, state, i, pos)
        y = layer(y, state.mem[i], *cores, peg)
    cache.length = s + n
    return m.lm_head(y)

def _sync_buffers(state: EncoderState, cache: DecodeCache, s: int, steps: bool) -> None:
    """Drop block buffers that this call would leave stale. Self: a buffer of block b holds [start] and every
    key before the block (positions <= b*nt) as they were when gathered, and its own block as token steps
    wrote it; rewriting an earlier position, or a block-kernel run (writes only the cache), invalidates it.
    Cross: only the state's encoder keys."""
    n = len(cache.k)
    if len(cache.self_kv) != n:  # a cache built without the buffer lists
        cache.self_kv, cache.cross_kv = [None] * n, [None] * n
    if cache.owner is not state:
        cache.self_kv, cache.cross_kv, cache.owner = [None] * n, [None] * n, state
    nt = state.layout.nt
    for i, buf in enumerate(cache.self_kv):
        if buf is not None and (not steps or s <= buf.block * nt):
            cache.self_kv[i] = None

def _write_cache(cache: DecodeCache, i: int, k: torch.Tensor, v: torch.Tensor, s: int, L: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    if cache.k[i] is None:
        B, H, _, d = k.shape
        cache.k[i] = k.new_zeros(B, H, L + 1, d)  # zeros: masked keys are read, never NaN
        cache.v[i] = v.new_zeros(B, H, L + 1, d)
    cache.k[i][:, :, s:s + k.shape[2]] = k
    cache.v[i][:, :, s:s + v.shape[2]] = v
    return cache.k[i], cache.v[i]

def _segments(s: int, n: int, nt: int) -> list[tuple[int, int, int]]:
    """(b, r0, r1): rows r0..r1-1 of the run s..s+n-1 (past [start]) hold the queries of query block b."""
    out, r = [], (1 if s == 0 else 0)
    while r < n:
        b = (s + r - 1) // nt
        end = min(n, (b + 1) * nt + 1 - s)
        out.append((b, r, end))
        r = end
    return out

def _token_self_core(m: "AssetTransformer", state: EncoderState, cache: DecodeCache, i: int, s: int,
                     n: int) -> Core:
    nt, L = state.layout.nt, state.layout.L
    table = state.tables["self"][i]
    last = s + n - 2  # the run's last query token

    def core(q, k, v):
        K, V = _write_cache(cache, i, k, v, s, L)
        outs = [V[:, :, :1]] if s == 0 else []  # [start] attends only to itself
        for b, r0, r1 in _segments(s, n, nt):
            buf = cache.self_kv[i]
            first = s + r0 - 1 - b * nt  # in-block offset of the segment's first query
            if buf is None or buf.block != b:  # entering block b: gather after this run's cache write
                buf = AD.gather_block_kv(K[:, :, 1:], V[:, :, 1:], table, b, nt, (K[:, :, :1], V[:, :, :1]))
                cache.self_kv[i] = buf
            else:
                AD.write_own(buf, k[:, :, r0:r1], v[:, :, r0:r1], first)
            outs.append(AD.block_kv_attention(q[:, :, r0:r1], buf, nt, first, min(last - b * nt, nt - 1)))
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return core

def _token_cross_core(m: "AssetTransformer", state: EncoderState, cache: DecodeCache, i: int, s: int,
                      n: int) -> Core:
    nt = state.layout.nt
    table = state.tables["cross"][i]

    def core(q, k, v):
        outs = [F.scaled_dot_product_attention(q[:, :, :1], k, v)] if s == 0 else []  # [start]: every token
        for b, r0, r1 in _segments(s, n, nt):
            buf = cache.cross_kv[i]
            if buf is None or buf.block != b:
                buf = cache.cross_kv[i] = AD.gather_block_kv(k, v, table, b, nt)
            outs.append(AD.block_kv_attention(q[:, :, r0:r1], buf, nt))
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return core

def _step_self_core(m: "AssetTransformer", state: EncoderState, cache: DecodeCache, i: int,
                    pos: torch.Tensor) -> Core:
    """Dense runs, and SGA runs of a block or more (block kernel)."""
    s, e = int(pos[0]), int(pos[-1]) + 1

    def core(q, k, v):
        K, V = _write_cache(cache, i, k, v, s, state.layout.L)
        # positions >= e are stale or empty; the causal mask never reads them
        if state.guides is None:
            mask = pos.view(-1, 1) >= torch.arange(e, device=pos.device).view(1, -1)
            return F.scaled_dot_product_attention(q, K[:, :, :e], V[:, :, :e], attn_mask=mask)
        guide = state.guides["d_causal"][i]
        outs = []
        if s == 0:
            outs.append(V[:, :, :1])  # [start] attends only to itself
        if e > 1:
            j = 1 if s == 0 else 0
            outs.append(block_kernel(m)(q[:, :, j:], pos[j:] - 1, K[:, :, 1:], V[:, :, 1:], guide,
                                      state.layout.nt, causal=True, prefix=(K[:, :, :1], V[:, :, :1])))
        return torch.cat(outs, 2)
    return core

def _step_cross_core(m: "AssetTransformer", state: EncoderState, i: int, pos: torch.Tensor) -> Core:
    def core(q, k, v):
        if state.guides is None:
            return F.scaled_dot_product_attention(q, k, v)
        outs = []
        j = 1 if int(pos[0]) == 0 else 0
        if j:
            outs.append(F.scaled_dot_product_attention(q[:, :, :1], k, v))
        if q.shape[2] > j:
            outs.append(block_kernel(m)(q[:, :, j:], pos[j:] - 1, k, v, state.guides["d_cross"][i],
                                      state.layout.nt, causal=False))
        return torch.cat(outs, 2)
    return core


# --------------------------------------------------------------------------------------------------------------
# Continuous batching: every row at its own position


@dataclass
class Run:
    """Decoder positions start..start+len(ids)-1 of slot `slot` (ids: the decoder inputs there, position 0's
    is ignored); want: return the logits of the run's last position."""

    slot: int
    start: int
    ids: torch.Tensor  # long [n] on the model's device
    want: bool = True


class Slots:
    """B decoding slots for one model and one token geometry hw; see the module doc."""

    def __init__(self, model, n_slots: int, hw: tuple[int, int], sparse: bool, device, dtype: torch.dtype,
                 guide_k: Optional[int] = None):
        self.model, self.B, self.hw, self.sparse = model, n_slots, (int(hw[0]), int(hw[1])), sparse
        self._dtype, self._device = dtype, device
        L = self.hw[0] * self.hw[1]
        self.lay = model.layout(L, self.hw, device)
        self.L, self.nt, nb = L, self.lay.nt, model.n_blocks
        cfg = model.cfg
        H, hd, B = model.n_heads, cfg.d_model // model.n_heads, n_slots
        n = len(model.decoder)
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        self.k = [self._big(B, H, L + 1, hd) for _ in range(n)]  # zeros: masked keys are read, never NaN
        self.v = [self._big(B, H, L + 1, hd) for _ in range(n)]
        self.mem = [(self._big(B, H, L, hd), self._big(B, H, L, hd)) for _ in range(n)]
        self.peg = [None if layer.peg is None else z(B, L, cfg.d_model) for layer in model.decoder]
        self.length = [0] * B  # decoder positions held per slot
        self.block = [-1] * B  # query block the slot's buffers hold (-1: none)
        self.spill: Optional[list[set]] = None  # per slot, blocks whose causal picks hold b+1 (official rule)
        if not sparse:
            return
        K = int(guide_k if guide_k is not None else cfg.guide_k)
        self.K = K
        self.guides = {key: torch.full((len(model.encoder) if key == "e_self" else n, B, H, nb, K), -1,
                                       dtype=torch.long, device=device) for key in GUIDE_KEYS}
        S = AD.step_table(torch.full((1, H, nb, K), -1, dtype=torch.long), nb, True,
                          model.semantics.table).blocks.shape[-1]
        sdt = AD._score_dtype(dtype)
        self.S = S
        self.tab = {w: [(torch.full((B, H, nb, S), -1, dtype=torch.long, device=device),
                         torch.zeros(B, H, nb, S, dtype=torch.float64, device=device)) for _ in range(n)]
                    for w in ("self", "cross")}
        self.picks: Optional[list[torch.Tensor]] = None  # official causal self-picks [B, H, nb] per layer
        nt = self.nt
        self.buf = {"self": [(z(B, H, 1 + S * nt, hd), z(B, H, 1 + S * nt, hd),
                              torch.zeros(B, H, 1, 1 + S * nt, device=device, dtype=sdt)) for _ in range(n)],
                    "cross": [(z(B, H, S * nt, hd), z(B, H, S * nt, hd),
                               torch.zeros(B, H, 1, S * nt, device=device, dtype=sdt)) for _ in range(n)]}

    def _big(self, *shape: int) -> torch.Tensor:
        """The per-layer cache and cross-attention tensors (benchmarks override: memory)."""
        return torch.zeros(*shape, device=self._device, dtype=self._dtype)

    # ---------------------------------------------------------------------------------------------- admission

    @torch.no_grad()
    def admit(self, slots: Sequence[int], ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor,
              guides: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Rows ids / cond / hole [m, L] (raster) into `slots` (m of them); guides {key: [n, m, H, nb, K]}
        (sparse slots) or None. Runs the encoder once for the m rows."""
        if (guides is not None) != self.sparse:
            raise ValueError("Slots: sparse slots need guides for every row, dense slots none")
        m = self.model
        st = encode(m, ids, cond, hole, guides, self.hw)
        js = torch.as_tensor(list(slots), dtype=torch.long, device=ids.device)
        for i in range(len(m.decoder)):
            self.mem[i][0][js] = st.mem[i][0]
            self.mem[i][1][js] = st.mem[i][1]
            if self.peg[i] is not None:
                self.peg[i][js] = st.peg[i]
        for j in slots:
            self.length[j], self.block[j] = 0, -1
        if not self.sparse:
            return
        # causal rows of block b whose table holds b+1 (the official rule's picks; never union tables):
        # runs from such a block into the next take the block kernel
        nb = m.n_blocks
        nxt = torch.arange(1, nb + 1, device=ids.device).view(nb, 1)
        hit = torch.zeros(len(slots), nb, dtype=torch.bool, device=ids.device)
        for g in guides["d_causal"]:  # [m, H, nb, K]
            hit |= (m.semantics.table(g, nb, True) == nxt).any(-1).any(1)
        if self.spill is not None or bool(hit.any()):
            self.spill = self.spill or [set() for _ in range(self.B)]
            for n, j in enumerate(slots):
                self.spill[j] = set(hit[n].nonzero().view(-1).tolist())
        for key in GUIDE_KEYS:
            g = guides[key]
            if g.shape[-1] != self.K:
                raise ValueError(f"guides['{key}'] has {g.shape[-1]} picks per block, these slots {self.K}")
            self.guides[key][:, js] = g.to(self.guides[key].device).expand(-1, len(slots), -1, -1, -1)
        sdt = self.buf["self"][0][2].dtype
        for w, tables in st.tables.items():
            for i, t in enumerate(tables):
                blocks, bias = self.tab[w][i]
                blocks[js] = t.blocks.expand(len(slots), -1, -1, -1)
                bias[js] = t.bias.expand(len(slots), -1, -1, -1)
                if w == "self" and t.own_picks is not None:
                    if self.picks is None:
                        self.picks = [torch.zeros(self.B, m.n_heads, m.n_blocks, device=ids.device, dtype=sdt)
                                      for _ in range(len(m.decoder))]
                    self.picks[i][js] = t.own_picks.to(sdt).expand(len(slots), -1, -1)
                elif w == "self" and self.picks is not None:
                    self.picks[i][js] = 0

    # ---------------------------------------------------------------------------------------------- a step

    @torch.no_grad()
    def step(self, runs: Sequence[Run]) -> torch.Tensor:
        """Feed each run (at most one per slot; run.start == the slot's length). Returns the logits [R, V] of
        the runs with want=True, in order."""
        m, nt, dev = self.model, self.nt, self.k[0].device
        plan = _Plan(runs, nt, self.sparse, self.block, self.length, self.L, dev, self.spill)
        y = m._embed_decoder(plan.ids.view(1, -1), plan.pos, self.lay)
        tok = (plan.pos - 1).clamp(min=0)
        not_start = (plan.pos > 0).view(1, -1, 1)
        for i, layer in enumerate(m.decoder):
            peg = None if self.peg[i] is None else self.peg[i][plan.slot, tok].unsqueeze(0) * not_start.to(y.dtype)
            y = layer(y, (None, None), self._self_core(i, plan), self._cross_core(i, plan), peg)
        for r in runs:
            self.length[r.slot] = r.start + r.ids.numel()
        for j, b in plan.new_block.items():
            self.block[j] = b
        return m.lm_head(y[0, plan.want])

    def _self_core(self, i: int, plan: "_Plan"):
        def core(q, k, v):  # [1, H, T, hd] each
            K, V = self.k[i], self.v[i]
            K[plan.slot, :, plan.pos] = k[0].transpose(0, 1)
            V[plan.slot, :, plan.pos] = v[0].transpose(0, 1)
            out = torch.empty_like(q)
            if not self.sparse:
                return self._dense_self(q, out, K, V, plan)
            bk, bv, bb = self.buf["self"][i]
            if plan.gather:
                self._gather_self(i, plan)
            if plan.bt.numel():  # own-block keys of the buffered tokens (also right after a gather)
                bk[plan.bslot, :, 1 + plan.boff] = k[0, :, plan.bt].transpose(0, 1)
                bv[plan.bslot, :, 1 + plan.boff] = v[0, :, plan.bt].transpose(0, 1)
            for t, j in plan.starts:  # [start] attends only to itself
                out[:, :, t] = v[:, :, t]
            picks = self.picks[i] if self.picks is not None else None
            for j, t0, t1, b, first, last in plan.gaps:
                own = None if picks is None else picks[j:j + 1, :, b].view(1, -1, 1, 1)
                buf = AD.BlockKV(b, bk[j:j + 1], bv[j:j + 1], bb[j:j + 1], 1, own)
                out[:, :, t0:t1] = AD.block_kv_attention(q[:, :, t0:t1], buf, nt=self.nt, first=first, last=last)
            for j, t0, t1, b, first, last in plan.segs:
                kg, vg, bias = self._gather(*self.tab["self"][i], K[:, :, 1:], V[:, :, 1:], [j], [b])
                own = None if picks is None else picks[j:j + 1, :, b].view(1, -1, 1, 1)
                buf = AD.BlockKV(b, torch.cat([K[j:j + 1, :, :1], kg], 2), torch.cat([V[j:j + 1, :, :1], vg], 2),
                                 F.pad(bias.to(bb.dtype), (1, 0)), 1, own)
                out[:, :, t0:t1] = AD.block_kv_attention(q[:, :, t0:t1], buf, self.nt, first=first, last=last)
            guide, kernel = self.guides["d_causal"][i], block_kernel(self.model)
            for j, t0, t1, qtok in plan.kernel:
                out[:, :, t0:t1] = kernel(q[:, :, t0:t1], qtok, K[j:j + 1, :, 1:], V[j:j + 1, :, 1:], guide[j:j + 1],
                                          self.nt, causal=True, prefix=(K[j:j + 1, :, :1], V[j:j + 1, :, :1]))
            if plan.vt.numel():
                sel, qv = plan.vector_rows(q, self.B)
                own = None
                if picks is not None:
                    own = picks.gather(2, plan.vblock_all(self.B).view(-1, 1, 1).expand(-1, picks.shape[1], 1))
                    own = own.view(-1, picks.shape[1], 1, 1)
                buf = AD.BlockKV(-1, bk, bv, bb, 1, own)
                if sel is not None:
                    buf = AD.BlockKV(-1, bk[sel], bv[sel], bb[sel], 1, None if own is None else own[sel])
                res = AD.block_kv_attention(qv, buf, self.nt, first=plan.vfirst_rows(self.B, sel),
                                            last=plan.vlast_rows(self.B, sel))
                out[0, :, plan.vt] = plan.vector_out(res, sel)
            return out
        return core

    def _cross_core(self, i: int, plan: "_Plan"):
        def core(q, _k, _v):
            mk, mv = self.mem[i]
            out = torch.empty_like(q)
            if not self.sparse:
                return self._dense_cross(q, out, mk, mv, plan)
            bk, bv, bb = self.buf["cross"][i]
            if plan.gather:
                self._gather_cross(i, plan)
            for t, j in plan.starts:  # [start] sees every encoder token
                out[:, :, t:t + 1] = F.scaled_dot_product_attention(q[:, :, t:t + 1], mk[j:j + 1], mv[j:j + 1])
            for j, t0, t1, b, _first, _last in plan.gaps:
                buf = AD.BlockKV(b, bk[j:j + 1], bv[j:j + 1], bb[j:j + 1], 0, None)
                out[:, :, t0:t1] = AD.block_kv_attention(q[:, :, t0:t1], buf, self.nt)
            for j, t0, t1, b, _first, _last in plan.segs:
                kg, vg, bias = self._gather(*self.tab["cross"][i], mk, mv, [j], [b])
                buf = AD.BlockKV(b, kg, vg, bias.to(bb.dtype), 0, None)
                out[:, :, t0:t1] = AD.block_kv_attention(q[:, :, t0:t1], buf, self.nt)
            guide, kernel = self.guides["d_cross"][i], block_kernel(self.model)
            for j, t0, t1, qtok in plan.kernel:
                out[:, :, t0:t1] = kernel(q[:, :, t0:t1], qtok, mk[j:j + 1], mv[j:j + 1], guide[j:j + 1], self.nt,
                                          causal=False)
            if plan.vt.numel():
                sel, qv = plan.vector_rows(q, self.B)
                buf = AD.BlockKV(-1, bk, bv, bb, 0, None) if sel is None else \
                    AD.BlockKV(-1, bk[sel], bv[sel], bb[sel], 0, None)
                out[0, :, plan.vt] = plan.vector_out(AD.block_kv_attention(qv, buf, self.nt), sel)
            return out
        return core

    # ---------------------------------------------------------------------------------------------- buffers

    def _gather(self, blocks_tab: torch.Tensor, bias_tab: torch.Tensor, src_k, src_v, js, bs):
        """Key/value blocks of query block bs[n] for slot js[n]: [m, H, S*nt, hd] and the bias [m, H, 1, S*nt]."""
        nt = self.nt
        js = torch.as_tensor(js, dtype=torch.long, device=blocks_tab.device)
        bs = torch.as_tensor(bs, dtype=torch.long, device=blocks_tab.device)
        tb = blocks_tab[js, :, bs]  # [m, H, S]
        idx = (tb.clamp(min=0).unsqueeze(-1) * nt + torch.arange(nt, device=tb.device)).flatten(2)
        kg, vg = AD.gather_rows(src_k, idx, js), AD.gather_rows(src_v, idx, js)
        bias = bias_tab[js, :, bs].unsqueeze(-1).expand(-1, -1, -1, nt).flatten(2).unsqueeze(2)
        return kg, vg, bias

    def _gather_self(self, i: int, plan: "_Plan") -> None:
        bk, bv, bb = self.buf["self"][i]
        K, V = self.k[i], self.v[i]
        kg, vg, bias = self._gather(*self.tab["self"][i], K[:, :, 1:], V[:, :, 1:], plan.gslot, plan.gblock)
        js = plan.gslot
        bk[js, :, :1], bv[js, :, :1] = K[js, :, :1], V[js, :, :1]  # [start], seen by every query
        bk[js, :, 1:], bv[js, :, 1:] = kg, vg
        bb[js, :, :, :1] = 0
        bb[js, :, :, 1:] = bias.to(bb.dtype)

    def _gather_cross(self, i: int, plan: "_Plan") -> None:
        bk, bv, bb = self.buf["cross"][i]
        kg, vg, bias = self._gather(*self.tab["cross"][i], *self.mem[i], plan.gslot, plan.gblock)
        js = plan.gslot
        bk[js], bv[js], bb[js] = kg, vg, bias.to(bb.dtype)

    # ---------------------------------------------------------------------------------------------- dense

    def _dense_self(self, q, out, K, V, plan: "_Plan"):
        for j, t0, t1, s in plan.dense_gaps:  # earlier tokens of a run, causal over the row's cache
            e = s + (t1 - t0)
            pos = torch.arange(s, e, device=q.device).view(-1, 1)
            mask = pos >= torch.arange(e, device=q.device).view(1, -1)
            out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], K[j:j + 1, :, :e], V[j:j + 1, :, :e],
                                                              attn_mask=mask)
        if plan.vt.numel():
            sel, qv = plan.vector_rows(q, self.B)
            Kv, Vv = (K, V) if sel is None else (K[sel], V[sel])
            limit = plan.vpos_rows(self.B, sel)  # each row sees positions <= its query's
            mask = torch.arange(self.L + 1, device=q.device).view(1, 1, 1, -1) <= limit.view(-1, 1, 1, 1)
            out[0, :, plan.vt] = plan.vector_out(F.scaled_dot_product_attention(qv, Kv, Vv, attn_mask=mask), sel)
        return out

    def _dense_cross(self, q, out, mk, mv, plan: "_Plan"):
        for j, t0, t1, _s in plan.dense_gaps:
            out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], mk[j:j + 1], mv[j:j + 1])
        if plan.vt.numel():
            sel, qv = plan.vector_rows(q, self.B)
            Kv, Vv = (mk, mv) if sel is None else (mk[sel], mv[sel])
            out[0, :, plan.vt] = plan.vector_out(F.scaled_dot_product_attention(qv, Kv, Vv), sel)
        return out


class _Plan:
    """How the tokens of one step attend (computed once per step, used by every layer).

    Flat token t belongs to run r; groups: `starts` (position 0); the batched call (`vt`): SGA, a run's tokens
    inside one block, up to PAD of them (a row of queries padded to the step's longest; attention over a buffer
    is memory-bound, so a few more queries cost little), dense, each run's last token; `gaps` (the other tokens
    of a longer run: buffer, per slot); `segs` (the part of a run in the block before a boundary it crosses: a
    buffer gathered for it, per slot); `kernel` (runs of a block or more, or official spills: block kernel, per
    slot); `dense_gaps` (dense models: every token but the last of a run)."""

    PAD = 16

    def __init__(self, runs: Sequence[Run], nt: int, sparse: bool, block: list[int], length: list[int], L: int,
                 dev: torch.device, spill: Optional[list[set]] = None):
        ids, pos, slot, want = [], [], [], []
        self.starts: list[tuple[int, int]] = []
        self.gaps: list[tuple] = []
        self.kernel: list[tuple] = []
        self.segs: list[tuple] = []
        self.dense_gaps: list[tuple] = []
        vrows: list[list[int]] = []  # per row of the batched call: its tokens
        vslot, voff, vlast, vblock, vpos = [], [], [], [], []
        bt, bslot, boff = [], [], []
        gather: dict[int, int] = {}
        self.new_block: dict[int, int] = {}
        seen = set()
        t = 0
        for r in runs:
            j, s, n = r.slot, r.start, int(r.ids.numel())
            if j in seen or s != length[j] or n < 1 or s + n > L + 1:
                raise ValueError(f"step: slot {j} holds positions 0..{length[j] - 1}; run {s}..{s + n - 1} is not "
                                 f"its continuation (one run per slot, within 0..{L})")
            seen.add(j)
            ids.append(r.ids.view(-1))
            pos.extend(range(s, s + n))
            slot.extend([j] * n)
            if r.want:
                want.append(t + n - 1)
            if not sparse:
                if n > 1:
                    self.dense_gaps.append((j, t, t + n - 1, s))
                vrows.append([t + n - 1])
                vslot.append(j)
                vpos.append(s + n - 1)
                t += n
                continue
            t_body, p0 = t, s
            if s == 0:
                self.starts.append((t, j))
                t_body, p0 = t + 1, 1
            e = s + n  # body: positions p0..e-1, query tokens p0-1..e-2
            if p0 < e:
                b0, b1 = (p0 - 1) // nt, (e - 2) // nt
                if e - p0 >= nt or (b0 != b1 and spill is not None and b0 in spill[j]):
                    # a block or more (a new row's known prefix), or official picks of the next block: kernel
                    self.kernel.append((j, t_body, t + n, torch.arange(p0 - 1, e - 1, device=dev)))
                    self.new_block[j] = -1  # the cache moved on without the buffers
                    t += n
                    continue
                if b0 != b1:  # across one boundary: the part in b0 through a buffer gathered for it alone
                    split = b1 * nt + 1  # first position whose query lies in b1
                    self.segs.append((j, t_body, t_body + split - p0, b0, p0 - 1 - b0 * nt, nt - 1))
                    t_body, p0, b0 = t_body + split - p0, split, b1
                if block[j] != b0:
                    gather[j] = b0
                self.new_block[j] = b0
                first = p0 - 1 - b0 * nt
                last = e - 2 - b0 * nt
                bt.extend(range(t_body, t + n))
                bslot.extend([j] * (e - p0))
                boff.extend(range(first, last + 1))
                if e - p0 > self.PAD:  # a long known run: its own call; the last token joins the batched one
                    self.gaps.append((j, t_body, t + n - 1, b0, first, last))
                    t_body, first = t + n - 1, last
                vrows.append(list(range(t_body, t + n)))
                vslot.append(j)
                voff.append(first)
                vlast.append(last)
                vblock.append(b0)
            t += n
        self.ids = torch.cat(ids).to(dev)
        self._vslot, self._voff, self._vlast, self._vblock, self._vpos = vslot, voff, vlast, vblock, vpos
        self.M = max((len(r) for r in vrows), default=1)  # queries per row of the batched call
        vt = [x for r in vrows for x in r]
        vidx = [x for r in vrows for x in r + [r[-1]] * (self.M - len(r))]  # padded with the row's last token
        vsel = [i * self.M + q for i, r in enumerate(vrows) for q in range(len(r))]  # the real ones, in vt order
        self.gather = bool(gather)
        # every index list of the step in one host -> device copy
        parts = [pos, slot, want, vt, bt, bslot, boff, list(gather), list(gather.values()), vslot, vidx, vsel]
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long).to(dev)
        (self.pos, self.slot, self.want, self.vt, self.bt, self.bslot, self.boff, self.gslot, self.gblock,
         self._vslots, self._vidx, self._vsel) = flat.split([len(part) for part in parts])
        self._dev = dev
        self._rows: dict = {}

    # The batched call runs over all B slots (rows of slots without queries are zeros, their outputs dropped:
    # cheaper than copying the others' buffers) when at least half the slots take part, else over the taking
    # part slots only (index_select). sel: None (all B) or those slots.
    def vector_rows(self, q: torch.Tensor, B: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """q [1, H, T, hd] -> the batched call's queries [B or m, H, M, hd]."""
        H, hd = q.shape[1], q.shape[3]
        m = len(self._vslot)
        qt = q[0, :, self._vidx].view(H, m, self.M, hd).transpose(0, 1)  # [m, H, M, hd]
        self._identity = self._vslot == list(range(B))
        if self._identity:  # every slot, in slot order: nothing to scatter
            return None, qt
        if 2 * m >= B:
            full = q.new_zeros(B, H, self.M, hd)
            full[self._slots()] = qt
            return None, full
        return self._slots(), qt

    def vector_out(self, res: torch.Tensor, sel: Optional[torch.Tensor]) -> torch.Tensor:
        """vector_rows' result [B or m, H, M, hd] -> [H, len(vt), hd] in vt order (padding dropped)."""
        if sel is None and not self._identity:
            res = res[self._slots()]
        H, hd = res.shape[1], res.shape[3]
        return res.transpose(1, 2).reshape(-1, H, hd)[self._vsel].transpose(0, 1)

    def _slots(self) -> torch.Tensor:
        return self._vslots

    def _per_row(self, B: int, sel) -> torch.Tensor:
        """[first offset, last offset, last position, query block] of each row of the batched call: per slot
        (B, zeros for slots not taking part) or, sel given, per taking-part slot. Once per step, for every
        layer."""
        key = sel is not None
        if key not in self._rows:
            m = len(self._vslot)  # dense steps have positions only, sparse ones offsets and blocks only
            vals = (self._voff, self._vlast, self._vpos, self._vblock)
            t = torch.tensor([v or [0] * m for v in vals], dtype=torch.long).to(self._dev)
            if sel is None:
                full = torch.zeros(4, B, dtype=torch.long, device=self._dev)
                full[:, self._slots()] = t
                t = full
            self._rows[key] = t
        return self._rows[key]

    def vfirst_rows(self, B: int, sel) -> torch.Tensor:
        return self._per_row(B, sel)[0]

    def vlast_rows(self, B: int, sel) -> torch.Tensor:
        return self._per_row(B, sel)[1]

    def vpos_rows(self, B: int, sel) -> torch.Tensor:
        return self._per_row(B, sel)[2]

    def vblock_all(self, B: int) -> torch.Tensor:
        return self._per_row(B, None)[3]

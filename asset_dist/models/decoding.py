"""Continuous-batching decoder state: `Slots` holds B rows (images being sampled), each at its own decoder
position, in one token geometry; `Slots.step` feeds every row its own run of consecutive decoder positions in
one call and returns the logits at the end of each run.

A step's runs are flattened into one token list, so the linear layers (the weight reads) are shared by every
row whatever its position; only attention is per row:
- the LAST token of each run (the one whose logits are sampled) attends in one batched call over all slots:
  SGA through each slot's own per-block key/value buffers (`attention.decode`: gathered once when the row's
  run enters a block, own-block keys written as they are computed), dense through the cache with a per-row
  causal limit;
- the other tokens of a run that stays inside one block (known tokens before a hole token) attend through
  the same buffer, one call per slot; runs that cross a block boundary or cover a whole block (a new row's
  known prefix) take the model's block kernel (`block_fn`, one call per slot), as `decode_step` does;
- the decoder's [start] (position 0) attends to itself (self) and to every encoder token (cross).
Every value equals `AssetTransformer.forward` on the row's tokens up to float rounding
(tests/test_infer_continuous.py); the union sampler's `decode_step` is the reference.

A row enters a free slot with `admit` (the encoder runs once for the rows admitted together; their tensors are
copied into the slot tensors) and leaves by being overwritten: nothing is freed per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from asset_dist.attention import decode as AD

GUIDE_KEYS = ("e_self", "d_causal", "d_cross")


@dataclass
class Run:
    """Decoder positions start..start+len(ids)-1 of slot `slot` (ids: the decoder inputs there, position 0's
    is ignored); want: return the logits of the run's last position."""

    slot: int
    start: int
    ids: torch.Tensor  # long [n] on the model's device
    want: bool = True


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
        self.spill: Optional[list[set]] = None  # official semantics: per slot, blocks whose causal picks hold b+1
        if not sparse:
            return
        K = int(guide_k if guide_k is not None else cfg.guide_k)
        self.K = K
        self.guides = {key: torch.full((len(model.encoder) if key == "e_self" else n, B, H, nb, K), -1,
                                       dtype=torch.long, device=device) for key in GUIDE_KEYS}
        S = AD.step_table(torch.full((1, H, nb, K), -1, dtype=torch.long), nb, True,
                          cfg.sga_semantics).blocks.shape[-1]
        sdt = _score_dtype(dtype)
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
        st = m.encode(ids, cond, hole, guides, self.hw)
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
        if m.cfg.sga_semantics == "official":  # runs from such a block into the next take the kernel
            from asset_dist.attention.official import official_table

            nb = m.n_blocks
            nxt = torch.arange(1, nb + 1, device=ids.device).view(nb, 1)
            hit = torch.zeros(len(slots), nb, dtype=torch.bool, device=ids.device)
            for g in guides["d_causal"]:  # [m, H, nb, K]
                hit |= (official_table(g, nb, True) == nxt).any(-1).any(1)
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
            guide = self.guides["d_causal"][i]
            for j, t0, t1, qtok in plan.kernel:
                out[:, :, t0:t1] = self.model.block_fn(q[:, :, t0:t1], qtok, K[j:j + 1, :, 1:], V[j:j + 1, :, 1:],
                                                       guide[j:j + 1], self.nt, causal=True,
                                                       prefix=(K[j:j + 1, :, :1], V[j:j + 1, :, :1]))
            if plan.vt.numel():
                sel, qv = plan.vector_rows(q, self.B)
                own = None
                if picks is not None:
                    own = picks.gather(2, plan.vblock_all(self.B).view(-1, 1, 1).expand(-1, picks.shape[1], 1))
                    own = own.view(-1, picks.shape[1], 1, 1)
                buf = AD.BlockKV(-1, bk, bv, bb, 1, own)
                if sel is not None:
                    buf = AD.BlockKV(-1, bk[sel], bv[sel], bb[sel], 1, None if own is None else own[sel])
                offs = plan.voff_rows(self.B, sel)
                res = AD.block_kv_attention(qv, buf, self.nt, first=offs, last=offs)
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
            guide = self.guides["d_cross"][i]
            for j, t0, t1, qtok in plan.kernel:
                out[:, :, t0:t1] = self.model.block_fn(q[:, :, t0:t1], qtok, mk[j:j + 1], mv[j:j + 1],
                                                       guide[j:j + 1], self.nt, causal=False)
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

    Flat token t belongs to run r; groups: `starts` (position 0), `vt` (the last token of each run not taking
    the kernel: one batched call), `gaps` (the other tokens of a run inside one block: buffer, per slot),
    `segs` (the part of a run in the block before a boundary it crosses: a buffer gathered for it, per slot),
    `kernel` (runs of a block or more, or official spills: block kernel, per slot), `dense_gaps` (dense models:
    every token but the last of a run)."""

    def __init__(self, runs: Sequence[Run], nt: int, sparse: bool, block: list[int], length: list[int], L: int,
                 dev: torch.device, spill: Optional[list[set]] = None):
        ids, pos, slot, want = [], [], [], []
        self.starts: list[tuple[int, int]] = []
        self.gaps: list[tuple] = []
        self.kernel: list[tuple] = []
        self.segs: list[tuple] = []
        self.dense_gaps: list[tuple] = []
        vt, vslot, voff, vblock, vpos = [], [], [], [], []
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
                vt.append(t + n - 1)
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
                if e - p0 > 1:
                    self.gaps.append((j, t_body, t + n - 1, b0, first, last))
                bt.extend(range(t_body, t + n))
                bslot.extend([j] * (e - p0))
                boff.extend(range(first, last + 1))
                vt.append(t + n - 1)
                vslot.append(j)
                voff.append(last)
                vblock.append(b0)
            t += n
        self.ids = torch.cat(ids).to(dev)
        self.pos = torch.tensor(pos, device=dev)
        self.slot = torch.tensor(slot, device=dev)
        self.want = torch.tensor(want, dtype=torch.long, device=dev)
        self.vt = torch.tensor(vt, dtype=torch.long, device=dev)
        self._vslot, self._voff, self._vblock, self._vpos = vslot, voff, vblock, vpos
        self.bt = torch.tensor(bt, dtype=torch.long, device=dev)
        self.bslot = torch.tensor(bslot, dtype=torch.long, device=dev)
        self.boff = torch.tensor(boff, dtype=torch.long, device=dev)
        self.gather = bool(gather)
        self.gslot = torch.tensor(list(gather), dtype=torch.long, device=dev)
        self.gblock = torch.tensor(list(gather.values()), dtype=torch.long, device=dev)
        self._dev = dev
        self._cache: dict = {}

    # The last tokens of the runs attend in one call: over all B slots (queries of slots without such a token
    # are zeros, their outputs dropped: cheaper than copying the others' buffers) when at least half the slots
    # take part, else over the taking part slots only (index_select). sel: None (all B) or those slots.
    def vector_rows(self, q: torch.Tensor, B: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        qt = q[0, :, self.vt].transpose(0, 1).unsqueeze(2)  # [m, H, 1, hd]
        self._identity = self._vslot == list(range(B))
        if self._identity:  # every slot, in slot order: nothing to scatter
            return None, qt
        if 2 * len(self._vslot) >= B:
            full = q.new_zeros(B, *qt.shape[1:])
            full[self._slots()] = qt
            return None, full
        return self._slots(), qt

    def vector_out(self, res: torch.Tensor, sel: Optional[torch.Tensor]) -> torch.Tensor:
        """vector_rows' result [B or m, H, 1, hd] -> [H, m, hd] in vt order."""
        if sel is None and not self._identity:
            res = res[self._slots()]
        return res[:, :, 0].transpose(0, 1)

    def _slots(self) -> torch.Tensor:
        if "slots" not in self._cache:
            self._cache["slots"] = torch.tensor(self._vslot, dtype=torch.long, device=self._dev)
        return self._cache["slots"]

    def _per_row(self, values: list[int], B: int, sel, fill: int) -> torch.Tensor:
        if sel is not None:
            return torch.tensor(values, dtype=torch.long, device=self._dev)
        out = torch.full((B,), fill, dtype=torch.long, device=self._dev)
        out[self._slots()] = torch.tensor(values, dtype=torch.long, device=self._dev)
        return out

    def voff_rows(self, B: int, sel) -> torch.Tensor:
        return self._per_row(self._voff, B, sel, 0)

    def vpos_rows(self, B: int, sel) -> torch.Tensor:
        return self._per_row(self._vpos, B, sel, 0)

    def vblock_all(self, B: int) -> torch.Tensor:
        return self._per_row(self._vblock, B, None, 0)

"""The ASSET encoder-decoder transformer (docs/ASSET_NOTES.md §4), run densely (guide, 256 px) or with SGA.

Conventions
- Inputs are raster ("normal") order [B, L]; inside, everything runs in strip order over the block grid (section 5.1),
  so one block = `nt` consecutive tokens.
- Decoder sequence: position 0 = [start], position p >= 1 holds strip token p-1 (teacher forcing). The output at
  position p predicts strip token p, so `forward` returns the outputs of positions 0..L-1: `logits[:, p]` predicts strip
  token p (the output of position L predicts nothing and is dropped).
- Guides (SGA) are block ids in strip order, one row per query block, -1 = no pick:
  {"e_self": [n_enc, B, H, nb, K], "d_causal": [n_dec, B, H, nb, K], "d_cross": [n_dec, B, H, nb, K]}.
  A query block b sees its window ({b-1,b,b+1}; causal {b-2,b-1,b}) UNION its picks (a pick inside the window counts
  once), and causal attention never sees a key after the query's own position. Consequence for the official warm-up:
  the official decoder lets blocks 0-4 see all of blocks 0..b; here that is expressed by picks, i.e. rows 0-4 of
  "d_causal" must list the blocks < b-2 (`official_transformer.official_guides` fills them). guide_blocks' "fixed" mode
  does this by itself: a causal row b has at most b-2 eligible blocks, so rows 0..k+2 list all of them and those
  blocks attend densely-causally (rows 0-2 have nothing to pick and see their window, which is everything before them).
- Decoder [start]: its key/value is visible to every decoder query; its own query attends only to itself in causal
  self-attention and densely to all encoder tokens in cross-attention (in both modes, as official).
- Incremental decoding (`encode` once, then `decode_step` over a `DecodeCache`): runs shorter than a block (the
  sampler's token steps) attend through per-block key/value buffers gathered once when the run enters a block
  (`asset_dist.attention.decode`); longer runs (known chunks, whole-block re-runs) use the block kernel
  (`block_fn`). Both equal `forward` (tests/test_transformer.py, tests/test_infer_sampler.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from asset_dist import attention as A
from asset_dist.attention import decode as AD
from asset_dist.config import TransformerConfig

Guides = dict[str, torch.Tensor]
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GUIDE_KEYS = ("e_self", "d_causal", "d_cross")


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, L, D = x.shape
    return x.view(B, L, n_heads, D // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the probabilities (before dropout): the guide's maps. Causal = lower
    triangle over equal query/key lengths."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = s.softmax(-1)
    return F.dropout(p, dropout_p) @ v if dropout_p > 0 else p @ v, p


def _parse_peg(items: Sequence[str], n_enc: int, n_dec: int) -> tuple[set[int], set[int]]:
    enc, dec = set(), set()
    for item in items:
        side, _, which = item.partition("_")
        n, target = {"E": (n_enc, enc), "D": (n_dec, dec)}.get(side, (0, None))
        if target is None or not (which == "all" or (which.isdigit() and int(which) < n)):
            raise ValueError(f"transformer.peg: bad entry {item!r} (expected E_all, E_<i>, D_all or D_<i>)")
        target.update(range(n) if which == "all" else {int(which)})
    return enc, dec


# --------------------------------------------------------------------------------------------------------------
# Layers


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict). 2-64 rows on the CPU without autograd (decode token steps)
    run as one batched GEMM of the rows against 256-row slices of the weight: MKL's sgemm on the whole weight
    was measured 20-35% slower for 4-32 rows (BENCHMARKS.md "Editing"; one row is a GEMV either way). Same
    result up to float rounding (another summation blocking)."""

    SLICE = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, i = self.out_features, self.in_features
        rows = x.numel() // i
        if not (2 <= rows <= 64 and o % self.SLICE == 0 and o > self.SLICE and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            return super().forward(x)
        n = o // self.SLICE
        w = self.weight.view(n, self.SLICE, i).transpose(1, 2)
        xs = x.reshape(rows, i).expand(n, rows, i)
        y = torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias.view(n, 1, self.SLICE), xs, w)
        return y.transpose(0, 1).reshape(*x.shape[:-1], o)


class PEG(nn.Module):
    """Depthwise conv over each block's own token patch; zero padding at the block border, so blocks never mix."""

    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.proj = nn.Conv2d(d, d, kernel, padding=kernel // 2, groups=d)

    def forward(self, x: torch.Tensor, block_hw: tuple[int, int]) -> torch.Tensor:
        B, L, D = x.shape
        th, tw = block_hw
        y = x.reshape(B * (L // (th * tw)), th, tw, D).permute(0, 3, 1, 2)
        return self.proj(y).permute(0, 2, 3, 1).reshape(B, L, D)


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(d, 3 * d)
        self.out = Linear(d, d)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        return _heads(q, self.n_heads), _heads(k, self.n_heads), _heads(v, self.n_heads)


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = Linear(d, d)
        self.kv = Linear(d, 2 * d)
        self.out = Linear(d, d)

    def project_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(mem).chunk(2, -1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1 = Linear(d, ffn)
        self.fc2 = Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, as BART


class EncoderLayer(nn.Module):
    """Post-norm: [PEG add] -> self-attention -> +res -> LN -> FFN -> +res -> LN."""

    def __init__(self, cfg: TransformerConfig, peg: bool):
        super().__init__()
        d = cfg.d_model
        self.peg = PEG(d, cfg.peg_kernel) if peg else None
        self.attn = SelfAttention(d, cfg.n_heads)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, core: Core, block_hw: tuple[int, int]) -> torch.Tensor:
        if self.peg is not None:
            x = x + self.peg(x, block_hw)
        x = self.ln1(x + self.drop(self.attn.out(_merge(core(*self.attn.project(x))))))
        return self.ln2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm: [PEG term add] -> causal self-attn -> +res -> LN -> cross-attn -> +res -> LN -> FFN -> +res -> LN.
    The PEG conv here is applied to the final encoder output (by the model), never to decoder states."""

    def __init__(self, cfg: TransformerConfig, peg: bool):
        super().__init__()
        d = cfg.d_model
        self.peg = PEG(d, cfg.peg_kernel) if peg else None
        self.self_attn = SelfAttention(d, cfg.n_heads)
        self.ln1 = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(d, cfg.n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.ln3 = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y: torch.Tensor, mem: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                self_core: Core, cross_core: Core, peg_term: Optional[torch.Tensor] = None) -> torch.Tensor:
        if peg_term is not None:
            y = y + peg_term
        y = self.ln1(y + self.drop(self.self_attn.out(_merge(self_core(*self.self_attn.project(y))))))
        ck, cv = mem if isinstance(mem, tuple) else self.cross_attn.project_kv(mem)
        q = _heads(self.cross_attn.q(y), self.cross_attn.n_heads)
        y = self.ln2(y + self.drop(self.cross_attn.out(_merge(cross_core(q, ck, cv)))))
        return self.ln3(y + self.drop(self.ffn(y)))


# --------------------------------------------------------------------------------------------------------------
# State for incremental decoding


@dataclass(frozen=True)
class Layout:
    """Token geometry of one resolution: raster<->strip permutations and strip-order block ids."""

    h: int
    w: int
    nt: int  # tokens per block
    block_hw: tuple[int, int]
    perm: torch.Tensor  # x_strip = x_raster[..., perm]
    inv: torch.Tensor  # x_raster = x_strip[..., inv]
    blocks: torch.Tensor  # block id of each strip position

    @property
    def L(self) -> int:
        return self.h * self.w


@dataclass
class EncoderState:
    """What `decode_step` needs from the encoder; computed once per image by `encode`."""

    layout: Layout
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


# --------------------------------------------------------------------------------------------------------------
# Model


class AssetTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, V = cfg.d_model, cfg.vocab_size
        self.n_heads = cfg.n_heads
        self.vocab_size = V
        self.mask_id, self.start_id = V, V + 1
        self.grid = (int(cfg.block_grid[0]), int(cfg.block_grid[1]))
        self.n_blocks = self.grid[0] * self.grid[1]
        if d % cfg.n_heads:
            raise ValueError(f"transformer.d_model {d} is not divisible by n_heads {cfg.n_heads}")
        self.tok_embed = nn.Embedding(V + 2, d)  # image codes, [mask] = V, [start] = V + 1 (encoder and decoder)
        self.cond_embed = nn.Embedding(cfg.cond_vocab_size, d)  # semantic tokens (encoder only)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings + 1, d)  # only the last row ([start]) is used
        self.block_embed = nn.Embedding(self.n_blocks, d)  # coarse absolute position: block id in the grid
        self.enc_ln = nn.LayerNorm(d)
        self.dec_ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        enc_peg, dec_peg = _parse_peg(cfg.peg, cfg.encoder_layers, cfg.decoder_layers)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, i in enc_peg) for i in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, i in dec_peg) for i in range(cfg.decoder_layers))
        self.lm_head = Linear(d, V, bias=False)
        self.use_checkpoint = False  # activation checkpointing per layer (set by the trainer)
        # SGA kernel: None -> asset_dist.attention.sga_attention (union semantics); fidelity checks swap in
        # official_transformer.official_sga_attention (the official concatenation semantics, dense, small L only)
        self.sga_fn: Optional[Callable[..., torch.Tensor]] = None
        # decode_step's counterpart of sga_fn for runs of a block or more (shorter runs: token steps)
        self.block_fn: Callable[..., torch.Tensor] = AD.block_attention
        if cfg.sga_semantics == "official":  # imported official weights: asset_dist/attention/official.py
            from asset_dist.attention.official import official_block_attention, official_sga_attention
            self.sga_fn, self.block_fn = official_sga_attention, official_block_attention
        self._layouts: dict[tuple, Layout] = {}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        # PEG convs keep PyTorch's default init (as official); LayerNorms are (1, 0)

    # ---------------------------------------------------------------------------------------------------- layout

    def layout(self, L: int, hw: Optional[tuple[int, int]] = None, device: Optional[torch.device] = None) -> Layout:
        if hw is None:
            t = math.isqrt(L)
            if t * t != L:
                raise ValueError(f"sequence length {L} is not square; pass hw=(h, w)")
            hw = (t, t)
        h, w = int(hw[0]), int(hw[1])
        gh, gw = self.grid
        if h * w != L or h % gh or w % gw:
            raise ValueError(f"token grid {h}x{w} (L={L}) must hold L tokens and divide into the {gh}x{gw} block grid")
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (h, w, device)
        if key not in self._layouts:
            perm = A.strip_order(h, w, self.grid).to(device)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(L, device=device)
            blocks = A.block_ids(h, w, self.grid).to(device)[perm]
            th, tw = h // gh, w // gw
            self._layouts[key] = Layout(h, w, th * tw, (th, tw), perm, inv, blocks)
        return self._layouts[key]

    def to_strip(self, x: torch.Tensor, hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """[B, L, ...] raster -> strip order (dim 1)."""
        return x[:, self.layout(x.shape[1], hw, x.device).perm]

    def to_raster(self, x: torch.Tensor, hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """[B, L, ...] strip -> raster order (dim 1), e.g. logits from `forward`: out[:, r] predicts raster token r."""
        return x[:, self.layout(x.shape[1], hw, x.device).inv]

    # ---------------------------------------------------------------------------------------------------- pieces

    def _attn_p(self) -> float:
        return self.cfg.attention_dropout if self.training else 0.0

    def _sga(self, q, k, v, guide, causal, prefix_k=None, prefix_v=None) -> torch.Tensor:
        if self._attn_p() > 0:
            raise ValueError("SGA attention has no attention dropout; set transformer.attention_dropout=0")
        fn = self.sga_fn or A.sga_attention
        return fn(q, k, v, guide, self.grid, causal=causal, prefix_k=prefix_k, prefix_v=prefix_v,
                  impl=self.cfg.attention_impl)

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _check_guides(self, guides: Guides, B: int) -> None:
        want = {"e_self": len(self.encoder), "d_causal": len(self.decoder), "d_cross": len(self.decoder)}
        for key, n in want.items():
            g = guides.get(key)
            if g is None:
                raise ValueError(f"guides: missing '{key}' (need {', '.join(GUIDE_KEYS)})")
            if g.dim() != 5 or g.shape[0] != n or g.shape[1] not in (1, B) or g.shape[2] != self.n_heads \
                    or g.shape[3] != self.n_blocks:
                raise ValueError(f"guides['{key}']: shape {tuple(g.shape)}, expected "
                                 f"[{n}, {B}, {self.n_heads}, {self.n_blocks}, K]")
            if g.is_floating_point() or (g.numel() and (int(g.min()) < -1 or int(g.max()) >= self.n_blocks)):
                raise ValueError(f"guides['{key}']: must be integer block ids in [-1, {self.n_blocks})")

    def _embed_encoder(self, image_s, cond_s, hole_s, lay: Layout) -> torch.Tensor:
        ids = torch.where(hole_s, torch.full_like(image_s, self.mask_id), image_s)  # the hole is [mask]
        x = self.tok_embed(ids) + self.cond_embed(cond_s) + self.block_embed(lay.blocks)
        return self.drop(self.enc_ln(x))

    def _embed_decoder(self, ids: torch.Tensor, pos: torch.Tensor, lay: Layout) -> torch.Tensor:
        """ids [B, n] at decoder positions pos [n]; position 0 is always [start] (its id is ignored)."""
        is_start = (pos == 0).view(1, -1, 1)
        tok = self.tok_embed(torch.where(pos.view(1, -1) == 0, self.start_id, ids))
        where = self.block_embed(lay.blocks[(pos - 1).clamp(min=0)])
        start = self.pos_embed.weight[-1]
        return self.drop(self.dec_ln(tok + torch.where(is_start, start, where)))

    def _peg_terms(self, enc: torch.Tensor, lay: Layout) -> list[Optional[torch.Tensor]]:
        return [None if layer.peg is None else layer.peg(enc, lay.block_hw) for layer in self.decoder]

    # ---------------------------------------------------------------------------------------------------- cores

    def _enc_core(self, guide: Optional[torch.Tensor], maps: Optional[list]) -> Core:
        if guide is not None:
            return lambda q, k, v: self._sga(q, k, v, guide, causal=False)
        if maps is not None:
            def core(q, k, v):
                o, p = explicit_attention(q, k, v, False, self._attn_p())
                maps.append(p)
                return o
            return core
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=self._attn_p())

    def _dec_self_core(self, guide: Optional[torch.Tensor], maps: Optional[list]) -> Core:
        if guide is not None:
            def core(q, k, v):
                body = self._sga(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], guide, causal=True,
                                 prefix_k=k[:, :, :1], prefix_v=v[:, :, :1])
                return torch.cat([v[:, :, :1], body], 2)  # [start] attends only to itself
            return core
        if maps is not None:
            def core(q, k, v):
                o, p = explicit_attention(q, k, v, True, self._attn_p())
                maps.append(p[:, :, 1:, 1:])
                return o
            return core
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=self._attn_p(), is_causal=True)

    def _dec_cross_core(self, guide: Optional[torch.Tensor], maps: Optional[list]) -> Core:
        if guide is not None:
            def core(q, k, v):
                start = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # [start] sees every encoder token
                return torch.cat([start, self._sga(q[:, :, 1:], k, v, guide, causal=False)], 2)
            return core
        if maps is not None:
            def core(q, k, v):
                o, p = explicit_attention(q, k, v, False, self._attn_p())
                maps.append(p[:, :, 1:])
                return o
            return core
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=self._attn_p())

    # ---------------------------------------------------------------------------------------------------- forward

    def _encode(self, image_s, cond_s, hole_s, lay: Layout, guides: Optional[Guides], maps=None) -> torch.Tensor:
        x = self._embed_encoder(image_s, cond_s, hole_s, lay)
        for i, layer in enumerate(self.encoder):
            core = self._enc_core(None if guides is None else guides["e_self"][i], maps)
            x = self._run(layer, x, core, lay.block_hw)
        return x

    def _inputs(self, image_ids, cond_ids, hole, guides, hw):
        if image_ids.shape != cond_ids.shape or image_ids.shape != hole.shape or image_ids.dim() != 2:
            raise ValueError(f"image_ids {tuple(image_ids.shape)}, cond_ids {tuple(cond_ids.shape)} and hole "
                             f"{tuple(hole.shape)} must all be [B, L]")
        lay = self.layout(image_ids.shape[1], hw, image_ids.device)
        if guides is not None:
            self._check_guides(guides, image_ids.shape[0])
        return lay, image_ids[:, lay.perm], cond_ids[:, lay.perm], hole[:, lay.perm].bool()

    def forward(self, image_ids: torch.Tensor, cond_ids: torch.Tensor, hole: torch.Tensor,
                guides: Optional[Guides] = None, return_attn: bool = False,
                hw: Optional[tuple[int, int]] = None):
        """Teacher-forced pass. image_ids/cond_ids/hole: [B, L] raster. guides: None (dense) or the SGA dict.
        Returns logits [B, L, V] in strip order (logits[:, p] predicts strip token p); with return_attn also
        {"e_self": [n_enc, B, H, L, L], "d_causal": [n_dec, B, H, L, L] (no [start] row/col),
        "d_cross": [n_dec, B, H, L, L] (no [start] row)}: dense softmax probabilities in strip order."""
        lay, image_s, cond_s, hole_s = self._inputs(image_ids, cond_ids, hole, guides, hw)
        if return_attn and guides is not None:
            raise ValueError("return_attn needs the dense path (guides=None)")
        maps = {k: [] for k in GUIDE_KEYS} if return_attn else None
        enc = self._encode(image_s, cond_s, hole_s, lay, guides, maps and maps["e_self"])
        L = lay.L
        pos = torch.arange(L + 1, device=image_ids.device)
        y = self._embed_decoder(F.pad(image_s, (1, 0)), pos, lay)
        pegs = self._peg_terms(enc, lay)
        for i, layer in enumerate(self.decoder):
            g_self = None if guides is None else guides["d_causal"][i]
            g_cross = None if guides is None else guides["d_cross"][i]
            peg = None if pegs[i] is None else F.pad(pegs[i], (0, 0, 1, 0))  # nothing added to [start]
            y = self._run(layer, y, enc, self._dec_self_core(g_self, maps and maps["d_causal"]),
                          self._dec_cross_core(g_cross, maps and maps["d_cross"]), peg)
        logits = self.lm_head(y[:, :L])
        if return_attn:
            return logits, {k: torch.stack(v) for k, v in maps.items()}
        return logits

    def loss(self, logits: torch.Tensor, image_ids: torch.Tensor, hole: torch.Tensor,
             hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Cross-entropy over the hole tokens only, pooled over the whole batch (as official). logits: `forward`'s
        strip-order output; image_ids/hole: [B, L] raster."""
        lay = self.layout(image_ids.shape[1], hw, image_ids.device)
        target, sel = image_ids[:, lay.perm], hole[:, lay.perm].bool()
        if not sel.any():
            return logits.sum() * 0.0  # no hole: zero loss that still has a graph
        return F.cross_entropy(logits[sel].float(), target[sel])

    # ---------------------------------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def encode(self, image_ids: torch.Tensor, cond_ids: torch.Tensor, hole: torch.Tensor,
               guides: Optional[Guides] = None, hw: Optional[tuple[int, int]] = None) -> EncoderState:
        """Run the encoder once and precompute, per decoder layer, the cross-attention keys/values, PEG term and
        SGA token-step tables."""
        lay, image_s, cond_s, hole_s = self._inputs(image_ids, cond_ids, hole, guides, hw)
        enc = self._encode(image_s, cond_s, hole_s, lay, guides)
        mem = [layer.cross_attn.project_kv(enc) for layer in self.decoder]
        state = EncoderState(lay, enc, mem, self._peg_terms(enc, lay), guides)
        self._tables(state)
        return state

    def new_cache(self) -> DecodeCache:
        n = len(self.decoder)
        return DecodeCache([None] * n, [None] * n, 0, [None] * n, [None] * n, None)

    def _tables(self, state: EncoderState) -> Optional[dict[str, list[AD.StepTable]]]:
        """The state's token-step tables (once per image: not per token and layer)."""
        if state.guides is not None and state.tables is None:
            sem = self.cfg.sga_semantics
            state.tables = {
                "self": [AD.step_table(g.to(state.enc.device), self.n_blocks, True, sem)
                         for g in state.guides["d_causal"]],
                "cross": [AD.step_table(g.to(state.enc.device), self.n_blocks, False, sem)
                          for g in state.guides["d_cross"]]}
        return state.tables

    def _token_steps(self, state: EncoderState, s: int, n: int) -> bool:
        """Whether the run s..s+n-1 goes through the per-block buffers (SGA, shorter than a block)."""
        nt = state.layout.nt
        if state.guides is None or n >= nt:
            return False
        tables = self._tables(state)
        b0, b1 = max(s - 1, 0) // nt, (s + n - 2) // nt  # query blocks of the run's tokens
        return b0 == b1 or not any(t.spill[b0] for t in tables["self"])

    @torch.no_grad()
    def decode_step(self, state: EncoderState, cache: DecodeCache, new_token_ids: torch.Tensor,
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
        steps = self._token_steps(state, s, n)
        self._sync_buffers(state, cache, s, steps)
        pos = torch.arange(s, s + n, device=new_token_ids.device)
        y = self._embed_decoder(new_token_ids, pos, lay)
        tok = (pos - 1).clamp(min=0)
        for i, layer in enumerate(self.decoder):
            peg = None
            if state.peg[i] is not None:
                peg = state.peg[i][:, tok] * (pos > 0).view(1, -1, 1).to(y.dtype)
            if steps:
                cores = self._token_self_core(state, cache, i, s, n), self._token_cross_core(state, cache, i, s, n)
            else:
                cores = self._step_self_core(state, cache, i, pos), self._step_cross_core(state, i, pos)
            y = layer(y, state.mem[i], *cores, peg)
        cache.length = s + n
        return self.lm_head(y)

    @staticmethod
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

    @staticmethod
    def _write_cache(cache: DecodeCache, i: int, k: torch.Tensor, v: torch.Tensor, s: int, L: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if cache.k[i] is None:
            B, H, _, d = k.shape
            cache.k[i] = k.new_zeros(B, H, L + 1, d)  # zeros: masked keys are read, never NaN
            cache.v[i] = v.new_zeros(B, H, L + 1, d)
        cache.k[i][:, :, s:s + k.shape[2]] = k
        cache.v[i][:, :, s:s + v.shape[2]] = v
        return cache.k[i], cache.v[i]

    @staticmethod
    def _segments(s: int, n: int, nt: int) -> list[tuple[int, int, int]]:
        """(b, r0, r1): rows r0..r1-1 of the run s..s+n-1 (past [start]) hold the queries of query block b."""
        out, r = [], (1 if s == 0 else 0)
        while r < n:
            b = (s + r - 1) // nt
            end = min(n, (b + 1) * nt + 1 - s)
            out.append((b, r, end))
            r = end
        return out

    def _token_self_core(self, state: EncoderState, cache: DecodeCache, i: int, s: int, n: int) -> Core:
        nt, L = state.layout.nt, state.layout.L
        table = state.tables["self"][i]
        last = s + n - 2  # the run's last query token

        def core(q, k, v):
            K, V = self._write_cache(cache, i, k, v, s, L)
            outs = [V[:, :, :1]] if s == 0 else []  # [start] attends only to itself
            for b, r0, r1 in self._segments(s, n, nt):
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

    def _token_cross_core(self, state: EncoderState, cache: DecodeCache, i: int, s: int, n: int) -> Core:
        nt = state.layout.nt
        table = state.tables["cross"][i]

        def core(q, k, v):
            outs = [F.scaled_dot_product_attention(q[:, :, :1], k, v)] if s == 0 else []  # [start]: every token
            for b, r0, r1 in self._segments(s, n, nt):
                buf = cache.cross_kv[i]
                if buf is None or buf.block != b:
                    buf = cache.cross_kv[i] = AD.gather_block_kv(k, v, table, b, nt)
                outs.append(AD.block_kv_attention(q[:, :, r0:r1], buf, nt))
            return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        return core

    def _step_self_core(self, state: EncoderState, cache: DecodeCache, i: int, pos: torch.Tensor) -> Core:
        """Dense runs, and SGA runs of a block or more (block kernel)."""
        s, e = int(pos[0]), int(pos[-1]) + 1

        def core(q, k, v):
            K, V = self._write_cache(cache, i, k, v, s, state.layout.L)
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
                outs.append(self.block_fn(q[:, :, j:], pos[j:] - 1, K[:, :, 1:], V[:, :, 1:], guide,
                                          state.layout.nt, causal=True, prefix=(K[:, :, :1], V[:, :, :1])))
            return torch.cat(outs, 2)
        return core

    def _step_cross_core(self, state: EncoderState, i: int, pos: torch.Tensor) -> Core:
        def core(q, k, v):
            if state.guides is None:
                return F.scaled_dot_product_attention(q, k, v)
            outs = []
            j = 1 if int(pos[0]) == 0 else 0
            if j:
                outs.append(F.scaled_dot_product_attention(q[:, :, :1], k, v))
            if q.shape[2] > j:
                outs.append(self.block_fn(q[:, :, j:], pos[j:] - 1, k, v, state.guides["d_cross"][i],
                                          state.layout.nt, causal=False))
            return torch.cat(outs, 2)
        return core


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on Linear weights (not embeddings, norms, biases or the PEG convs)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def guides_from_maps(maps: dict[str, torch.Tensor], grid: Sequence[int], k: int = 3, causal_mode: str = "fixed"
                     ) -> Guides:
    """Dense guide maps (forward(..., return_attn=True)) -> SGA guides in the model's 64-row layout."""
    grid = tuple(grid)
    return {"e_self": A.guide_blocks(maps["e_self"], grid, k=k, causal=False),
            "d_causal": A.guide_blocks(maps["d_causal"], grid, k=k, causal=True, mode=causal_mode),
            "d_cross": A.guide_blocks(maps["d_cross"], grid, k=k, causal=False)}

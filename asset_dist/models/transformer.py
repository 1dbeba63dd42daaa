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
  "d_causal" must list the blocks < b-2 (`asset_dist.official.guides.official_guides` fills them). guide_blocks' "fixed" mode
  does this by itself: a causal row b has at most b-2 eligible blocks, so rows 0..k+2 list all of them and those
  blocks attend densely-causally (rows 0-2 have nothing to pick and see their window, which is everything before them).
- Decoder [start]: its key/value is visible to every decoder query; its own query attends only to itself in causal
  self-attention and densely to all encoder tokens in cross-attention (in both modes, as official).
- Checks: `forward` checks shapes (host metadata, no device sync); guide VALUES are checked where guides enter
  from outside (`check_guides`: decoding's `encode`, the picks loaded by the editor), never per training step.
- Sampling (encoder state, key/value cache, decode steps, continuous batching) lives beside this file in
  `models/decoding.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from asset_dist import attention as A
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
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        return _heads(q, self.n_heads), _heads(k, self.n_heads), _heads(v, self.n_heads)


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def project_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(mem).chunk(2, -1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

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
        self.lm_head = nn.Linear(d, V, bias=False)
        self.use_checkpoint = False  # activation checkpointing per layer (set by the trainer)
        # SGA rule (attention/semantics.py): union, or one registered from above (official: imported weights).
        # sga_fn is its whole-sequence kernel; fidelity checks may swap in a dense reference (small L only).
        self.semantics = A.get_semantics(cfg.sga_semantics)
        self.sga_fn: Callable[..., torch.Tensor] = self.semantics.attend
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
        return self.sga_fn(q, k, v, guide, self.grid, causal=causal, prefix_k=prefix_k, prefix_v=prefix_v,
                           impl=self.cfg.attention_impl, validate=False)  # values: checked where guides come in

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _check_guide_shapes(self, guides: Guides, B: int) -> None:
        want = {"e_self": len(self.encoder), "d_causal": len(self.decoder), "d_cross": len(self.decoder)}
        for key, n in want.items():
            g = guides.get(key)
            if g is None:
                raise ValueError(f"guides: missing '{key}' (need {', '.join(GUIDE_KEYS)})")
            if g.dim() != 5 or g.shape[0] != n or g.shape[1] not in (1, B) or g.shape[2] != self.n_heads \
                    or g.shape[3] != self.n_blocks:
                raise ValueError(f"guides['{key}']: shape {tuple(g.shape)}, expected "
                                 f"[{n}, {B}, {self.n_heads}, {self.n_blocks}, K]")
            if g.is_floating_point() or g.dtype == torch.bool:
                raise ValueError(f"guides['{key}']: must be integer block ids in [-1, {self.n_blocks})")

    def check_guides(self, guides: Guides, B: int) -> None:
        """Shapes and values of guides that come from outside (loaded or user-given): ids in [-1, n_blocks).
        Reads the values (a device sync), so it runs where guides enter, not in every forward."""
        self._check_guide_shapes(guides, B)
        for key in GUIDE_KEYS:
            g = guides[key]
            if g.numel() and (int(g.min()) < -1 or int(g.max()) >= self.n_blocks):
                raise ValueError(f"guides['{key}']: must be integer block ids in [-1, {self.n_blocks}) "
                                 f"(got {int(g.min())}..{int(g.max())})")

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
            self._check_guide_shapes(guides, image_ids.shape[0])
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
        # no boolean indexing or `if sel.any()`: both would wait for the device every step. Known tokens are
        # ignored (-100); with no hole at all the loss is 0 and still has a graph.
        target = torch.where(sel, target, torch.full_like(target, -100))
        total = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
        return total / sel.sum().clamp(min=1)

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

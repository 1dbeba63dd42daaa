"""Image VQGAN of ASSET (docs/ASSET_NOTES.md §2): a mask-aware encoder, a plain decoder, a legacy quantizer.

Mask convention everywhere: a pixel mask [B,1,H,W] (or [B,H,W]) with 1 = hole (unknown, to be generated).
With `VQConfig.masked` the encoder uses partial convolutions, region normalisation and masked self-attention,
so every latent whose (nearest-sampled) mask value is 0 is computed from known pixels only: changing hole pixels
changes no token outside the token hole. `mask=None` means "nothing is masked" (an all-zero mask).

Module names follow the official taming/ASSET layout (`encoder.down.0.block.0.norm1.weight`, ...), so an official
`first_stage_model.*` / `cond_stage_model.*` state dict loads after stripping the prefix (see asset_dist/official/vq.py).
Every ResnetBlock / AttnBlock has a `use_checkpoint` attribute (activation checkpointing, use_reentrant=False).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from asset_dist.config import VQConfig
from asset_dist.models.quantize import VectorQuantizer

NUM_GROUPS = 32
NORM_EPS = 1e-6


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a [B,1,H,W] mask: output (i, j) samples input (i*H/h, j*W/w), like F.interpolate."""
    H, W = mask.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (H, W) == (h, w):
        return mask
    if H % h == 0 and W % w == 0:  # exact integer factor: a strided view, no copy
        return mask[..., :: H // h, :: W // w]
    return F.interpolate(mask, size=(h, w), mode="nearest")


def prepare_mask(mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """[B,H,W] or [B,1,H,W], any dtype -> {0,1} [B,1,H,W] in x's float dtype (values > 0.5 are holes)."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask must be [B,1,H,W] or [B,H,W] matching the input {tuple(x.shape)}, "
                         f"got {tuple(mask.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return (mask > 0.5).to(dtype)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


# ----------------------------------------------------------------------------------------------------------
# Mask-aware layers


class PartialConv2d(nn.Conv2d):
    """The official "PartialConv" (docs/ASSET_NOTES.md §2.3): a Conv2d that keeps hole pixels out of known outputs.

    Output position p (its own mask value sampled at the output resolution):
    - p in the hole: the ordinary conv of the input (it may see everything);
    - p known: the conv of input * (1 - mask), i.e. the same weights with hole pixels zeroed. Where the window
      does not touch the hole this equals the ordinary conv (the official code takes it from the ordinary conv;
      the values are the same), where it does it is exactly the official "leaked" branch. No renormalisation.
    Selecting with torch.where on a tensor whose hole pixels are zero makes the invariance exact whatever
    algorithm the conv backend picks. Stride-2 convs pad the input (and the mask) by one pixel on the right and
    bottom themselves (the official `downsample_legacy=False` path). With mask=None this is a plain conv.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pad_br = self.stride[0] == 2
        if mask is None:
            return super().forward(F.pad(x, (0, 1, 0, 1)) if pad_br else x)
        m = resize_mask(mask, x.shape[-2:])
        x_known = x * (1.0 - m)
        if pad_br:
            x, x_known = F.pad(x, (0, 1, 0, 1)), F.pad(x_known, (0, 1, 0, 1))
        out_all = super().forward(x)
        out_known = super().forward(x_known)
        m_out = resize_mask(mask, out_all.shape[-2:])
        return torch.where(m_out > 0, out_all, out_known)


class GroupNorm(nn.GroupNorm):
    """GroupNorm(32, eps 1e-6) that accepts (and ignores) a mask, so blocks call every norm the same way."""

    def __init__(self, num_channels: int, groups: int = NUM_GROUPS):
        super().__init__(groups, num_channels, eps=NORM_EPS, affine=True)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # contiguous: torch's CPU channels-last GroupNorm loses ~1e-3 to cancellation in fp32 (measured)
        return super().forward(x.contiguous())


class RegionNorm(nn.GroupNorm):
    """Region normalisation over 32 groups; known positions are normalised from known positions only.

    mode="official" reproduces the official RNGroupNorm arithmetic exactly (needed to load official weights).
    Per sample and group, with k known pixels, c = C/32 channels per group and N = H*W:
      fill  = sum_{c channels, known pixels} x / k          (c x the true mean: the official bug)
      x'    = x at known pixels, fill at hole pixels
      known output = GroupNorm(x') * sqrt(k / (c*N)) * weight + bias
      hole output  = GroupNorm(x) * weight + bias           (ordinary GroupNorm of the raw input)
    With nothing masked this is GroupNorm(x)/sqrt(c) before the affine step, not GroupNorm(x). The official code
    divides by zero when everything is masked; here k is clamped to 1, so an all-hole input gives GroupNorm(x).

    mode="true" is proper region normalisation: the known pixels of each group are normalised with the mean and
    (biased) variance over the known pixels of that group, the hole pixels with those over the hole pixels, then
    the shared affine step. Nothing masked or everything masked both give GroupNorm(x) (up to rounding); no
    division by zero (counts clamped to 1). Weights trained with one mode do not transfer to the other.
    """

    def __init__(self, num_channels: int, mode: str = "true", groups: int = NUM_GROUPS):
        super().__init__(groups, num_channels, eps=NORM_EPS, affine=True)
        if mode not in ("true", "official"):
            raise ValueError(f"region_norm must be 'true' or 'official', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.contiguous()  # see GroupNorm.forward
        if mask is None and self.mode == "true":
            return super().forward(x)
        in_dtype = x.dtype
        if in_dtype in (torch.float16, torch.bfloat16):  # statistics in fp32, like autocast's group_norm
            x = x.float()
        B, C, H, W = x.shape
        if mask is None:
            mask = x.new_zeros(B, 1, H, W)
        m = resize_mask(mask, (H, W)).to(x.dtype)
        out = self._official(x, m) if self.mode == "official" else self._true(x, m)
        return out.to(in_dtype)

    def _official(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        G, c = self.num_groups, C // self.num_groups
        xg = x.view(B, G, c, H, W)
        m5 = m.unsqueeze(1)  # B,1,1,H,W
        known5 = 1.0 - m5
        k = known5.sum(dim=(2, 3, 4))  # B,1
        fill = (known5 * xg).sum(dim=(2, 3, 4)) / k.clamp_min(1.0)  # B,G: c x mean over known pixels
        filled = known5 * xg + m5 * fill[:, :, None, None, None]
        scale = torch.sqrt(k / (c * H * W))[:, :, None, None]  # B,1,1,1
        known_out = F.group_norm(filled.view(B, C, H, W), G, eps=self.eps) * scale
        known_out = known_out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        hole_out = F.group_norm(x, G, self.weight, self.bias, self.eps)
        return torch.where(m > 0, hole_out, known_out)

    def _true(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        G, c = self.num_groups, C // self.num_groups
        xg = x.view(B, G, c, H * W)
        hole = m.reshape(B, 1, 1, H * W)

        def normalise(wt: torch.Tensor) -> torch.Tensor:
            n = (wt.sum(dim=(2, 3)) * c).clamp_min(1.0)  # B,1 elements in the region (per group)
            mean = (xg * wt).sum(dim=(2, 3)) / n  # B,G; zero-weighted pixels contribute exact zeros
            var = ((xg - mean[..., None, None]).square() * wt).sum(dim=(2, 3)) / n
            return (xg - mean[..., None, None]) * torch.rsqrt(var + self.eps)[..., None, None]

        xn = torch.where(hole > 0, normalise(hole), normalise(1.0 - hole)).view(B, C, H, W)
        return xn * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def make_norm(channels: int, masked: bool, region_norm: str, groups: int = NUM_GROUPS) -> nn.Module:
    return RegionNorm(channels, region_norm, groups) if masked else GroupNorm(channels, groups)


# ----------------------------------------------------------------------------------------------------------
# Blocks


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a 1x1 shortcut if channels change."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, masked: bool = False,
                 region_norm: str = "true", groups: int = NUM_GROUPS):
        super().__init__()
        self.use_checkpoint = False
        self.norm1 = make_norm(in_ch, masked, region_norm, groups)
        self.conv1 = PartialConv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = make_norm(out_ch, masked, region_norm, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = PartialConv2d(out_ch, out_ch, 3, 1, 1)
        # 1x1 conv: no spatial mixing, so it needs no mask handling
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mask, use_reentrant=False)
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x, mask)), mask)
        h = self.conv2(self.dropout(swish(self.norm2(h, mask))), mask)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (1x1 conv q, k, v, proj_out; scale C^-1/2), residual.

    With a mask (encoder, section 2.5): keys at hole positions are removed for known queries; hole queries
    attend to every key. Known queries therefore never read hole features.
    """

    def __init__(self, channels: int, masked: bool = False, region_norm: str = "true", groups: int = NUM_GROUPS):
        super().__init__()
        self.use_checkpoint = False
        self.norm = make_norm(channels, masked, region_norm, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mask, use_reentrant=False)
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm(x, mask)
        B, C, H, W = h.shape
        # [B,C,H,W] -> [B,1,HW,C]: one head of width C
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))
        attn_mask = None
        if mask is not None:
            hole = resize_mask(mask, (H, W)).reshape(B, 1, H * W) > 0
            # True = may attend: the key is known, or the query is in the hole. Never an empty row.
            attn_mask = (~hole).unsqueeze(-2) | hole.unsqueeze(-1)  # B,1,L(query),L(key)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by 1, then 3x3 stride-2 conv (the padding lives inside the mask-aware conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = PartialConv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(x, mask)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def onehot_conv2d(labels: torch.Tensor, conv: nn.Conv2d, impl: str = "bag") -> torch.Tensor:
    """conv(one_hot(labels)) for a long label map [B,H,W], without building the one-hot tensor.

    A conv of a one-hot map is a sum of weight slices: out[:, y, x] = bias + sum_{dy,dx} W[:, label(y+dy,x+dx),
    dy, dx], with zero padding outside the image. "bag" (default): one `embedding_bag` sum over the kh*kw rows
    (tap, label) of a [kh*kw*C (+ kh*kw zero rows for the padding), O] table per pixel; its [B,H,W,O] result is
    returned as a channels-last [B,O,H,W] view. Memory: kh*kw indices per pixel instead of a [B,C,H,W] one-hot
    (182 channels at 1024^2 would be 0.7 GB in fp32 per image); 7-10x faster than "gather" (kh*kw separate
    lookups and adds) and than "dense" (the plain conv of the one-hot map) at 182 classes on CPU (BENCHMARKS.md
    "Frozen tokenizers"). Differentiable w.r.t. W.
    """
    weight = conv.weight
    O, C, kh, kw = weight.shape
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError("onehot_conv2d supports stride 1, dilation 1, groups 1 only")
    if labels.dim() != 3:
        raise ValueError(f"label map must be [B,H,W], got shape {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"label map has ids in [{lo}, {hi}] but the model has {C} classes (0..{C - 1})")
    B, H, W = labels.shape
    if impl == "dense":
        return conv(weight.new_zeros(B, C, H, W).scatter_(1, labels.long().unsqueeze(1), 1.0))
    ph, pw = conv.padding
    idx = F.pad(labels.long(), (pw, pw, ph, ph), value=C)  # C = padding sentinel -> zero row
    if impl == "bag":
        taps = kh * kw
        table = torch.cat([weight.permute(2, 3, 1, 0).reshape(taps * C, O), weight.new_zeros(taps, O)])
        rows = []
        for k in range(taps):
            lab = idx[:, k // kw:k // kw + H, k % kw:k % kw + W]
            rows.append(torch.where(lab == C, taps * C + k, k * C + lab))
        out = F.embedding_bag(torch.stack(rows, -1).view(-1, taps), table, mode="sum").view(B, H, W, O)
        if conv.bias is not None:
            out = out + conv.bias
        return out.permute(0, 3, 1, 2)  # channels-last strides: no copy
    if impl != "gather":
        raise ValueError(f"onehot_conv2d impl must be bag, gather or dense, got {impl!r}")
    zero = weight.new_zeros(1, O)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            table = torch.cat([weight[:, :, dy, dx].t(), zero], dim=0)
            term = F.embedding(idx[:, dy:dy + H, dx:dx + W], table)  # B,H,W,O
            out = term if out is None else out + term
    if conv.bias is not None:
        out = out + conv.bias
    return out.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder


def check_norm_groups(cfg: VQConfig) -> None:
    """The config check (VQConfig.validate) for a VQConfig built in code, which skips load_config."""
    if bad := cfg.widths_off_groups():
        raise ValueError(f"norm_groups={cfg.norm_groups} must divide every channel width of the model "
                         f"(ch x ch_mult = {cfg.widths()}); {bad} do not divide")


def _level_attn(cfg: VQConfig, level: int) -> bool:
    return cfg.resolution // 2 ** level in cfg.attn_resolutions


class Encoder(nn.Module):
    """conv_in -> levels (res blocks [+ attn], stride-2 downsample except last) -> mid -> norm, swish, conv_out.

    `masked=True`: PartialConv2d + RegionNorm + masked attention everywhere (the official PartialConv/RegionNorm
    encoder). `masked=False`: plain convs and GroupNorm (the seg tokenizer); any mask is ignored.
    A long [B,H,W] input is a label map: the first conv runs as `onehot_conv2d` (in_channels = classes).
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.masked and cfg.legacy_downsample:
            raise ValueError("legacy_downsample applies to unmasked encoders only (the official legacy + "
                             "PartialConv combination resizes the mask to the padded size, a bug not reproduced)")
        check_norm_groups(cfg)
        self.masked = cfg.masked
        mk = dict(masked=cfg.masked, region_norm=cfg.region_norm, groups=cfg.norm_groups)
        self.conv_in = PartialConv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            block_in = cfg.ch * in_mult[level]
            block_out = cfg.ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout, **mk))
                block_in = block_out
                if _level_attn(cfg, level):
                    stage.attn.append(AttnBlock(block_in, **mk))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, **mk)
        self.mid.attn_1 = AttnBlock(block_in, **mk)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, **mk)
        self.norm_out = make_norm(block_in, **mk)
        self.conv_out = PartialConv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.is_floating_point():
            mask = prepare_mask(mask, x) if self.masked else None
            h = self.conv_in(x, mask)
        else:  # label map: embedding-style first conv; its outputs are unmasked (seg tokenizer)
            if self.masked and mask is not None:
                raise ValueError("a masked encoder takes float images, not label maps")
            h = onehot_conv2d(x, self.conv_in)
            mask = None
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h, mask)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h, mask)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h, mask)
        h = self.mid.block_1(h, mask)
        h = self.mid.attn_1(h, mask)
        h = self.mid.block_2(h, mask)
        return self.conv_out(swish(self.norm_out(h, mask)), mask)


class Decoder(nn.Module):
    """conv_in -> mid -> levels from coarse to fine (res blocks [+ attn], nearest x2 + conv) -> norm, swish, conv.

    `up[level]` is indexed like the encoder's `down[level]` (0 = finest), as in the official layout.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        check_norm_groups(cfg)
        n_blocks = cfg.decoder_res_blocks if cfg.decoder_res_blocks is not None else cfg.num_res_blocks + 1
        n_levels = len(cfg.ch_mult)
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, groups=g)
        self.mid.attn_1 = AttnBlock(block_in, groups=g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, groups=g)
        stages: list[nn.Module] = [nn.Module() for _ in range(n_levels)]
        for level in reversed(range(n_levels)):
            stage = stages[level]
            block_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(n_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout, groups=g))
                block_in = block_out
                if _level_attn(cfg, level):
                    stage.attn.append(AttnBlock(block_in, groups=g))
            if level != 0:
                stage.upsample = Upsample(block_in)
        self.up = nn.ModuleList(stages)
        self.norm_out = GroupNorm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# The tokenizer


class VQModel(nn.Module):
    """Factor-16 VQ autoencoder (image VQGAN; the seg tokenizer subclasses it in seg_vq.py).

    encode(x, mask)            -> (quant [B,E,h,w] straight-through, quantizer loss, indices [B,h,w] int64)
    encode_to_indices(x, mask) -> indices [B,h,w]
    decode(quant)              -> image [B,out_channels,H,W] (not clamped; the VQGAN's range is about [-1, 1])
    decode_indices(indices)    -> image, from raster-order indices [B,h,w]
    forward(x, mask)           -> (reconstruction, quantizer loss, indices)
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25, legacy=True)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_pre_quant(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The continuous latent quant_conv(encoder(x, mask)) [B,E,h,w]."""
        return self.quant_conv(self.encoder(x, mask))

    def encode(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.quantize(self.encode_pre_quant(x, mask))

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.quantize.nearest(self.encode_pre_quant(x, mask))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3:
            raise ValueError(f"indices must be [B,h,w] (raster order), got shape {tuple(indices.shape)}")
        return self.decode(self.quantize.lookup(indices).to(self.post_quant_conv.weight.dtype))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quant, qloss, indices = self.encode(x, mask)
        return self.decode(quant), qloss, indices

    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight: the adaptive GAN weight differentiates w.r.t. it."""
        return self.decoder.conv_out.weight

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, (ResnetBlock, AttnBlock)):
                m.use_checkpoint = enabled

    @staticmethod
    def token_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The token hole the official code uses: the pixel mask nearest-sampled at each patch's top-left pixel."""
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        return resize_mask((mask > 0.5).float(), grid)[:, 0] > 0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "VQModel", "Encoder", "Decoder", "ResnetBlock", "AttnBlock", "PartialConv2d", "RegionNorm", "GroupNorm",
    "onehot_conv2d", "resize_mask", "prepare_mask", "count_parameters",
]

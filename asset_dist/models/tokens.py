"""Pixels -> token sequences for the transformers: the frozen tokenizers plus the token hole rule.

Shared by the guide/SGA training stages and the edit runner, so training and inference tokenize alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from asset_dist.config import Config
from asset_dist.models.seg_vq import SegVQModel
from asset_dist.models.vqgan import VQModel

FACTOR = 16  # both tokenizers downsample by 16


def token_hole(mask: torch.Tensor, rule: str = "any") -> torch.Tensor:
    """Pixel mask [B,1,H,W] (1 = hole) -> token hole [B, H/16 * W/16] bool, raster order.

    "any": a token is unknown when any pixel of its 16x16 patch is masked (docs/ASSET_NOTES.md §10.2: the
    official rule leaves partly covered tokens "known", yet their pixels get replaced by the blend).
    "nearest": the official rule, the patch's top-left pixel decides.
    """
    m = (mask > 0.5).float()
    if rule == "any":
        t = F.max_pool2d(m, FACTOR)
    elif rule == "nearest":
        t = m[:, :, ::FACTOR, ::FACTOR]
    else:
        raise ValueError(f"token hole rule must be 'any' or 'nearest', got {rule!r}")
    return t.flatten(1) > 0


def aligned_pixel_mask(hole: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Token hole [B, L] -> the pixel mask [B,1,H,W] the encoder should see (every pixel of a hole token)."""
    t = hole.view(hole.shape[0], 1, h // FACTOR, w // FACTOR).float()
    return t.repeat_interleave(FACTOR, 2).repeat_interleave(FACTOR, 3)


def load_weights(module: nn.Module, path: str, stage: str | tuple[str, ...]) -> dict:
    """Load an asset_dist export into `module`, strictly; `stage` names the stage(s) it may come from."""
    from asset_dist.artifacts import read_export

    stages = (stage,) if isinstance(stage, str) else stage
    if not path:
        raise ValueError(f"no weights file given for the {stages[0]} model (set train.{stages[0]}_weights)")
    rec = read_export(path)
    if rec["stage"] not in stages:
        raise ValueError(f"{path}: exported by stage '{rec['stage']}', expected {' or '.join(stages)}")
    missing, unexpected = module.load_state_dict(rec["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the configured {stage} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (do the model sizes in the config match the export's?)")
    return rec


class Tokenizers(nn.Module):
    """The frozen image VQGAN and seg tokenizer, loaded from their exports."""

    def __init__(self, cfg: Config, vqgan_path: Optional[str] = None, seg_path: Optional[str] = None,
                 load: bool = True):
        super().__init__()
        self.vqgan = VQModel(cfg.model.vqgan)
        self.seg = SegVQModel(cfg.model.seg)
        self.rule = cfg.model.token_hole
        if load:
            load_weights(self.vqgan, vqgan_path if vqgan_path is not None else cfg.train.vqgan_weights, "vqgan")
            load_weights(self.seg, seg_path if seg_path is not None else cfg.train.seg_weights, "seg")
        self.requires_grad_(False)
        self.eval()
        # Channels-last convs: ~1.5x faster frozen tokenizing on CPU (oneDNN) and on GPU with bf16 (cuDNN); the
        # tokenizers run in every transformer step, where on CPU they cost several times the transformer.
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "Tokenizers":
        return super().train(False)  # pinned to eval, as the paper's frozen VQ models

    @torch.no_grad()
    def forward(self, image: torch.Tensor, seg: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image [B,3,H,W] in [-1,1], seg [B,H,W] long, mask [B,1,H,W] -> (image ids, seg ids, hole), each
        [B, L] raster order. The encoder sees the token-aligned mask, so no known token depends on a
        hole pixel."""
        h, w = image.shape[-2:]
        if h % FACTOR or w % FACTOR:
            raise ValueError(f"image size {h}x{w} is not a multiple of {FACTOR}")
        hole = token_hole(mask, self.rule)
        pix = aligned_pixel_mask(hole, h, w).to(image.dtype) if self.rule == "any" else mask.to(image.dtype)
        image = image.contiguous(memory_format=torch.channels_last)
        ids = self.vqgan.encode_to_indices(image, pix).flatten(1)
        cond = self.seg.encode_to_indices(seg).flatten(1)
        return ids, cond, hole

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Raster ids [B, L] -> image [B,3,h,w] in [-1, 1]."""
        return self.vqgan.decode_indices(ids.view(ids.shape[0], h // FACTOR, w // FACTOR)).clamp(-1, 1)


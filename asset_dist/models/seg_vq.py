"""Semantic-map tokenizer (docs/ASSET_NOTES.md §3): a VQ autoencoder over one-hot label maps.

Same encoder/decoder as the image VQGAN with in/out channels = number of classes (182 landscape; 183 COCO with
0 = unlabeled), but plain convs, GroupNorm and the pad-then-conv downsample; codebook 1024 x 256, factor 16.
Inputs are either a long label map [B,H,W] (the first conv then runs as a gather of conv-weight slices, no
one-hot tensor is built; see vqgan.onehot_conv2d) or a float one-hot map [B,C,H,W]. The decoder returns
per-class logits [B,C,H,W].
"""
from __future__ import annotations

from typing import Optional

import torch

from asset_dist.config import VQConfig
from asset_dist.models.vqgan import VQModel


def seg_config(num_classes: int, **overrides) -> VQConfig:
    """The paper's seg tokenizer config for `num_classes` labels (overrides for tiny test models)."""
    kw = dict(in_channels=num_classes, out_channels=num_classes, masked=False, legacy_downsample=True)
    kw.update(overrides)
    return VQConfig(**kw)


class SegVQModel(VQModel):
    """VQModel over label maps. encode/encode_to_indices take labels [B,H,W] (long) or one-hot [B,C,H,W];
    decode/decode_indices return logits [B,C,H,W]; `predict_labels(logits)` gives the argmax map."""

    def __init__(self, cfg: VQConfig):
        if cfg.masked:
            raise ValueError("the seg tokenizer uses plain convs: set masked=False in its VQConfig")
        if cfg.in_channels != cfg.out_channels:
            raise ValueError(f"seg tokenizer needs in_channels == out_channels (classes), got "
                             f"{cfg.in_channels} vs {cfg.out_channels}")
        super().__init__(cfg)
        self.num_classes = cfg.in_channels

    def encode_pre_quant(self, seg: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if seg.is_floating_point() and seg.shape[1] != self.num_classes:
            raise ValueError(f"one-hot seg must have {self.num_classes} channels, got shape {tuple(seg.shape)}")
        return self.quant_conv(self.encoder(seg))

    @staticmethod
    def predict_labels(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

"""Turning tensors into pictures for logs and galleries."""
from __future__ import annotations

import torch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1] float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def palette(n: int) -> torch.Tensor:
    """A fixed, well-spread colour per label id: [n, 3] in [0, 1]."""
    g = torch.Generator().manual_seed(12345)
    return torch.rand(n, 3, generator=g) * 0.85 + 0.1


def colorize_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, W] label ids -> [B, 3, H, W] colours in [0, 1]."""
    pal = palette(max(n, int(labels.max()) + 1)).to(labels.device)
    return pal[labels.long()].permute(0, 3, 1, 2)

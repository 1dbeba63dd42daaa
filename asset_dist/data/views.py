"""One sample -> aligned multi-resolution views (ASSET_FACTS.md 6.1).

Short side -> `short_side` (area interpolation for images, nearest for labels), a square crop of
`resolution` (random for training, centre for validation), and the same crop at `guide_resolution`
(area for the image, nearest for labels and masks). Nearest resizes are done by index arithmetic, so
label values are exact.

Speed: the image is resized straight into the crop window (PIL's `box=`), which is the same as resizing
the whole image and cropping, without computing the pixels that would be thrown away.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
from PIL import Image

from asset_dist.config import MaskConfig
from asset_dist.data.masks import nearest_index, resize_nearest, sample_mask


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample generator from (seed, epoch, key): independent of ranks, workers and read order."""
    k = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, k])


def mask_resolution(cfg: MaskConfig, resolution: int) -> int:
    """Masks are sampled at min(resolution, 512) unless set: the paper samples at 512 for the 1024 stage."""
    return cfg.sample_resolution or min(resolution, 512)


def to_image_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def crop_views(image: Image.Image, seg: np.ndarray, resolution: int, guide_resolution: int,
               mask_cfg: Optional[MaskConfig], rng: np.random.Generator, train: bool, *,
               short_side: int = 0, mask: Optional[np.ndarray] = None) -> dict:
    """`make_views` as uint8 arrays (HWC images, HW labels and masks): the loader turns a whole batch into
    tensors at once, which is cheaper than per sample."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    r, g = resolution, guide_resolution
    s = short_side or r
    if s < r:
        raise ValueError(f"short side {s} is smaller than the crop {r}")
    scale = s / min(w, h)
    nw, nh = max(r, int(round(w * scale))), max(r, int(round(h * scale)))
    if train:
        x0, y0 = int(rng.integers(nw - r + 1)), int(rng.integers(nh - r + 1))
    else:
        x0, y0 = (nw - r) // 2, (nh - r) // 2
    sx, sy = w / nw, h / nh  # source pixels per resized pixel
    # Area (box) filter when shrinking; bilinear when enlarging, as cv2.INTER_AREA does.
    resample = Image.BOX if scale <= 1.0 else Image.BILINEAR
    crop = image.resize((r, r), resample, box=(x0 * sx, y0 * sy, (x0 + r) * sx, (y0 + r) * sy))
    crop_lr = crop.resize((g, g), Image.BOX) if g != r else crop

    seg = np.asarray(seg)
    rows_of = lambda n: nearest_index(r, n, y0, nh)  # noqa: E731 - crop rows in an n-row source
    cols_of = lambda n: nearest_index(r, n, x0, nw)  # noqa: E731
    seg_c = seg[rows_of(seg.shape[0])][:, cols_of(seg.shape[1])]  # rows, then columns: faster than np.ix_
    if mask is not None:
        m = np.asarray(mask)
        m = (m[rows_of(m.shape[0])][:, cols_of(m.shape[1])] != 0).astype(np.uint8)
    elif mask_cfg is not None:
        ms = mask_resolution(mask_cfg, r)
        m = resize_nearest(sample_mask(resize_nearest(seg_c, ms, ms), mask_cfg, rng, ms), r, r)
    else:
        m = np.zeros((r, r), dtype=np.uint8)
    return {"image": np.array(crop), "seg": seg_c, "mask": m, "image_lr": np.array(crop_lr),
            "seg_lr": resize_nearest(seg_c, g, g), "mask_lr": resize_nearest(m, g, g), "upscaled": scale > 1.0}


def make_views(image: Image.Image, seg: np.ndarray, resolution: int, guide_resolution: int,
               mask_cfg: Optional[MaskConfig], rng: np.random.Generator, train: bool, *,
               short_side: int = 0, mask: Optional[np.ndarray] = None) -> dict:
    """Crop and resize one (image, label map[, mask]) into the training views.

    Returns image (3,R,R) float [-1,1], seg (R,R) long, mask (1,R,R) float {0,1} (1 = hole), the same three
    at guide_resolution G as image_lr / seg_lr / mask_lr, and `upscaled` (bool: the image was smaller than
    the short side). A label map (or given mask) of another size than the image is nearest-resized to it.
    The mask is `mask` if given (non-zero = hole), else sampled with `mask_cfg` on the crop's label map,
    else all zeros. `rng` draws the crop offset, then the mask.
    """
    v = crop_views(image, seg, resolution, guide_resolution, mask_cfg, rng, train, short_side=short_side, mask=mask)
    return {
        "image": to_image_tensor(np.array(v["image"])),  # np.array: PIL's buffer is read-only
        "seg": torch.from_numpy(v["seg"].astype(np.int64)),
        "mask": torch.from_numpy(v["mask"].astype(np.float32))[None],
        "image_lr": to_image_tensor(np.array(v["image_lr"])),
        "seg_lr": torch.from_numpy(v["seg_lr"].astype(np.int64)),
        "mask_lr": torch.from_numpy(v["mask_lr"].astype(np.float32))[None],
        "upscaled": v["upscaled"],
    }

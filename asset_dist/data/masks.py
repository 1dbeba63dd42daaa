"""The paper's training-mask sampler (ASSET_FACTS.md 6.2): holes follow semantic segments, not strokes.

1. a uniformly random pixel picks a label; 2. a random pixel of that label picks one of its 8-connected
components (so a component's chance is proportional to its area); 3. the component is dilated by a 5x5
kernel 2/4/8 times at 256/512/1024 (COCO: with probability 1/2 its bounding box instead, grown by
max(1, round(side/100)) px per axis); 4. if the hole covers >= max_ratio of the image, a random half
(top/bottom/left/right) is cleared; 5. if the hole vanishes when nearest-sampled on the 16x16 token grid,
it is replaced by a random half-image hole.

Differences from the official code, on purpose: the COCO sampler uses cfg.max_ratio (the official one
hard-codes 0.6; set 0.6 in COCO configs), and the bounding box is not shifted by +1 px.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from asset_dist.config import MaskConfig

_EIGHT = np.ones((3, 3), dtype=bool)
TOKEN_GRID = 16  # the guide's token grid; a hole must survive nearest sampling onto it


def dilation_iterations(resolution: int) -> int:
    """5x5 dilation count of the official sampler: 2 / 4 / 8 at 256 / 512 / 1024 (linear in between)."""
    return max(1, int(round(2 * resolution / 256)))


def nearest_index(out_len: int, in_len: int, offset: int = 0, out_total: int | None = None) -> np.ndarray:
    """Source indices of a nearest resize in_len -> out_total (default out_len), for output pixels
    offset .. offset+out_len-1. Pixel-centre rule floor((x + 0.5) * in / out), in exact integer arithmetic
    (PIL's NEAREST computes it in floating point and rounds some exact ties down)."""
    out_total = out_total or out_len
    x = np.arange(offset, offset + out_len, dtype=np.int64)
    return np.minimum((2 * x + 1) * in_len // (2 * out_total), in_len - 1)


def resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest resize with `nearest_index`'s rule; integer factors take exact fast paths
    (shrink by f: every f-th pixel from f//2; grow by f: repeat each pixel f times)."""
    ih, iw = a.shape[:2]
    if (ih, iw) == (h, w):
        return a
    if ih % h == 0 and iw % w == 0 and ih // h == iw // w:
        f = ih // h
        return a[f // 2::f, f // 2::f]
    if h % ih == 0 and w % iw == 0 and h // ih == w // iw:
        f = h // ih
        return np.repeat(np.repeat(a, f, axis=0), f, axis=1)
    return a[nearest_index(h, ih)][:, nearest_index(w, iw)]


def _half(h: int, w: int, which: int) -> tuple[slice, slice]:
    return [(slice(0, h // 2), slice(None)), (slice(h // 2, None), slice(None)),
            (slice(None), slice(0, w // 2)), (slice(None), slice(w // 2, None))][which]


def token_view(mask: np.ndarray, grid: int = TOKEN_GRID) -> np.ndarray:
    """Nearest downsample to grid x grid with the top-left pixel of each patch (the token-hole rule)."""
    h, w = mask.shape
    return mask[np.ix_((np.arange(grid) * h) // grid, (np.arange(grid) * w) // grid)]


def _dilate(comp: np.ndarray, radius: int) -> np.ndarray:
    """k dilations by a 5x5 square == one max filter of side 2*radius+1 (radius 2k), computed only on the
    component's bounding box grown by the radius (nothing outside it can change). Pixels outside the image
    count as background, as cv2.dilate's default border."""
    h, w = comp.shape
    rows, cols = np.flatnonzero(comp.any(axis=1)), np.flatnonzero(comp.any(axis=0))
    y0, y1 = max(0, rows[0] - radius), min(h, rows[-1] + radius + 1)
    x0, x1 = max(0, cols[0] - radius), min(w, cols[-1] + radius + 1)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = ndimage.maximum_filter(comp[y0:y1, x0:x1].view(np.uint8), size=2 * radius + 1,
                                                mode="constant", cval=0)
    return mask


def sample_mask(seg: np.ndarray, cfg: MaskConfig, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A training hole (uint8 {0,1}, 1 = hole) of shape (resolution, resolution) from a label map.

    `seg` is nearest-resized to resolution x resolution first (a no-op when it is that size already);
    `resolution` also sets the dilation (2 / 4 / 8 iterations at 256 / 512 / 1024). All randomness comes
    from `rng`, so a seeded generator gives the same mask every time.
    """
    seg = resize_nearest(np.asarray(seg), resolution, resolution)
    h, w = seg.shape
    label = seg[rng.integers(h), rng.integers(w)]
    same = seg == label
    comps, _ = ndimage.label(same, structure=_EIGHT)
    pixels = np.flatnonzero(same)
    comp = comps == comps.flat[pixels[rng.integers(len(pixels))]]

    if cfg.kind == "coco" and rng.random() >= 0.5:  # bounding box of the component
        ys, xs = np.nonzero(np.any(comp, axis=1))[0], np.nonzero(np.any(comp, axis=0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        my, mx = max(1, round((y1 - y0) / 100)), max(1, round((x1 - x0) / 100))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[max(0, y0 - my):min(h, y1 + my), max(0, x0 - mx):min(w, x1 + mx)] = 1
    else:
        mask = _dilate(comp, 2 * dilation_iterations(resolution))

    if mask.sum() >= cfg.max_ratio * h * w:  # too large: clear a random half
        mask[_half(h, w, int(rng.integers(4)))] = 0
    if not token_view(mask).any():  # would give no hole tokens: use a random half-image hole
        mask[:] = 0
        mask[_half(h, w, int(rng.integers(4)))] = 1
    return mask

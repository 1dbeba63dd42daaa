"""The paper's training-mask sampler (docs/ASSET_NOTES.md §6.2): holes follow semantic segments, not strokes.

1. a uniformly random pixel picks a label; 2. a random pixel of that label picks one of its 8-connected
components (so a component's chance is proportional to its area); 3. the component is dilated by a 5x5
kernel 2/4/8 times at 256/512/1024 (COCO: with probability 1/2 its bounding box instead, grown by
max(1, round(side/100)) px per axis); 4. if the hole covers >= max_ratio of the image, a random half
(top/bottom/left/right; `mask.halves` may restrict them) is cleared; 5. if the hole vanishes when
nearest-sampled on the 16x16 token grid, it is replaced by a random half-image hole.

Differences from the official code, on purpose: the COCO sampler uses cfg.max_ratio (the official one
hard-codes 0.6; set 0.6 in COCO configs), and the bounding box is not shifted by +1 px.
"""
from __future__ import annotations

import numpy as np

from asset_dist.config import MaskConfig

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


def _half(h: int, w: int, which: str) -> tuple[slice, slice]:
    return {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, None), slice(None)),
            "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, None))}[which]


def _random_half(h: int, w: int, cfg: MaskConfig, rng: np.random.Generator) -> tuple[slice, slice]:
    """One of cfg.halves, uniformly (all four by default: the paper's draw, in HALVES order)."""
    return _half(h, w, cfg.halves[int(rng.integers(len(cfg.halves)))])


def token_view(mask: np.ndarray, grid: int = TOKEN_GRID) -> np.ndarray:
    """Nearest downsample to grid x grid with the top-left pixel of each patch (the token-hole rule)."""
    h, w = mask.shape
    return mask[np.ix_((np.arange(grid) * h) // grid, (np.arange(grid) * w) // grid)]


def _runs(same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal runs of True in a bool (h, w) map, in raster order, as [start, end) positions in a flat
    layout with one False column before each row (pixel (y, x) -> y*(w+1) + x + 1), so that runs of
    different rows never touch."""
    h, w = same.shape
    flat = np.zeros(h * (w + 1) + 1, dtype=bool)
    flat[:-1].reshape(h, w + 1)[:, 1:] = same
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # starts and ends alternate
    return change[0::2], change[1::2]


def _component_runs(starts: np.ndarray, ends: np.ndarray, stride: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the runs 8-connected to run `seed`. Runs in adjacent rows touch when their
    column ranges overlap after growing one of them by a pixel on each side; with the flat layout of
    `_runs` (row stride `stride`) each run's neighbours in the row below are one contiguous index range,
    found by binary search. Components: union-find in numpy over those edges (each round hooks every edge's
    larger root under the smaller, then compresses paths fully; done when no edge joins two roots)."""
    n = len(starts)
    lo = np.searchsorted(ends, starts + (stride - 1), side="right")
    hi = np.searchsorted(starts, ends + (stride + 1), side="left")
    count = hi - lo
    src = np.repeat(np.arange(n), count)
    dst = np.arange(len(src)) - np.repeat(np.cumsum(count) - count, count) + lo[src]
    root = np.arange(n)
    while True:
        a, b = root[src], root[dst]
        low = np.minimum(a, b)
        new = root.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # path compression: every node points at its tree's root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, root):
            return np.flatnonzero(root == root[seed])
        root = new


def _sliding_any(a: np.ndarray, n: int) -> np.ndarray:
    """out[i] = any(a[i:i+n]) along the rows (the length shrinks by n-1): windows doubled log2(n) times,
    then two overlapping windows (OR is idempotent), i.e. O(log n) array passes instead of n."""
    size = 1
    while 2 * size <= n:
        a = a[:len(a) - size] | a[size:]
        size *= 2
    if size < n:
        a = a[:len(a) - (n - size)] | a[n - size:]
    return a


def _dilated(rows: np.ndarray, x0s: np.ndarray, x1s: np.ndarray, h: int, w: int, radius: int) -> np.ndarray:
    """Runs (row, [x0, x1)) -> uint8 (h, w) map of the runs dilated by a (2*radius+1)^2 square, i.e. one
    max filter == k dilations by 5x5 for radius 2k. Pixels outside the image count as background (as
    cv2.dilate's default border). The square is separable: horizontally each run grows by the radius
    (runs of a row that then overlap merge), vertically a sliding OR over the runs' rows +- the radius."""
    a, b = np.maximum(x0s - radius, 0), np.minimum(x1s + radius, w)
    first = np.ones(len(rows), dtype=bool)  # runs that start a merged segment (rows, then x0, sorted)
    first[1:] = (rows[1:] != rows[:-1]) | (a[1:] > b[:-1])
    starts = np.flatnonzero(first)
    seg_rows, seg_a, seg_b = rows[starts], a[starts], b[np.r_[starts[1:] - 1, len(rows) - 1]]
    y0, y1, xa, xb = int(rows[0]), int(rows[-1]) + 1, int(seg_a.min()), int(seg_b.max())
    m, width = 2 * radius, xb - xa  # row margin: the window needs `radius` rows beyond the output's own
    # paint the segments into a zero-margined box: alternating 0/1 stretches in one np.repeat
    bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, (y1 - y0 + 2 * m) * width
    base = (seg_rows - y0 + m) * width - xa
    bounds[1:-1:2], bounds[2:-1:2] = base + seg_a, base + seg_b
    values = np.zeros(2 * len(starts) + 1, dtype=bool)
    values[1::2] = True
    box = np.repeat(values, np.diff(bounds)).reshape(y1 - y0 + 2 * m, width)
    box = _sliding_any(box, 2 * radius + 1)  # rows [y0 - radius, y1 + radius)
    mask = np.zeros((h, w), dtype=np.uint8)
    ya, yb = max(0, y0 - radius), min(h, y1 + radius)
    mask[ya:yb, xa:xb] = box[ya - (y0 - radius):yb - (y0 - radius)]
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
    # the chosen label's 8-connected components, found on its horizontal runs (few, for segment maps)
    # rather than by labelling every pixel: same result, several times cheaper
    starts, ends = _runs(seg == label)
    before = np.cumsum(ends - starts)  # label pixels up to the end of each run, in raster order
    pick = int(rng.integers(int(before[-1])))  # a uniformly random pixel of the label ...
    seed = int(np.searchsorted(before, pick, side="right"))  # ... and the run holding it
    stride = w + 1
    comp = _component_runs(starts, ends, stride, seed)
    rows = (starts[comp] - 1) // stride
    x0s, x1s = starts[comp] - 1 - rows * stride, ends[comp] - 1 - rows * stride

    if cfg.kind == "coco" and rng.random() >= 0.5:  # bounding box of the component
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(x0s.min()), int(x1s.max())
        my, mx = max(1, round((y1 - y0) / 100)), max(1, round((x1 - x0) / 100))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[max(0, y0 - my):min(h, y1 + my), max(0, x0 - mx):min(w, x1 + mx)] = 1
    else:
        mask = _dilated(rows, x0s, x1s, h, w, 2 * dilation_iterations(resolution))

    if np.count_nonzero(mask) >= cfg.max_ratio * h * w:  # too large: clear a random half
        mask[_random_half(h, w, cfg, rng)] = 0
    if not token_view(mask).any():  # would give no hole tokens: use a random half-image hole
        mask[:] = 0
        mask[_random_half(h, w, cfg, rng)] = 1
    return mask

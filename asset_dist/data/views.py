"""One sample -> aligned multi-resolution views (docs/ASSET_NOTES.md §6.1).

Short side -> `short_side` (area interpolation for images, nearest for labels), a square crop of
`resolution` (random for training, centre for validation), and the same crop at `guide_resolution`
(area for the image, nearest for labels and masks). Nearest resizes are done by index arithmetic, so
label values are exact.

Speed (the loader calls `fill_views` once per sample, writing straight into the batch's buffers; every
fast path gives the same bytes as the plain computation, see tests/test_views.py):
- the image is resized straight into the crop window (PIL's `box=`): the same pixels as resizing the
  whole image and cropping, without computing the ones that would be thrown away;
- the crop leaves PIL one plane at a time (`split`, then PIL copies each plane into the output), so
  the CHW layout costs no strided transpose;
- the guide-resolution image is the area (BOX) resize of the crop; for power-of-two factors it is
  computed from the crop's uint8 planes with integer adds that reproduce PIL's BOX rounding bit for
  bit (horizontal pass rounded to uint8, then vertical), several times cheaper than PIL's resampler;
- the label crop is PIL's NEAREST nudged onto the exact integer rule (`_nearest_crop`);
- the mask is sampled at 512 for the 1024 stage (the paper's rule) and upsampled by word tricks.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Optional

import numpy as np
import torch
from PIL import Image

from asset_dist.config import MaskConfig
from asset_dist.data.masks import nearest_index, resize_nearest, sample_mask

_SCRATCH = threading.local()
_PASTE_OK: Optional[bool] = None  # see _paste_writes_through
_NUDGE = 1e-6  # see _nearest_crop
_PIL_NEAREST_OK: Optional[bool] = None  # see _pil_nearest_exact


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample generator from (seed, epoch, key): independent of ranks, workers and read order."""
    k = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, k])


def mask_resolution(cfg: MaskConfig, resolution: int) -> int:
    """Masks are sampled at min(resolution, 512) unless set: the paper samples at 512 for the 1024 stage."""
    return cfg.sample_resolution or min(resolution, 512)


def unit_(t: torch.Tensor) -> torch.Tensor:
    """Float tensor of pixel values 0..255 -> x / 127.5 - 1 in [-1, 1], in place. The one definition for
    training batches (on any device), edits and evaluation, so the same pixel always gives the same value."""
    return t.div_(127.5).sub_(1.0)


def image_to_unit(t: torch.Tensor) -> torch.Tensor:
    """uint8 image -> float32 in [-1, 1] (a new tensor; see `unit_`)."""
    return unit_(t.to(torch.float32))


def view_shapes(resolution: int, guide_resolution: int) -> dict[str, tuple[int, ...]]:
    """Per-sample uint8 array shapes that `fill_views` writes (images CHW)."""
    r, g = resolution, guide_resolution
    return {"image": (3, r, r), "image_lr": (3, g, g), "seg": (r, r), "seg_lr": (g, g), "mask": (r, r),
            "mask_lr": (g, g)}


def _box_lanes(f: int) -> Optional[np.dtype]:
    """The unsigned word holding f uint8 pixels, for the f's `box_down` handles (2, 4, 8)."""
    return {2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}.get(f)


def _scratch(tag: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A per-thread work array reused across calls: fresh multi-MB temporaries per sample would pay
    page faults (zero-filled pages) every time."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    a = pool.get(tag)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = pool[tag] = np.empty(shape, dtype=dtype)
    return a


def box_down(a: np.ndarray, f: int, out: np.ndarray) -> None:
    """uint8 (..., H, W) -> out (..., H/f, W/f): PIL's resize(BOX) by an integer factor f in {2, 4, 8},
    bit for bit. PIL resamples horizontally first (each output = sum of f pixels, rounded half up to
    uint8), then vertically the same way. The horizontal sums are SWAR adds on the f pixels packed in one
    machine word (a view of the contiguous rows), so the pass reads each byte once, without strides."""
    word = _box_lanes(f)
    k, bits = f.bit_length() - 1, 8 * f
    x = np.ascontiguousarray(a).view(word)  # (..., H, W/f): f neighbouring pixels per word
    s, t = _scratch("box_s", x.shape, word), _scratch("box_t", x.shape, word)
    lane, src = 8, x
    while 2 * lane < bits or lane == 8:  # pairwise lane sums until two lanes are left (f=2: one sum)
        m = word.type(int("".join(["0" * lane + "1" * lane] * (bits // (2 * lane))), 2))
        np.right_shift(src, word.type(lane), out=t)
        t &= m
        np.bitwise_and(src, m, out=s)
        s += t
        lane, src = 2 * lane, s
    if lane < bits:  # two lanes (lo, hi): (s * (1 + 2**lane)) >> lane = lo + hi, rounded in the same pass
        s *= word.type(1 + (1 << lane))
        s += word.type((f // 2) << lane)
        s >>= word.type(lane + k)
    else:
        s += word.type(f // 2)
        s >>= word.type(k)  # horizontal pass done: one uint8 value per word
    v = _scratch("box_v", (*x.shape[:-2], x.shape[-2] // f, x.shape[-1]), word)
    np.copyto(v, s[..., 0::f, :])
    for j in range(1, f):
        v += s[..., j::f, :]
    v += word.type(f // 2)
    v >>= word.type(k)
    np.copyto(out, v, casting="unsafe")


def _paste_writes_through() -> bool:
    """Whether pasting into an image made by `Image.frombuffer` (with its copy-on-write flag cleared)
    writes into the buffer, as Pillow's memory-mapped images do. Checked once; `copy_plane` falls back to
    `tobytes` if a Pillow version behaves otherwise."""
    buf = np.zeros((2, 3), dtype=np.uint8)
    target = Image.frombuffer("L", (3, 2), buf, "raw", "L", 0, 1)
    target.readonly = 0
    target.paste(Image.new("L", (3, 2), 7))
    return bool((buf == 7).all())


def copy_plane(band: Image.Image, out: np.ndarray) -> None:
    """8-bit PIL image -> out (H, W) uint8 (C-contiguous): one line-by-line copy by PIL's paste into a
    view of `out`, instead of tobytes (pack + join) and a numpy copy."""
    global _PASTE_OK
    if _PASTE_OK is None:
        _PASTE_OK = _paste_writes_through()
    if _PASTE_OK and out.flags.c_contiguous:
        target = Image.frombuffer("L", band.size, out, "raw", "L", 0, 1)
        target.readonly = 0  # write into `out` (otherwise Pillow copies the image before writing)
        target.paste(band)
    else:
        out[...] = np.frombuffer(band.tobytes(), dtype=np.uint8).reshape(out.shape)


def _planes(image: Image.Image, out: np.ndarray, lr: np.ndarray) -> None:
    """RGB crop -> out (3, R, R) uint8 and its BOX resize -> lr (3, G, G), one plane at a time: planes
    leave PIL without an HWC -> CHW transpose, and each plane is box-reduced while it is still in cache."""
    r, g = out.shape[-1], lr.shape[-1]
    f = r // g
    fast = g != r and r == f * g and _box_lanes(f) is not None
    for c, band in enumerate(image.split()):
        copy_plane(band, out[c])
        if fast:
            box_down(out[c], f, lr[c])
    if g == r:
        lr[...] = out
    elif not fast:  # other factors: PIL's own BOX resize of the crop
        for c, band in enumerate(image.resize((g, g), Image.BOX).split()):
            copy_plane(band, lr[c])


def _nearest_into(a: np.ndarray, out: np.ndarray) -> None:
    """out[...] = resize_nearest(a, *out.shape), without the intermediate for integer upscales."""
    (ih, iw), (h, w) = a.shape, out.shape
    f = h // ih
    if h == f * ih and w == f * iw and f > 1 and _box_lanes(f) is not None and a.dtype == np.uint8:
        word = _box_lanes(f)
        # multiplying by 0x0101.. copies each byte into all f bytes of its word: the row, f times wider
        wide = (a.astype(word) * word.type(int("01" * f, 16))).view(np.uint8)
        out.reshape(ih, f, w)[...] = wide[:, None, :]  # and each row f times: contiguous row copies
    else:
        out[...] = resize_nearest(a, h, w)


def _pil_axis(n_in: int, out_len: int, scale: float, offset: float, rows: bool) -> np.ndarray:
    """The source index PIL's affine NEAREST picks for each output pixel along one axis (probe image)."""
    idx = np.arange(n_in, dtype=np.int32)
    probe = Image.fromarray(idx[:, None] if rows else idx[None, :])
    size, data = ((1, out_len), (1, 0, 0, 0, scale, offset)) if rows else ((out_len, 1), (scale, 0, offset, 0, 1, 0))
    return np.asarray(probe.transform(size, Image.AFFINE, data, Image.NEAREST)).ravel()


def _pil_nearest_exact() -> bool:
    """Whether this Pillow's nudged affine NEAREST picks `nearest_index`'s pixels: checked once per process
    on resizes with exact ties and on random ones, both axes."""
    rng = np.random.default_rng(0)
    cases = [(683, 1024, 0, 1024), (1024, 768, 128, 512), (357, 512, 0, 512), (512, 1536, 512, 1024),
             (600, 592, 40, 512), (1023, 1534, 700, 512), (3, 256, 0, 256)]
    for _ in range(24):
        r = int(rng.choice([256, 512, 1024]))
        total = r + int(rng.integers(0, r))
        cases.append((int(rng.integers(8, 3000)), total, int(rng.integers(0, total - r + 1)), r))
    for n_in, total, offset, r in cases:
        want = nearest_index(r, n_in, offset, total)
        scale = n_in / total
        for rows in (False, True):
            if not np.array_equal(_pil_axis(n_in, r, scale, offset * scale + _NUDGE, rows), want):
                return False
    return True


def _nearest_crop(a: np.ndarray, x0: int, y0: int, nw: int, nh: int, out: np.ndarray) -> None:
    """out (r, r) = window (x0, y0) of `a` nearest-resized to (nh, nw), with `nearest_index`'s exact rule.

    PIL's affine NEAREST does it several times faster than a numpy gather (1024: ~1.5 vs ~3 ms), but in
    floating point: source coordinate (x + 0.5) * in/out accumulated in doubles (error < 1e-8 px), then
    floored. Nudged by _NUDGE = 1e-6 px, exact ties round up as the integer rule does, and no other
    coordinate is within 1/(2*out) > 1e-6 px of an integer, so the same pixels are picked. A self-test
    on index probes confirms it once per process (else numpy)."""
    global _PIL_NEAREST_OK
    h, w = a.shape
    r = out.shape[0]
    if a.dtype == np.uint8 and out.dtype == np.uint8 and a.flags.c_contiguous:
        if _PIL_NEAREST_OK is None:
            _PIL_NEAREST_OK = _pil_nearest_exact()
        if _PIL_NEAREST_OK:
            sx, sy = w / nw, h / nh
            data = (sx, 0, x0 * sx + _NUDGE, 0, sy, y0 * sy + _NUDGE)
            copy_plane(Image.fromarray(a).transform((r, r), Image.AFFINE, data, Image.NEAREST), out)
            return
    rows, cols = nearest_index(r, h, y0, nh), nearest_index(r, w, x0, nw)
    if a.dtype == out.dtype:
        np.take(a[rows], cols, axis=1, out=out)  # rows, then columns: faster than np.ix_
    else:
        out[...] = a[rows][:, cols]


def warm_up() -> None:
    """Run the one-off Pillow checks now (e.g. in the main process, so that forked workers inherit them)."""
    global _PASTE_OK, _PIL_NEAREST_OK
    if _PASTE_OK is None:
        _PASTE_OK = _paste_writes_through()
    if _PIL_NEAREST_OK is None:
        _PIL_NEAREST_OK = _pil_nearest_exact()


def fill_views(out: dict[str, np.ndarray], image: Image.Image, seg: np.ndarray, resolution: int,
               guide_resolution: int, mask_cfg: Optional[MaskConfig], rng: np.random.Generator, train: bool, *,
               short_side: int = 0, mask: Optional[np.ndarray] = None, crop_grid: int = 1) -> bool:
    """Write one sample's views into `out` (uint8 arrays of `view_shapes`: images CHW, labels and masks
    HW; e.g. one row of the loader's batch buffers). Returns whether the image was upscaled. What each
    view holds is described in `make_views`; training crops start on multiples of `crop_grid` pixels."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    r, g = resolution, guide_resolution
    s = short_side or r
    if s < r:
        raise ValueError(f"short side {s} is smaller than the crop {r}")
    scale = s / min(w, h)
    nw, nh = max(r, int(round(w * scale))), max(r, int(round(h * scale)))
    if train:
        x0, y0 = (int(rng.integers((n - r) // crop_grid + 1)) * crop_grid for n in (nw, nh))
    else:
        x0, y0 = (nw - r) // 2, (nh - r) // 2
    sx, sy = w / nw, h / nh  # source pixels per resized pixel
    # Area (box) filter when shrinking; bilinear when enlarging, as cv2.INTER_AREA does.
    resample = Image.BOX if scale <= 1.0 else Image.BILINEAR
    crop = image.resize((r, r), resample, box=(x0 * sx, y0 * sy, (x0 + r) * sx, (y0 + r) * sy))
    _planes(crop, out["image"], out["image_lr"])

    seg_c = out["seg"]
    _nearest_crop(np.asarray(seg), x0, y0, nw, nh, seg_c)
    if mask is not None:
        m = np.asarray(mask)
        m = m[nearest_index(r, m.shape[0], y0, nh)][:, nearest_index(r, m.shape[1], x0, nw)]
        np.not_equal(m, 0, out=out["mask"], casting="unsafe")
    elif mask_cfg is not None:
        ms = mask_resolution(mask_cfg, r)
        _nearest_into(sample_mask(resize_nearest(seg_c, ms, ms), mask_cfg, rng, ms), out["mask"])
    else:
        out["mask"][...] = 0
    out["seg_lr"][...] = resize_nearest(seg_c, g, g)
    out["mask_lr"][...] = resize_nearest(out["mask"], g, g)
    return scale > 1.0


def _alloc(resolution: int, guide_resolution: int, seg: np.ndarray) -> dict[str, np.ndarray]:
    """Fresh view arrays; label maps keep the input's integer type (uint8 for the loader's data)."""
    seg = np.asarray(seg)
    label = seg.dtype if np.issubdtype(seg.dtype, np.integer) else np.dtype(np.int64)
    return {k: np.empty(shape, dtype=label if k.startswith("seg") else np.uint8)
            for k, shape in view_shapes(resolution, guide_resolution).items()}


def crop_views(image: Image.Image, seg: np.ndarray, resolution: int, guide_resolution: int,
               mask_cfg: Optional[MaskConfig], rng: np.random.Generator, train: bool, *,
               short_side: int = 0, mask: Optional[np.ndarray] = None, crop_grid: int = 1) -> dict:
    """`make_views` as uint8 arrays (HWC images, HW labels and masks) plus `upscaled`."""
    v = _alloc(resolution, guide_resolution, seg)
    up = fill_views(v, image, seg, resolution, guide_resolution, mask_cfg, rng, train, short_side=short_side,
                    mask=mask, crop_grid=crop_grid)
    for k in ("image", "image_lr"):
        v[k] = np.ascontiguousarray(v[k].transpose(1, 2, 0))
    return {**v, "upscaled": up}


def make_views(image: Image.Image, seg: np.ndarray, resolution: int, guide_resolution: int,
               mask_cfg: Optional[MaskConfig], rng: np.random.Generator, train: bool, *,
               short_side: int = 0, mask: Optional[np.ndarray] = None) -> dict:
    """Crop and resize one (image, label map[, mask]) into the training views.

    Returns image (3,R,R) float [-1,1], seg (R,R) long, mask (1,R,R) float {0,1} (1 = hole), the same three
    at guide_resolution G as image_lr / seg_lr / mask_lr, and `upscaled` (bool: the image was smaller than
    the short side). A label map (or given mask) of another size than the image is nearest-resized to it.
    The mask is `mask` if given (non-zero = hole), else sampled with `mask_cfg` on the crop's label map
    (at `mask_resolution`, then nearest-resized), else all zeros. `rng` draws the crop offset, then the mask.
    """
    v = _alloc(resolution, guide_resolution, seg)
    up = fill_views(v, image, seg, resolution, guide_resolution, mask_cfg, rng, train, short_side=short_side,
                    mask=mask)
    t = {k: torch.from_numpy(a) for k, a in v.items()}
    return {
        "image": image_to_unit(t["image"]),
        "seg": t["seg"].long(),
        "mask": t["mask"].float()[None],
        "image_lr": image_to_unit(t["image_lr"]),
        "seg_lr": t["seg_lr"].long(),
        "mask_lr": t["mask_lr"].float()[None],
        "upscaled": up,
    }

"""Where an edit is sampled: a window of the photo at the model's scale, so any photo size and aspect works.

The transformer samples token grids whose sides divide into its 16 x 4 block grid: working images of H x W px
with H a multiple of 256 and W a multiple of 64 (16 px tokens). It was trained at one resolution R (the SGA
config's data.resolution, 512 or 1024; `infer.resolution` overrides it), i.e. on (R/16)^2 tokens. An edit of
any size becomes a `Canvas`:
- the region the model must see: the mask's bounding box plus context (half its longer side, at least 64 px
  and the blend band + 16), clipped to the photo;
- the scale s: 1 (native pixels) when that region fits in R x R, else R / its longer side (a large mask is
  edited downscaled); a photo shorter than 256 px (or narrower than 64) is upscaled to that;
- the working size W x H: among the sizes the block grid allows with W x H <= R x R that cover the region, the
  one that shows the most of the photo (so a small mask on a 4000 x 3000 photo gets an R x R window of native
  pixels around it, a 1024 x 768 photo is edited whole, a 16:9 photo gets a square window, a portrait a tall
  one). Rounding up past the photo's edge (at most one step) is filled by mirroring: known tokens, never
  sampled;
- the guide's view: the working image scaled by 256 / R (sides multiples of 256 x 64).
The generated working image is resized back to the window's native size (bicubic when it was downscaled) and
blended into the photo at native resolution (`blend.composite` on the window): every pixel farther than the
blend band from the mask is the input's, byte for byte; outside the window nothing is touched.

Trade-off (BENCHMARKS.md "Editing any photo"): a downscaled canvas gives the model the whole region as context
but generates the hole at lower resolution (upsampled back); native windows keep full detail with less context.
A square photo of a side the block grid allows, up to R, is edited whole at scale 1, exactly as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from asset_dist.data.masks import resize_nearest
from asset_dist.infer.blend import composite
from asset_dist.infer.edits import EditError

ROW, COL = 256, 64  # px granularity of the working size: 16 px tokens x the 16 x 4 block grid
GUIDE = 256  # the guide's resolution
MIN_SIDE = 16  # smaller photos are refused


@dataclass(frozen=True)
class Canvas:
    x0: int  # native window (may reach past the photo: mirrored)
    y0: int
    w: int
    h: int
    W: int  # working size, px
    H: int
    Wg: int  # guide view, px
    Hg: int

    @property
    def scale(self) -> float:
        return self.W / self.w

    @property
    def hw(self) -> tuple[int, int]:
        """Token grid (rows, cols) of the working image."""
        return self.H // 16, self.W // 16

    @property
    def guide_hw(self) -> tuple[int, int]:
        return self.Hg // 16, self.Wg // 16

    def to_dict(self) -> dict:
        return {"window": [self.x0, self.y0, self.w, self.h], "working": [self.W, self.H],
                "guide": [self.Wg, self.Hg], "scale": round(self.scale, 4)}


def _floor(x: float, step: int) -> int:
    return int(math.floor(x / step + 1e-9)) * step


def _ceil(x: float, step: int) -> int:
    return int(math.ceil(x / step - 1e-9)) * step


def plan(edit_id: str, mask: np.ndarray, resolution: int, band: int = 16) -> Canvas:
    """The canvas of an edit with this mask (native size, non-zero = hole) for a model of `resolution`."""
    Hp, Wp = mask.shape
    if min(Hp, Wp) < MIN_SIDE:
        raise EditError(f"edit {edit_id!r}: the image is {Wp}x{Hp} px: too small to edit (at least "
                        f"{MIN_SIDE} px per side)")
    R = int(resolution)
    if R < ROW or R % ROW:
        raise ValueError(f"infer.resolution {R} must be a positive multiple of {ROW}")
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    m = max(64, band + 16, math.ceil(0.5 * max(x1 - x0, y1 - y0)))
    nx0, nx1, ny0, ny1 = max(0, x0 - m), min(Wp, x1 + m), max(0, y0 - m), min(Hp, y1 + m)
    need_w, need_h = nx1 - nx0, ny1 - ny0
    s = min(1.0, R / max(need_w, need_h))
    s = max(s, ROW / Hp, COL / Wp)  # a photo shorter than one block row is upscaled
    Wf, Hf, nw, nh = Wp * s, Hp * s, need_w * s, need_h * s
    best = None
    for H in range(ROW, _ceil(Hf, ROW) + 1, ROW):
        cap = _floor(R * R / H, COL)
        if cap < COL:
            break
        if H < nh - 1e-6:
            continue
        for W in {min(max(_floor(Wf, COL), COL), cap), min(_ceil(Wf, COL), cap)}:
            if W < nw - 1e-6:
                continue
            seen = min(W, Wf) * min(H, Hf)
            pad = W * H - seen
            key = (round(seen, 3), -pad, -abs(W - H))
            if best is None or key > best[0]:
                best = (key, W, H)
    if best is None:
        raise EditError(f"edit {edit_id!r}: the mask's region ({need_w}x{need_h} px of a {Wp}x{Hp} photo) does "
                        f"not fit one {R} px window at any scale (a very elongated photo): crop it first")
    _, W, H = best
    w, h = max(1, round(W / s)), max(1, round(H / s))
    cx, cy = (nx0 + nx1) / 2, (ny0 + ny1) / 2
    wx0 = min(max(round(cx - w / 2), 0), Wp - w) if w <= Wp else -((w - Wp) // 2)
    wy0 = min(max(round(cy - h / 2), 0), Hp - h) if h <= Hp else -((h - Hp) // 2)
    f = R / GUIDE
    Hg = ROW * max(1, round(H / f / ROW))
    Wg = COL * max(1, round(Hg * W / H / COL))
    return Canvas(wx0, wy0, w, h, W, H, Wg, Hg)


# ----------------------------------------------------------------------------------------------------------
# Native <-> working


def window(a: np.ndarray, c: Canvas) -> np.ndarray:
    """The canvas window of a native array (HW or HWC), mirrored where it reaches past the photo."""
    Hp, Wp = a.shape[:2]
    pads = [(max(0, -c.y0), max(0, c.y0 + c.h - Hp)), (max(0, -c.x0), max(0, c.x0 + c.w - Wp))]
    if any(p for pair in pads for p in pair):
        a = np.pad(a, pads + [(0, 0)] * (a.ndim - 2), mode="symmetric")
    y0, x0 = c.y0 + pads[0][0], c.x0 + pads[1][0]
    return a[y0:y0 + c.h, x0:x0 + c.w]


def _resize_image(a: np.ndarray, W: int, H: int) -> np.ndarray:
    if a.shape[1] == W and a.shape[0] == H:
        return a
    im = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(im.resize((W, H), Image.BOX if W <= a.shape[1] else Image.BICUBIC))


def _resize_mask(m: np.ndarray, W: int, H: int) -> np.ndarray:
    """A pixel of the result is in the hole when its footprint touches the hole (the hole never shrinks)."""
    if m.shape == (H, W):
        return (m != 0).astype(np.uint8)
    a = np.asarray(Image.fromarray(((m != 0) * 255).astype(np.uint8)).resize((W, H), Image.BOX))
    return (a > 0).astype(np.uint8)


def working_views(c: Canvas, image: np.ndarray, seg: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """image / seg / mask (native) -> the working views: image, seg, mask at W x H and *_lr at the guide's
    Wg x Hg (uint8; images HWC). At scale 1 over the whole photo these equal `data.views.make_views`'."""
    img = _resize_image(window(image, c), c.W, c.H)
    lab = resize_nearest(window(seg, c), c.H, c.W)
    msk = _resize_mask(window(mask, c), c.W, c.H)
    return {"image": img, "seg": lab, "mask": msk, "image_lr": _resize_image(img, c.Wg, c.Hg),
            "seg_lr": resize_nearest(lab, c.Hg, c.Wg), "mask_lr": resize_nearest(msk, c.Hg, c.Wg)}


def paste(c: Canvas, generated: np.ndarray, image: np.ndarray, mask: np.ndarray, levels: int, band: int
          ) -> np.ndarray:
    """The generated working image [H, W, 3] back into the photo at native size: resized to the window,
    blended on the window's part of the photo (`composite`: byte-identical beyond `band` px of the mask)."""
    Hp, Wp = mask.shape
    gen = generated if generated.shape[:2] == (c.h, c.w) else np.asarray(
        Image.fromarray(generated).resize((c.w, c.h), Image.BICUBIC if c.w >= c.W else Image.BOX))
    y0, y1, x0, x1 = max(0, c.y0), min(Hp, c.y0 + c.h), max(0, c.x0), min(Wp, c.x0 + c.w)
    part = gen[y0 - c.y0:y1 - c.y0, x0 - c.x0:x1 - c.x0]
    out = image.copy()
    out[y0:y1, x0:x1] = composite(part, image[y0:y1, x0:x1], mask[y0:y1, x0:x1], levels, band)
    return out

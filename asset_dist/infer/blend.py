"""Compositing a generated image into the input (docs/ASSET_NOTES.md §7.5 and §10.8), NumPy only.

`laplacian_blend` follows the official test script: Gaussian pyramids (5-tap [1 4 6 4 1]/16, reflect-101
borders, as cv2.pyrDown / pyrUp) of the generated image A, the input B and the binary mask; image levels
below the top rounded to uint8 as cv2 does on uint8 images; Laplacian bands A_i - up(A_i+1); every band
blended as A*m + B*(1-m) with the mask pyramid; collapsed, clipped, rounded. The official blend lets low
frequencies bleed across the mask border, so `composite` then copies the input back byte for byte outside
the mask dilated by `band` pixels: only pixels within `band` of the hole can differ from the input.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur_axis(x: np.ndarray, axis: int, k: np.ndarray) -> np.ndarray:
    n = x.shape[axis]
    if n == 1:
        return x * k.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    xp = np.pad(x, pad, mode="reflect")  # numpy "reflect" = cv2 BORDER_REFLECT_101 (edge not repeated)
    sl = lambda i: tuple(slice(i, i + n) if a == axis else slice(None) for a in range(x.ndim))  # noqa: E731
    return sum(k[i] * xp[sl(i)] for i in range(5))


def blur(x: np.ndarray, k: np.ndarray = KERNEL) -> np.ndarray:
    """Separable 5-tap blur over the first two axes (H, W[, C])."""
    return _blur_axis(_blur_axis(x, 0, k), 1, k)


def pyr_down(x: np.ndarray) -> np.ndarray:
    """Blur then keep even rows and columns: (H, W) -> (ceil(H/2), ceil(W/2)), as cv2.pyrDown."""
    return blur(np.asarray(x, dtype=np.float64))[::2, ::2]


def pyr_up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Insert zeros between samples, blur with 2x the kernel per axis (so a constant stays constant) and crop
    to `shape` (H, W), as cv2.pyrUp with dstsize."""
    h, w = shape
    if not (2 * x.shape[0] - 1 <= h <= 2 * x.shape[0] and 2 * x.shape[1] - 1 <= w <= 2 * x.shape[1]):
        raise ValueError(f"pyr_up: {x.shape[:2]} -> {shape} is not a factor-2 step")
    up = np.zeros((2 * x.shape[0], 2 * x.shape[1]) + x.shape[2:], dtype=np.float64)
    up[::2, ::2] = x
    return blur(up, 2 * KERNEL)[:h, :w]


def gaussian_pyramid(x: np.ndarray, levels: int, round_u8: bool) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=np.float64)]
    for _ in range(levels - 1):
        nxt = pyr_down(out[-1])
        out.append(np.clip(np.rint(nxt), 0, 255) if round_u8 else nxt)
    return out


def laplacian_blend(generated: np.ndarray, original: np.ndarray, mask: np.ndarray, levels: int = 5) -> np.ndarray:
    """generated / original uint8 [H, W, 3], mask [H, W] (non-zero / >= 0.5 = generated) -> uint8 [H, W, 3].

    levels = number of pyramid levels used (the official 5: the 1/16 level is the base, 4 bands above it);
    levels <= 1 is a plain per-pixel composite."""
    if generated.shape != original.shape or generated.shape[:2] != mask.shape[:2]:
        raise ValueError(f"blend: generated {generated.shape}, original {original.shape} and mask {mask.shape} "
                         "must have the same size")
    m = (np.asarray(mask, dtype=np.float64) >= 0.5).astype(np.float64)[..., None]
    if levels <= 1:
        return np.where(m > 0, generated, original).astype(np.uint8)
    ga = gaussian_pyramid(generated, levels, True)
    gb = gaussian_pyramid(original, levels, True)
    gm = gaussian_pyramid(m, levels, False)
    out = ga[-1] * gm[-1] + gb[-1] * (1 - gm[-1])
    for i in range(levels - 2, -1, -1):
        shape = ga[i].shape[:2]
        la = ga[i] - pyr_up(ga[i + 1], shape)
        lb = gb[i] - pyr_up(gb[i + 1], shape)
        out = pyr_up(out, shape) + la * gm[i] + lb * (1 - gm[i])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dilate(mask: np.ndarray, band: int) -> np.ndarray:
    """Binary mask grown by `band` pixels (square neighbourhood); pixels outside the image count as 0."""
    m = np.asarray(mask) != 0
    if band <= 0:
        return m
    return ndimage.maximum_filter(m.view(np.uint8), size=2 * band + 1, mode="constant", cval=0).astype(bool)


def composite(generated: np.ndarray, original: np.ndarray, mask: np.ndarray, levels: int = 5, band: int = 16
              ) -> np.ndarray:
    """Laplacian blend, then every pixel farther than `band` px from the mask is the input's, byte for byte."""
    blended = laplacian_blend(generated, original, mask, levels)
    keep = dilate(mask, band)[..., None]
    return np.where(keep, blended, original).astype(np.uint8)

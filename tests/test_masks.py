"""The paper's training-mask sampler (docs/ASSET_NOTES.md §6.2), checked against brute-force constructions."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from asset_dist.config import MaskConfig
from asset_dist.data.masks import dilation_iterations, sample_mask, token_view


def _blocks_seg(n: int = 128, seed: int = 0) -> np.ndarray:
    """Labels 0..4 in 16x16 blocks: each label has several 8-connected components of varied shapes."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 5, (n // 16, n // 16)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)


def _components(seg: np.ndarray):
    for label in np.unique(seg):
        comps, n = ndimage.label(seg == label, structure=np.ones((3, 3)))
        for c in range(1, n + 1):
            yield comps == c


def _square_dilate(comp: np.ndarray, iterations: int) -> np.ndarray:
    """Reference: `iterations` binary dilations with a 5x5 square (what cv2.dilate does), zero border."""
    return ndimage.binary_dilation(comp, structure=np.ones((5, 5), bool), iterations=iterations).astype(np.uint8)


def test_landscape_mask_is_a_dilated_component_of_one_label():
    seg = _blocks_seg(128)
    cfg = MaskConfig(kind="landscape", max_ratio=1.0)
    k = dilation_iterations(128)
    candidates = [_square_dilate(c, k) for c in _components(seg)]
    for seed in range(12):
        mask = sample_mask(seg, cfg, np.random.default_rng(seed), 128)
        assert mask.shape == (128, 128) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        if not token_view(mask).any():
            continue
        assert any(np.array_equal(mask, c) for c in candidates), seed


def test_dilation_iterations_match_the_paper():
    assert [dilation_iterations(r) for r in (256, 512, 1024)] == [2, 4, 8]


def test_coco_mask_is_dilation_or_grown_bounding_box():
    seg = _blocks_seg(256, seed=1)
    cfg = MaskConfig(kind="coco", max_ratio=1.0)
    dil, boxes = [], []
    for c in _components(seg):
        dil.append(_square_dilate(c, 2))
        ys, xs = np.nonzero(c)
        my = max(1, round((ys.max() + 1 - ys.min()) / 100))
        mx = max(1, round((xs.max() + 1 - xs.min()) / 100))
        b = np.zeros_like(c, dtype=np.uint8)
        b[max(0, ys.min() - my):ys.max() + 1 + my, max(0, xs.min() - mx):xs.max() + 1 + mx] = 1
        boxes.append(b)
    kinds = set()
    for seed in range(16):
        mask = sample_mask(seg, cfg, np.random.default_rng(seed), 256)
        if any(np.array_equal(mask, d) for d in dil):
            kinds.add("dilated")
        elif any(np.array_equal(mask, b) for b in boxes):
            kinds.add("box")
        else:
            pytest.fail(f"seed {seed}: mask is neither a dilated component nor its grown bounding box")
    assert kinds == {"dilated", "box"}


def _halves(h: int, w: int) -> list[np.ndarray]:
    out = []
    for sl in [(slice(0, h // 2), slice(None)), (slice(h // 2, None), slice(None)),
               (slice(None), slice(0, w // 2)), (slice(None), slice(w // 2, None))]:
        m = np.zeros((h, w), np.uint8)
        m[sl] = 1
        out.append(m)
    return out


def test_max_ratio_clears_a_random_half():
    seg = np.zeros((256, 256), np.uint8)  # one label, one component: the hole would be the whole image
    halves = _halves(256, 256)
    seen = set()
    for seed in range(24):
        mask = sample_mask(seg, MaskConfig(max_ratio=0.6), np.random.default_rng(seed), 256)
        which = [i for i, h in enumerate(halves) if np.array_equal(mask, 1 - h)]
        assert len(which) == 1
        seen.add(which[0])
    assert seen == {0, 1, 2, 3}
    # mask.halves restricts which half may be cleared (the long-range benchmark: top / bottom only)
    cfg = MaskConfig(max_ratio=0.6, halves=["top", "bottom"])
    cleared = {[i for i, h in enumerate(halves) if np.array_equal(sample_mask(seg, cfg, np.random.default_rng(s),
                                                                            256), 1 - h)][0] for s in range(24)}
    assert cleared == {0, 1}
    # below the ratio nothing is cleared
    seg[:, :100] = 1
    mask = sample_mask(seg, MaskConfig(max_ratio=0.99), np.random.default_rng(0), 256)
    assert mask.sum() < 256 * 256 and mask.sum() >= min((seg == 0).sum(), (seg == 1).sum())


def test_empty_fallback_gives_a_hole_on_the_16x16_grid():
    seg = np.random.default_rng(0).integers(0, 256, (256, 256)).astype(np.uint8)  # tiny components only
    halves = _halves(256, 256)
    fallbacks = 0
    for seed in range(20):
        mask = sample_mask(seg, MaskConfig(), np.random.default_rng(seed), 256)
        assert token_view(mask).any()  # never an empty hole for the transformer
        fallbacks += any(np.array_equal(mask, h) for h in halves)
    assert fallbacks > 0


def test_deterministic_with_seed_and_resizes_input():
    seg = _blocks_seg(64)
    cfg = MaskConfig(kind="coco")
    a = [sample_mask(seg, cfg, np.random.default_rng(s), 256) for s in range(6)]
    b = [sample_mask(seg, cfg, np.random.default_rng(s), 256) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (256, 256)  # the 64x64 map is nearest-resized to the requested resolution
    assert len({x.tobytes() for x in a}) > 1


def _reference_mask(seg: np.ndarray, cfg: MaskConfig, rng: np.random.Generator, res: int) -> np.ndarray:
    """The sampler written the direct way (pixel labelling with ndimage.label, one max filter over the
    whole map), with the same random draws in the same order: the oracle for the run-based version."""
    rows, cols = [(np.arange(res) * 2 + 1) * n // (2 * res) for n in np.shape(seg)]
    seg = np.asarray(seg)[rows][:, cols]
    label = seg[rng.integers(res), rng.integers(res)]
    same = seg == label
    comps, _ = ndimage.label(same, structure=np.ones((3, 3)))
    pixels = np.flatnonzero(same)
    comp = comps == comps.flat[pixels[rng.integers(len(pixels))]]
    if cfg.kind == "coco" and rng.random() >= 0.5:
        ys, xs = np.nonzero(comp)
        my, mx = max(1, round((ys.max() + 1 - ys.min()) / 100)), max(1, round((xs.max() + 1 - xs.min()) / 100))
        mask = np.zeros_like(comp, dtype=np.uint8)
        mask[max(0, ys.min() - my):ys.max() + 1 + my, max(0, xs.min() - mx):xs.max() + 1 + mx] = 1
    else:
        mask = _square_dilate(comp, dilation_iterations(res))
    halves = _halves(res, res)
    if mask.sum() >= cfg.max_ratio * res * res:
        mask = mask * (1 - halves[int(rng.integers(4))])
    if not token_view(mask).any():
        mask = halves[int(rng.integers(4))]
    return mask


def test_run_based_sampler_equals_pixel_labelling(sample_data):
    """Exact equality (masks and random stream) with the direct construction, on real segment maps and
    on adversarial ones: noise (thousands of tiny components), diagonal chains (8-connectivity only),
    a spiral-like snake, one label."""
    rng = np.random.default_rng(3)
    files = sorted((sample_data / "sflckr" / "segmentations").rglob("*.png"))[:6]
    maps = [np.asarray(Image.open(p)) for p in files]
    cross = np.eye(128, dtype=np.uint8)[::-1] + np.eye(128, dtype=np.uint8)  # diagonal: 8-connected only
    maps += [rng.integers(0, 3, (96, 101)).astype(np.uint8), cross, np.zeros((64, 64), np.uint8), _blocks_seg(128, 5)]
    snake = np.zeros((128, 128), np.uint8)
    snake[::4, 2:-2] = 1
    snake[1::8, -3] = snake[2::8, -3] = snake[3::8, -3] = 1
    snake[5::8, 2] = snake[6::8, 2] = snake[7::8, 2] = 1
    maps.append(snake)
    for i, seg in enumerate(maps):
        for res in (64, 128) if i >= 6 else (128, 256):
            for cfg in (MaskConfig(max_ratio=0.6), MaskConfig(kind="coco", max_ratio=0.85)):
                for seed in range(4):
                    a, b = np.random.default_rng([i, seed]), np.random.default_rng([i, seed])
                    got = sample_mask(seg, cfg, a, res)
                    want = _reference_mask(seg, cfg, b, res)
                    np.testing.assert_array_equal(got, want, err_msg=f"map {i} {cfg} {seed}")
                    assert a.random() == b.random()  # the same number of draws

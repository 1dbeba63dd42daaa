"""The paper's training-mask sampler (ASSET_FACTS.md 6.2), checked against brute-force constructions."""
from __future__ import annotations

import numpy as np
import pytest
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

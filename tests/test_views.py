"""The fast paths of the view builder against their slow definitions: PIL's BOX resize, the exact nearest rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist.config import MaskConfig
from asset_dist.data.masks import nearest_index, resize_nearest
from asset_dist.data.views import box_down, crop_views, make_views, _nearest_crop


def _photo(sample_data, w: int, h: int) -> np.ndarray:
    img = Image.open(sample_data / "edits" / "landscape_input.jpg").convert("RGB")
    return np.asarray(img.resize((w, h), Image.BILINEAR))


@pytest.mark.parametrize("f", [2, 4, 8])
def test_box_down_is_pils_box_resize_bit_for_bit(sample_data, f):
    rng = np.random.default_rng(f)
    for trial in range(6):
        n = int(rng.integers(1, 40))
        hwc = _photo(sample_data, n * f, n * f) if trial % 2 else rng.integers(0, 256, (n * f, n * f, 3), dtype=np.uint8)
        out = np.empty((3, n, n), np.uint8)
        box_down(np.ascontiguousarray(hwc.transpose(2, 0, 1)), f, out)
        want = np.asarray(Image.fromarray(hwc).resize((n, n), Image.BOX))
        np.testing.assert_array_equal(out.transpose(1, 2, 0), want)


def test_nearest_crop_picks_the_exact_rule():
    """PIL's nudged NEAREST (or the numpy fallback) == nearest_index's integer rule, on random geometries
    (down- and upscaling, random windows) and on sizes with exact ties."""
    rng = np.random.default_rng(0)
    geoms = [(683, 1024, 1024, 1536, 0, 256, 512), (768, 1024, 512, 683, 40, 100, 256),
             (357, 1023, 512, 1467, 0, 900, 512)]
    for _ in range(40):
        r = int(rng.choice([64, 128, 256]))
        h, w = int(rng.integers(8, 700)), int(rng.integers(8, 700))
        nh, nw = r + int(rng.integers(0, 2 * r)), r + int(rng.integers(0, 2 * r))
        geoms.append((h, w, nh, nw, int(rng.integers(0, nh - r + 1)), int(rng.integers(0, nw - r + 1)), r))
    for h, w, nh, nw, y0, x0, r in geoms:
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out = np.empty((r, r), np.uint8)
        _nearest_crop(a, x0, y0, nw, nh, out)
        np.testing.assert_array_equal(out, a[nearest_index(r, h, y0, nh)][:, nearest_index(r, w, x0, nw)])


@pytest.mark.parametrize("r,g", [(192, 64), (128, 128), (256, 32)])  # factor 3 (PIL path), 1, 8
def test_views_at_other_guide_factors(sample_data, r, g):
    img = Image.fromarray(_photo(sample_data, 300, 220))
    seg = np.random.default_rng(1).integers(0, 5, (55, 75)).astype(np.uint8)
    v = crop_views(img, seg, r, g, MaskConfig(), np.random.default_rng(2), True)
    assert v["image"].shape == (r, r, 3) and v["image_lr"].shape == (g, g, 3)
    want = np.asarray(Image.fromarray(v["image"]).resize((g, g), Image.BOX)) if g != r else v["image"]
    np.testing.assert_array_equal(v["image_lr"], want)
    np.testing.assert_array_equal(v["seg_lr"], resize_nearest(v["seg"], g, g))
    np.testing.assert_array_equal(v["mask_lr"], resize_nearest(v["mask"], g, g))
    t = make_views(img, seg, r, g, MaskConfig(), np.random.default_rng(2), True)
    assert torch.equal(t["seg"], torch.from_numpy(v["seg"]).long())
    assert torch.equal(t["image"], torch.from_numpy(v["image"]).permute(2, 0, 1).float().div(127.5).sub(1))


def test_wide_label_values_and_given_masks_keep_their_values(sample_data):
    """make_views is also the inference API: int labels beyond uint8 and a given mask pass unchanged."""
    img = Image.fromarray(_photo(sample_data, 128, 128))
    seg = np.arange(96 * 96, dtype=np.int64).reshape(96, 96) % 1000
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 5:50] = 255
    v = make_views(img, seg, 128, 64, None, np.random.default_rng(0), False, mask=mask)
    assert torch.equal(v["seg"], torch.from_numpy(seg[nearest_index(128, 96)][:, nearest_index(128, 96)]))
    assert v["seg"].max() > 255
    want = torch.from_numpy(resize_nearest((mask != 0).astype(np.float32), 128, 128))[None]
    assert torch.equal(v["mask"], want)
    assert torch.equal(v["mask_lr"], torch.from_numpy((mask != 0).astype(np.float32))[None])


def test_crop_grid_keeps_training_crops_on_the_grid():
    """data.crop_grid: random training crops start on multiples of the grid (token-aligned synthetic content
    stays aligned); grid 1 draws the same crops as before the option existed."""
    big = np.random.default_rng(0).integers(0, 256, (512, 640, 3), dtype=np.uint8)  # no resize at short side 512
    img, seg = Image.fromarray(big), np.zeros((512, 640), np.uint8)
    starts = set()
    for s in range(12):
        v = crop_views(img, seg, 64, 64, None, np.random.default_rng(s), True, short_side=512, crop_grid=16)
        ys, xs = np.nonzero((big[:512 - 63, :640 - 63] == v["image"][0, 0]).all(-1))
        hits = [(y, x) for y, x in zip(ys.tolist(), xs.tolist()) if np.array_equal(big[y:y + 64, x:x + 64], v["image"])]
        assert len(hits) == 1 and hits[0][0] % 16 == 0 and hits[0][1] % 16 == 0, (s, hits)
        starts.add(hits[0])
    assert len(starts) > 6  # still random
    a = crop_views(img, seg, 64, 64, None, np.random.default_rng(5), True, short_side=512)
    b = crop_views(img, seg, 64, 64, None, np.random.default_rng(5), True, short_side=512, crop_grid=1)
    assert np.array_equal(a["image"], b["image"])

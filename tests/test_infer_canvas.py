"""Any photo at its native size (asset_dist/infer/canvas.py): where each edit is sampled, the working views, the
paste back at native resolution; end to end through edit-batch (4:3, portrait, 16:9, a 3000 px photo, a tiny one,
a mask on the border); 2048 px (128 x 128 tokens) through the model at tiny size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist.data.views import make_views
from asset_dist.infer import canvas as C
from asset_dist.infer.blend import dilate
from asset_dist.infer.edits import EditError, make_record, write_edit_shards
from tests.test_infer_common import make_exports, png, sflckr_pair

torch.set_num_threads(1)


def mask_of(w, h, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def check_canvas(c: C.Canvas, mask: np.ndarray, R: int, band: int = 16) -> None:
    Hp, Wp = mask.shape
    assert c.W % 64 == 0 and c.H % 256 == 0 and c.W * c.H <= R * R
    assert c.Wg % 64 == 0 and c.Hg % 256 == 0
    ys, xs = np.nonzero(dilate(mask, band))  # the window holds the hole and its blend band
    assert c.x0 <= xs.min() and xs.max() < c.x0 + c.w and c.y0 <= ys.min() and ys.max() < c.y0 + c.h
    if c.w <= Wp:
        assert 0 <= c.x0 and c.x0 + c.w <= Wp  # inside the photo when it fits
    if c.h <= Hp:
        assert 0 <= c.y0 and c.y0 + c.h <= Hp
    assert abs(c.W / c.w - c.H / c.h) < 0.01 * c.W / c.w  # one scale for both axes


def test_plans():
    # a square photo the model can take whole: edited whole at scale 1, as before
    c = C.plan("e", mask_of(1024, 1024, 100, 600, 300, 900), 1024)
    assert (c.x0, c.y0, c.w, c.h, c.W, c.H, c.Wg, c.Hg) == (0, 0, 1024, 1024, 1024, 1024, 256, 256)
    c = C.plan("e", mask_of(512, 512, 10, 10, 50, 50), 1024)
    assert (c.w, c.h, c.W, c.H, c.Wg, c.Hg) == (512, 512, 512, 512, 256, 256)
    # 4:3 and portrait photos: whole, native
    c = C.plan("e", mask_of(1024, 768, 400, 300, 600, 500), 1024)
    assert (c.x0, c.y0, c.w, c.h, c.W, c.H, c.scale) == (0, 0, 1024, 768, 1024, 768, 1.0) and (c.Wg, c.Hg) == (320, 256)
    c = C.plan("e", mask_of(768, 1024, 300, 400, 500, 600), 1024)
    assert (c.w, c.h, c.W, c.H, c.scale) == (768, 1024, 768, 1024, 1.0)
    # 16:9, small mask at the right border: a square window of native pixels, inside the photo
    m = mask_of(1920, 1080, 1800, 500, 1920, 700)
    c = C.plan("e", m, 1024)
    assert (c.w, c.h, c.W, c.H, c.scale) == (1024, 1024, 1024, 1024, 1.0) and c.x0 + c.w == 1920
    check_canvas(c, m, 1024)
    # 3000 x 2000: a small mask gets a native window, a large one is edited downscaled
    m = mask_of(3000, 2000, 1400, 900, 1600, 1100)
    c = C.plan("e", m, 1024)
    assert c.scale == 1.0 and (c.W, c.H) == (1024, 1024)
    check_canvas(c, m, 1024)
    m = mask_of(3000, 2000, 500, 400, 2500, 1600)
    c = C.plan("e", m, 1024)
    assert c.scale < 0.5 and c.W * c.H <= 1024 * 1024
    check_canvas(c, m, 1024)
    # tiny photo: upscaled to a 256 px short side, mirrored up to the 64 px column step
    m = mask_of(200, 150, 50, 50, 100, 100)
    c = C.plan("e", m, 1024)
    assert c.scale > 1.5 and (c.W, c.H) == (384, 256) and c.w > 200 and c.x0 < 0
    check_canvas(c, m, 1024)
    # named errors
    with pytest.raises(EditError, match="too small to edit"):
        C.plan("e", mask_of(12, 40, 0, 0, 5, 5), 1024)
    with pytest.raises(EditError, match="does not fit one 1024 px window"):
        C.plan("e", mask_of(6000, 30, 0, 0, 6000, 20), 1024)


@pytest.mark.parametrize("seed", range(6))
def test_random_plans_hold_their_promises(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        Wp, Hp = int(rng.integers(20, 5000)), int(rng.integers(20, 5000))
        if max(Wp, Hp) / min(Wp, Hp) > 12:
            continue
        bw, bh = int(rng.integers(1, Wp)), int(rng.integers(1, Hp))
        x0, y0 = int(rng.integers(0, Wp - bw + 1)), int(rng.integers(0, Hp - bh + 1))
        m = mask_of(Wp, Hp, x0, y0, x0 + bw, y0 + bh)
        for R in (512, 1024):
            try:
                c = C.plan("e", m, R)
            except EditError:  # only very wide photos: a 256 px tall window holds at most R^2 / 256 px of width
                assert Wp / Hp > R * R / 65536 / 2
                continue
            check_canvas(c, m, R)


def test_square_views_equal_the_old_views():
    """A square photo edited whole at scale 1 gets exactly the views the editor used before (make_views)."""
    im, seg = sflckr_pair(0)
    img = np.asarray(im.resize((512, 512), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(seg).resize((512, 512), Image.NEAREST))
    m = mask_of(512, 512, 40, 300, 400, 420)
    c = C.plan("e", m, 1024)
    v = C.working_views(c, img, lab, m)
    old = make_views(Image.fromarray(img), lab, 512, 256, None, np.random.default_rng(0), False, short_side=512,
                     mask=m)
    assert np.array_equal(v["image"], ((old["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    assert np.array_equal(v["image_lr"], ((old["image_lr"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    for k in ("seg", "seg_lr"):
        assert np.array_equal(v[k], old[k].numpy())
    for k in ("mask", "mask_lr"):
        assert np.array_equal(v[k], old[k][0].numpy())


def test_paste_keeps_every_pixel_beyond_the_band():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (700, 1300, 3), dtype=np.uint8)
    for m in (mask_of(1300, 700, 1200, 600, 1300, 700), mask_of(1300, 700, 100, 100, 1200, 650)):
        c = C.plan("e", m, 512)
        gen = rng.integers(0, 256, (c.H, c.W, 3), dtype=np.uint8)
        out = C.paste(c, gen, photo, m, 5, 16)
        keep = dilate(m, 16)
        assert out.shape == photo.shape and np.array_equal(out[~keep], photo[~keep])
        assert (out[m > 0] != photo[m > 0]).any()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Edits of many shapes from the sflckr photos (native 685-1024 px sizes), one upscaled to 3000 x 2000, a
    small one, and a mask on the border."""
    from asset_dist.infer.classes import ClassTable

    tmp = tmp_path_factory.mktemp("canvas")
    cfg = make_exports(tmp / "w")
    table = ClassTable(182)
    specs = {}
    for i, (eid, size) in enumerate((("landscape43", (1024, 768)), ("portrait", (600, 800)),
                                     ("wide169", (1280, 720)), ("photo3000", (3000, 2000)), ("small", (160, 120)))):
        im, seg = sflckr_pair(i)
        img = np.asarray(im.resize(size, Image.BICUBIC))
        lab = np.asarray(Image.fromarray(seg).resize(size, Image.NEAREST))
        w, h = size
        specs[eid] = (img, lab, mask_of(w, h, w // 3, h // 2, w // 3 + max(16, w // 5), h // 2 + max(16, h // 6)))
    img, lab, _ = specs["wide169"]
    specs["border"] = (img, lab, mask_of(1280, 720, 1180, 0, 1280, 90))  # in the corner
    img, lab, large = specs["photo3000"]
    specs["photo3000"] = (img, lab, mask_of(3000, 2000, 2000, 1500, 2150, 1600))  # a small hole
    specs["large3000"] = (img, lab, large)  # a 600 x 333 px hole: more than a 512 window holds natively
    recs = []
    for eid, (img, lab, m) in specs.items():
        recs.append(make_record(eid, png(img), png(lab), png(m * 255), class_id=table.lookup("tree"),
                                class_name="tree", num_classes=182, label_shift=0))
    write_edit_shards(tmp / "edits", recs, samples_per_shard=3)
    return tmp, cfg, specs


def test_any_photo_is_edited_at_its_own_size(photos):
    from asset_dist.config import load_config
    from asset_dist.infer.runner import run_batch_edits
    from asset_dist.distenv import DistEnv

    tmp, cfg_path, specs = photos
    cfg = load_config(cfg_path, ["infer.samples=1", "infer.batch_size=4"])
    assert run_batch_edits(cfg, str(tmp / "edits"), tmp / "out", device="cpu", env=DistEnv()) == 0
    recs = {r["edit"]: r for r in map(json.loads, (tmp / "out" / "manifest.jsonl").read_text().splitlines())}
    for eid, (img, _, m) in specs.items():
        r = recs[eid]
        assert r["status"] == "ok", r
        assert (r["width"], r["height"]) == (img.shape[1], img.shape[0])
        out = np.asarray(Image.open(tmp / "out" / eid / "sample_0.png"))
        keep = dilate(m, 8)  # infer.blend_band of the test config
        assert out.shape == img.shape and np.array_equal(out[~keep], img[~keep]), eid
        assert (out[m > 0] != img[m > 0]).any(), eid
        W, H = r["canvas"]["working"]
        assert W * H <= 512 * 512 and W % 64 == 0 and H % 256 == 0  # tiny_sga: data.resolution 512
    assert recs["photo3000"]["canvas"]["scale"] == 1.0  # a small hole: native pixels around it
    assert recs["large3000"]["canvas"]["scale"] < 0.5  # edited downscaled, blended back at 3000 x 2000
    assert recs["small"]["canvas"]["scale"] > 1.0
    assert recs["landscape43"]["canvas"]["working"] == [512, 512]  # 1024 x 768 > 512 x 512: a native window


def test_2048_through_the_model():
    """A 2048 px square edit: 128 x 128 tokens, the 16 x 4 block grid scaled to 8 x 32-token blocks (256 tokens
    each); the guide still sees 256 px. Continuous batching == the union sampler on it."""
    from asset_dist.infer.sampler import row_generator, sample_cached
    from asset_dist.infer.scheduler import sample_continuous
    from tests.test_infer_sampler import H, NC, V, tiny

    c = C.plan("e", mask_of(2048, 2048, 900, 1000, 1100, 1100), 2048)
    assert (c.W, c.H, c.hw, c.guide_hw, c.scale) == (2048, 2048, (128, 128), (16, 16), 1.0)
    m = tiny(torch.float32, grid=(16, 4))
    L = 128 * 128
    assert m.layout(L, (128, 128)).nt == 256
    g = torch.Generator().manual_seed(0)
    z, cond = torch.randint(0, V, (2, L), generator=g), torch.randint(0, NC, (2, L), generator=g)
    hole = torch.zeros(2, L, dtype=torch.bool)
    hole[0].view(128, 128)[70:72, 56:70] = True  # 28 tokens across a block boundary
    hole[1].view(128, 128)[4:5, 100:120] = True
    guides = {k: torch.randint(-1, 64, (2, 2, H, 64, 3), generator=g) for k in ("e_self", "d_causal", "d_cross")}
    gens = lambda: [row_generator(0, f"e{i}", 0, "sga") for i in range(2)]  # noqa: E731
    a, _ = sample_cached(m, z, cond, hole, gens(), guides=guides, top_k=5, hw=(128, 128))
    b, st = sample_continuous(m, z, cond, hole, gens(), guides=guides, top_k=5, hw=(128, 128))
    assert torch.equal(a, b) and st.sampled == int(hole.sum()) and (a[hole] != z[hole]).any()


def test_composite_blends_only_around_the_band():
    """composite blends a crop around the band (margin beyond the pyramid's reach, aligned to its sampling grid):
    the same bytes as blending the whole image, for any shape, hole position, level count and band."""
    from asset_dist.infer import blend as B

    rng = np.random.default_rng(0)
    for _ in range(25):
        H, W = int(rng.integers(40, 600)), int(rng.integers(40, 600))
        g, o = (rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(2))
        m = np.zeros((H, W), np.uint8)
        y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
        m[y0:y0 + int(rng.integers(1, H)), x0:x0 + int(rng.integers(1, W))] = 1
        for levels, band in ((5, 16), (3, 0), (6, 8)):
            whole = np.where(B.dilate(m, band)[..., None], B.laplacian_blend(g, o, m, levels), o).astype(np.uint8)
            assert np.array_equal(B.composite(g, o, m, levels, band), whole)

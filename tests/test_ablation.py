"""The long-range benchmark's parts: the scene generator (every pixel equals its stated source), the source
maps -> token -> block sets, pick hit counting against hand values, the bootstrap intervals, the
`evaluate ablation` command on random exports (report, figure, hit rates with a sources file), and the
label-following score of `evaluate edits` on hand-made colours."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist import attention as A
from asset_dist.eval import ablation as AB
from asset_dist.eval import labels as LB

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data_tools"))
import make_longrange as LR  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# generator and source maps


@pytest.mark.parametrize("rule", LR.RULES)
@pytest.mark.parametrize("background", LR.BACKGROUNDS)
def test_every_pixel_equals_its_stated_source(rule, background):
    tex = ("flat", "stripes", "mosaic")
    img, lab = LR.make_scene(rule, 128, seed=3, shapes=2, textures=tex, background=background)
    assert img.shape == (128, 128, 3) and lab.shape == (128, 128)
    assert set(np.unique(lab)) - {LR.BACKGROUND} <= set(LR.SHAPES.values()) and len(np.unique(lab)) >= 2
    again, _ = LR.make_scene(rule, 128, seed=3, shapes=2, textures=tex, background=background)
    assert np.array_equal(img, again)  # seeded
    other, _ = LR.make_scene(rule, 128, seed=4, shapes=2, textures=tex, background=background)
    assert not np.array_equal(img, other)
    if background == "mosaic":  # 4 px cells (128 / 32) on the image's grid: every cell is one colour
        cells = img.reshape(32, 4, 32, 4, 3)
        bg = (lab.reshape(32, 4, 32, 4) == LR.BACKGROUND).all((1, 3))
        assert (cells == cells[:, :1, :, :1]).all((1, 3, 4))[bg].all() and len(np.unique(img.reshape(-1, 3), axis=0)) > 8
    yy, xx = np.mgrid[0:128, 0:128]
    x, y = (xx + 0.5) / 128, (yy + 0.5) / 128  # pixel centres
    covered = np.zeros((128, 128), bool)
    for m in LR.source_maps(rule):
        x0, y0, x1, y1 = m["region"]
        ax, bx, ay, by = m["map"]
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1) & ~covered
        sy = np.floor((ay * y + by) * 128).astype(int)[inside]
        sx = np.floor((ax * x + bx) * 128).astype(int)[inside]
        assert np.array_equal(img[sy, sx], img[inside]) and np.array_equal(lab[sy, sx], lab[inside]), rule
        covered |= inside
    assert covered.all()


def test_fewer_colours():
    """--colours N: only the first N palette colours (the benchmark uses 4); 0 keeps the full palette's draws."""
    img, _ = LR.make_scene("mirror_v", 128, seed=2, shapes=2, textures=("flat", "mosaic"), background="mosaic",
                           colours=4)
    used = {tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0).tolist()}
    assert used <= {tuple(c) for c in LR.PALETTE[:4].tolist()} and len(used) == 4
    a, _ = LR.make_scene("copy_v", 128, seed=2, background="mosaic")
    b, _ = LR.make_scene("copy_v", 128, seed=2, background="mosaic", colours=0)
    assert np.array_equal(a, b)


def test_source_tokens_and_block_sets():
    src = {"width": 64, "height": 64, "maps": LR.source_maps("copy_v")}
    t = AB.source_tokens(src, 4, 4).view(4, 4)
    assert t[0].tolist() == [8, 9, 10, 11] and t[3].tolist() == [4, 5, 6, 7]  # row 0 <-> row 2, row 3 <-> row 1
    t = AB.source_tokens({"width": 64, "height": 64, "maps": LR.source_maps("rot180")}, 4, 4).view(4, 4)
    assert t[0, 0] == 15 and t[3, 1] == 2
    # a 2:1 image: the val view is the centre square, so the left/right quarters fall outside it
    assert AB.crop_box(200, 100) == (0.25, 0.0, 0.75, 1.0)
    wide = {"width": 200, "height": 100, "maps": LR.source_maps("copy_h")}
    assert (AB.source_tokens(wide, 4, 4) == -1).all()  # every source is half the image away: off the crop
    # blocks of a 32 x 32 grid (16 x 4 blocks of 2 x 8 tokens): a hole in block 5 copies from block 37
    hole = torch.zeros(32 * 32, dtype=torch.bool)
    hole[2 * 32 + 8] = True  # token (2, 8): block row 1, block col 1 -> block 5
    s = AB.source_block_sets(AB.source_tokens({"maps": LR.source_maps("copy_v")}, 32, 32), hole, 32, 32, (16, 4))
    assert s.sum() == 1 and bool(s[5, 37])


def test_pick_hits_hand_counts():
    nb = 8
    sets = torch.zeros(nb, nb, dtype=torch.bool)
    sets[1, 6] = True  # query block 1's source is block 6 (far)
    sets[4, 5] = True  # query block 4's source is in its window: no pick can hit it, the row is left out
    picks = torch.full((2, 1, nb, 3), -1)  # 2 layers, 1 head
    picks[0, 0, 1] = torch.tensor([6, 3, -1])  # a hit and a miss (the -1 is not a pick)
    picks[1, 0, 1] = torch.tensor([3, 4, 5])  # three misses
    hit, n, rows_hit, rows = AB.pick_hits(picks, sets, causal=False)
    assert (hit, n, rows_hit, rows) == (1, 5, 1, 2)
    # causal: a source after b-2 is not pickable
    sets_c = torch.zeros(nb, nb, dtype=torch.bool)
    sets_c[6, 2] = True
    sets_c[3, 7] = True
    pc = torch.full((1, 1, nb, 3), -1)
    pc[0, 0, 6] = torch.tensor([2, 0, 1])
    assert AB.pick_hits(pc, sets_c, causal=True) == (1, 3, 1, 1)


def test_bootstrap_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    n = 40
    counts = rng.integers(5, 50, n).astype(float)
    base = rng.uniform(1.0, 3.0, n) * counts  # per-sample summed NLL
    rows = [{"count": int(c), "guided": {"nll": b - 0.3 * c, "correct": 0}, "window": {"nll": b, "correct": 0},
             "random": {"nll": b + rng.normal(0, 0.01) * c, "correct": 0}} for c, b in zip(counts, base)]
    s = AB.summarize(rows, 500, 0)
    g, w = s["rules"]["guided"], s["rules"]["window"]
    assert g["nll_ci"][0] <= g["nll"] <= g["nll_ci"][1]
    assert abs(w["nll"] - g["nll"] - 0.3) < 1e-9
    d = s["differences"]["guided-window"]
    # every sample is exactly 0.3 nats/token better: the paired interval is the point, far from 0
    assert d["excludes_0"] and d["nll_ci"][0] == pytest.approx(-0.3) and d["nll_ci"][1] == pytest.approx(-0.3)
    assert not s["differences"]["random-window"]["excludes_0"] or abs(s["differences"]["random-window"]["nll"]) < 0.01


# ----------------------------------------------------------------------------------------------------------
# label-following score


def test_label_score_hand_colours():
    blue, green, grey = (20, 40, 220), (30, 200, 40), (128, 128, 128)
    hists = {1: LB.histogram(np.array([blue] * 10, np.uint8)), 2: LB.histogram(np.array([green] * 10, np.uint8))}
    S = 32
    image = np.full((S, S, 3), grey, np.uint8)
    image[8:24, 8:24] = green
    old = np.zeros((S, S), np.uint8)
    old[8:24, 8:24] = 2
    mask = np.zeros((S, S), np.uint8)
    mask[8:24, 8:24] = 1
    new = np.where(mask > 0, 1, old).astype(np.uint8)  # green -> "blue class"
    good, bad = image.copy(), image.copy()
    good[8:24, 8:24] = blue
    s = LB.edit_label_score([good, good, bad], image, mask, old, new, hists)
    assert s["labels_change"] and s["changed_fraction"] == 1.0 and s["follows"] is True
    assert s["samples"][0]["to_class"] == 0.0 and s["samples"][2]["to_input"] == 0.0
    assert LB.edit_label_score([bad, bad, good], image, mask, old, new, hists)["follows"] is False
    # repainting an area as the class it already has: reported, kept out of the fraction
    same = LB.edit_label_score([good], image, mask, old, old, hists)
    assert not same["labels_change"] and same["changed_fraction"] == 0.0
    # an unknown class is not scored
    assert LB.edit_label_score([good], image, mask, old, np.where(mask > 0, 9, old).astype(np.uint8),
                               hists)["follows"] is None
    summ = LB.label_summary({"a": s, "b": LB.edit_label_score([bad], image, mask, old, new, hists), "c": same})
    assert summ["fraction"] == 0.5 and summ["edits_scored"] == 2 and summ["edits_labels_barely_change"] == ["c"]


def test_class_colour_stats_from_shards(tmp_path):
    from asset_dist.data.shardwriter import run_sharding

    raw = tmp_path / "raw"
    assert LR.main(["--out", str(raw), "--count", "3", "--size", "64", "--rules", "copy_v"]) == 0
    run_sharding(raw / "images", raw / "labels", tmp_path / "shards", samples_per_shard=10, max_shard_bytes=1 << 30,
                 workers=1, val_fraction=0.0, seed=0, strict=True, resume=False)
    st = LB.load_or_compute_stats(str(tmp_path / "shards"), 0, 182, cache=tmp_path / "cc.json")
    assert st["images"] == 3 and str(LR.BACKGROUND) in st["classes"]
    for c, h in LB.class_histograms(st).items():
        assert abs(h.sum() - 1) < 1e-9
    # every histogram cell that a class uses holds a palette colour
    cells = set(LB.colour_cells(LR.PALETTE).tolist())
    assert all(set(np.flatnonzero(np.asarray(h)).tolist()) <= cells for h in st["classes"].values())
    again = LB.load_or_compute_stats(str(tmp_path / "shards"), 0, 182, cache=tmp_path / "cc.json")
    assert again == json.loads((tmp_path / "cc.json").read_text())
    img = np.asarray(Image.open(next((raw / "images" / "copy_v").iterdir())))
    assert img.shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------------------------
# the mechanism, reduced: does a trained SGA model need the guide's far picks?


def test_guided_picks_reach_the_far_half_reduced_run():
    """The long-range benchmark at token level (bench/longrange_tokens.py; bench/longrange.sh is the full
    pipeline): 16 x 16 token grids whose bottom half copies the top half, every token one of 4 random codes, the
    whole bottom half a hole, so a hole token is predictable only from 8 rows = 32 blocks away. The tiny guide
    (configs/tiny_guide.yaml, dense attention) trains 1800 steps (batch 8), SGA starts from it and trains 100
    steps with its picks; hole NLL / top-1 of the SGA model on 64 held-out grids with guided, random and window
    picks. About 3.5 minutes on one core.

    Measured (seeds 0 / 1 / 2): guided 0.324 / 0.336 / 0.345 nats per hole token (top-1 0.825 / 0.817 / 0.818),
    random 4.655 / 4.790 / 4.851 (0.296 / 0.288 / 0.291), window 4.606 / 4.389 / 5.066 (0.249 / 0.253 / 0.254);
    chance is ln 4 = 1.386. Without its source a model that learnt to copy is confidently wrong, so random and
    window NLLs are both far above chance and not reliably ordered (random <= window failed for seeds 0 and 1);
    random picks do hit the source now and then, which shows in top-1 (+0.035 to +0.047 over window in every
    seed): the ordering asserted is NLL guided << random, window, and top-1 guided > random > window. The guide's
    loss sits at chance for ~1000 steps, then drops (it finds the copy at step 1000-1200 in all three seeds):
    1800 steps leave room for that."""
    sys.path.insert(0, str(REPO / "bench"))
    from longrange_tokens import run

    r = run(guide_steps=1800, sga_steps=100, seed=0)
    g, rnd, w = r["guided"], r["random"], r["window"]
    assert g["nll"] < 0.8 and min(rnd["nll"], w["nll"]) > 1.386 + 1.0, r  # guided copies; the others cannot
    assert g["top1"] > 0.7 > rnd["top1"], r
    assert rnd["top1"] > w["top1"] + 0.015, r  # random picks sometimes land on the source block

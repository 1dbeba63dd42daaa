#!/usr/bin/env python
"""Synthetic scenes where a hole can only be filled correctly from a far-away region (the attention ablation).

Each scene is one half drawn at random (a background and a few shapes) and the other half made from it by a
rule; the label map carries every shape's class, the colours are drawn per image, so labels alone cannot
predict a shape's pixels but its counterpart in the other half can. Rules (source half -> other half):

  copy_v    the bottom half is a copy of the top half (translation by H/2)
  mirror_v  the bottom half is the top half flipped upside down
  rot180    the bottom half is the top half rotated by 180 degrees (point reflection about the centre)
  copy_h    the right half is a copy of the left half (translation by W/2)
  mirror_h  the right half is the left half flipped left-right

In the SGA block layout (16 x 4 blocks in raster order, the sequence is block-major) copy_v / mirror_v /
rot180 put the counterpart of a block 4..60 blocks away; copy_h / mirror_h put it in the same block row,
1-3 blocks away, where a few stacked window layers already reach: they are the near-range controls.

Writes OUT/images/<rule>/<rule>_<n>.png, OUT/labels/<rule>/<rule>_<n>.png, OUT/classes.json ({name: id}, usable as infer.class_names) and
OUT/sources.json:
per sample key (the key data_tools/shard.py gives it) the rule and where each pixel's counterpart is, as
affine maps in normalised image coordinates ({"region": [x0, y0, x1, y1], "map": [ax, bx, ay, by]}: a point
(x, y) of the region has its source at (ax x + bx, ay y + by)). `asset-dist evaluate ablation --sources` reads
it to measure how often the guide's block picks hit the counterpart. Then shard the folders as any dataset:

  python data_tools/make_longrange.py --out data/longrange/raw --count 300 --size 512 --rules copy_v,mirror_v
  python data_tools/shard.py --images data/longrange/raw/images --labels data/longrange/raw/labels \\
      --out data/longrange/shards --val-fraction 0.1

Everything is fixed by --seed (scene n of a rule uses its own seed): the same command writes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from asset_dist.data.shardwriter import safe_key  # noqa: E402
from asset_dist.utils import atomic_write, atomic_write_json  # noqa: E402

RULES = ("copy_v", "mirror_v", "rot180", "copy_h", "mirror_h")
# Well separated colours (RGB): a tiny tokenizer reproduces them, a model must copy which one a shape has.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0),
    (170, 255, 195), (0, 0, 128), (128, 128, 128), (255, 255, 255), (20, 20, 20), (210, 245, 60),
], dtype=np.uint8)
# Label ids in the 182-class landscape convention (COCO-Stuff, 0-based), so the repo's landscape / tiny
# configs take the maps unchanged; the names only document what the ids stand for here.
SHAPES = {"disc": 1, "square": 2, "triangle": 3, "ring": 4, "diamond": 5, "bar": 6}
BACKGROUND = 0
TEXTURES = ("flat", "stripes", "checker", "mosaic")
BACKGROUNDS = ("flat", "mosaic")


def _shape_mask(kind: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dy ** 2 + dx ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "ring":
        d2 = dy ** 2 + dx ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if kind == "bar":
        return (np.abs(dy) <= 0.4 * r) & (np.abs(dx) <= 1.4 * r)
    raise ValueError(kind)


def mosaic(rng: np.random.Generator, h: int, w: int, cell: int, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Square cells of `cell` px, each one random palette colour: content no neighbour predicts."""
    cells = palette[rng.integers(len(palette), size=(-(-h // cell), -(-w // cell)))]
    return np.ascontiguousarray(cells.repeat(cell, 0).repeat(cell, 1)[:h, :w])


def _texture(kind: str, h: int, w: int, c1: np.ndarray, c2: np.ndarray, period: int,
             rng: np.random.Generator, cell: int, palette: np.ndarray = PALETTE) -> np.ndarray:
    if kind == "mosaic":
        return mosaic(rng, h, w, cell, palette)
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = c1
    if kind == "flat":
        return out
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "stripes":
        sel = (yy // period) % 2 == 1
    else:
        sel = ((yy // period) + (xx // period)) % 2 == 1
    out[sel] = c2
    return out


def draw_half(rng: np.random.Generator, h: int, w: int, shapes: int, textures: tuple[str, ...],
              margin: int, background: str = "flat", cell: int = 16, colours: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """One half scene: image uint8 (h, w, 3), labels uint8 (h, w). Shapes keep `margin` px from every edge
    (so the mask sampler's dilated holes stay inside the half) and do not overlap. Mosaic cells start at the
    half's corner, so with `cell` dividing the half they stay on the full image's cell grid after any rule.
    `colours` > 0: only the first `colours` palette colours (fewer, so a small model's copy is learnt sooner)."""
    palette = PALETTE[:colours] if colours > 0 else PALETTE
    order = rng.permutation(len(palette))
    bg, used = palette[order[0]], 1
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = bg
    if background == "mosaic":
        img[:] = mosaic(rng, h, w, cell, palette)
    lab = np.full((h, w), BACKGROUND, dtype=np.uint8)
    kinds = list(SHAPES)
    side = min(h, w)
    placed = 0
    for _ in range(shapes * 20):  # rejection sampling for non-overlapping shapes
        if placed == shapes:
            break
        r = float(rng.uniform(0.12, 0.22) * side)
        lo_y, hi_y, lo_x, hi_x = margin + r, h - margin - r, margin + 1.4 * r, w - margin - 1.4 * r
        if lo_y >= hi_y or lo_x >= hi_x:
            continue
        cy, cx = rng.uniform(lo_y, hi_y), rng.uniform(lo_x, hi_x)
        kind = kinds[int(rng.integers(len(kinds)))]
        m = _shape_mask(kind, h, w, cy, cx, r)
        grown = _shape_mask("square", h, w, cy, cx, 1.5 * r)  # keep a gap between shapes
        if (lab[grown] != BACKGROUND).any():
            continue
        tex = textures[int(rng.integers(len(textures)))]
        c1 = palette[order[used % len(palette)]]
        c2 = palette[order[(used + 1) % len(palette)]]
        used += 2 if tex != "flat" else 1
        fill = _texture(tex, h, w, c1, c2, max(4, side // 16), rng, cell, palette)
        img[m] = fill[m]
        lab[m] = SHAPES[kind]
        placed += 1
    return img, lab


def apply_rule(rule: str, half_img: np.ndarray, half_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full scene from its source half (top half for *_v / rot180, left half for *_h)."""
    if rule == "copy_v":
        f = lambda a: np.concatenate([a, a], 0)  # noqa: E731
    elif rule == "mirror_v":
        f = lambda a: np.concatenate([a, a[::-1]], 0)  # noqa: E731
    elif rule == "rot180":
        f = lambda a: np.concatenate([a, a[::-1, ::-1]], 0)  # noqa: E731
    elif rule == "copy_h":
        f = lambda a: np.concatenate([a, a], 1)  # noqa: E731
    elif rule == "mirror_h":
        f = lambda a: np.concatenate([a, a[:, ::-1]], 1)  # noqa: E731
    else:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    return np.ascontiguousarray(f(half_img)), np.ascontiguousarray(f(half_lab))


def source_maps(rule: str) -> list[dict]:
    """Where each point's counterpart is, in normalised coordinates (both halves: each is the other's source)."""
    top, bottom, left, right = [0, 0, 1, .5], [0, .5, 1, 1], [0, 0, .5, 1], [.5, 0, 1, 1]
    maps = {
        "copy_v": [(top, [1, 0, 1, .5]), (bottom, [1, 0, 1, -.5])],
        "mirror_v": [(top, [1, 0, -1, 1]), (bottom, [1, 0, -1, 1])],
        "rot180": [(top, [-1, 1, -1, 1]), (bottom, [-1, 1, -1, 1])],
        "copy_h": [(left, [1, .5, 1, 0]), (right, [1, -.5, 1, 0])],
        "mirror_h": [(left, [-1, 1, 1, 0]), (right, [-1, 1, 1, 0])],
    }[rule]
    return [{"region": r, "map": m} for r, m in maps]


def make_scene(rule: str, size: int, seed: int, shapes: int = 2, textures: tuple[str, ...] = ("flat",),
               background: str = "flat", cell: int = 0, colours: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scene `seed` of `rule`: image uint8 (size, size, 3) and labels uint8 (size, size). cell 0 = size // 32
    (one 16 px token of a 512 px image: a token-aligned mosaic at full resolution)."""
    cell = cell or size // 32
    if size % 32 or (size // 2) % cell:
        raise ValueError(f"--size must be a multiple of 32 and --cell divide size / 2 (got {size}, {cell})")
    rng = np.random.default_rng([seed, RULES.index(rule)])
    vertical = rule in ("copy_v", "mirror_v", "rot180")
    h, w = (size // 2, size) if vertical else (size, size // 2)
    img, lab = draw_half(rng, h, w, shapes, textures, max(8, size // 32), background, cell, colours)
    return apply_rule(rule, img, lab)


def _png(arr: np.ndarray):
    def write(f) -> None:
        Image.fromarray(arr).save(f, format="PNG")
    return write


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (images/, labels/, sources.json, classes.json)")
    p.add_argument("--count", type=int, default=300, help="scenes per rule (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 32 (default %(default)s)")
    p.add_argument("--rules", default="copy_v,mirror_v,rot180",
                   help=f"comma-separated rules among {', '.join(RULES)} (default %(default)s)")
    p.add_argument("--shapes", type=int, default=2, help="shapes per source half (default %(default)s)")
    p.add_argument("--textures", default="flat",
                   help=f"comma-separated shape textures among {', '.join(TEXTURES)} (default %(default)s)")
    p.add_argument("--background", choices=BACKGROUNDS, default="flat",
                   help="flat: one random colour; mosaic: random colour cells, so every hole token (not only "
                        "the first of a shape) needs its far counterpart (default %(default)s)")
    p.add_argument("--cell", type=int, default=0,
                   help="mosaic cell side in px (default size / 32: one token of the full-resolution image)")
    p.add_argument("--colours", type=int, default=0,
                   help=f"use only the first N of the {len(PALETTE)} palette colours (default: all)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rules = [r.strip() for r in a.rules.split(",") if r.strip()]
    textures = tuple(t.strip() for t in a.textures.split(",") if t.strip())
    bad = [r for r in rules if r not in RULES] + [t for t in textures if t not in TEXTURES]
    if bad or not rules or not textures:
        print(f"error: unknown rule/texture {bad}; rules: {', '.join(RULES)}; textures: {', '.join(TEXTURES)}",
              file=sys.stderr)
        return 2
    if a.count < 1 or a.shapes < 1 or not 0 <= a.colours <= len(PALETTE) or a.colours == 1 or a.size < 64 or a.size % 32 or a.cell < 0 or (a.cell and (a.size // 2) % a.cell):
        print(f"error: --count and --shapes must be >= 1, --size a multiple of 32 and >= 64, --cell divide "
              f"size / 2, --colours 0 or 2..{len(PALETTE)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    sources: dict[str, dict] = {}
    for rule in rules:
        for n in range(a.count):
            img, lab = make_scene(rule, a.size, a.seed * 1_000_003 + n, a.shapes, textures, a.background, a.cell,
                                  a.colours)
            stem = f"{rule}/{rule}_{n:05d}"
            atomic_write(out / "images" / f"{stem}.png", _png(img))
            atomic_write(out / "labels" / f"{stem}.png", _png(lab))
            sources[safe_key(stem)] = {"rule": rule, "width": a.size, "height": a.size, "maps": source_maps(rule)}
        print(f"{rule}: {a.count} scenes", file=sys.stderr, flush=True)
    # a class table in the format infer.class_names reads ({name: id})
    atomic_write_json(out / "classes.json", {"background": BACKGROUND, **SHAPES})
    atomic_write_json(out / "sources.json", {"format": "asset_dist.longrange.v1", "seed": a.seed, "size": a.size,
                                             "rules": rules, "background": a.background, "textures": list(textures),
                                             "colours": a.colours or len(PALETTE),
                                             "samples": sources})
    print(f"wrote {len(sources)} scenes to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

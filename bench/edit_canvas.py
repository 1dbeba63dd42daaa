#!/usr/bin/env python
"""Editing any photo (asset_dist/infer/canvas.py): what each photo/mask shape costs and gives up.

Per case (a bundled sflckr photo resized to the size, a rectangular hole): the canvas the editor picks for a
model of --resolution R, then
- scale: working px per native px (1 = the hole is generated at native resolution);
- detail (PSNR, dB): the input's hole region downscaled to the canvas scale and back (bicubic), against the
  native pixels: the most detail a hole generated at that scale can keep (inf at scale 1);
- context: the share of the photo the model sees; pad: the mirrored share of the working canvas; tokens: L;
- canvas s: planning + working views + the paste back (blend at native resolution), the editor's own work;
- with --e2e: whole edits through the runner (tiny random-weight exports, light tokenizers) and the check that
  every pixel beyond the blend band equals the input.

Example: python bench/edit_canvas.py --resolution 1024 --e2e
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asset_dist.infer import canvas as C  # noqa: E402
from asset_dist.infer.blend import dilate  # noqa: E402

SFLCKR = REPO / "sample_data" / "sflckr"
CASES = [  # name, photo (w, h), hole (x0, y0, x1, y1) as fractions of the photo
    ("square 1024", (1024, 1024), (0.3, 0.55, 0.6, 0.85)),
    ("4:3 1024x768", (1024, 768), (0.3, 0.55, 0.6, 0.85)),
    ("portrait 768x1024", (768, 1024), (0.3, 0.55, 0.6, 0.85)),
    ("16:9 1920x1080", (1920, 1080), (0.6, 0.5, 0.75, 0.8)),
    ("3000x2000 small hole", (3000, 2000), (0.6, 0.6, 0.66, 0.68)),
    ("3000x2000 large hole", (3000, 2000), (0.2, 0.3, 0.7, 0.8)),
    ("4000x3000 sky", (4000, 3000), (0.0, 0.0, 1.0, 0.35)),
    ("border 1920x1080", (1920, 1080), (0.92, 0.0, 1.0, 0.15)),
    ("tiny 200x150", (200, 150), (0.3, 0.3, 0.6, 0.6)),
    ("2048 square", (2048, 2048), (0.4, 0.4, 0.55, 0.5)),
]


def photo(i: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    imgs = sorted((SFLCKR / "images").rglob("*.jpg"))
    p = imgs[i % len(imgs)]
    seg = Image.open(SFLCKR / "segmentations" / p.relative_to(SFLCKR / "images").with_suffix(".png"))
    return (np.asarray(Image.open(p).convert("RGB").resize(size, Image.BICUBIC)),
            np.asarray(seg.resize(size, Image.NEAREST)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def measure(name, size, box, R, i) -> tuple[dict, tuple]:
    img, seg = photo(i, size)
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), max(int(box[2] * w), int(box[0] * w) + 1), \
        max(int(box[3] * h), int(box[1] * h) + 1)
    mask[y0:y1, x0:x1] = 1
    t0 = time.perf_counter()
    c = C.plan(name, mask, R)
    v = C.working_views(c, img, seg, mask)
    out = C.paste(c, v["image"], img, mask, 5, 16)  # the input's own pixels as "generated": a round trip
    dt = time.perf_counter() - t0
    win = C.window(img, c)
    back = np.asarray(Image.fromarray(v["image"]).resize((c.w, c.h), Image.BICUBIC)) if c.scale != 1 else win
    hole = C.window(mask, c) > 0
    inside = (min(c.x0 + c.w, w) - max(c.x0, 0)) * (min(c.y0 + c.h, h) - max(c.y0, 0))
    keep = dilate(mask, 16)
    r = {"case": name, "photo": f"{w}x{h}", "hole_px": f"{x1 - x0}x{y1 - y0}", "R": R,
         "window": f"{c.w}x{c.h}", "working": f"{c.W}x{c.H}", "tokens": c.hw[0] * c.hw[1],
         "guide": f"{c.Wg}x{c.Hg}", "scale": round(c.scale, 3), "detail_psnr_db": round(psnr(back[hole], win[hole]), 1),
         "context": round(inside / (w * h), 3), "pad": round(1 - inside / (c.w * c.h), 3),
         "canvas_s": round(dt, 3), "outside_identical": bool(np.array_equal(out[~keep], img[~keep]))}
    return r, (img, seg, mask)


def e2e(cases: list[tuple], R: int) -> dict[str, dict]:  # cases: (name, data, R of the case)
    """Whole edits through the runner: tiny random-weight exports with light tokenizers (no res blocks)."""
    import torch

    sys.path.insert(0, str(REPO))
    from asset_dist.config import load_config
    from asset_dist.infer.classes import ClassTable
    from asset_dist.infer.edits import MemoryEdits, make_record
    from asset_dist.infer.runner import run_batch_edits
    from asset_dist.distenv import DistEnv
    from tests.test_infer_common import make_exports, png

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_canvas_"))
    cfg_path = make_exports(tmp / "w")
    table = ClassTable(182)
    out = {}
    for k, (name, (img, seg, mask), r_case) in enumerate(cases):
        cfg = load_config(cfg_path, [f"infer.resolution={r_case}", "infer.samples=1", "infer.blend_band=16"])
        rec = make_record(f"c{k}", png(img), png(seg), png(mask * 255), class_id=table.lookup("tree"),
                          class_name="tree", num_classes=182, label_shift=0)
        t0 = time.perf_counter()
        run_batch_edits(cfg, "", tmp / f"o{k}", device="cpu", env=DistEnv(), edit_set=MemoryEdits([rec]))
        dt = time.perf_counter() - t0
        res = np.asarray(Image.open(tmp / f"o{k}" / f"c{k}" / "sample_0.png"))
        keep = dilate(mask, 16)
        r = json.loads((tmp / f"o{k}" / f"c{k}" / "record.json").read_text())
        out[name] = {"edit_s": round(dt, 1), "timings_s": r["timings_s"],
                     "same_size": res.shape == img.shape, "outside_identical": bool(np.array_equal(res[~keep],
                                                                                                    img[~keep]))}
        print(json.dumps({"case": name, **out[name]}), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024, help="the model's resolution R (infer.resolution)")
    p.add_argument("--e2e", action="store_true", help="also run whole edits through the runner (tiny models)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    rows, inputs = [], []
    for i, (name, size, box) in enumerate(CASES):
        R = 2048 if name.startswith("2048") else a.resolution
        r, data = measure(name, size, box, R, i)
        rows.append(r)
        inputs.append((name, data, R))
    ends = e2e(inputs, a.resolution) if a.e2e else {}
    head = ["case", "photo", "hole_px", "R", "window", "working", "tokens", "guide", "scale", "detail_psnr_db",
            "context", "pad", "canvas_s", "outside_identical"]
    print("\n| " + " | ".join(head + (["edit s (tiny)", "same size, outside identical"] if ends else [])) + " |")
    print("|" + "---|" * (len(head) + (2 if ends else 0)))
    for r in rows:
        extra = []
        if ends:
            e = ends[r["case"]]
            extra = [str(e["edit_s"]), f"{e['same_size']}, {e['outside_identical']}"]
        print("| " + " | ".join(str(r[k]) for k in head) + (" | " + " | ".join(extra) if extra else "") + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "e2e": ends}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

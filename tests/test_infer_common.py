"""Shared helpers of the test_infer_* files (tiny exports, edit sets, CLI runs), plus the class table and the
Laplacian blend."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist.infer import blend as B
from asset_dist.infer.classes import ClassTable, class_table

REPO = Path(__file__).resolve().parents[1]
SFLCKR = REPO / "sample_data" / "sflckr"

# tiny_sga.yaml with smaller tokenizers (no res blocks, no attention): the same code paths, CPU-cheap
TEST_YAML = """base: {repo}/configs/tiny_sga.yaml
model:
  vqgan: {{num_res_blocks: 0, decoder_res_blocks: 0, attn_resolutions: []}}
  seg: {{num_res_blocks: 0, decoder_res_blocks: 0, attn_resolutions: []}}
infer:
  vqgan_weights: {w}/vqgan.pt
  seg_weights: {w}/seg.pt
  guide_weights: {w}/guide.pt
  sga_weights: {sga}
  samples: 2
  batch_size: 3
  blend_band: 8
  preview_size: 64
  claim_chunk: 1
"""


# ----------------------------------------------------------------------------------------------------------
# helpers (imported by the other test_infer_* files)


def make_exports(out: Path, sga: bool = True, seed: int = 0) -> Path:
    """Random-weight exports (vqgan, seg, guide, sga) in the real export format and a config using them."""
    from asset_dist.config import load_config, to_dict
    from asset_dist.models.seg_vq import SegVQModel
    from asset_dist.models.transformer import AssetTransformer
    from asset_dist.models.vqgan import VQModel
    from asset_dist.artifacts import write_export

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(TEST_YAML.format(repo=REPO, w=out, sga=f"{out}/sga.pt" if sga else '""'))
    cfg = load_config(cfg_path)
    torch.manual_seed(seed)
    models = {"vqgan": VQModel(cfg.model.vqgan), "seg": SegVQModel(cfg.model.seg),
              "guide": AssetTransformer(cfg.model.transformer), "sga": AssetTransformer(cfg.model.transformer)}
    with torch.no_grad():  # larger than the 0.02 init: peaked logits, so samples depend on the context
        for name in ("guide", "sga"):
            for p in models[name].parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.15)
    for stage, m in models.items():
        write_export(out / f"{stage}.pt", stage=stage, network="model", state_dict=m.state_dict(),
                     config=to_dict(cfg), lineage={"test": "random weights"}, step=0)
    return cfg_path


def sflckr_pair(i: int) -> tuple[Image.Image, np.ndarray]:
    imgs = sorted((SFLCKR / "images").rglob("*.jpg"))
    p = imgs[i]
    seg = SFLCKR / "segmentations" / p.relative_to(SFLCKR / "images").with_suffix(".png")
    return Image.open(p).convert("RGB"), np.asarray(Image.open(seg))


def square(i: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A centre square of sflckr pair i resized to side (image: box/bilinear, labels: nearest)."""
    im, seg = sflckr_pair(i)
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    img = np.array(im.crop(box).resize((side, side), Image.BILINEAR))
    lab = np.array(Image.fromarray(seg).crop(box).resize((side, side), Image.NEAREST))
    return img, lab


def rect_mask(side: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(folder: Path, name: str, image: np.ndarray, seg: np.ndarray, mask: np.ndarray) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / f"{name}.png", "seg": folder / f"{name}_seg.png", "mask": folder / f"{name}_mask.png"}
    for k, a in (("image", image), ("seg", seg), ("mask", mask)):
        paths[k].write_bytes(png(a))
    return {k: str(v) for k, v in paths.items()}


def small_edit_set(out: Path, with_bad: bool = True, with_512: bool = True) -> list[str]:
    """A few edits from sample_data/sflckr (256 px with different holes and classes, one 512 px with a
    small hole) and, with_bad, one edit that fails at run time (its mask has another aspect than its image,
    stored without checks).
    Returns the ids of the edits expected to succeed."""
    from asset_dist.infer.edits import make_record, write_edit_shards

    specs = [("a256", 0, 256, (64, 128, 0, 256), "waterother"), ("b256", 1, 256, (0, 48, 96, 200), "snow"),
             ("c256", 2, 256, (150, 256, 30, 140), "None"), ("d256", 3, 256, (100, 180, 100, 180), "tree")]
    if with_512:
        specs.append(("e512", 4, 512, (300, 348, 0, 160), "sea"))
    table = ClassTable(182)
    recs = []
    for eid, i, side, (y0, y1, x0, x1), cls in specs:
        img, lab = square(i, side)
        cid = table.lookup(cls)
        recs.append(make_record(eid, png(img), png(lab), png(rect_mask(side, y0, y1, x0, x1)), class_id=cid,
                                class_name=table.name(cid), num_classes=182, label_shift=0))
    if with_bad:
        img, lab = square(5, 256)
        bad = make_record("zbad", png(img[:, :200]), png(lab), png(rect_mask(256, 0, 64, 0, 64)), class_id=3,
                          class_name="x", num_classes=182, label_shift=0)
        recs.append(bad)
    write_edit_shards(out, recs, samples_per_shard=2)
    return [s[0] for s in specs]


def many_edits(out: Path, n: int, side: int = 256) -> list[str]:
    """n edits e000.. of the sflckr samples at side px (holes of a quarter of the height, four classes), for
    runs that need more edits than small_edit_set (claims, benchmarks). Returns their ids."""
    from asset_dist.infer.edits import make_record, write_edit_shards

    table, recs, ids = ClassTable(182), [], []
    for k in range(n):
        img, lab = square(k % 6, side)
        y = side // 8 + (k % 5) * side // 16
        cid = table.lookup(("sea", "tree", "snow", "grass")[k % 4])
        recs.append(make_record(f"e{k:03d}", png(img), png(lab), png(rect_mask(side, y, y + side // 4, side // 5,
                                                                            side * 5 // 8)),
                                class_id=cid, class_name=table.name(cid), num_classes=182, label_shift=0))
        ids.append(f"e{k:03d}")
    write_edit_shards(out, recs, samples_per_shard=4)
    return ids


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def cli(args: list[str], nproc: int = 1, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    """`asset-dist ARGS` in a subprocess; nproc > 1 runs it under torchrun."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29700 + os.getpid() % 1000), "-m", "asset_dist.cli", *args]
    else:
        cmd = [sys.executable, "-m", "asset_dist.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc})\n--- stdout\n{proc.stdout[-3000:]}" \
                                  f"\n--- stderr\n{proc.stderr[-6000:]}"


# ----------------------------------------------------------------------------------------------------------
# class table


def test_class_table_matches_the_official_dictionaries():
    land = ClassTable(182, 0)
    official = {"mountain": 134, "snow": 158, "river": 147, "waterother": 177, "road": 148, "grass": 123,
                "rock": 149, "tree": 168, "clouds": 105, "stone": 161, "sea": 154, "skyother": 156, "flower": 118,
                "None": -1}
    assert {k: land.lookup(k) for k in official} == official
    assert land.lookup("person") == 0 and land.lookup("banner") == 91 and land.lookup("Water-Other") == 177
    coco = ClassTable(183, 1)
    assert coco.lookup("pizza") == 59 and coco.lookup("unlabeled") == 0 and coco.lookup("wall-panel") == 174
    assert coco.lookup("waterother") == 178
    with pytest.raises(ValueError, match="unknown class name 'lake'"):
        land.lookup("lake")
    with pytest.raises(ValueError, match="outside the model's 182 classes"):
        land.lookup("182")
    with pytest.raises(ValueError, match="outside"):
        ClassTable(10).lookup("tree")  # a real name, but not a class of a 10-class model


def test_class_table_files(tmp_path):
    (tmp_path / "names.txt").write_text("sky\n\nlake\n")
    t = class_table(3, 0, str(tmp_path / "names.txt"), {"pond": 2})
    assert (t.lookup("sky"), t.lookup("lake"), t.lookup("pond")) == (0, 2, 2)
    (tmp_path / "names.json").write_text('{"lake": 1}')
    assert class_table(3, 0, str(tmp_path / "names.json")).lookup("lake") == 1


# ----------------------------------------------------------------------------------------------------------
# blend


def test_pyramid_ops_by_hand():
    x = np.arange(6, dtype=np.float64)[None, :, None].repeat(3, 0)  # rows identical: only the columns blur
    d = B.pyr_down(x)
    # reflect-101 at column 0: [2,1,0,1,2] -> (2 + 4 + 0 + 4 + 2)/16 = 0.75; column 2: (0+4+12+12+4)/16 = 2
    # column 4: [2,3,4,5,4] -> (2 + 12 + 24 + 20 + 4)/16 = 3.875
    np.testing.assert_allclose(d[0, :, 0], [0.75, 2.0, 3.875])
    assert d.shape == (2, 3, 1)
    for shape in ((5, 7), (6, 8)):
        c = np.full(shape + (3,), 42.0)
        np.testing.assert_allclose(B.pyr_up(B.pyr_down(c), shape), c)
    with pytest.raises(ValueError, match="factor-2"):
        B.pyr_up(np.zeros((3, 3)), (9, 9))


def test_blend_extremes_and_band():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    zero, one = np.zeros((96, 80)), np.ones((96, 80))
    assert np.array_equal(B.laplacian_blend(a, b, zero), b)  # the bands telescope: exact reconstruction
    assert np.array_equal(B.laplacian_blend(a, b, one), a)
    m = np.zeros((96, 80), np.uint8)
    m[30:50, 20:60] = 1
    out = B.composite(a, b, m, levels=5, band=6)
    keep = B.dilate(m, 6)
    assert np.array_equal(out[~keep], b[~keep])  # byte-identical outside the band
    assert not np.array_equal(out[m > 0], b[m > 0])  # generated content inside
    blended = B.laplacian_blend(a, b, m)
    assert not np.array_equal(blended[~keep], b[~keep])  # the plain pyramid blend does bleed: the composite matters
    assert B.dilate(m, 6)[24, 20] and not B.dilate(m, 6)[23, 20]

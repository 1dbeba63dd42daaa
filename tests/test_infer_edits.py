"""Edit sets: the official edit files load as they are, dataset-made edits, lists, and every kind of bad input
(recorded as failed, naming the edit, while the other edits are written)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from asset_dist.infer.edits import EditSet, decode_edit, make_record, split_for_rank
from asset_dist.models.tokens import token_hole
from tests.test_infer_common import REPO, SFLCKR, png, rect_mask, square, write_inputs

sys.path.insert(0, str(REPO / "data_tools"))
import make_edits  # noqa: E402

torch.set_num_threads(1)
EDITS = REPO / "sample_data" / "edits"


def _load_one(folder, n_classes):
    es = EditSet(str(folder))
    assert len(es) == 1
    return es.load(es.ids[0]), decode_edit(es.load(es.ids[0]), n_classes)


def _holes(mask):
    m = torch.from_numpy(mask)[None, None].float()
    return int(token_hole(m, "nearest").sum()), int(token_hole(m, "any").sum())


def test_official_edits_load_as_they_are(tmp_path):
    assert make_edits.main(["official", "--which", "landscape", "--out", str(tmp_path / "land")]) == 0
    files, e = _load_one(tmp_path / "land", 182)
    assert files.image == (EDITS / "landscape_input.jpg").read_bytes()  # original JPEG bytes, not re-encoded
    assert (e.side, e.class_id, files.meta["label_shift"]) == (1024, 177, 0)
    assert _holes(e.mask) == (1984, 2048)  # docs/ASSET_NOTES.md §8: nearest vs any-touched token holes
    assert e.mask[513].sum() == 0 and e.mask[514].all()  # rows 514-1023, full width
    seg512 = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(EDITS / "landscape_seg.png"))
    up = np.repeat(np.repeat(seg512, 2, 0), 2, 1)  # the 512 label map nearest-upsampled to the image
    assert np.array_equal(e.seg, np.where(e.mask > 0, 177, up))

    assert make_edits.main(["official", "--which", "coco", "--out", str(tmp_path / "coco")]) == 0
    files, e = _load_one(tmp_path / "coco", 183)
    assert (e.side, e.class_id, files.meta["num_classes"]) == (512, 59, 183)
    assert _holes(e.mask) == (431, 478)
    assert set(np.unique(e.seg[e.mask == 0])) <= {0, 59, 72, 109, 156, 161, 172, 174}
    # the conventions are enforced: a COCO edit cannot run on the 182-class landscape model
    with pytest.raises(ValueError, match="183-class"):
        decode_edit(files, 182)


def test_dataset_mode_from_shards_and_folders(tmp_path, sflckr_shards):
    args = ["--classes", "waterother,snow,None", "--resolution", "256", "--per-image", "2", "--limit", "3"]
    assert make_edits.main(["dataset", "--shards", str(sflckr_shards), *args, "--out", str(tmp_path / "s")]) == 0
    es = EditSet(str(tmp_path / "s"))
    assert len(es) == 6 and all(i.endswith(("_e0", "_e1")) for i in es.ids)
    for eid in es.ids:
        e = decode_edit(es.load(eid), 182)
        assert e.side == 256 and 0 < e.mask.mean() < 0.7 and e.class_id in (177, 158, -1)
        assert e.mask[::16, ::16].any()  # the training sampler guarantees a hole on the 16x16 grid
    # deterministic: the same arguments give the same bytes
    assert make_edits.main(["dataset", "--shards", str(sflckr_shards), *args, "--out", str(tmp_path / "s2")]) == 0
    es2 = EditSet(str(tmp_path / "s2"))
    assert all(es.load(i).digest() == es2.load(i).digest() for i in es.ids)
    # folders: raw COCO-Stuff maps (255 = unlabeled) are shifted to the 183-class convention
    coco = REPO / "sample_data" / "coco_stuff"
    assert make_edits.main(["dataset", "--images", str(coco / "images"), "--labels", str(coco / "segmentations"),
                            "--convention", "coco", "--classes", "pizza", "--limit", "2", "--mask-kind", "coco",
                            "--out", str(tmp_path / "c")]) == 0
    es = EditSet(str(tmp_path / "c"))
    e = decode_edit(es.load(es.ids[0]), 183)
    assert e.class_id == 59 and int(e.seg.max()) <= 182
    # without the shift, 255 is outside the classes: every edit fails, nothing is written
    assert make_edits.main(["dataset", "--images", str(coco / "images"), "--labels", str(coco / "segmentations"),
                            "--convention", "landscape", "--classes", "tree", "--limit", "2",
                            "--out", str(tmp_path / "c2")]) == 1


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    img, lab = square(0, 256)
    good = write_inputs(tmp_path / "in", "good", img, lab, rect_mask(256, 0, 64, 0, 256))
    cases = {
        "nonsquare": write_inputs(tmp_path / "in", "ns", img[:, :200], lab, rect_mask(256, 0, 64, 0, 64)),
        "oddsize": write_inputs(tmp_path / "in", "odd", img[:200, :200], lab[:200, :200], rect_mask(200, 0, 9, 0, 9)),
        "badmask": write_inputs(tmp_path / "in", "bm", img, lab, rect_mask(256, 0, 64, 0, 64)[:, :100]),
        "emptymask": write_inputs(tmp_path / "in", "em", img, lab, rect_mask(256, 0, 0, 0, 0)),
        "fullmask": write_inputs(tmp_path / "in", "fm", img, lab, rect_mask(256, 0, 256, 0, 256)),
        "labels": write_inputs(tmp_path / "in", "lb", img, np.full_like(lab, 200), rect_mask(256, 0, 64, 0, 64)),
    }
    (tmp_path / "in" / "broken.png").write_bytes(png(img)[:300])  # truncated file
    rows = [{"id": "good", **good, "class": "sea"}, {"id": "unknownclass", **good, "class": "lake"},
            {"id": "unreadable", **good, "image": str(tmp_path / "in" / "broken.png"), "class": "sea"},
            {"id": "missing", **good, "mask": str(tmp_path / "in" / "nope.png"), "class": "sea"},
            {"id": "newseg", **good, "new_seg": good["seg"]},
            {"id": "outofrange", **good, "class": "190"}]
    rows += [{"id": k, **v, "class": "tree"} for k, v in cases.items()]
    lst = tmp_path / "edits.jsonl"
    lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert make_edits.main(["files", "--list", str(lst), "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["edit_ids"] == ["good", "newseg"]
    errors = {f["edit"]: f["error"] for f in m["failed"]}
    expect = {"unknownclass": "unknown class name 'lake'", "unreadable": "image is unreadable",
              "missing": "cannot read the mask", "outofrange": "outside the model's 182 classes",
              "nonsquare": "must be square", "oddsize": "not a multiple of 256",
              "badmask": "cannot be aligned", "emptymask": "mask is empty", "fullmask": "covers the whole image",
              "labels": "label ids [200] outside the model's 182 classes"}
    assert set(errors) == set(expect)
    for eid, msg in expect.items():
        assert errors[eid].startswith(f"edit {eid!r}") and msg in errors[eid], errors[eid]
    assert "failed: edit 'fullmask'" in capsys.readouterr().err
    # --strict: nothing written, exit 1
    assert make_edits.main(["files", "--list", str(lst), "--strict", "--out", str(tmp_path / "strict")]) == 1
    assert not (tmp_path / "strict" / "manifest.json").exists()
    # an existing set is not overwritten by accident
    assert make_edits.main(["files", "--list", str(lst), "--out", str(tmp_path / "o")]) == 1


def test_csv_folders_and_rank_split(tmp_path):
    img, lab = square(1, 512)
    d = tmp_path / "f"
    for sub, a in (("images", img), ("segs", lab), ("masks", rect_mask(512, 0, 100, 0, 512))):
        (d / sub / "x").mkdir(parents=True)
        (d / sub / "x" / "one.png").write_bytes(png(a))
    assert make_edits.main(["files", "--images", str(d / "images"), "--segs", str(d / "segs"), "--masks",
                            str(d / "masks"), "--class", "mountain", "--out", str(tmp_path / "o")]) == 0
    e = decode_edit(EditSet(str(tmp_path / "o")).load("x_one"), 182)
    assert e.class_id == 134 and (e.seg[e.mask > 0] == 134).all()
    csv = tmp_path / "l.csv"
    csv.write_text("id,image,seg,mask,class\nrel,f/images/x/one.png,f/segs/x/one.png,f/masks/x/one.png,7\n")
    assert make_edits.main(["files", "--list", str(csv), "--out", str(tmp_path / "c")]) == 0  # relative paths
    assert decode_edit(EditSet(str(tmp_path / "c")).load("rel"), 182).class_id == 7
    ids = [f"e{i}" for i in range(7)]
    parts = [split_for_rank(ids, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and len(set(sum(parts, []))) == 7
    # the runner rejects records the builder would have rejected (shards can come from anywhere)
    bad = make_record("b", png(img), png(lab), png(rect_mask(512, 0, 0, 0, 0)), class_id=1, class_name="x",
                      num_classes=182, label_shift=0)
    with pytest.raises(ValueError, match="edit 'b': the mask is empty"):
        decode_edit(bad, 182)
    assert SFLCKR.is_dir()

"""Quickstart tools: the official edits resized and converted to the other label convention
(make_edits.py official --resolution/--convention), and `asset-dist gallery` on a hand-made edit-batch output."""
from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

from asset_dist.infer.build import convert_labels
from asset_dist.infer.edits import EditSet, decode_edit
from asset_dist.infer.gallery import write_gallery
from tests.test_infer_common import REPO

sys.path.insert(0, str(REPO / "data_tools"))
import make_edits  # noqa: E402

EDITS = REPO / "sample_data" / "edits"


def test_convert_labels_between_conventions():
    coco = np.array([[5, 0, 0, 9, 182, 1]], dtype=np.uint8)
    land = convert_labels(coco, 1, 0)
    # classes move down by one; COCO's unlabeled 0 takes the nearest labelled pixel's class
    assert land.tolist() == [[4, 4, 8, 8, 181, 0]]
    assert convert_labels(land, 0, 1).tolist() == [[5, 5, 9, 9, 182, 1]]
    assert convert_labels(coco, 1, 1) is coco


def test_official_edits_at_512_in_the_landscape_convention(tmp_path):
    for which, cid in (("landscape", 177), ("coco", 58)):
        out = tmp_path / which
        assert make_edits.main(["official", "--which", which, "--root", str(EDITS), "--resolution", "512",
                                "--convention", "landscape", "--out", str(out)]) == 0
        es = EditSet(str(out))
        files = es.load(es.ids[0])
        e = decode_edit(files, 182)
        assert (e.width, e.class_id, files.meta["label_shift"]) == (512, cid, 0)
        raw = np.asarray(Image.open(EDITS / f"{which}_seg.png"))
        if which == "landscape":  # same convention: the 512 label map as it is, the class painted in
            assert np.array_equal(e.seg, np.where(e.mask > 0, cid, raw))
            assert e.mask[256].sum() == 0 and e.mask[258].all()  # rows 514-1023 of 1024 -> 257.. of 512
        else:  # every labelled pixel moves down by one
            keep = (e.mask == 0) & (raw > 0)
            assert np.array_equal(e.seg[keep], raw[keep] - 1)


def test_gallery_rows_for_ok_failed_and_missing_edits(tmp_path):
    es_dir = tmp_path / "edits"
    assert make_edits.main(["official", "--which", "landscape", "--root", str(EDITS), "--resolution", "256",
                            "--out", str(es_dir)]) == 0
    res = tmp_path / "res"
    eid = "official_landscape"
    (res / eid).mkdir(parents=True)
    sample = np.full((256, 256, 3), 7, np.uint8)
    Image.fromarray(sample).save(res / eid / "sample_0.png")
    (res / eid / "record.json").write_text(json.dumps(
        {"edit": eid, "status": "ok", "size": 256, "hole_tokens": 128, "samples": 1, "outputs": ["sample_0.png"],
         "timings_s": {"sample": 1.5}}))
    r = write_gallery(str(es_dir), res, tmp_path / "g", 182, size=64)
    assert (r["rows"], r["ok"], r["failed"]) == (1, 1, [])
    page = (tmp_path / "g" / "gallery.html").read_text()
    assert f"gallery/{eid}/sample_0.png" in page and "water-other" in page and "sample 1.5 s" in page
    tile = np.asarray(Image.open(tmp_path / "g" / "gallery" / eid / "sample_0.png"))
    assert tile.shape == (64, 64, 3) and (tile == 7).all()
    sheet = np.asarray(Image.open(tmp_path / "g" / "contact_sheet.png"))
    assert sheet.shape[1] > 5 * 64 and sheet.shape[0] > 64

    (res / eid / "record.json").write_text(json.dumps({"edit": eid, "status": "failed", "error": "edit boom"}))
    r = write_gallery(str(es_dir), res, tmp_path / "g", 182, size=64)
    assert r["failed"] == [eid] and "edit boom" in (tmp_path / "g" / "gallery.html").read_text()
    (res / eid / "record.json").unlink()
    r = write_gallery(str(es_dir), res, tmp_path / "g", 182, size=64)
    assert r["failed"] == [eid] and "not edited yet" in (tmp_path / "g" / "gallery.html").read_text()

"""The README's main command, `bash quickstart.sh`, end to end at a few steps per stage (STEPS), installed already
(SKIP_INSTALL): every stage's export and TensorBoard log, the five edits (two official + three from held-out
photos) with two samples each made from the precomputed guides, the evaluation (outside-band pixels 100 %
unchanged), gallery.html and the contact sheet. A second run resumes: nothing is trained or edited again and the outputs are untouched."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EDITS = ["official_landscape", "official_coco"]


def run(out: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "STEPS": "3 2 3 2", "SKIP_INSTALL": "1", "PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout[-4000:], p.stderr[-4000:])
    return p


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, run(out, 29631)


def records(out: Path) -> dict[str, dict]:
    lines = (out / "edit_results" / "manifest.jsonl").read_text().splitlines()
    return {r["edit"]: r for r in map(json.loads, lines)}


def test_every_stage_and_edit_is_on_disk(first):
    out, p = first
    for stage, name in (("vqgan", "vqgan"), ("seg", "seg"), ("guide", "guide"), ("sga512", "sga")):
        assert (out / stage / "export" / f"{name}.pt").stat().st_size > 10_000, stage
        assert any((out / stage / "tensorboard").iterdir()), stage
    recs = records(out)
    held = [e for e in recs if e not in EDITS]
    assert set(EDITS) <= set(recs) and len(held) == 3, sorted(recs)
    for eid, r in recs.items():
        assert r["status"] == "ok" and r["size"] == 512 and r["mode"] == "sga", r
        assert r["guides"] == ["loaded"], r  # edit-batch used precompute-guides' picks
        for k in range(2):
            im = np.asarray(Image.open(out / "edit_results" / eid / f"sample_{k}.png"))
            assert im.shape == (512, 512, 3)
    ev = json.loads((out / "edit_results" / "eval_edits.json").read_text())
    assert ev["ok"] == 5 and ev["preservation"]["passed"] and ev["preservation"]["unchanged_fraction"] == 1.0
    assert "gallery.html" in p.stdout and "done in" in p.stdout
    tok = json.loads((out / "eval" / "eval_tokenizer.json").read_text())
    tr = (out / "eval" / "eval_transformer.md").read_text()
    assert set(tok["models"]) == {"vqgan", "seg"} and all(f"| {row} |" in tr for row in ("guided", "window", "random", "guide256"))


def test_gallery_shows_every_edit(first):
    out, _ = first
    page = (out / "gallery.html").read_text()
    for eid in records(out):
        for tile in ("input", "labels_before", "labels_after", "mask", "sample_0", "sample_1"):
            assert f"gallery/{eid}/{tile}.png" in page
            assert (out / "gallery" / eid / f"{tile}.png").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height > 5 * 192 and sheet.width > 6 * 192  # five rows of input, 2 label maps, mask, 2 samples


def test_rerun_resumes(first):
    out, _ = first
    samples = sorted((out / "edit_results").glob("*/sample_*.png"))
    before = {f: f.stat().st_mtime_ns for f in samples}
    exports = {f: f.stat().st_mtime_ns for f in out.glob("*/export/*.pt")}
    p = run(out, 29641)
    log = p.stdout + p.stderr
    assert log.count("already finished") == 4, log[-3000:]
    assert "0 to do" in log and "already complete, 0 failed" in log
    assert {f: f.stat().st_mtime_ns for f in samples} == before
    assert {f: f.stat().st_mtime_ns for f in out.glob("*/export/*.pt")} == exports

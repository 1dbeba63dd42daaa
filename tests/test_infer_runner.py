"""edit-batch end to end with tiny random-weight exports: 2 ranks (torchrun, gloo-free CPU) vs 1 rank with another
batch size give byte-identical images, each edit is done once, pixels outside the blend band are the input's,
a bad edit is recorded as failed and the run goes on; the single-edit command gives the same result."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist.infer.blend import dilate
from asset_dist.infer.edits import EditSet, decode_edit
from tests.test_infer_common import check, cli, make_exports, small_edit_set, write_inputs

torch.set_num_threads(1)
S = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_runner")
    cfg = make_exports(tmp / "w")
    ok = small_edit_set(tmp / "edits")
    base = ["edit-batch", "--config", str(cfg), "--edits", str(tmp / "edits"), "--device", "cpu"]
    p2 = cli([*base, "--out", str(tmp / "two"), "--set", "infer.batch_size=3"], nproc=2)
    check(p2)
    p1 = cli([*base, "--out", str(tmp / "one"), "--set", "infer.batch_size=2"])
    check(p1)
    return {"tmp": tmp, "cfg": cfg, "ok": ok, "two": tmp / "two", "one": tmp / "one", "p2": p2}


def _manifest(out):
    return {r["edit"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_two_ranks_equal_one_rank_other_batch(runs):
    one, two = _manifest(runs["one"]), _manifest(runs["two"])
    assert sorted(one) == sorted(two) == sorted(runs["ok"] + ["zbad"])
    for eid in runs["ok"]:
        assert one[eid]["status"] == two[eid]["status"] == "ok"
        assert one[eid]["tokens_sampled"] == two[eid]["tokens_sampled"]
        for k in range(S):
            a = (runs["one"] / eid / f"sample_{k}.png").read_bytes()
            assert a == (runs["two"] / eid / f"sample_{k}.png").read_bytes(), (eid, k)
        assert (runs["two"] / eid / "preview.png").is_file()
    # samples differ from each other (their own random streams)
    assert (runs["one"] / "a256" / "sample_0.png").read_bytes() != (runs["one"] / "a256" / "sample_1.png").read_bytes()
    assert {two[e]["rank"] for e in runs["ok"]} == {0, 1} and two["e512"]["mode"] == "sga"


def test_each_edit_done_once_across_ranks(runs):
    logs = [json.loads(line) for r in (0, 1)
            for line in (runs["two"] / "logs" / f"rank{r}.jsonl").read_text().splitlines()]
    done = [entry["edit"] for entry in logs]
    assert sorted(done) == sorted(runs["ok"] + ["zbad"])  # every edit, once
    by_rank = {r: {e["edit"] for e in logs if e["rank"] == r} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]


def test_failed_edit_is_recorded(runs):
    rec = _manifest(runs["two"])["zbad"]
    assert rec["status"] == "failed" and rec["error"].startswith("edit 'zbad': image is 200x256")
    assert "FAILED edit 'zbad'" in runs["p2"].stderr
    assert not (runs["two"] / "zbad" / "sample_0.png").exists()


def test_outside_the_band_is_byte_identical(runs):
    es = EditSet(str(runs["tmp"] / "edits"))
    band = 8  # infer.blend_band in the test config
    for eid in runs["ok"]:
        e = decode_edit(es.load(eid), 182)
        keep = dilate(e.mask, band)
        for k in range(S):
            out = np.asarray(Image.open(runs["one"] / eid / f"sample_{k}.png"))
            assert out.shape == e.image.shape and out.dtype == np.uint8
            assert np.array_equal(out[~keep], e.image[~keep])
            assert not np.array_equal(out[e.mask > 0], e.image[e.mask > 0])


def test_single_edit_command_matches_batch(runs, tmp_path):
    """`asset-dist edit` on the files of edit a256: the same images as the batch run (same id and seed)."""
    es = EditSet(str(runs["tmp"] / "edits"))
    e = decode_edit(es.load("a256"), 182)
    seg_in = np.asarray(Image.open(__import__("io").BytesIO(es.load("a256").seg)))
    files = write_inputs(tmp_path / "in", "a", e.image, seg_in, e.mask * 255)
    p = cli(["edit", "--config", str(runs["cfg"]), "--input", files["image"], "--seg", files["seg"], "--mask",
             files["mask"], "--class", "waterother", "--id", "a256", "--out", str(tmp_path / "o"), "--device", "cpu"])
    check(p)
    assert str(tmp_path / "o" / "a256" / "sample_0.png") in p.stdout
    for k in range(S):
        assert (tmp_path / "o" / "a256" / f"sample_{k}.png").read_bytes() == \
            (runs["one"] / "a256" / f"sample_{k}.png").read_bytes()
    bad = cli(["edit", "--config", str(runs["cfg"]), "--input", files["image"], "--seg", files["seg"], "--mask",
               files["mask"], "--class", "lake", "--out", str(tmp_path / "o2")])
    check(bad, 1)
    assert "unknown class name 'lake'" in bad.stderr


def test_guide_only_mode_without_sga(runs, tmp_path):
    """No SGA export: the guide samples 256 px edits itself; larger edits fail with a message naming the fix."""
    from asset_dist.config import load_config
    from asset_dist.infer.runner import run_batch_edits
    from asset_dist.distenv import DistEnv

    cfg = load_config(runs["cfg"], ["infer.samples=1", "infer.sga_weights="])
    assert run_batch_edits(cfg, str(runs["tmp"] / "edits"), tmp_path / "o", device="cpu", env=DistEnv()) == 0
    recs = {r["edit"]: r for r in map(json.loads, (tmp_path / "o" / "manifest.jsonl").read_text().splitlines())}
    assert all(recs[e]["status"] == "ok" and recs[e]["mode"] == "guide-only" for e in runs["ok"] if e != "e512")
    assert recs["e512"]["status"] == "failed" and "set infer.sga_weights" in recs["e512"]["error"]


def test_an_error_while_computing_fails_only_that_edit(runs, tmp_path, monkeypatch):
    """A runtime error inside a batch: the batch is retried edit by edit, only the guilty edit is recorded as
    failed, the others finish; the exit status says something went wrong (1), unlike bad input (0)."""
    from asset_dist.config import load_config
    from asset_dist.infer import runner as R
    from asset_dist.distenv import DistEnv

    real = R.composite

    def flaky(generated, original, mask, levels, band):
        if original.shape[0] == 256 and mask[140, 140] and not mask[60, 60]:  # only d256's hole is there
            raise RuntimeError("simulated failure")
        return real(generated, original, mask, levels, band)

    monkeypatch.setattr(R, "composite", flaky)
    cfg = load_config(runs["cfg"], ["infer.samples=1", "infer.batch_size=8"])
    rc = R.run_batch_edits(cfg, str(runs["tmp"] / "edits"), tmp_path / "o", device="cpu", env=DistEnv())
    assert rc == 1
    recs = {r["edit"]: r for r in map(json.loads, (tmp_path / "o" / "manifest.jsonl").read_text().splitlines())}
    assert recs["d256"]["status"] == "failed" and "RuntimeError: simulated failure" in recs["d256"]["error"]
    assert all(recs[e]["status"] == "ok" for e in runs["ok"] if e != "d256")
    for e in ("a256", "c256"):  # in d256's batch before the retry: same result as the 1-rank run
        assert (tmp_path / "o" / e / "sample_0.png").read_bytes() == (runs["one"] / e / "sample_0.png").read_bytes()

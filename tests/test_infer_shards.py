"""edit-batch --out-format shards: WebDataset tars of finished edits, written atomically, exact-once and
resumable after kill -9; equal (decoded) to the per-file output; read by `tar`, the webdataset library,
`asset-dist gallery` and `asset-dist evaluate edits`."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist.infer.results import open_results
from tests.test_infer_common import REPO, check, cli, cli_env, make_exports, small_edit_set

torch.set_num_threads(1)
S = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_shards")
    cfg = make_exports(tmp / "w")
    ok = small_edit_set(tmp / "edits", with_512=False)
    base = ["edit-batch", "--config", str(cfg), "--edits", str(tmp / "edits"), "--device", "cpu"]
    check(cli([*base, "--out", str(tmp / "files")]))
    p = cli([*base, "--out", str(tmp / "shards"), "--out-format", "shards", "--shard-size", "2"], nproc=2)
    check(p)
    return {"tmp": tmp, "cfg": cfg, "ok": ok, "base": base, "files": tmp / "files", "shards": tmp / "shards"}


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _tar_members(out) -> dict[str, list[str]]:
    got = {}
    for t in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(t) as tar:
            got[t.name] = tar.getnames()
    return got


def _same_as_files(setup, out) -> None:
    files, shards = open_results(setup["files"]), open_results(out)
    assert shards.kind == "shards" and files.kind == "files"
    for eid in setup["ok"]:
        a, b = files.read_record(eid), shards.read_record(eid)
        assert b["status"] == "ok" and b["outputs"] == a["outputs"] and b["shard"].endswith(".tar")
        for name in a["outputs"]:
            assert np.array_equal(_decoded(files.read_file(eid, name)), _decoded(shards.read_file(eid, name)))
    assert shards.read_record("zbad")["status"] == "failed"
    # every edit in exactly one tar, each tar complete with its members together
    members = _tar_members(out)
    keys = [n.split(".")[0] for names in members.values() for n in names if n.endswith(".record.json")]
    assert sorted(keys) == sorted(setup["ok"] + ["zbad"])
    man = [json.loads(x)["edit"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert man == sorted(setup["ok"] + ["zbad"])
    idx = json.loads((out / "shards.json").read_text())
    assert sorted(e for s in idx["shards"] for e in s["edits"]) == man
    assert all((out / "shards" / s["name"]).stat().st_size == s["bytes"] for s in idx["shards"])
    assert not list(out.glob("*/sample_0.png"))  # no per-edit folders


def test_shards_equal_the_per_file_output(setup):
    _same_as_files(setup, setup["shards"])
    members = _tar_members(setup["shards"])
    assert {n.split("-")[1] for n in members} == {"r0000", "r0001"}  # each rank its own tars
    assert all(len({m.split(".")[0] for m in names}) <= 2 for names in members.values())  # --shard-size 2


def test_readers(setup, tmp_path):
    out = setup["shards"]
    tars = sorted((out / "shards").glob("*.tar"))
    listed = subprocess.run(["tar", "tf", str(tars[0])], capture_output=True, text=True, check=True).stdout.split()
    assert any(n.endswith(".sample_0.png") for n in listed) and any(n.endswith(".record.json") for n in listed)
    import webdataset as wds

    seen = {}
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
        seen[sample["__key__"]] = sample
    assert set(seen) == set(setup["ok"] + ["zbad"])
    a256 = seen["a256"]
    assert set(a256) >= {"sample_0.png", "sample_1.png", "preview.png", "record.json"}
    assert json.loads(a256["record.json"])["edit"] == "a256"
    assert np.array_equal(_decoded(a256["sample_1.png"]),
                          _decoded((setup["files"] / "a256" / "sample_1.png").read_bytes()))
    g = cli(["gallery", "--config", str(setup["cfg"]), "--edits", str(setup["tmp"] / "edits"), "--results", str(out),
             "--out", str(tmp_path / "g")])
    check(g)
    page = (tmp_path / "g" / "gallery.html").read_text()
    assert "gallery/a256/sample_1.png" in page and (tmp_path / "g" / "contact_sheet.png").is_file()
    e = cli(["evaluate", "edits", "--edit-out", str(out), "--edits", str(setup["tmp"] / "edits"),
             "--out", str(tmp_path / "e")])
    check(e)
    rep = json.loads((tmp_path / "e" / "eval_edits.json").read_text())
    assert rep["preservation"]["passed"] and rep["preservation"]["pixels_checked"] > 0


def test_resume_after_kill(setup):
    """kill -9 once the first tar is written; the restart keeps the complete tars, redoes the rest; the result
    equals the per-file output and every edit is in exactly one tar."""
    out = setup["tmp"] / "killed"
    args = [*setup["base"], "--out", str(out), "--out-format", "shards", "--shard-size", "1",
            "--set", "infer.batch_size=1"]
    proc = subprocess.Popen([sys.executable, "-m", "asset_dist.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((out / "shards").glob("*.tar")) if (out / "shards").is_dir() else True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {t.name: t.stat().st_mtime_ns for t in (out / "shards").glob("*.tar")}
    assert 1 <= len(first) < len(setup["ok"]) + 1 and not (out / "manifest.jsonl").exists()
    again = cli(args)
    check(again)
    assert f"{len(first)} already done" in again.stderr
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in first} == first  # complete tars kept
    _same_as_files(setup, out)
    # a restart of a finished run does nothing; another format in the same folder is refused
    check(cli(args))
    bad = cli([*setup["base"], "--out", str(out)])
    assert bad.returncode != 0 and "other settings" in bad.stderr

"""data_tools/shard.py and asset_dist.data.shardwriter: round trip, bad inputs, atomic writes, resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from asset_dist.data.shardwriter import ShardError, run_sharding, safe_key, write_tar

REPO = Path(__file__).resolve().parents[1]
SHARD_PY = REPO / "data_tools" / "shard.py"
quiet = dict(log=lambda msg: None)


def _sources(folder: Path) -> dict[str, tuple[Path, Path]]:
    """key -> (image, label) of a shared dataset, by relative path without extension."""
    out = {}
    for img in sorted((folder / "images").rglob("*.jpg")):
        stem = img.relative_to(folder / "images").with_suffix("")
        out[safe_key(stem.as_posix())] = (img, folder / "segmentations" / stem.with_suffix(".png"))
    return out


def _check_round_trip(out: Path, src: Path, tmp_path: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    sources = _sources(src)
    assert manifest["total_samples"] == len(sources) and manifest["skipped"] == []
    tars = [out / s["name"] for sp in manifest["splits"].values() for s in sp["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in tars)
    for sp in manifest["splits"].values():
        for s in sp["shards"]:
            data = (out / s["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]

    # plain `tar`: extract everything and compare with the sources byte for byte / value for value
    ext = tmp_path / "extracted"
    ext.mkdir()
    for t in tars:
        subprocess.run(["tar", "-xf", str(t), "-C", str(ext)], check=True)
    names = sorted(p.name for p in ext.iterdir())
    assert len(names) == 3 * len(sources)
    all_values = set()
    for key, (img, lab) in sources.items():
        assert (ext / f"{key}.jpg").read_bytes() == img.read_bytes()  # original bytes, not re-encoded
        got = np.asarray(Image.open(ext / f"{key}.seg.png"))
        want = np.asarray(Image.open(lab))
        assert Image.open(ext / f"{key}.seg.png").mode == "L" and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        all_values |= set(np.unique(want).tolist())
        meta = json.loads((ext / f"{key}.json").read_text())
        w, h = Image.open(img).size
        assert (meta["width"], meta["height"]) == (w, h)
        assert meta["source"] == img.relative_to(src / "images").as_posix()
    assert manifest["label_values"]["distinct"] == sorted(all_values)
    assert (manifest["label_values"]["min"], manifest["label_values"]["max"]) == (min(all_values), max(all_values))

    # plain webdataset: every sample once, with its three members
    urls = [str(t) for t in tars]
    seen = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)
            if {"jpg", "seg.png", "json"} <= set(s)]
    assert sorted(seen) == sorted(sources)

    # member names are safe
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                assert m.isfile() and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*\.(jpg|png|seg\.png|json)", m.name)


def test_round_trip_sflckr(sflckr_shards, sample_data, tmp_path):
    _check_round_trip(sflckr_shards, sample_data / "sflckr", tmp_path)
    m = json.loads((sflckr_shards / "manifest.json").read_text())
    assert m["splits"]["train"]["samples"] == 20 and m["splits"]["val"]["samples"] == 5
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [4] * 5
    assert "lakes_39933489595_f0e5d85b6d_b" in _sources(sample_data / "sflckr")


def test_round_trip_coco_stuff_parallel_cli(sample_data, tmp_path):
    src = sample_data / "coco_stuff"
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(SHARD_PY), "--images", str(src / "images"), "--labels",
                        str(src / "segmentations"), "--out", str(out), "--samples-per-shard", "10",
                        "--workers", "2", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_round_trip(out, src, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    assert 255 in m["label_values"]["distinct"]  # COCO-Stuff 'unlabeled' kept as is (the loader shifts)
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [10, 10, 10, 5] and "val" not in m["splits"]
    assert m["args"]["seed"] == 3 and m["tool"]["version"]


def test_max_shard_bytes_cuts_shards(sample_data, tmp_path):
    src = sample_data / "coco_stuff"
    m = run_sharding(src / "images", src / "segmentations", tmp_path, samples_per_shard=1000,
                     max_shard_bytes=400_000, **quiet)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 35
    assert all(s["bytes"] <= 400_000 or s["samples"] == 1 for s in shards)


# ------------------------------------------------------------------------------------------------ bad inputs


def _jpeg(size=(40, 30), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _label(size=(40, 30), mode="L") -> Image.Image:
    arr = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 7).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "L" else im


def _make_bad_dataset(root: Path) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    for i, stem in enumerate(["good0", "sub/good1", "sub/good.2"]):  # '.' in a stem: key must not keep it
        (images / f"{stem}.jpg").write_bytes(_jpeg(seed=i))
        _label().save(labels / f"{stem}.png")
    (images / "truncated.jpg").write_bytes(_jpeg()[:400])
    _label().save(labels / "truncated.png")
    (images / "mismatch.jpg").write_bytes(_jpeg())
    _label((30, 40)).save(labels / "mismatch.png")
    (images / "nolabel.jpg").write_bytes(_jpeg())
    (images / "rgblabel.jpg").write_bytes(_jpeg())
    _label(mode="RGB").save(labels / "rgblabel.png")
    (images / "badlabel.jpg").write_bytes(_jpeg())
    (labels / "badlabel.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _label().save(labels / "orphan.png")
    return images, labels


def test_bad_inputs_skipped_listed_and_strict(tmp_path, capsys):
    images, labels = _make_bad_dataset(tmp_path / "in")
    out = tmp_path / "out"
    m = run_sharding(images, labels, out, samples_per_shard=2)
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"truncated.jpg", "mismatch.jpg", "nolabel.jpg", "rgblabel.png", "badlabel.png",
                            "orphan.png"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "size mismatch" in reasons["mismatch.jpg"] and "40x30" in reasons["mismatch.jpg"]
    assert "without a label map" in reasons["nolabel.jpg"]
    assert "not single-channel" in reasons["rgblabel.png"] and "RGB" in reasons["rgblabel.png"]
    assert "unreadable" in reasons["badlabel.png"]
    assert "without an image" in reasons["orphan.png"]
    assert m["total_samples"] == 3 and m["skipped_count"] == 6
    err = capsys.readouterr().err
    for name in reasons:
        assert re.search(rf"skipped: \S*{re.escape(name)}: ", err), name
    keys = {json.loads(s["json"])["key"] for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))],
                                                                   shardshuffle=False)}
    assert keys == {"good0", "sub_good1", "sub_good_2"}

    # --strict: non-zero exit, every problem named, nothing written
    out2 = tmp_path / "out2"
    r = subprocess.run([sys.executable, str(SHARD_PY), "--images", str(images), "--labels", str(labels),
                        "--out", str(out2), "--strict", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "--strict" in r.stderr and "truncated.jpg" in r.stderr and "rgblabel.png" in r.stderr
    assert not list(out2.glob("*.tar")) and not (out2 / "manifest.json").exists()


def test_empty_input_and_existing_output_are_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    with pytest.raises(ShardError, match="no images found"):
        run_sharding(tmp_path / "img", tmp_path / "lab", tmp_path / "out", **quiet)
    r = subprocess.run([sys.executable, str(SHARD_PY), "--images", str(tmp_path / "img"), "--labels",
                        str(tmp_path / "lab"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and "no images found" in r.stderr
    with pytest.raises(ShardError, match="not a directory"):
        run_sharding(tmp_path / "missing", tmp_path / "lab", tmp_path / "out", **quiet)
    images, labels = _make_bad_dataset(tmp_path / "in")
    run_sharding(images, labels, tmp_path / "o", **quiet)
    with pytest.raises(ShardError, match="--resume"):  # never overwrite earlier shards silently
        run_sharding(images, labels, tmp_path / "o", **quiet)


def test_cli_help():
    r = subprocess.run([sys.executable, str(SHARD_PY), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-shard-bytes" in r.stdout and "--resume" in r.stdout


# ------------------------------------------------------------------------------------- atomic writes, resume


def _shard_digests(out: Path) -> dict[str, str]:
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for sp in m["splits"].values() for s in sp["shards"]}


def test_write_tar_is_atomic_and_checks_keys(tmp_path):
    path = tmp_path / "x.tar"

    def samples():
        yield "a", {"jpg": b"1", "json": b"{}"}
        raise RuntimeError("killed mid-shard")

    with pytest.raises(RuntimeError):
        write_tar(path, samples())
    assert list(tmp_path.iterdir()) == []  # no partial file under any name
    for bad in ["a.b", "../x", "/abs", "", "_meta"]:
        with pytest.raises(ValueError, match="unsafe"):
            write_tar(path, [(bad, {"jpg": b"1"})])
    assert not path.exists()


def test_resume_repairs_and_matches_clean_run(sflckr_shards, sample_data, tmp_path):
    src = sample_data / "sflckr"
    args = dict(samples_per_shard=4, val_fraction=0.2, seed=0, workers=1, **quiet)
    out = tmp_path / "out"
    out.mkdir()
    for p in sflckr_shards.iterdir():
        shutil.copy(p, out / p.name)
    (out / "manifest.json").unlink()  # an interrupted run has no manifest yet
    (out / "train-000003.tar").unlink()  # not written yet
    damaged = out / "train-000001.tar"  # damaged by hand (atomic writes never leave this)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    (out / ".train-000003.tar.abc123.tmp").write_bytes(b"partial")  # temp file of a killed writer
    keep = (out / "val-000000.tar").stat().st_mtime_ns
    run_sharding(src / "images", src / "segmentations", out, resume=True, **args)
    assert _shard_digests(out) == _shard_digests(sflckr_shards)
    assert (out / "val-000000.tar").stat().st_mtime_ns == keep  # complete shards are not redone
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ShardError, match="different arguments"):
        run_sharding(src / "images", src / "segmentations", out, resume=True, **{**args, "seed": 1})


def test_killed_run_resumes_to_identical_shards(sflckr_shards, sample_data, tmp_path):
    src = sample_data / "sflckr"
    out = tmp_path / "out"
    cmd = [sys.executable, str(SHARD_PY), "--images", str(src / "images"), "--labels", str(src / "segmentations"),
           "--out", str(out), "--samples-per-shard", "4", "--val-fraction", "0.2", "--seed", "0", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.tar")):
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # a hard kill between or during shard writes
    proc.wait()
    for t in out.glob("*.tar"):  # whatever exists under a shard name is a complete tar
        with tarfile.open(t) as tf:
            assert len(tf.getnames()) == 12
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _shard_digests(out) == _shard_digests(sflckr_shards)

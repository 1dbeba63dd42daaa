"""The bad-input battery (issue 13): every class of bad input, for every entry point, ends with a named error and an
exit code != 0 (2 for bad config or input, argparse's 2 for a bad option) or with a named per-record failure; never a
traceback, never a file outside the output folder, never code run from a data file or a shard source.

Classes: config values (zero/negative counts and intervals, unknown choices, wrong shapes and types, empty paths,
model/data mismatches, unknown keys, shell-command sources), command-line values, hostile names (absolute, '..',
separators, symlinks) in edit tars / lists / records, untrusted extractors, data errors (missing, truncated, replaced
or mislabelled shards, training shards given as edits, duplicate ids), unwritable output folders, held output
folders (one process and torchrun), bad record metadata, and output permissions under a umask.

Most cases fail before any heavy work, so they run in-process (asset_dist.cli.main / make_edits.main with stderr
captured; an uncaught exception fails the test like a traceback would) against one tiny set of exports, shards and
edits per module. A few run real subprocesses: the console entry points, torchrun with two ranks, one training
start on a replaced shard, and the permission run.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from asset_dist.cli import main as cli_main
from asset_dist.config import apply_overrides
from asset_dist.infer.edits import make_record, write_edit_shards
from asset_dist.infer.classes import ClassTable
from asset_dist.runlock import LOCK_NAME
from tests.test_infer_common import (REPO, check, cli, cli_env, make_exports, png, rect_mask, small_edit_set, square,
                                     write_inputs)

sys.path.insert(0, str(REPO / "data_tools"))
import make_edits  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# One tiny world per module: exports + config, shards, an edit set, one edit's input files


@pytest.fixture(scope="module")
def world(tmp_path_factory, sflckr_shards):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cfg = make_exports(tmp / "w")
    train_cfg = tmp / "w" / "train.yaml"  # the same model, with training data and a run folder of its own
    train_cfg.write_text(f"base: {cfg}\ndata: {{train_shards: {sflckr_shards}, val_shards: ''}}\n"
                         f"paths: {{run_dir: {tmp / 'run'}}}\n")
    edits = tmp / "edits"
    small_edit_set(edits, with_bad=False, with_512=False)
    img, lab = square(0, 256)
    files = write_inputs(tmp / "in", "one", img, lab, rect_mask(256, 64, 128, 0, 256))
    results = tmp / "results"  # a finished-looking edit-batch output (for gallery and evaluate edits)
    results.mkdir()
    (results / "manifest.jsonl").write_text(json.dumps({"edit": "a256", "status": "ok", "samples": 1}) + "\n")
    (results / "run.json").write_text(json.dumps({"blend_band": 8}))
    return SimpleNamespace(tmp=tmp, cfg=train_cfg, edits=edits, files=files, results=results, shards=sflckr_shards)


@dataclass
class Outcome:
    rc: int
    out: str
    err: str


def call(capsys, argv: list, cwd: Path) -> Outcome:
    """One command in-process, from `cwd` (which must stay empty: nothing is written beside the outputs).
    argv[0] == "make_edits" runs data_tools/make_edits.py, anything else `asset-dist`."""
    argv = [str(a) for a in argv]
    tool, args = (make_edits.main, argv[1:]) if argv[0] == "make_edits" else (cli_main, argv)
    cwd.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = tool(args)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    c = capsys.readouterr()
    assert not list(cwd.iterdir()), f"{argv}: wrote into the current folder: {list(cwd.iterdir())}"
    return Outcome(rc, c.out, c.err)


def refused(o: Outcome, *texts: str, rc: int = 2) -> None:
    assert o.rc == rc, f"exit {o.rc} (wanted {rc})\n{o.err[-3000:]}"
    assert "Traceback" not in o.err, o.err
    assert "error" in o.err, o.err
    for t in texts:
        assert t in o.err, f"{t!r} not in:\n{o.err[-3000:]}"


def commands(w, cfg: Path, out: Path) -> dict[str, list]:
    """Every entry point with valid arguments (and `cfg`), writing under `out`."""
    c = ["--config", cfg]
    f = w.files
    return {
        "train": ["train", *c],
        "edit": ["edit", *c, "--input", f["image"], "--seg", f["seg"], "--mask", f["mask"], "--class", "sea",
                 "--out", out],
        "edit-batch": ["edit-batch", *c, "--edits", w.edits, "--out", out, "--device", "cpu"],
        "precompute-guides": ["precompute-guides", *c, "--edits", w.edits, "--out", out, "--device", "cpu"],
        "evaluate tokenizer": ["evaluate", "tokenizer", *c, "--out", out, "--device", "cpu"],
        "evaluate transformer": ["evaluate", "transformer", *c, "--out", out, "--device", "cpu"],
        "gallery": ["gallery", *c, "--edits", w.edits, "--results", w.results, "--out", out],
        "submit": ["submit", *c, "--executor", "local", "--dry-run"],
        "make_edits": ["make_edits", "official", "--which", "landscape", "--resolution", "256", "--config", cfg,
                       "--out", out],
    }


def config_file(w, folder: Path, override: str) -> Path:
    """A config that is the world's plus one `key=value` (written as YAML: make_edits has no --set)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "bad.yaml"
    p.write_text(yaml.safe_dump({"base": str(w.cfg), **apply_overrides({}, [override])}))
    return p


# ----------------------------------------------------------------------------------------------------------
# Config values: each is refused by every command, before any work, naming the key


BAD_CONFIG = [  # (override, text the error must contain)
    # zero / negative counts and intervals
    ("train.ckpt_every=0", "'train.ckpt_every' must be >= 1 (got 0)"),
    ("logging.log_every=0", "'logging.log_every' must be >= 1"),
    ("logging.image_every=-1", "'logging.image_every' must be >= 0"),
    ("train.max_steps=-5", "'train.max_steps' must be >= 1 (got -5)"),
    ("train.keep_last=0", "'train.keep_last'"),
    ("train.grad_accum=0", "'train.grad_accum'"),
    ("train.warmup_steps=-1", "'train.warmup_steps'"),
    ("train.lr=0", "'train.lr' must be a finite number > 0"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("data.num_workers=-1", "'data.num_workers'"),
    ("data.max_corrupt_fraction=2", "'data.max_corrupt_fraction' must be in [0, 1]"),
    ("data.mask.max_ratio=0", "'data.mask.max_ratio' must be in (0, 1]"),
    ("infer.samples=0", "'infer.samples' must be >= 1"),
    ("infer.batch_size=-1", "'infer.batch_size'"),
    ("infer.top_k=-1", "'infer.top_k'"),
    ("infer.temperature=-0.5", "'infer.temperature'"),
    ("infer.preview_size=4", "'infer.preview_size'"),
    ("model.vqgan.n_embed=0", "'model.vqgan.n_embed'"),
    ("model.transformer.dropout=1.5", "'model.transformer.dropout' must be in [0, 1)"),
    # unknown choices
    ("train.optimizer=sgd", "'train.optimizer' must be one of adam, adamw (got 'sgd')"),
    ("train.precision=fp8", "'train.precision' must be one of fp32, bf16, fp16"),
    ("infer.precision=int8", "'infer.precision'"),
    ("train.schedule=linear", "'train.schedule'"),
    ("train.stage=gan", "'train.stage' must be one of vqgan, seg, guide, sga"),
    ("model.token_hole=centre", "'model.token_hole'"),
    ("train.loss.seg_recon=l2", "'train.loss.seg_recon'"),
    ("data.mask.kind=strokes", "'data.mask.kind'"),
    ("deepspeed.zero_stage=4", "'deepspeed.zero_stage' must be in [0, 3]"),
    ("model.transformer.attention_impl=magic", "'model.transformer.attention_impl'"),
    ("model.vqgan.region_norm=maybe", "'model.vqgan.region_norm'"),
    # wrong shapes and types
    ("train.betas=[0.5]", "'train.betas' must be [beta1, beta2]"),
    ("train.betas=[0.5,1.5]", "'train.betas'"),
    ("model.vqgan.ch_mult=[]", "'model.vqgan.ch_mult' must be 5 positive integers"),
    ("model.seg.ch_mult=[1,1,0,1,1]", "'model.seg.ch_mult'"),
    ("model.vqgan.ch=36", "'model.vqgan.ch' must be positive, with every level's width"),
    ("model.vqgan.norm_groups=0", "'model.vqgan.norm_groups' must be"),
    ("model.transformer.block_grid=[16]", "'model.transformer.block_grid'"),
    ("model.transformer.n_heads=3", "'model.transformer.n_heads' must be a divisor of d_model"),
    ("model.transformer.peg=[X_1]", "'model.transformer.peg'"),
    ("model.transformer.peg=[E_9]", "'model.transformer.peg'"),
    ("model.transformer.peg_kernel=4", "'model.transformer.peg_kernel' must be odd"),
    ("data.batch_size=two", "'data.batch_size' must be int, got str 'two'"),
    ("train.lr=fast", "'train.lr' must be float"),
    ("infer.classes={lake: x}", "'infer.classes.lake'"),
    ("train.betas=0.5", "'train.betas' must be a list"),
    ("train.max_step=5", "unknown key 'train.max_step'"),
    # empty paths
    ("paths.run_dir=", "'paths.run_dir' must be a folder"),
    ("paths.run_dir=' '", "'paths.run_dir'"),
    # model / data mismatches
    ("model.transformer.vocab_size=10", "'model.transformer.vocab_size' must be >= model.vqgan.n_embed=64"),
    ("model.transformer.cond_vocab_size=3", "'model.transformer.cond_vocab_size' must be >= model.seg.n_embed"),
    ("data.num_classes=100", "'model.seg.in_channels' must be data.num_classes=100"),
    ("data.num_classes=300", "'data.num_classes' must be in [1, 256]"),
    ("data.resolution=200", "'data.resolution' must be a positive multiple of 16"),
    ("data.resolution=272", "'data.resolution' must be a multiple of 16 whose 16-px token grid splits into"),
    ("data.guide_resolution=1024", "'data.guide_resolution'"),
]


@pytest.mark.parametrize("override,text", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_bad_config_values_are_refused_by_every_command(world, tmp_path, capsys, override, text):
    cfg = config_file(world, tmp_path / "cfg", override)
    for name, argv in commands(world, cfg, tmp_path / "out").items():
        o = call(capsys, argv, tmp_path / "cwd")
        refused(o, text, str(cfg))
        assert not (tmp_path / "out").exists(), f"{name}: created its output folder before checking the config"


def test_shell_command_sources_need_the_config_switch(world, tmp_path, capsys):
    marker = tmp_path / "ran"
    cfg = config_file(world, tmp_path / "cfg", f"data.train_shards='pipe:touch {marker}'")
    for name, argv in commands(world, cfg, tmp_path / "out").items():
        refused(call(capsys, argv, tmp_path / "cwd"), "'data.train_shards'", "data.allow_pipe=true")
    # edit sets never take one, whatever the config says
    allow = config_file(world, tmp_path / "cfg2", "data.allow_pipe=true")
    for name in ("edit-batch", "precompute-guides", "gallery"):
        argv = commands(world, allow, tmp_path / "out")[name]
        argv[argv.index("--edits") + 1] = f"pipe:touch {marker}"
        refused(call(capsys, argv, tmp_path / "cwd"), "runs a shell command")
    argv = ["make_edits", "dataset", "--shards", f"pipe:touch {marker}", "--classes", "tree", "--out",
            tmp_path / "out"]
    refused(call(capsys, argv, tmp_path / "cwd"), "runs a shell command")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Command-line values


def _cli_cases(w, out: Path) -> list[tuple[list, str]]:
    cmd = commands(w, w.cfg, out)
    ev = ["evaluate", "edits", "--edit-out", w.results, "--edits", w.edits, "--out", out]
    me = ["make_edits", "dataset", "--shards", w.shards, "--classes", "tree", "--out", out]
    return [
        (cmd["edit-batch"] + ["--samples", "-1"], "argument --samples: must be >= 1 (got -1)"),
        (cmd["edit-batch"] + ["--samples", "0"], "argument --samples: must be >= 1 (got 0)"),
        (cmd["edit-batch"] + ["--samples", "two"], "argument --samples: must be an integer >= 1 (got 'two')"),
        (cmd["precompute-guides"] + ["--samples", "0"], "argument --samples"),
        (cmd["edit"] + ["--samples", "-2"], "argument --samples"),
        (cmd["gallery"] + ["--size", "0"], "argument --size: must be in 8..2048 (got 0)"),
        (cmd["gallery"] + ["--size", "-3"], "argument --size"),
        (cmd["gallery"] + ["--size", "99999"], "argument --size"),
        (cmd["evaluate tokenizer"] + ["--max-samples", "-1"], "argument --max-samples: must be >= 0"),
        (cmd["evaluate transformer"] + ["--max-samples", "x"], "argument --max-samples"),
        (ev + ["--band", "-1"], "argument --band: must be >= 0"),
        (me + ["--samples-per-shard", "0"], "argument --samples-per-shard"),
        (me + ["--per-image", "0"], "argument --per-image"),
        (me + ["--limit", "-1"], "argument --limit"),
        (me + ["--max-ratio", "0"], "argument --max-ratio: must be in (0, 1]"),
        (me + ["--max-ratio", "1.5"], "argument --max-ratio"),
        (me + ["--resolution", "8"], "argument --resolution"),
        (["make_edits", "files", "--list", "x.csv", "--label-shift", "300", "--out", out], "argument --label-shift"),
        # empty paths
        (cmd["edit-batch"][:-4] + ["--out", "", "--device", "cpu"], "argument --out: must name a file or folder"),
        (cmd["precompute-guides"][:-4] + ["--out", "", "--device", "cpu"], "argument --out"),
        (cmd["edit"][:-2] + ["--out", ""], "argument --out"),
        (cmd["gallery"][:-2] + ["--out", ""], "argument --out"),
        (cmd["evaluate tokenizer"][:-4] + ["--out", "", "--device", "cpu"], "argument --out"),
        (["train", "--config", ""], "argument --config"),
        (cmd["train"] + ["--resume", ""], "argument --resume"),
        (me[:-1] + [""], "argument --out"),
        (cmd["edit-batch"][:3] + ["--edits", "", "--out", out], "argument --edits"),
        # unsafe names given on the command line
        (cmd["edit"] + ["--id", "../escape"], "unsafe --id '../escape'"),
        (cmd["edit"] + ["--id", "/tmp/abs"], "unsafe --id '/tmp/abs'"),
        (cmd["edit"] + ["--id", "a.b"], "unsafe --id"),
    ]


def test_bad_command_line_values(world, tmp_path, capsys):
    for argv, text in _cli_cases(world, tmp_path / "out"):
        o = call(capsys, argv, tmp_path / "cwd")
        refused(o, text)
        assert not (tmp_path / "out").exists(), argv


def test_extractors_run_code_only_when_trusted(world, tmp_path, capsys):
    """A .pt2 extractor is unpickled by torch.export.load, a TorchScript file is a program: neither is opened
    without --trust-extractor (a pickle planted under that name would create the marker)."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    for name in ("x.pt2", "x.pt"):
        (tmp_path / name).write_bytes(pickle.dumps(Evil()))
        for argv in (["evaluate", "fid", "--real", tmp_path, "--fake", tmp_path, "--extractor", tmp_path / name],
                     ["evaluate", "edits", "--edit-out", world.results, "--edits", world.edits, "--fid-extractor",
                      tmp_path / name, "--out", tmp_path / "out"]):
            refused(call(capsys, argv, tmp_path / "cwd"), "--trust-extractor")
    assert not marker.exists() and not (tmp_path / "out").exists()
    o = call(capsys, ["evaluate", "fid", "--help"], tmp_path / "cwd")
    assert o.rc == 0 and "--trust-extractor" in o.out


# ----------------------------------------------------------------------------------------------------------
# Hostile names in data


def _tar(path: Path, members) -> Path:
    """A tar written by hand (no checks): `members` is a dict or a list of (name, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in (members.items() if isinstance(members, dict) else members):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def _members(key: str) -> dict[str, bytes]:
    img, lab = square(1, 256)
    rec = make_record("x", png(img), png(lab), png(rect_mask(256, 0, 64, 0, 64)), class_id=3, class_name="x",
                      num_classes=182, label_shift=0)
    return {f"{key}.{ext}": data for ext, data in rec.members().items()}


def _edit_commands(w, spec: str, out: Path) -> dict[str, list]:
    cmd = commands(w, w.cfg, out)
    res = {k: v for k, v in cmd.items() if k in ("edit-batch", "precompute-guides", "gallery")}
    for argv in res.values():
        argv[argv.index("--edits") + 1] = spec
    res["evaluate edits"] = ["evaluate", "edits", "--edit-out", w.results, "--edits", spec, "--out", out]
    return res


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "separator", "dotted"])
def test_unsafe_member_names_are_refused_by_every_reader(world, tmp_path, capsys, kind):
    outside = tmp_path / "outside"
    key = {"absolute": str(outside / "evil"), "dotdot": "../../evil", "separator": "sub/evil",
           "dotted": ".hidden"}[kind]
    evil = _tar(tmp_path / "evil" / "edits-000000.tar", {**_members("fine"), **_members(key)})
    for name, argv in _edit_commands(world, str(evil), tmp_path / "out").items():
        o = call(capsys, argv, tmp_path / "cwd")
        refused(o, "unsafe edit id", str(evil))
        assert not outside.exists() and not (tmp_path / "out" / "fine").exists(), name


@pytest.mark.parametrize("layout", ["repeated member", "key comes back"])
def test_duplicate_ids_inside_one_tar_are_an_error(world, tmp_path, capsys, layout):
    a, b = list(_members("a").items()), list(_members("b").items())
    members = a + a[:1] + b if layout == "repeated member" else a[:2] + b + a[2:]
    dup = _tar(tmp_path / "dup" / "edits-000000.tar", members)
    for name, argv in _edit_commands(world, str(dup), tmp_path / "out").items():
        refused(call(capsys, argv, tmp_path / "cwd"), "edit id 'a' appears twice", str(dup))


def test_unsafe_ids_in_an_edit_list_are_that_rows_failure(world, tmp_path, capsys):
    f = world.files
    rows = [{"id": i, "image": f["image"], "seg": f["seg"], "mask": f["mask"], "class": "sea"}
            for i in ("good", "../../escape", str(tmp_path / "abs"), "a/b", "x.y")]
    lst = tmp_path / "list.jsonl"
    lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    o = call(capsys, ["make_edits", "files", "--list", lst, "--out", tmp_path / "out"], tmp_path / "cwd")
    assert o.rc == 0 and "Traceback" not in o.err, o.err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["edit_ids"] == ["good"]
    assert sorted(x["edit"] for x in m["failed"]) == sorted(r["id"] for r in rows[1:])
    assert all("unsafe edit id" in x["error"] for x in m["failed"])
    assert not (tmp_path / "abs").exists() and not (tmp_path.parent / "escape").exists()


def test_symlinked_edit_folder_is_not_followed(world, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a256").symlink_to(outside, target_is_directory=True)
    argv = commands(world, world.cfg, out)["edit-batch"] + ["--samples", "1"]
    refused(call(capsys, argv, tmp_path / "cwd"), "would lie outside the output folder")
    assert list(outside.iterdir()) == []


def test_records_naming_files_outside_are_not_followed(world, tmp_path, capsys):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(square(3, 64)[0]))
    res = tmp_path / "res"
    (res / "a256").mkdir(parents=True)
    (res / "a256" / "record.json").write_text(json.dumps(
        {"edit": "a256", "status": "ok", "samples": 1, "outputs": [f"sample_0/../../../{secret.name}",
                                                                   f"sample_0.png/../../../{secret.name}",
                                                                   "sample_1.png"]}))
    o = call(capsys, ["gallery", "--config", world.cfg, "--edits", world.edits, "--results", res], tmp_path / "cwd")
    assert o.rc == 0 and "Traceback" not in o.err, o.err
    page = (res / "gallery.html").read_text()
    assert page.count("unsafe output") == 2 and "sample_1.png" in page  # each named, the missing one too
    assert not list((res / "gallery").rglob("sample*"))  # no tile came from the secret


# ----------------------------------------------------------------------------------------------------------
# Data errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_a_byte(tar: Path) -> None:
    """Another valid tar of the same size: one byte of the first image changed."""
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith((".jpg", ".png")))
    data = bytearray(tar.read_bytes())
    data[m.offset_data + m.size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))


def test_bad_edit_sets(world, tmp_path, capsys):
    cases = {}
    trunc = _copy(world.edits, tmp_path / "trunc")
    t = sorted(trunc.glob("*.tar"))[0]
    t.write_bytes(t.read_bytes()[:len(t.read_bytes()) // 2])
    cases["truncated (manifest)"] = (str(trunc), [f"{t}: ", "its manifest says"])
    lone = tmp_path / "lone" / t.name  # no manifest beside it: the tar itself shows the cut
    lone.parent.mkdir()
    shutil.copy(t, lone)
    cases["truncated (tar only)"] = (str(lone), [str(lone), "truncated"])
    swapped = _copy(world.edits, tmp_path / "swapped")
    s = sorted(swapped.glob("*.tar"))[0]
    _flip_a_byte(s)
    cases["replaced by another valid tar"] = (str(swapped), [str(s), "sha256", "differs from its manifest"])
    cases["training shards"] = (str(world.shards), ["no 'edits' split (has: train, val)", "make_edits.py"])
    cases["missing"] = (str(tmp_path / "nope"), ["not found"])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    cases["not a tar"] = (str(tmp_path / "junk.tar"), ["cannot read the edit shard"])
    for what, (spec, texts) in cases.items():
        for name, argv in _edit_commands(world, spec, tmp_path / "out").items():
            o = call(capsys, argv, tmp_path / "cwd")
            try:
                refused(o, *texts)
            except AssertionError as e:
                raise AssertionError(f"{what} / {name}: {e}") from None


def test_bad_training_data_is_refused_before_any_work(world, tmp_path, capsys):
    trunc = _copy(world.shards, tmp_path / "trunc")
    t = sorted(trunc.glob("train-*.tar"))[0]
    t.write_bytes(t.read_bytes()[:-1024])
    cases = {str(tmp_path / "nope"): "data.train_shards", str(world.edits): "no 'train' split (has: edits)",
             str(trunc): "its manifest says", str(tmp_path / "nope-{000000..000003}.tar"): "not found"}
    for spec, text in cases.items():
        o = call(capsys, ["train", "--config", world.cfg, "--set", f"data.train_shards={spec}",
                          "--set", f"paths.run_dir={tmp_path / 'run'}"], tmp_path / "cwd")
        refused(o, text)
        assert not (tmp_path / "run").exists()


def test_replaced_shard_stops_a_training_run_by_name(world, tmp_path):
    """The sha256 check happens when a loader worker first reads the shard; its DataError reaches the training
    process (not as the worker's wrapped traceback) and the run exits 2 naming the shard."""
    bad = _copy(world.shards, tmp_path / "shards")
    for t in sorted(bad.glob("train-*.tar")):
        _flip_a_byte(t)
    p = cli(["train", "--config", str(REPO / "configs" / "tiny_vqgan.yaml"), "--set", f"data.train_shards={bad}",
             "--set", "data.num_workers=1", "--set", f"paths.run_dir={tmp_path / 'run'}", "--set", "train.max_steps=2",
             "--set", "logging.image_every=0", "--set", "logging.tensorboard=false"], timeout=600)
    check(p, 2)
    assert "differs from its manifest" in p.stderr and "train-0000" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "export").exists()


def _unwritable(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("x")
    out = {"a file": tmp_path / "a_file", "below a file": tmp_path / "a_file" / "sub"}
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out["read-only"] = ro / "out"
    return out


def test_unwritable_output_folders(world, tmp_path, capsys):
    for what, out in _unwritable(tmp_path).items():
        cmds = commands(world, world.cfg, out)
        cmds["train"] += ["--set", f"paths.run_dir={out}"]
        cmds["evaluate edits"] = ["evaluate", "edits", "--edit-out", world.results, "--edits", world.edits,
                                  "--out", out]
        cmds.pop("submit")
        for name, argv in cmds.items():
            o = call(capsys, argv, tmp_path / "cwd")
            try:
                refused(o, str(out), "cannot write there")
            except AssertionError as e:
                raise AssertionError(f"{what} / {name}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Held output folders


def _hold(folder: Path, what: str = "edit-batch") -> None:
    """A lock of a live holder (this test process) on this host."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": what,
                                                "slurm_job_id": "", "started": "now", "token": "t"}))


def test_a_held_output_folder_is_refused_by_name(world, tmp_path, capsys):
    out = tmp_path / "out"
    _hold(out)
    _hold(out / "gallery", "gallery")
    cmds = commands(world, world.cfg, out)
    for name in ("edit", "edit-batch", "precompute-guides", "gallery", "make_edits"):
        refused(call(capsys, cmds[name], tmp_path / "cwd"), f"{out}", "is in use by", "pid %d" % os.getpid())
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "gallery"]


def test_a_held_output_folder_stops_every_rank(world, tmp_path):
    out = tmp_path / "out"
    _hold(out)
    p = cli(commands(world, world.cfg, out)["edit-batch"], nproc=2)
    assert p.returncode != 0
    assert p.stderr.count("is in use by edit-batch") == 2, p.stderr  # both ranks, the same named error
    assert 'asset_dist/' not in "".join(line for line in p.stderr.splitlines() if line.startswith('  File "'))
    assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]


# ----------------------------------------------------------------------------------------------------------
# One bad record never stops a batch


def test_bad_record_metadata_is_that_records_failure(world, tmp_path, capsys):
    img, lab = square(0, 256)
    table = ClassTable(182)
    good = make_record("good", png(img), png(lab), png(rect_mask(256, 64, 128, 0, 256)), class_id=table.lookup("sea"),
                       class_name="sea", num_classes=182, label_shift=0)
    bad = {"cls_text": {"class_id": "abc"}, "cls_null": {"class_id": None}, "cls_float": {"class_id": 1.5},
           "ncls_text": {"num_classes": "many"}, "shift_list": {"label_shift": [1]}}
    recs = [good] + [make_record(k, good.image, good.seg, good.mask, class_id=3, class_name="x", num_classes=182,
                                 label_shift=0) for k in bad]
    for r in recs[1:]:
        r.meta.update(bad[r.edit_id])
    write_edit_shards(tmp_path / "edits", recs, samples_per_shard=3)
    out = tmp_path / "out"
    p = cli(["edit-batch", "--config", str(world.cfg), "--edits", str(tmp_path / "edits"), "--out", str(out),
             "--device", "cpu", "--samples", "1", "--set", "infer.batch_size=1"])
    check(p)
    assert "Traceback" not in p.stderr
    m = {r["edit"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert m["good"]["status"] == "ok" and (out / "good" / "sample_0.png").is_file()
    for eid, meta in bad.items():
        key = next(iter(meta))
        assert m[eid]["status"] == "failed" and f"metadata field {key!r} must be an integer" in m[eid]["error"], m[eid]
    g = call(capsys, ["precompute-guides", "--config", world.cfg, "--edits", tmp_path / "edits", "--out",
                      tmp_path / "guides", "--device", "cpu", "--samples", "1"], tmp_path / "cwd")
    assert g.rc == 0 and "FAILED edit 'cls_text': metadata field 'class_id'" in g.err, g.err
    assert (tmp_path / "guides" / "good" / "guide_0.npz").is_file()
    assert all((tmp_path / "guides" / eid / "failed.json").is_file() for eid in bad)
    o = call(capsys, ["gallery", "--config", world.cfg, "--edits", tmp_path / "edits", "--results", out],
             tmp_path / "cwd")
    assert o.rc == 0 and "without samples: " in o.out and all(eid in o.out for eid in bad)
    assert not (out / LOCK_NAME).exists() and not (out / "gallery" / LOCK_NAME).exists()  # released


# ----------------------------------------------------------------------------------------------------------
# The console entry points themselves (subprocesses): a bad input is one line, exit 2


def test_console_entry_points(world, tmp_path):
    cfg = config_file(world, tmp_path / "cfg", "train.optimizer=sgd")
    env = cli_env()
    for argv in ([sys.executable, "-m", "asset_dist.cli", "edit-batch", "--config", str(cfg), "--edits",
                  str(world.edits), "--out", str(tmp_path / "o")],
                 [sys.executable, str(REPO / "data_tools" / "make_edits.py"), "official", "--which", "coco",
                  "--config", str(cfg), "--out", str(tmp_path / "o")]):
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "'train.optimizer' must be one of adam, adamw (got 'sgd')" in p.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------
# Permissions: every writer leaves what a plain open() would under the umask (never mkstemp's 0600)

PERMISSION_RUN = r"""
import json, os, sys
from pathlib import Path
os.umask(0o027)
sys.path.insert(0, {repo!r} + "/data_tools")
import make_edits
from asset_dist.cli import main
from asset_dist.data.shardwriter import run_sharding
from asset_dist.infer.gallery import write_gallery
t = Path({tmp!r})
run_sharding({repo!r} + "/sample_data/sflckr/images", {repo!r} + "/sample_data/sflckr/segmentations", t / "shards",
             samples_per_shard=8, val_fraction=0.2, seed=0, workers=1, log=lambda m: None)
assert make_edits.main(["official", "--which", "landscape", "--resolution", "256", "--out", str(t / "edits")]) == 0
cfg = ["--config", {cfg!r}]
assert main(["precompute-guides", *cfg, "--edits", str(t / "edits"), "--out", str(t / "guides"), "--samples", "1",
             "--device", "cpu"]) == 0
assert main(["edit-batch", *cfg, "--edits", str(t / "edits"), "--out", str(t / "out"), "--samples", "1",
             "--device", "cpu", "--guides", str(t / "guides")]) == 0
assert main(["gallery", *cfg, "--edits", str(t / "edits"), "--results", str(t / "out")]) == 0
assert main(["evaluate", "edits", "--edit-out", str(t / "out"), "--edits", str(t / "edits")]) == 0
assert main(["train", "--config", {repo!r} + "/configs/tiny_vqgan.yaml", "--set",
             "data.train_shards=" + str(t / "shards"), "--set", "train.max_steps=1", "--set", "logging.image_every=0",
             "--set", "paths.run_dir=" + str(t / "run")]) == 0
"""


def test_outputs_respect_the_umask(world, tmp_path):
    """Shards + manifest + plan, edit shards, guides, samples / previews / records / manifest / logs, gallery,
    evaluation reports, and a training run (DeepSpeed checkpoints, our rank states, export, config, metrics,
    TensorBoard) under umask 027: files rw-r----- (DeepSpeed's helper scripts may add u+x), folders rwxr-x---."""
    script = PERMISSION_RUN.format(repo=str(REPO), tmp=str(tmp_path), cfg=str(world.cfg))
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=900)
    check(p)
    seen = set()
    for root in ("shards", "edits", "guides", "out", "run"):
        for path in [tmp_path / root, *(tmp_path / root).rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            seen.add(path.suffix or path.name)
            if path.is_dir():
                assert mode == 0o750, f"{path}: {oct(mode)}"
            else:
                assert mode & 0o027 == 0 and mode & 0o640 == 0o640, f"{path}: {oct(mode)}"
    for kind in (".tar", ".npz", ".png", ".jsonl", ".json", ".yaml", ".html", ".md", ".pt", "latest"):
        assert kind in seen, f"no {kind} file was checked"
    assert not list(tmp_path.rglob(LOCK_NAME))

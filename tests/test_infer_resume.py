"""edit-batch restarts and precomputed guides: a run stopped by USR1 (exit 99) and then one killed with SIGKILL,
restarted with the same command, does only what is missing and ends with the same images as an uninterrupted
run; precompute-guides (2 ranks, resumable) + edit-batch --guides gives the same images too."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from asset_dist.config import load_config
from asset_dist.infer.runner import run_batch_edits
from tests.test_infer_common import REPO, check, cli, cli_env, make_exports, small_edit_set

torch.set_num_threads(1)
S = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_resume")
    cfg = make_exports(tmp / "w")
    ok = small_edit_set(tmp / "edits", with_512=False)
    base = ["edit-batch", "--config", str(cfg), "--edits", str(tmp / "edits"), "--device", "cpu"]
    check(cli([*base, "--out", str(tmp / "ref")]))
    return {"tmp": tmp, "cfg": cfg, "ok": ok, "base": base, "ref": tmp / "ref"}


def _same_as_ref(setup, out) -> None:
    for eid in setup["ok"]:
        for k in range(S):
            assert (out / eid / f"sample_{k}.png").read_bytes() == \
                (setup["ref"] / eid / f"sample_{k}.png").read_bytes(), (eid, k)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["edit"] for x in lines] == sorted(setup["ok"] + ["zbad"])


def _records(out) -> set[str]:
    return {p.parent.name for p in out.glob("*/record.json")}


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "asset_dist.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_records(out, more_than: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_records(out)) <= more_than:
        assert proc.poll() is None, f"run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no new record in time"
        time.sleep(0.1)


def test_stop_kill_and_resume(setup):
    out = setup["tmp"] / "resumed"
    args = [*setup["base"], "--out", str(out), "--set", "infer.batch_size=1"]  # one edit per chunk
    a = _start(args)
    _wait_records(out, 0, a)
    a.send_signal(signal.SIGUSR1)  # SLURM's time-limit warning: finish the chunk, exit 99 (requeue)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 99, err[-3000:]
    assert "stop signal" in err and not (out / "manifest.jsonl").exists()
    b = _start(args)
    n = len(_records(out))
    _wait_records(out, n, b)
    b.kill()  # SIGKILL: no chance to clean up
    b.communicate()
    before = _records(out)
    assert 0 < len(before) < 5
    log = out / "logs" / "rank0.jsonl"
    n_lines = len(log.read_text().splitlines())
    c = cli(args)
    check(c)
    assert f"{len(before)} already done, {5 - len(before)} to do" in c.stderr
    redone = [json.loads(x)["edit"] for x in log.read_text().splitlines()[n_lines:]]
    assert sorted(redone) == sorted(set(setup["ok"] + ["zbad"]) - before)  # only what was missing
    _same_as_ref(setup, out)
    assert not list(out.glob("*/.*.tmp"))
    # a restart with other settings is refused (in-process: fails before any model is loaded)
    cfg = load_config(setup["cfg"])
    with pytest.raises(ValueError, match="other settings"):
        run_batch_edits(cfg, str(setup["tmp"] / "edits"), out, samples=3)


def test_precompute_guides_then_edit(setup):
    g = setup["tmp"] / "guides"
    pre = ["precompute-guides", "--config", str(setup["cfg"]), "--edits", str(setup["tmp"] / "edits"),
           "--out", str(g), "--device", "cpu"]
    check(cli(pre, nproc=2))
    files = sorted(p.relative_to(g).as_posix() for p in g.glob("*/guide_*.npz"))
    assert files == sorted(f"{e}/guide_{k}.npz" for e in setup["ok"] for k in range(S))
    assert "cannot be aligned with the 200x256 image" in json.loads((g / "zbad" / "failed.json").read_text())["error"]
    stamp = {f: (g / f).stat().st_mtime_ns for f in files}
    again = cli(pre)  # resumable: nothing to redo
    check(again)
    assert f"{len(setup['ok'])} already complete" in again.stderr
    assert stamp == {f: (g / f).stat().st_mtime_ns for f in files}
    out = setup["tmp"] / "guided"
    check(cli([*setup["base"], "--guides", str(g), "--out", str(out)]))
    _same_as_ref(setup, out)
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["guides"] == ["loaded"] for r in recs if r["status"] == "ok")

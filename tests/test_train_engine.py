"""The engine on both backends (train.backend: deepspeed at ZeRO-3, fsdp2), two real processes under torchrun:
the VQGAN's GAN training, a kill -9 after a checkpoint and the resume (bitwise the same weights as an
uninterrupted run, every step logged once), the export against the backend's own consolidation, TensorBoard;
then what a resume refuses: changed settings, a planted pickle, a `latest` outside the run folder, a folder
another run holds, an old partitioned checkpoint on another world size. Elastic resume: test_train_elastic.py.

One uninterrupted and one killed-and-resumed run per backend (module fixture); the refusal tests reuse them
or a one-process tiny_seg checkpoint and fail before any training.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from asset_dist.artifacts import read_export
from asset_dist.config import load_config
from asset_dist.models.vqgan import VQModel
from asset_dist.runlock import RunLock
from tests.train_utils import (REPO, check, early_late, kill_tree, metrics, run_train, tb_scalars, tb_tags,
                               train_cmd, train_env)

BACKENDS = {"deepspeed": ["train.backend=deepspeed", "deepspeed.zero_stage=3"], "fsdp2": ["train.backend=fsdp2"]}
STEPS, CKPT = 8, 4


def vq_opts(shards, run, backend, max_steps):
    return [f"data.train_shards={shards}", f"paths.run_dir={run}", *BACKENDS[backend], f"train.max_steps={max_steps}",
            f"train.ckpt_every={CKPT}", "train.keep_last=5", "train.lr=5e-4", "train.loss.disc_start=2",
            "train.loss.perceptual_weight=1",  # the paper's loss (L1 + LPIPS + adaptive GAN): the tiny config drops LPIPS
            "logging.log_every=1", "logging.image_every=4"]


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module", params=list(BACKENDS))
def runs(request, sflckr_shards, tmp_path_factory):
    """backend, an uninterrupted 8-step run, and a run SIGKILLed (all processes) after its step-4 checkpoint
    and one more logged step, then resumed to step 8."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"engine_{backend}")
    full, killed = tmp / "full", tmp / "killed"
    check(run_train("tiny_vqgan.yaml", vq_opts(sflckr_shards, full, backend, STEPS), nproc=2))

    # the killed run would go on for 40 steps: it is stopped between its step-4 and step-8 checkpoints
    proc = subprocess.Popen(train_cmd("tiny_vqgan.yaml", vq_opts(sflckr_shards, killed, backend, 40), nproc=2),
                            cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = killed / "checkpoints" / "latest", time.time() + 300
    try:
        while not (latest.is_file() and (killed / "metrics.jsonl").is_file()
                   and metrics(killed)[-1]["step"] > CKPT):
            assert proc.poll() is None and time.time() < deadline, "the run to kill ended or never logged"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert latest.read_text().strip() == "step_00000004", "killed too late: the test needs the step-4 checkpoint"
    logged_before = [m["step"] for m in metrics(killed)]
    resumed = run_train("tiny_vqgan.yaml", vq_opts(sflckr_shards, killed, backend, STEPS), nproc=2)
    check(resumed)
    return SimpleNamespace(backend=backend, tmp=tmp, full=full, killed=killed, resumed=resumed,
                           logged_before=logged_before)


def own_consolidation(tag_dir: Path, net: str, backend: str, scratch: Path) -> dict[str, torch.Tensor]:
    """The backend's own tool for one full state dict: DeepSpeed's zero_to_fp32, DCP's dcp_to_torch_save."""
    if backend == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = scratch / f"{tag_dir.name}_{net}.pt"
        dcp_to_torch_save(str(tag_dir / net), str(out))
        return torch.load(out, weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag=net)


def test_gan_trains_logs_and_steps_both_networks(runs):
    m = metrics(runs.full)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    l1 = [r["loss/l1"] for r in m]
    # the codebook is seeded from the first latents (train.loss.codebook_init=data), so L1 starts low and noisy
    # (measured 0.58 at step 1, mean of the last 3 steps 0.43): compare to the first step
    assert early_late(l1, 3)[1] < 0.85 * l1[0], l1
    gan = [r for r in m if r["step"] > 2]
    assert gan and all("loss/g_loss" in r and r["loss/d_weight"] > 0 for r in gan), "GAN term off or no adaptive weight"
    assert all(r["data/corrupt_samples"] == 0 and 0 <= r["perf/data_wait_frac"] <= 1 for r in m)
    # the discriminator trained too: its weights moved between the two checkpoints
    ck = runs.full / "checkpoints"
    d4 = own_consolidation(ck / "step_00000004", "disc", runs.backend, runs.tmp)
    d8 = own_consolidation(ck / "step_00000008", "disc", runs.backend, runs.tmp)
    assert any(not torch.equal(d4[k], d8[k]) for k in d4)
    tags = tb_tags(runs.full)
    assert "loss/l1" in tags["scalars"] and "images/input|masked|reconstruction" in tags["images"]


def test_kill9_resume_is_bitwise_and_logs_every_step_once(runs):
    assert f"resumed from {runs.killed / 'checkpoints' / 'step_00000004'} at step 4" in runs.resumed.stdout
    assert runs.logged_before[-1] > CKPT  # the killed run had logged steps its checkpoint did not hold
    a = read_export(runs.full / "export" / "vqgan.pt")["state_dict"]
    b = read_export(runs.killed / "export" / "vqgan.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + resume"
    steps = list(range(1, STEPS + 1))
    assert [r["step"] for r in metrics(runs.killed)] == steps
    assert tb_scalars(runs.killed, "loss/l1") == steps
    for k in ("loss/l1", "loss/g_loss"):  # the re-trained steps logged the same values as the full run
        assert [r.get(k) for r in metrics(runs.killed)] == [r.get(k) for r in metrics(runs.full)]


def test_export_equals_the_backends_own_consolidation(runs):
    rec = read_export(runs.full / "export" / "vqgan.pt", expect_stage="vqgan")
    own = own_consolidation(runs.full / "checkpoints" / "step_00000008", "gen", runs.backend, runs.tmp)
    assert rec["state_dict"].keys() == own.keys()
    for k, v in own.items():
        assert rec["state_dict"][k].dtype == torch.float32 and torch.equal(rec["state_dict"][k], v.float()), k
    assert rec["step"] == STEPS and rec["lineage"]["backend"] == runs.backend
    assert rec["config"]["train"]["backend"] == runs.backend


ZERO3_OUTPUTS = r"""
import sys, torch, deepspeed
from asset_dist.config import load_config
from asset_dist.models.vqgan import VQModel
from asset_dist.train.backends.deepspeed import deepspeed_config, weights_only_loads
cfg = load_config(sys.argv[1], sys.argv[4:])
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = VQModel(cfg.model.vqgan)
opt = torch.optim.Adam(model.parameters())
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 3))
with weights_only_loads():
    engine.load_checkpoint(sys.argv[2], tag="gen")
engine.eval()
g = torch.Generator().manual_seed(1)
x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
mask = torch.zeros(2, 1, 64, 64); mask[:, :, 20:50, 10:40] = 1
with torch.no_grad():
    rec, _, idx = engine(x, mask)
if torch.distributed.get_rank() == 0:
    torch.save({"x": x, "mask": mask, "rec": rec, "idx": idx}, sys.argv[3])
"""


@pytest.mark.parametrize("runs", ["deepspeed"], indirect=True)
def test_zero3_checkpoint_loaded_by_deepspeed_reproduces_the_export(runs, sflckr_shards):
    """Independent of zero_to_fp32: DeepSpeed loads the ZeRO-3 tag on 2 ranks; its outputs match the export's."""
    script, out = runs.tmp / "z3_outputs.py", runs.tmp / "z3_outputs.pt"
    script.write_text(ZERO3_OUTPUTS)
    cfg_path = str(REPO / "configs" / "tiny_vqgan.yaml")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29400 + os.getpid() % 1000), str(script), cfg_path,
                           str(runs.full / "checkpoints" / "step_00000008"), str(out),
                           f"data.train_shards={sflckr_shards}"],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    check(proc)
    ref = torch.load(out, weights_only=True)
    rec = read_export(runs.full / "export" / "vqgan.pt", expect_stage="vqgan")
    model = VQModel(load_config(cfg_path, [f"data.train_shards={sflckr_shards}"]).model.vqgan)
    model.load_state_dict(rec["state_dict"])
    model.eval()
    with torch.no_grad():
        out, _, idx = model(ref["x"], ref["mask"])
    assert torch.equal(idx, ref["idx"])
    torch.testing.assert_close(out, ref["rec"], atol=1e-5, rtol=1e-5)
    assert rec["lineage"]["data"] == str(sflckr_shards)


def test_resume_refuses_changed_settings(runs, sflckr_shards, tmp_path):
    """Checked before any model is built: exit 2, a message naming each setting, no traceback."""
    opts = vq_opts(sflckr_shards, tmp_path / "other", runs.backend, STEPS)
    proc = run_train("tiny_vqgan.yaml", opts + ["train.lr=1e-3", "train.loss.disc_weight=0.5"],
                     extra=["--resume", str(runs.full)])
    check(proc, rc=2)
    no_traceback(proc)
    assert "train.lr: 0.0005 -> 0.001" in proc.stderr and "train.loss.disc_weight: 0.8 -> 0.5" in proc.stderr
    assert not (tmp_path / "other" / "config.yaml").exists()  # nothing recorded what was not done


@pytest.mark.parametrize("runs", ["deepspeed"], indirect=True)
def test_an_old_partitioned_checkpoint_on_another_world_size_is_a_named_error(runs, sflckr_shards, tmp_path):
    """A ZeRO-3 tag written before checkpoints carried DeepSpeed's universal info (and before meta.json)
    cannot be resharded: one process refuses it by name instead of failing inside DeepSpeed."""
    old = tmp_path / "old"
    shutil.copytree(runs.full / "checkpoints", old / "checkpoints")
    shutil.copy(runs.full / "config.yaml", old / "config.yaml")
    tag = old / "checkpoints" / "step_00000008"
    (tag / "meta.json").unlink()
    for f in tag.glob("*/*model_states.pt"):
        sd = torch.load(f, weights_only=False)
        sd.pop("universal_checkpoint_info", None)
        torch.save(sd, f)
    proc = run_train("tiny_vqgan.yaml", vq_opts(sflckr_shards, old, runs.backend, STEPS + 1))
    check(proc, rc=2)
    no_traceback(proc)
    assert "cannot reshard this checkpoint from 2 to 1 processes" in proc.stderr, proc.stderr[-2000:]


# ---- one-process tiny_seg checkpoints for the refusal tests ------------------------------------------------
def seg_opts(shards, run, backend, **kw):
    o = [f"data.train_shards={shards}", f"paths.run_dir={run}", f"train.backend={backend}", "deepspeed.zero_stage=0",
         "logging.image_every=0", "logging.log_every=1", "train.ckpt_every=2"]
    return o + [f"{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def seg_ckpts(sflckr_shards, tmp_path_factory):
    out = {}
    for backend in BACKENDS:
        run = tmp_path_factory.mktemp(f"seg_{backend}") / "run"
        check(run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, backend, **{"train.max_steps": 2})))
        out[backend] = run
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    return dst


class Payload:
    """A pickle that runs a command when unpickled (what a planted checkpoint could hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_planted_pickles_are_refused_and_never_run(backend, seg_ckpts, sflckr_shards, tmp_path):
    marker = tmp_path / "pwned"
    live = tmp_path / "live"  # the payload is real: plain unpickling runs it
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()
    net = "model"
    targets = {"backend file": f"{net}/mp_rank_00_model_states.pt" if backend == "deepspeed" else f"{net}/.metadata"}
    if backend == "deepspeed":  # the engine's own rank file, the same for both backends
        targets["rank file"] = "rank0.pt"
    for what, rel in targets.items():
        run = copy_run(seg_ckpts[backend], tmp_path / what.replace(" ", "_"))
        target = run / "checkpoints" / "step_00000002" / rel
        assert target.is_file()
        with open(target, "wb") as f:
            if rel.endswith(".metadata"):
                pickle.dump(Payload(marker), f)
            else:
                torch.save({"module": Payload(marker)}, f)
        proc = run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, backend, **{"train.max_steps": 4}))
        check(proc, rc=2)
        no_traceback(proc)
        assert "refused to load" in proc.stderr and str(target) in proc.stderr, (what, proc.stderr[-2000:])
        assert not marker.exists(), f"the planted pickle in the {what} ran"


def test_latest_must_name_a_tag_inside_the_run_folder(seg_ckpts, sflckr_shards, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(seg_ckpts["deepspeed"] / "checkpoints" / "step_00000002", outside / "step_00000002")
    for name, setup in {
        "escape": lambda ck: (ck / "latest").write_text("../../elsewhere/step_00000002\n"),
        "absolute": lambda ck: (ck / "latest").write_text(f"{outside / 'step_00000002'}\n"),
        "symlinked tag": lambda ck: (shutil.rmtree(ck / "step_00000002"),
                                     (ck / "step_00000002").symlink_to(outside / "step_00000002")),
    }.items():
        run = copy_run(seg_ckpts["deepspeed"], tmp_path / name.replace(" ", "_"))
        setup(run / "checkpoints")
        proc = run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, "deepspeed", **{"train.max_steps": 4}))
        check(proc, rc=2)
        no_traceback(proc)
        assert str(run / "checkpoints" / "latest") in proc.stderr, (name, proc.stderr[-2000:])


def test_legacy_checkpoint_resumes_and_may_extend_max_steps(seg_ckpts, sflckr_shards, tmp_path):
    """A tag written before meta.json (DeepSpeed, world size from its rank files, config.yaml as the record)."""
    run = copy_run(seg_ckpts["deepspeed"], tmp_path / "legacy")
    (run / "checkpoints" / "step_00000002" / "meta.json").unlink()
    proc = run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, "deepspeed", **{"train.max_steps": 3}))
    check(proc)
    assert "at step 2" in proc.stdout and read_export(run / "export" / "seg.pt")["step"] == 3
    assert "max_steps: 3" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_finished_run_is_kept(backend, seg_ckpts, sflckr_shards, tmp_path):
    """Training a finished run again (what a re-run of quickstart.sh or a pipeline does) trains nothing and keeps
    the export and the checkpoints as they are."""
    run = tmp_path / "run"
    shutil.copytree(seg_ckpts[backend], run)
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and f.name != ".asset_dist.lock"}
    proc = run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, backend, **{"train.max_steps": 2}))
    check(proc)
    assert "already finished: step 2" in proc.stdout, proc.stdout[-2000:]
    kept = {f: f.stat().st_mtime_ns for f in before}
    assert {f: t for f, t in kept.items() if f.suffix in (".pt", ".json") or "checkpoints" in f.parts} == \
        {f: t for f, t in before.items() if f.suffix in (".pt", ".json") or "checkpoints" in f.parts}


def test_a_held_run_folder_is_refused(sflckr_shards, tmp_path):
    run = tmp_path / "busy"
    with RunLock(run, "train"):
        proc = run_train("tiny_seg.yaml", seg_opts(sflckr_shards, run, "fsdp2", **{"train.max_steps": 2}))
    check(proc, rc=2)
    no_traceback(proc)
    assert "is in use by train" in proc.stderr and not (run / "checkpoints").exists()

"""Stage 1 on real DeepSpeed: two-process ZeRO-2/3 runs of the tiny VQGAN and seg tokenizer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from asset_dist.config import load_config
from asset_dist.models.vqgan import VQModel
from asset_dist.artifacts import read_export
from tests.train_utils import REPO, check, early_late, metrics, run_train, train_env


def base(shards, run_dir, **kw):
    o = [f"data.train_shards={shards}", f"paths.run_dir={run_dir}", "logging.log_every=1",
         "logging.image_every=0"]
    return o + [f"{k}={v}" for k, v in kw.items()]


def test_vqgan_zero2_loss_falls_and_resume_is_bitwise(sflckr_shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    opts = {"train.ckpt_every": 100, "train.loss.disc_start": 4, "deepspeed.zero_stage": 2, "train.lr": 5e-4}
    check(run_train("tiny_vqgan.yaml", base(sflckr_shards, full, **opts, **{"train.max_steps": 12}), nproc=2))
    l1 = [m["loss/l1"] for m in metrics(full)]
    early, late = early_late(l1, 4)
    assert late < 0.9 * early, f"L1 did not fall: {l1}"
    assert any("loss/g_loss" in m for m in metrics(full)), "the GAN term never switched on"
    assert all(m["data/corrupt_samples"] == 0 and 0 <= m["perf/data_wait_frac"] <= 1 for m in metrics(full))

    # the same run, stopped at step 6 and resumed from its checkpoint, ends with identical weights
    check(run_train("tiny_vqgan.yaml", base(sflckr_shards, part, **opts, **{"train.max_steps": 6}), nproc=2))
    proc = run_train("tiny_vqgan.yaml", base(sflckr_shards, part, **opts, **{"train.max_steps": 12}), nproc=2)
    check(proc)
    assert "resumed from" in proc.stdout
    a = read_export(full / "export" / "vqgan.pt")["state_dict"]
    b = read_export(part / "export" / "vqgan.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


ZERO3_OUTPUTS = r"""
import sys, torch, deepspeed
from asset_dist.config import load_config
from asset_dist.models.vqgan import VQModel
from asset_dist.train.engine import deepspeed_config
cfg = load_config(sys.argv[1], sys.argv[3:])
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = VQModel(cfg.model.vqgan)
opt = torch.optim.Adam(model.parameters())
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 3))
engine.load_checkpoint(sys.argv[2], tag="gen")
engine.eval()
g = torch.Generator().manual_seed(1)
x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
mask = torch.zeros(2, 1, 64, 64); mask[:, :, 20:50, 10:40] = 1
with torch.no_grad():
    rec, _, idx = engine(x, mask)
if torch.distributed.get_rank() == 0:
    torch.save({"x": x, "mask": mask, "rec": rec, "idx": idx}, sys.argv[2] + "/outputs.pt")
"""


def test_vqgan_zero3_gan_steps_both_networks_and_export_reproduces(sflckr_shards, tmp_path):
    run = tmp_path / "z3"
    opts = {"train.ckpt_every": 2, "train.keep_last": 5, "train.loss.disc_start": 0, "deepspeed.zero_stage": 3,
            "train.max_steps": 4}
    check(run_train("tiny_vqgan.yaml", base(sflckr_shards, run, **opts), nproc=2))
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    # the discriminator (ZeRO <= 2) moved between steps 2 and 4
    d2 = torch.load(ck / "step_00000002" / "disc" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    d4 = torch.load(ck / "step_00000004" / "disc" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(not torch.equal(d2[k], d4[k]) for k in d2 if d2[k].is_floating_point())
    assert all(m["loss/d_weight"] > 0 for m in metrics(run)), "adaptive GAN weight missing under ZeRO-3"

    # the ZeRO-3 model, loaded back by DeepSpeed on 2 ranks, and the single-file export agree
    script = tmp_path / "z3_outputs.py"
    script.write_text(ZERO3_OUTPUTS)
    cfg_path = str(REPO / "configs" / "tiny_vqgan.yaml")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29400 + os.getpid() % 1000), str(script), cfg_path,
                           str(ck / "step_00000004"), f"data.train_shards={sflckr_shards}"],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    check(proc)
    ref = torch.load(ck / "step_00000004" / "outputs.pt", weights_only=True)
    rec = read_export(run / "export" / "vqgan.pt", expect_stage="vqgan")
    model = VQModel(load_config(cfg_path, [f"data.train_shards={sflckr_shards}"]).model.vqgan)
    model.load_state_dict(rec["state_dict"])
    model.eval()
    with torch.no_grad():
        out, _, idx = model(ref["x"], ref["mask"])
    assert torch.equal(idx, ref["idx"])
    torch.testing.assert_close(out, ref["rec"], atol=1e-5, rtol=1e-5)
    assert rec["lineage"]["data"] == str(sflckr_shards)


@pytest.mark.parametrize("zero", [2, 3])
def test_seg_tokenizer_loss_falls(sflckr_shards, tmp_path, zero):
    run = tmp_path / f"seg{zero}"
    check(run_train("tiny_seg.yaml", base(sflckr_shards, run, **{"deepspeed.zero_stage": zero,
                                                                  "train.max_steps": 10}), nproc=2))
    rec = [m["loss/rec"] for m in metrics(run)]
    early, late = early_late(rec, 3)
    assert late < 0.9 * early, rec
    assert (run / "export" / "seg.pt").is_file() and (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_nonfinite_loss_stops_without_saving(sflckr_shards, tmp_path):
    run = tmp_path / "nan"
    proc = run_train("tiny_seg.yaml", base(sflckr_shards, run, **{"train.lr": "1e38", "train.max_steps": 30,
                                                                   "train.ckpt_every": 100,
                                                                   "deepspeed.zero_stage": 0}))
    check(proc, rc=3)
    assert "non-finite loss at step" in proc.stderr
    assert not (run / "checkpoints" / "latest").exists()


def test_bad_config_names_the_key(tmp_path):
    proc = run_train("tiny_seg.yaml", ["train.stagee=seg"])
    check(proc, rc=2)
    assert "train.stagee" in proc.stderr and "tiny_seg.yaml" in proc.stderr


def test_sigusr1_checkpoints_exits_for_requeue_and_resumes(sflckr_shards, tmp_path):
    from asset_dist.distenv import EXIT_REQUEUE

    run = tmp_path / "sig"
    args = ["--config", str(REPO / "configs" / "tiny_seg.yaml")]
    for o in base(sflckr_shards, run, **{"train.max_steps": 400, "train.ckpt_every": 1000,
                                          "deepspeed.zero_stage": 0}):
        args += ["--set", o]
    p = subprocess.Popen([sys.executable, "-m", "asset_dist.cli", "train", *args], cwd=REPO, env=train_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len(metrics(run)) < 2:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_REQUEUE, err[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert step >= 2
    proc = run_train("tiny_seg.yaml", base(sflckr_shards, run, **{"train.max_steps": step + 2,
                                                                   "train.ckpt_every": 1000,
                                                                   "deepspeed.zero_stage": 0}))
    check(proc)
    assert f"at step {step}" in proc.stdout
    assert read_export(run / "export" / "seg.pt")["step"] == step + 2


def test_bf16_accumulation_checkpointing_and_schedule(sflckr_shards, tmp_path):
    """bf16 (fp32 master weights exported), 2 micro-batches per step, activation checkpointing, clipping,
    warm-up + cosine: the options a cluster run uses, through the real engine."""
    run = tmp_path / "bf16"
    check(run_train("tiny_seg.yaml", base(sflckr_shards, run, **{
        "train.precision": "bf16", "train.grad_accum": 2, "train.activation_checkpointing": "true",
        "train.grad_clip": 1.0, "train.warmup_steps": 1, "train.schedule": "cosine", "train.max_steps": 3,
        "deepspeed.zero_stage": 2}), nproc=2))
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    lrs = [r["lr/model"] for r in m]
    assert lrs[0] > lrs[1] > lrs[2] > 0, lrs  # warm-up done after step 1, then cosine decay
    rec = read_export(run / "export" / "seg.pt")
    assert all(t.dtype == torch.float32 for t in rec["state_dict"].values())

"""Stage 1 through the real engine on both backends: the seg tokenizer at two processes, the options a
cluster run uses (bf16, accumulation, activation checkpointing, clipping, warm-up + cosine), the non-finite
guard and the requeue signal. The VQGAN's GAN, kill -9 resume and export: tests/test_train_engine.py."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from asset_dist.artifacts import read_export
from asset_dist.exitcodes import EXIT_REQUEUE
from tests.train_utils import REPO, check, early_late, metrics, run_train, train_env

BACKENDS = {"deepspeed": ["train.backend=deepspeed", "deepspeed.zero_stage=2"], "fsdp2": ["train.backend=fsdp2"]}


def base(shards, run_dir, backend="deepspeed", **kw):
    o = [f"data.train_shards={shards}", f"paths.run_dir={run_dir}", "logging.log_every=1",
         "logging.image_every=0", *BACKENDS[backend]]
    return o + [f"{k}={v}" for k, v in kw.items()]


def test_seg_tokenizer_loss_falls(sflckr_shards, tmp_path):
    """DeepSpeed ZeRO-2 (FSDP2 trains the seg tokenizer in test_train_elastic.py, the VQGAN in test_train_engine.py)."""
    run = tmp_path / "seg"
    check(run_train("tiny_seg.yaml", base(sflckr_shards, run, "deepspeed", **{"train.max_steps": 10}), nproc=2))
    rec = [m["loss/rec"] for m in metrics(run)]
    early, late = early_late(rec, 3)
    assert late < 0.9 * early, rec
    assert (run / "export" / "seg.pt").is_file() and (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("backend", ["fsdp2"])  # the check is the engine's, the same for every backend
def test_nonfinite_loss_stops_without_saving(sflckr_shards, tmp_path, backend):
    run = tmp_path / "nan"
    proc = run_train("tiny_seg.yaml", base(sflckr_shards, run, backend, **{
        "train.lr": "1e38", "train.max_steps": 30, "train.ckpt_every": 100, "deepspeed.zero_stage": 0,
        "logging.log_every": 100}))
    check(proc, rc=3)
    assert "non-finite loss at step" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "checkpoints" / "latest").exists()


def test_bad_config_names_the_key(sflckr_shards, tmp_path):
    proc = run_train("tiny_seg.yaml", ["train.stagee=seg"])
    check(proc, rc=2)
    assert "train.stagee" in proc.stderr and "tiny_seg.yaml" in proc.stderr
    proc = run_train("tiny_seg.yaml", base(sflckr_shards, tmp_path / "run", "fsdp2", **{"train.precision": "fp16"}))
    check(proc, rc=2)
    assert "fp16" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("backend", ["deepspeed"])  # the engine's signal path; FSDP2 saves and resumes elsewhere
def test_sigusr1_checkpoints_exits_for_requeue_and_resumes(sflckr_shards, tmp_path, backend):
    run = tmp_path / "sig"
    opts = {"train.ckpt_every": 1000, "deepspeed.zero_stage": 0, "train.sync_every": 3}
    args = ["--config", str(REPO / "configs" / "tiny_seg.yaml")]
    for o in base(sflckr_shards, run, backend, **opts, **{"train.max_steps": 400}):
        args += ["--set", o]
    p = subprocess.Popen([sys.executable, "-m", "asset_dist.cli", "train", *args], cwd=REPO, env=train_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len(metrics(run)) < 2:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    signalled_after = metrics(run)[-1]["step"]
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_REQUEUE, err[-3000:]
    step = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert signalled_after <= step <= signalled_after + 3 + 1  # acted on within train.sync_every steps
    proc = run_train("tiny_seg.yaml", base(sflckr_shards, run, backend, **opts, **{"train.max_steps": step + 2}))
    check(proc)
    assert f"at step {step}" in proc.stdout
    assert read_export(run / "export" / "seg.pt")["step"] == step + 2


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_accumulation_checkpointing_and_schedule(sflckr_shards, tmp_path, backend):
    """bf16 (fp32 master weights exported), 2 micro-batches per step, activation checkpointing, clipping,
    warm-up + cosine: the options a cluster run uses, through the real engine."""
    run = tmp_path / "bf16"
    check(run_train("tiny_seg.yaml", base(sflckr_shards, run, backend, **{
        "train.precision": "bf16", "train.grad_accum": 2, "train.activation_checkpointing": "true",
        "train.grad_clip": 1.0, "train.warmup_steps": 1, "train.schedule": "cosine", "train.max_steps": 3}), nproc=2))
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    lrs = [r["lr/model"] for r in m]
    assert lrs[0] > lrs[1] > lrs[2] > 0, lrs  # warm-up done after step 1, then cosine decay
    assert all(r["grad_norm/model"] > 0 for r in m)
    rec = read_export(run / "export" / "seg.pt")
    assert all(t.dtype == torch.float32 for t in rec["state_dict"].values())

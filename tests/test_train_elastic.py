"""Elastic resume: a checkpoint written by 2 processes continues on 1, then on 3 (both backends, ZeRO 0-3).

Per chain: a 2-process run; its checkpoint resumed by 1 process into a new folder and saved again at once,
which must hold exactly the same model and optimizer state (the backend's own consolidation of both tags:
DCP's dcp_to_torch_save, DeepSpeed's universal conversion); then training goes on with 1 process and with 3,
and the loss continues where it was (no jump back to its initial value). The data position's rule (every
sample of the epoch in progress exactly once) is tested on the loader: tests/test_loader_elastic.py.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest
import torch

from asset_dist.artifacts import read_export
from tests.train_utils import check, metrics, run_train

CHAINS = {  # name: (overrides, process counts after the first 2; the 1-process re-save always comes first)
    "fsdp2": (["train.backend=fsdp2"], [1, 3]),
    "ds-zero2": (["train.backend=deepspeed", "deepspeed.zero_stage=2"], [1, 3]),
    "ds-zero3": (["train.backend=deepspeed", "deepspeed.zero_stage=3"], [3]),
    "ds-zero1": (["train.backend=deepspeed", "deepspeed.zero_stage=1"], []),
    "ds-zero0": (["train.backend=deepspeed", "deepspeed.zero_stage=0"], [3]),
}
FIRST = 3  # steps of the 2-process run


def opts(shards, run, chain, steps):
    return [f"data.train_shards={shards}", f"paths.run_dir={run}", *CHAINS[chain][0], f"train.max_steps={steps}",
            "train.ckpt_every=1000", "train.lr=2e-3", "logging.log_every=1", "logging.image_every=0"]


def consolidated(tag: Path, backend: str, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of network 'model' (weights and optimizer state) by parameter name, by the backend's own
    world-size-free consolidation."""
    if backend == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = scratch / f"{tag.parent.parent.name}.pt"
        dcp_to_torch_save(str(tag / "model"), str(out))
        sd = torch.load(out, weights_only=True)
        flat = {f"model.{k}": v for k, v in sd["model"].items()}
        flat.update({f"optim.{p}.{k}": v for p, st in sd["optim"]["state"].items() for k, v in st.items()})
        return flat
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    files = list((tag / "model").glob("*_optim_states.pt"))
    if not files:  # ZeRO-0 fp32: one file with the whole model and torch optimizer state
        sd = torch.load(tag / "model" / "mp_rank_00_model_states.pt", weights_only=False)
        flat = {f"model.{k}": v for k, v in sd["module"].items()}
        flat.update({f"optim.{p}.{k}": v for p, st in sd["optimizer"]["state"].items() for k, v in st.items()})
        return flat
    out = scratch / f"{tag.parent.parent.name}_universal"
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(argparse.Namespace(input_folder=str(tag / "model"), output_folder=str(out),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=False))
    flat = {}
    for p in sorted((out / "zero").glob("*/*.pt")):  # <param>/{fp32,exp_avg,exp_avg_sq}.pt: {"param": ...}; step.pt
        obj = torch.load(p, weights_only=False)
        flat[f"{p.parent.name}.{p.stem}"] = obj["param"] if isinstance(obj, dict) else obj
    return flat


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_on_another_number_of_processes(chain, sflckr_shards, tmp_path):
    backend = "fsdp2" if chain == "fsdp2" else "deepspeed"
    first, second = tmp_path / "first", tmp_path / "second"
    check(run_train("tiny_seg.yaml", opts(sflckr_shards, first, chain, FIRST), nproc=2))

    # resharded to 1 process and saved again at once: the same model and optimizer, tensor for tensor
    proc = run_train("tiny_seg.yaml", opts(sflckr_shards, second, chain, FIRST), extra=["--resume", str(first)])
    check(proc)
    assert "resharded from 2 processes to 1" in proc.stdout
    tag = f"step_{FIRST:08d}"
    a = consolidated(first / "checkpoints" / tag, backend, tmp_path)
    b = consolidated(second / "checkpoints" / tag, backend, tmp_path)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed in the reshard"
    ea, eb = (read_export(r / "export" / "seg.pt")["state_dict"] for r in (first, second))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not (second / "checkpoints" / ".reshard").exists()

    # training goes on with 1 process, then 3: the loss continues from where it was
    steps, world = FIRST, 1
    for n in CHAINS[chain][1]:
        steps += 1
        proc = run_train("tiny_seg.yaml", opts(sflckr_shards, second, chain, steps), nproc=n)
        check(proc)
        if n != world:
            assert f"resharded from {world} processes to {n}" in proc.stdout
        world = n
    if CHAINS[chain][1]:
        before = [m["loss/rec"] for m in metrics(first)]
        after = [m["loss/rec"] for m in metrics(second)]
        assert [m["step"] for m in metrics(second)] == list(range(FIRST + 1, steps + 1))
        assert max(after) < before[0] - 0.5 * (before[0] - before[-1]), (before, after)

"""The DeepSpeed backend: one engine per network (ZeRO 0-3, `deepspeed.*` config section), DeepSpeed's own
checkpoint files, and its zero_to_fp32 consolidation for the export.

Resuming with another number of processes (elastic resume) goes through DeepSpeed's universal checkpoint:
rank 0 converts the network's partitioned files (ZeRO 1-3, or bf16 at ZeRO 0) with `ds_to_universal` into
per-parameter fp32 weights and Adam moments under the run's `checkpoints/.reshard/`, and every rank loads
them with `load_universal`. Files that are not partitioned (fp32 at ZeRO 0) load at any world size as they
are. Only checkpoints this backend wrote with `universal_checkpoint_info` (set on each network) convert.

Every checkpoint read goes through `weights_only_loads`: DeepSpeed calls `torch.load(..., weights_only=False)`
in several places (engine, ZeRO optimizers, zero_to_fp32), so inside the block `torch.load` is forced to
weights-only with an allow-list of the few classes DeepSpeed itself writes; anything else in a checkpoint
(a planted pickle) is refused with a named error before it can run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from asset_dist.config import Config
from asset_dist.train.backends.base import Backend, make_optimizer, make_scheduler
from asset_dist.train.checkpoint import CheckpointError, UnsafeCheckpoint

# The non-torch classes DeepSpeed 0.1x pickles into its checkpoint files (found by loading ZeRO 0-3 fp32/bf16
# checkpoints weights-only): the loss scaler, the ZeRO stage enum and the bf16 optimizer's fragment records.
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def _safe_globals() -> list:
    out = []
    for item in SAFE_GLOBALS:
        mod, _, name = item.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: a class it does not have cannot be in its files either
    return out


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block every `torch.load` is weights-only (DeepSpeed's classes allowed); a refused file
    raises UnsafeCheckpoint naming it."""
    original = torch.load
    allowed = _safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
            raise UnsafeCheckpoint(f"{f}: refused to load: not a plain-tensor DeepSpeed file ({why}). "
                                   "Checkpoints are read weights-only; do not resume from files you did not "
                                   "write") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def deepspeed_config(cfg: Config, zero_stage: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": ds.overlap_comm}
    if ds.offload_optimizer and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    if cfg.train.grad_clip > 0:
        conf["gradient_clipping"] = cfg.train.grad_clip
    for k, v in ds.extra.items():
        conf[k] = v
    return conf


def consolidate_fp32(net_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from one network's DeepSpeed checkpoint folder (RUN/checkpoints/TAG/NET), so a
    bf16 run exports its fp32 master weights (ZeRO >= 1), not the bf16 copies."""
    with weights_only_loads():
        if zero_stage == 0:
            files = sorted(net_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{net_dir}: no mp_rank_*_model_states.pt")
            sd = torch.load(files[0], map_location="cpu")["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # zero_to_fp32 wants (folder holding the tag, tag)
            sd = get_fp32_state_dict_from_zero_checkpoint(str(net_dir.parent), tag=net_dir.name)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg, device, env):
        super().__init__(cfg, device, env)
        import deepspeed

        if device.type == "cpu" and os.environ.get("ASSET_DS_SHM") != "1":
            # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled at first start (minutes on a
            # 2-core machine) and only speeds up intra-node CPU reductions; gloo does the same job.
            # ASSET_DS_SHM=1 keeps it. (`import deepspeed.comm.torch as m` would bind the `torch`
            # package that deepspeed.comm imports.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self.ds = deepspeed
        self.engines: dict[str, Any] = {}
        self.zero: dict[str, int] = {}

    def setup(self, stage, nets: dict[str, nn.Module]) -> None:
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        for name, module in nets.items():
            z = self.cfg.deepspeed.zero_stage
            if name in stage.frozen_use:  # called frozen outside its engine: ZeRO-3 partitioning would forbid it
                z = min(z, 2)
            self.zero[name] = z
            # saved with every checkpoint: what lets ds_to_universal reshard it for another world size
            setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
            opt = make_optimizer(stage.param_groups(name, module), stage.optimizer_args(name))
            engine, _, _, _ = self.ds.initialize(model=module, optimizer=opt, lr_scheduler=make_scheduler(opt, self.cfg),
                                                 config=deepspeed_config(self.cfg, z))
            self.engines[name] = engine

    def describe(self) -> dict[str, Any]:
        return {"zero_stage": dict(self.zero)}

    def __getitem__(self, name: str):
        return self.engines[name]  # the engine's forward hooks its outputs for its own backward

    def unwrap(self, name: str) -> nn.Module:
        return self.engines[name].module

    def train(self) -> None:
        for e in self.engines.values():
            e.train()

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.engines[name].backward(loss)

    def step(self, name: str, log: bool) -> None:
        self.engines[name].step()  # DeepSpeed counts micro-steps and steps the optimizer at the boundary

    def lr(self, name: str) -> float:
        return self.engines[name].get_lr()[0]

    def grad_norm(self, name: str):
        return self.engines[name].get_global_grad_norm()

    def save(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(folder), tag=name, save_latest=False)

    def load(self, folder: Path, meta: dict[str, Any], scratch: Path) -> None:
        saved = meta.get("zero_stage") or {}
        saved_world = int(meta.get("world_size", self.env.world_size))
        for name, engine in self.engines.items():
            if name in saved and saved[name] != self.zero[name]:
                raise CheckpointError(f"{folder / name}: written at ZeRO-{saved[name]}, this run uses "
                                      f"ZeRO-{self.zero[name]} (deepspeed.zero_stage)")
            partitioned = any((folder / name).glob("*_optim_states.pt"))
            if saved_world == self.env.world_size or not partitioned:
                with weights_only_loads():
                    path, _ = engine.load_checkpoint(str(folder), tag=name)
            else:
                universal = self._to_universal(folder / name, scratch / folder.name / name, saved_world)
                engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
                try:
                    with weights_only_loads():
                        path, _ = engine.load_checkpoint(str(universal.parent), tag=name)
                finally:
                    engine._config.load_universal_checkpoint = False
            if path is None:
                raise CheckpointError(f"{folder / name}: DeepSpeed could not load this checkpoint")

    def _to_universal(self, src: Path, out: Path, saved_world: int) -> Path:
        """Rank 0 converts `src` (one network's files) into a universal checkpoint at `out` (collective)."""
        err = ""
        if self.env.rank == 0 and not out.is_dir():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            talk = io.StringIO()
            try:
                with weights_only_loads(), contextlib.redirect_stdout(talk), contextlib.redirect_stderr(talk):
                    ds_to_universal(argparse.Namespace(
                        input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                        keep_temp_folder=False, strict=True, inject_missing_state=False))
                tmp.rename(out)
            except CheckpointError as e:
                err = str(e)
            except (AssertionError, FileNotFoundError, KeyError, ValueError) as e:
                err = (f"{src}: cannot reshard this checkpoint from {saved_world} to {self.env.world_size} processes "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); checkpoints "
                       f"written before elastic resume existed need the same {saved_world} processes")
        flag = torch.tensor([1.0 if err else 0.0], device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            raise CheckpointError(err or f"{src}: rank 0 could not reshard this checkpoint (see its error)")
        return out

    def full_state_dict(self, folder: Path, name: str) -> Optional[dict[str, torch.Tensor]]:
        if self.env.rank != 0:
            return None
        return consolidate_fp32(folder / name, self.zero[name])

"""The one training loop every stage uses: DeepSpeed engines, precision, accumulation, checkpoints,
signals, non-finite guards, logging and the final export.

Runs unchanged under `torchrun`, the `deepspeed` launcher, `srun` (one task per process) or as a
single process: rank and world size come from asset_dist.distenv.

Exit codes: 0 done, 2 bad config/input, 3 non-finite loss, EXIT_REQUEUE (99) checkpointed on a signal
and wants to be requeued (the sbatch scripts and the submitit launcher act on it).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from asset_dist.config import Config, ConfigError, add_config_args, load_config, save_config, to_dict
from asset_dist.distenv import DeviceError, dist_env, export_torch_env, pick_device
from asset_dist.exitcodes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE
from asset_dist.train import checkpoint as ckpt
from asset_dist.artifacts import write_export
from asset_dist.train.export import consolidate_fp32
from asset_dist.train.logger import RunLogger
from asset_dist.train.stage import Stage


class NonFiniteLoss(RuntimeError):
    pass


def get_stage(cfg: Config, device: torch.device) -> Stage:
    name = cfg.train.stage
    if name in ("vqgan", "seg"):
        from asset_dist.train.stages.tokenizer import SegStage, VQGANStage

        return (VQGANStage if name == "vqgan" else SegStage)(cfg, device)
    from asset_dist.train.stages.transformer import GuideStage, SGAStage

    return (GuideStage if name == "guide" else SGAStage)(cfg, device)


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps > 0 and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            span = max(t.max_steps - t.warmup_steps, 1)
            prog = min(max(step - t.warmup_steps, 0) / span, 1.0)
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
        return 1.0

    return f


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


def make_optimizer(groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    kind = args.pop("kind")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(groups, lr=args["lr"], betas=args["betas"], weight_decay=args["weight_decay"])


class Trainer:
    """Checkpointable training job: build once, `run()` to the step budget or a stop signal."""

    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        self.stop_signal = 0
        self.install_signal_handlers()  # first: a SLURM warning may arrive while we are still starting up
        self.env = dist_env()
        export_torch_env(self.env)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = pick_device(self.env)
        import deepspeed

        self.ds = deepspeed
        if self.device.type == "cpu" and os.environ.get("ASSET_DS_SHM") != "1":
            # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled at first start (minutes on a
            # 2-core machine) and only speeds up intra-node CPU reductions; gloo does the same job.
            # ASSET_DS_SHM=1 keeps it.
            import importlib

            # (`import deepspeed.comm.torch as m` would bind the `torch` package that deepspeed.comm imports)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                       verbose=False)
        self.run_dir = Path(cfg.paths.run_dir)
        self.step = 0
        self._data_wait = 0.0  # seconds spent in next(batches) since the last log line
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.stage = get_stage(cfg, self.device)
        nets = self.stage.build()
        self.stage.set_checkpointing(nets, cfg.train.activation_checkpointing)
        self.engines: dict[str, Any] = {}
        self.zero: dict[str, int] = {}
        for name, module in nets.items():
            z = self.stage.zero_stage(name, cfg.deepspeed.zero_stage)
            self.zero[name] = z
            opt = make_optimizer(self.stage.param_groups(name, module), self.stage.optimizer_args(name))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                   config=deepspeed_config(cfg, z))
            self.engines[name] = engine
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
        self.stage.to_device(self.device, self.dtype)

        from asset_dist.data import build_loader

        # uint8 batches: 4-8x fewer bytes through shared memory and to the GPU than float/long, and the
        # conversion runs on the device instead of beside the data workers (BENCHMARKS.md, Data pipeline)
        self.loader = build_loader(cfg.data, "train", rank=self.rank, world_size=self.world, epoch=0,
                                   convert=False)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.log = RunLogger(self.run_dir, self.rank == 0, cfg.logging.tensorboard, cfg.train.max_steps)
        if resume != "none":
            self._resume(resume)

    # ---- set-up helpers ---------------------------------------------------------------------------------
    def _resume(self, resume: str) -> None:
        run_dir = self.run_dir if resume == "auto" else Path(resume)
        tag = ckpt.latest_tag(run_dir)
        if tag is None:
            if resume != "auto":
                raise FileNotFoundError(f"--resume {resume}: no checkpoints/latest there")
            return
        root = ckpt.ckpt_root(run_dir) / tag
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(root), tag=name)
            if path is None:
                raise RuntimeError(f"{root / name}: DeepSpeed could not load this checkpoint")
        state = ckpt.load_rank_state(run_dir, tag, self.rank)
        if state["world_size"] != self.world:
            raise RuntimeError(f"{root}: written with world size {state['world_size']}, now {self.world}; "
                               "exact mid-epoch resume needs the same world size")
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        if self.rank == 0:
            print(f"resumed from {root} at step {self.step}", flush=True)

    # ---- signals ------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def _any_rank(self, flag: bool | int) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- the loop -------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        while True:
            for batch in self.loader:
                yield batch
            self.loader.set_epoch(self.loader.epoch + 1)

    def _to_device(self, batch: dict) -> dict:
        """uint8 loader batch -> float image [-1, 1] / long labels / float mask on the device, floats in the
        run's precision. Only the converted copy is kept, so the loader can hand the uint8 slot back to its
        worker once the caller has dropped the batch."""
        from asset_dist.data import finalize_batch

        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        out = finalize_batch(moved)
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in out.items()}

    def _data_logs(self, dt: float) -> dict[str, float]:
        """Loader health over all ranks: corrupt / upscaled samples so far (sums), and the mean fraction of
        the last `dt` seconds that steps spent waiting for a batch (near 0 = the loader keeps up)."""
        st = self.loader.stats
        t = torch.tensor([st["corrupt"], st["upscaled"], self._data_wait / dt], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t)
        self._data_wait = 0.0
        return {"data/corrupt_samples": t[0].item(), "data/upscaled_samples": t[1].item(),
                "perf/data_wait_frac": t[2].item() / self.world}

    def train_step(self, batches: Iterator[dict]) -> dict[str, float]:
        logs: dict[str, float] = {}
        for engine in self.engines.values():
            engine.train()
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            raw = next(batches)
            self._data_wait += time.perf_counter() - t0  # the step waited for the loader this long
            batch = self._to_device(raw)
            del raw
            scratch: dict = {}
            for name in self.stage.networks:
                out = self.stage.step(name, self.engines, batch, self.step, scratch)
                if self._any_rank(not torch.isfinite(out.loss.detach()).all()):
                    raise NonFiniteLoss(f"non-finite loss at step {self.step} in network '{name}': "
                                        + ", ".join(f"{k}={v:.4g}" for k, v in out.logs.items()))
                self.engines[name].backward(out.loss)
                self.engines[name].step()
                for k, v in out.logs.items():
                    logs[k] = logs.get(k, 0.0) + v / self.cfg.train.grad_accum
            self._last_batch = batch
        for name, engine in self.engines.items():
            logs[f"lr/{name}"] = engine.get_lr()[0]
            gn = engine.get_global_grad_norm()
            if gn is not None:
                logs[f"grad_norm/{name}"] = float(gn)
        return logs

    def save(self) -> str:
        tag = ckpt.tag_name(self.step)
        root = ckpt.ckpt_root(self.run_dir) / tag
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(root), tag=name, save_latest=False)
        ckpt.save_rank_state(self.run_dir, tag, self.rank, {
            "step": self.step, "world_size": self.world, "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
        })
        dist.barrier()
        if self.rank == 0:
            ckpt.mark_complete(self.run_dir, tag, self.cfg.train.keep_last)
        dist.barrier()
        return tag

    def export(self, tag: str) -> Optional[Path]:
        """Rank 0 consolidates the stage's network from checkpoint `tag` into RUN/export/<stage>.pt."""
        if self.rank != 0:
            return None
        name = self.stage.export_name()
        sd = consolidate_fp32(ckpt.ckpt_root(self.run_dir) / tag / name, self.zero[name])
        out = self.run_dir / "export" / f"{self.cfg.train.stage}.pt"
        write_export(out, stage=self.cfg.train.stage, network=name, state_dict=sd, config=to_dict(self.cfg),
                     lineage={"data": self.cfg.data.train_shards, "parents": self.stage.lineage(),
                              "checkpoint": str(ckpt.ckpt_root(self.run_dir) / tag)}, step=self.step)
        print(f"exported {out}", flush=True)
        return out

    def _stop_for_requeue(self) -> int:
        self.save()
        if self.rank == 0:
            print(f"signal received: checkpointed at step {self.step}, exiting for requeue", flush=True)
        self.log.close()
        return EXIT_REQUEUE

    def run(self) -> int:
        cfg = self.cfg
        export = self.run_dir / "export" / f"{cfg.train.stage}.pt"
        if self.step >= cfg.train.max_steps and export.is_file():
            if self.rank == 0:
                print(f"already finished: step {self.step}, export {export}", flush=True)
            return 0
        batches = self._batches()
        t_last, n_last = time.time(), self.step
        if self._any_rank(self.stop_signal):  # signalled during start-up
            return self._stop_for_requeue()
        while self.step < cfg.train.max_steps:
            logs = self.train_step(batches)
            self.step += 1
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.max_steps:
                dt = max(time.time() - t_last, 1e-9)
                logs.update(self._data_logs(dt))  # a collective: every rank takes part
                logs["perf/samples_per_s"] = ((self.step - n_last) * cfg.data.batch_size * cfg.train.grad_accum
                                              * self.world / dt)
                t_last, n_last = time.time(), self.step
                if self.rank == 0:
                    self.log.scalars(self.step, logs)
                    self.log.progress(self.step, logs)
            if cfg.logging.image_every > 0 and self.step % cfg.logging.image_every == 0:
                grids = self.stage.images(self.engines, self._last_batch)
                if self.rank == 0:
                    self.log.images(self.step, grids)
            if self._any_rank(self.stop_signal):
                return self._stop_for_requeue()
            if self.step % cfg.train.ckpt_every == 0 and self.step < cfg.train.max_steps:
                self.save()
        tag = self.save()
        self.export(tag)
        dist.barrier()
        self.log.close()
        return 0


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", default="auto",
                   help="'auto': continue from RUN/checkpoints/latest if it exists (default); 'none': start "
                        "fresh; or a run folder to continue from")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        trainer = Trainer(cfg, resume=args.resume)
        rc = trainer.run()
        # Python restores default signal actions while it shuts down; a late USR1/TERM from the batch
        # script must not turn a clean exit into a death by signal.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        return rc
    except NonFiniteLoss as e:
        print(f"error: {e}. Nothing was saved over the last good checkpoint.", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except (ConfigError, DeviceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""The one training loop every stage and backend uses: accumulation, checkpoints, signals, non-finite
guards, logging and the final export. The backend (`train.backend`, asset_dist/train/backends/) owns the
networks: wrapping, backward, optimizer, precision and their checkpoint files.

Runs unchanged under `torchrun`, the `deepspeed` launcher, `srun` (one task per process) or as a
single process: rank and world size come from asset_dist.distenv.

No wait for the device per step: non-finite losses are recorded in a device tensor, and ranks agree on them
and on stop signals in one small all-reduce every `train.sync_every` steps, at logging and checkpoint steps
and at the end (a signal is acted on within `train.sync_every` steps; a non-finite loss is caught before
anything is saved). Logged scalars stay on the device until a logging step reduces them over ranks.

Exit codes: 0 done, 2 bad config/input/checkpoint, 3 non-finite loss, EXIT_REQUEUE (99) checkpointed on a
signal and wants to be requeued (the sbatch scripts and the submitit launcher act on it).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from asset_dist.artifacts import parent_record, write_export
from asset_dist.config import (Config, ConfigError, config_from_dict, load_config, save_config, to_dict)
from asset_dist.distenv import DeviceError, dist_env, export_torch_env, init_process_group, pick_device
from asset_dist.exitcodes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE
from asset_dist.runlock import LockHeld, RunLock
from asset_dist.train import checkpoint as ckpt
from asset_dist.train.backends.base import check_backend_config
from asset_dist.train.logger import RunLogger
from asset_dist.registry import UnknownName, check
from asset_dist.train.resume import MAY_CHANGE, refused_changes
from asset_dist.train.stage import StepContext, get_stage


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """Checkpointable training job: build once, `run()` to the step budget or a stop signal."""

    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        self.stop_signal = 0
        self.install_signal_handlers()  # first: a SLURM warning may arrive while we are still starting up
        self.lock: Optional[RunLock] = None
        self.log: Optional[RunLogger] = None
        try:  # named errors before any heavy work
            check("stage", cfg.train.stage)
        except UnknownName as e:
            raise ConfigError(str(e)) from None
        self._backend_cls = check_backend_config(cfg)
        self.env = dist_env()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = pick_device(self.env)
        self._init_process_group()
        self.run_dir = Path(cfg.paths.run_dir)
        self._take_lock()
        try:
            self._build(resume)
        except BaseException:
            self.close()  # a failed start-up must not leave the run folder locked
            raise

    def _build(self, resume: str) -> None:
        cfg = self.cfg
        self.source = self._find_checkpoint(resume)
        if self.rank == 0:  # after the checks: the record describes what this run really does
            save_config(cfg, self.run_dir / "config.yaml")
        self.step = 0
        self._data_wait = 0.0  # seconds spent in next(batches) since the last log line
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.stage = get_stage(cfg, self.device)
        nets = self.stage.build()
        self.stage.set_checkpointing(nets, cfg.train.activation_checkpointing)
        self.parents = {k: parent_record(p) for k, p in self.stage.parents().items()} if self.rank == 0 else {}
        self.backend = self._backend_cls(cfg, self.device, self.env)
        self.backend.setup(self.stage, nets)
        self.dtype = self.backend.dtype
        self.stage.to_device(self.device, self.dtype)
        self._inf = torch.tensor(float("inf"), device=self.device)
        self._dev_step = torch.zeros((), device=self.device)  # the step being trained, on the device
        self._first_bad = {name: self._inf.clone() for name in self.stage.networks}  # first non-finite step
        self._last_batch: Optional[dict] = None
        self._t_last, self._n_last = time.time(), 0  # since the last log line: time, step

        from asset_dist.data import build_loader

        # uint8 batches: 4-8x fewer bytes through shared memory and to the GPU than float/long, and the
        # conversion runs on the device instead of beside the data workers (BENCHMARKS.md, Data pipeline)
        self.loader = build_loader(cfg.data, "train", rank=self.rank, world_size=self.world, epoch=0,
                                   convert=False)
        if self.source is not None:
            self._resume(*self.source)
        self.log = RunLogger(self.run_dir, self.rank == 0, cfg.logging.tensorboard, cfg.train.max_steps,
                             start_step=self.step)

    # ---- set-up helpers ---------------------------------------------------------------------------------
    def _init_process_group(self) -> None:
        """Every run has a process group, one process too (its collectives are then no-ops): an in-memory
        store for one, so single-process runs never race for a port. The torch variables are exported in
        every case (DeepSpeed reads LOCAL_RANK)."""
        export_torch_env(self.env)
        if not init_process_group(self.env, self.device, timeout_s=self.cfg.dist.timeout_s):
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                        rank=0, world_size=1)

    def _take_lock(self) -> None:
        """One training per run folder: rank 0 holds RUN/.asset_dist.lock; every rank fails if it is held."""
        err = ""
        if self.rank == 0:
            try:
                self.lock = RunLock(self.run_dir, "train").acquire()
            except LockHeld as e:
                err = str(e)
        flag = torch.tensor([1.0 if err else 0.0], device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            raise LockHeld(err or f"{self.run_dir} is in use by another run (rank 0 could not take its lock)")

    def _find_checkpoint(self, resume: str) -> Optional[tuple[Path, dict]]:
        """The checkpoint to continue from, after every check that needs no heavy work: a `latest` inside
        the run folder, the same backend, and no setting changed that resuming cannot honour."""
        if resume == "none":
            return None
        src = self.run_dir if resume == "auto" else Path(resume)
        tag = ckpt.latest_tag(src)
        if tag is None:
            if resume != "auto":
                raise FileNotFoundError(f"--resume {resume}: no checkpoints/latest there")
            return None
        folder = ckpt.ckpt_root(src) / tag
        meta = ckpt.read_meta(folder)
        if "config" in meta:
            saved, where = meta["config"], folder / "meta.json"
        elif (src / "config.yaml").is_file():  # a checkpoint from before meta.json: the run's config.yaml
            import yaml

            saved, where = yaml.safe_load((src / "config.yaml").read_text()), src / "config.yaml"
        else:
            saved, where = None, None
        if saved is not None:
            try:
                saved = to_dict(config_from_dict(saved, str(where)))  # fills keys added since, with defaults
            except ConfigError as e:
                raise ckpt.CheckpointError(f"{where}: cannot read the saved config ({e})") from None
            diff = refused_changes(saved, to_dict(self.cfg))
            if diff:
                raise ckpt.CheckpointError(
                    f"resuming {folder} with changed settings, which the saved optimizer and schedule would "
                    f"silently override: {'; '.join(diff)} (saved in {where}). Only these may change on resume: "
                    f"{', '.join(MAY_CHANGE)}. Start a new run folder (or --resume none) to train with them")
        if meta.get("backend") != self.cfg.train.backend:
            raise ckpt.CheckpointError(f"{folder}: written by train.backend={meta.get('backend')}, this run uses "
                                       f"{self.cfg.train.backend}; resume with the same backend")
        if not isinstance(meta.get("world_size"), int) or meta["world_size"] < 1:
            raise ckpt.CheckpointError(f"{folder}: meta.json has no valid world_size")
        return folder, meta

    def _resume(self, folder: Path, meta: dict) -> None:
        """Load the checkpoint. With another world size or data-worker count (elastic resume) the backend
        reshards model, optimizer and scheduler, and the loader takes every saved rank's position (its rule:
        asset_dist/data/loader.py); RNG and stage extras come from saved rank (rank mod saved world)."""
        saved_world = int(meta["world_size"])
        mine = self.rank % saved_world
        state = ckpt.load_rank_state(folder, mine)
        elastic = saved_world != self.world or not self.loader.same_layout(state["loader"])
        states = [state if r == mine else ckpt.load_rank_state(folder, r) for r in range(saved_world)] if elastic else []
        scratch = ckpt.ckpt_root(self.run_dir) / ".reshard"
        self.backend.load(folder, meta, scratch)
        dist.barrier()
        if self.rank == 0 and scratch.exists():
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        self.step = int(state["step"])
        if elastic:
            self.loader.load_global_state([st["loader"] for st in states])
        else:
            self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.backend.load_rank_state((states[0] if elastic else state).get("backend", {}))
        for key, obj in self.stage.extra_state().items():
            obj.load_state_dict(state["extra"][key])
        if self.rank == 0:
            how = f" (resharded from {saved_world} processes to {self.world})" if saved_world != self.world else ""
            print(f"resumed from {folder} at step {self.step}{how}", flush=True)

    # ---- signals ------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def _agree(self, logs: Optional[dict[str, Any]] = None) -> tuple[bool, dict[str, float]]:
        """The one host sync of a checked step: a single all-reduce of [stop signal, non-finite flag per
        network, log scalars] over ranks. Returns (stop?, logs averaged over ranks); raises NonFiniteLoss."""
        nets = self.stage.networks
        keys = sorted(logs) if logs else []
        parts = [torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device, dtype=torch.float64)]
        parts += [torch.isfinite(self._first_bad[n]).to(torch.float64).reshape(1) for n in nets]
        parts += [torch.as_tensor(logs[k], dtype=torch.float64, device=self.device).detach().reshape(1) for k in keys]
        vec = torch.cat(parts)
        dist.all_reduce(vec)
        vals = vec.tolist()
        bad = [n for n, v in zip(nets, vals[1:1 + len(nets)]) if v > 0]
        if bad:  # rare: find the first bad step over ranks (every rank takes part: all saw the flag)
            first = torch.stack([self._first_bad[n] for n in bad])
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            where = ", ".join(f"'{n}' (first at step {int(s)})" for n, s in zip(bad, first.tolist()))
            raise NonFiniteLoss(f"non-finite loss at step {int(min(first.tolist()))} in network {where}; "
                                f"detected at step {self.step} (checks every train.sync_every="
                                f"{self.cfg.train.sync_every} steps)")
        return vals[0] > 0, {k: v / self.world for k, v in zip(keys, vals[1 + len(nets):])}

    # ---- the loop -------------------------------------------------------------------------------------------
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

    def _note_loss(self, name: str, loss: torch.Tensor) -> None:
        """Remember the first step whose loss was not finite: device ops only (no copy from the host, no sync)."""
        here = torch.where(torch.isfinite(loss.detach()).all(), self._inf, self._dev_step)
        torch.minimum(self._first_bad[name], here, out=self._first_bad[name])

    def train_step(self, batches: Iterator[dict], log: bool = False, keep_batch: bool = False) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-batches through every network). With `log`, returns the
        stage's scalars averaged over micro-batches (device tensors), learning rates and gradient norms."""
        ga = self.cfg.train.grad_accum
        logs: dict[str, Any] = {}
        self.backend.train()
        self._dev_step.fill_(self.step + 1)  # a scalar kernel argument, not a copy
        for _ in range(ga):
            t0 = time.perf_counter()
            raw = next(batches)
            self._data_wait += time.perf_counter() - t0  # the step waited for the loader this long
            batch = self._to_device(raw)
            del raw
            ctx = StepContext(step=self.step, log=log)
            for name in self.stage.networks:
                out = self.stage.step(name, self.backend, batch, ctx)
                self._note_loss(name, out.loss)
                self.backend.backward(name, out.loss)
                self.backend.step(name, log)
                if log:
                    for k, v in out.logs.items():
                        logs[k] = logs.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / ga
            if keep_batch:
                self._last_batch = batch
        if log:
            for name in self.stage.networks:
                logs[f"lr/{name}"] = self.backend.lr(name)
                gn = self.backend.grad_norm(name)  # collective where the backend reduces it
                if gn is not None:
                    logs[f"grad_norm/{name}"] = gn
        return logs

    def save(self) -> str:
        tag = ckpt.tag_name(self.step)
        folder = ckpt.ckpt_root(self.run_dir) / tag
        if self.rank == 0 and folder.exists():  # left by an earlier run of this folder: never mix files
            import shutil

            shutil.rmtree(folder)
        dist.barrier()
        self.backend.save(folder)
        ckpt.save_rank_state(folder, self.rank, {
            "step": self.step, "world_size": self.world, "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(), "backend": self.backend.rank_state(),
            "extra": {k: obj.state_dict() for k, obj in self.stage.extra_state().items()},
        })
        dist.barrier()
        if self.rank == 0:
            ckpt.write_meta(folder, {"backend": self.cfg.train.backend, "world_size": self.world, "step": self.step,
                                     **self.backend.describe(), "config": to_dict(self.cfg)})
            ckpt.mark_complete(self.run_dir, tag, self.cfg.train.keep_last)
        dist.barrier()
        return tag

    def export(self, tag: str) -> Optional[Path]:
        """Rank 0 writes the stage's network from checkpoint `tag` to RUN/export/<stage>.pt (collective)."""
        name = self.stage.export_name()
        folder = ckpt.ckpt_root(self.run_dir) / tag
        sd = self.backend.full_state_dict(folder, name)
        if self.rank != 0:
            return None
        out = self.run_dir / "export" / f"{self.cfg.train.stage}.pt"
        write_export(out, stage=self.cfg.train.stage, network=name, state_dict=sd, config=to_dict(self.cfg),
                     lineage={"data": self.cfg.data.train_shards, "parents": self.parents,
                              "checkpoint": str(folder), "backend": self.cfg.train.backend}, step=self.step)
        print(f"exported {out}", flush=True)
        return out

    def _stop_for_requeue(self) -> int:
        self.save()
        if self.rank == 0:
            print(f"signal received: checkpointed at step {self.step}, exiting for requeue", flush=True)
        return EXIT_REQUEUE

    def advance(self, batches: Iterator[dict]) -> tuple[bool, bool]:
        """One optimizer step with its checks, logs and images. Returns (stop requested by a signal on any
        rank, checkpoint due)."""
        cfg, t = self.cfg, self.cfg.train
        nxt = self.step + 1
        log_now = nxt % cfg.logging.log_every == 0 or nxt == t.max_steps
        image_now = cfg.logging.image_every > 0 and nxt % cfg.logging.image_every == 0
        logs = self.train_step(batches, log=log_now, keep_batch=image_now)
        self.step = nxt
        ckpt_now = self.step % t.ckpt_every == 0 and self.step < t.max_steps
        stop = False
        if log_now:
            dt = max(time.time() - self._t_last, 1e-9)
            st = self.loader.stats  # x world: the reduction averages, these are sums over ranks
            logs.update({"data/corrupt_samples": st["corrupt"] * self.world,
                         "data/upscaled_samples": st["upscaled"] * self.world,
                         "perf/data_wait_frac": self._data_wait / dt})
            self._data_wait = 0.0
            stop, reduced = self._agree(logs)
            reduced["perf/samples_per_s"] = ((self.step - self._n_last) * cfg.data.batch_size * t.grad_accum
                                             * self.world / dt)
            self._t_last, self._n_last = time.time(), self.step
            if self.rank == 0:
                self.log.scalars(self.step, reduced)
                self.log.progress(self.step, reduced)
        elif ckpt_now or self.step % t.sync_every == 0 or self.step == t.max_steps:
            stop, _ = self._agree()
        if image_now:
            grids = self.stage.images(self.backend, self._last_batch)  # collective for sharded networks
            self._last_batch = None
            if self.rank == 0:
                self.log.images(self.step, grids)
        return stop, ckpt_now

    def run(self) -> int:
        t = self.cfg.train
        export = self.run_dir / "export" / f"{t.stage}.pt"
        if self.step >= t.max_steps and export.is_file():
            if self.rank == 0:
                print(f"already finished: step {self.step}, export {export}", flush=True)
            return 0
        from asset_dist.data import iter_forever

        batches = iter_forever(self.loader)
        self._t_last, self._n_last = time.time(), self.step
        if self._agree()[0]:  # signalled during start-up
            return self._stop_for_requeue()
        while self.step < t.max_steps:
            stop, ckpt_now = self.advance(batches)
            if stop:
                return self._stop_for_requeue()
            if ckpt_now:
                self.save()
        tag = self.save()
        self.export(tag)
        dist.barrier()
        return 0

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def main(args: argparse.Namespace) -> int:
    try:  # every check that needs no model or process group, before any heavy work
        cfg = load_config(args.config, args.overrides)
        check_backend_config(cfg)  # e.g. fp16 under fsdp2
        from asset_dist.data import check_sources
        from asset_dist.utils import writable_dir

        check_sources(cfg.data)
        writable_dir(cfg.paths.run_dir, "paths.run_dir")
    except ValueError as e:  # ConfigError, InputError, DataError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    trainer = None
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
    except (ConfigError, DeviceError, OSError, ValueError, LockHeld) as e:  # bad input, a shard gone bad, a full disk
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()

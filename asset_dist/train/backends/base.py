"""The backend interface (one object per run), and the optimizer / LR schedule every backend builds alike.

The engine gives a backend the stage's plain modules (`setup`); from then on the backend owns them:
wrapping and sharding, the training forward the stage calls (`nets[name](...)`), backward with gradient
accumulation, precision, gradient clipping, the optimizer and LR-scheduler step, checkpoint save / load of
model + optimizer + scheduler, and the consolidated fp32 weights an export holds. Everything else a
checkpoint holds (step, RNG, loader position, a stage's extra state) is per-rank state the engine writes
itself (asset_dist/train/checkpoint.py).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import nn

from asset_dist.config import Config, ConfigError
from asset_dist.distenv import DistEnv
from asset_dist.models.losses import frozen_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_lambda(cfg: Config) -> Callable[[int], float]:
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


def make_optimizer(groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    args = dict(args)
    kind = args.pop("kind")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(groups, lr=args["lr"], betas=args["betas"], weight_decay=args["weight_decay"])


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


class Backend(ABC):
    """One training run's networks. Every method marked *collective* is called by all ranks together."""

    name: ClassVar[str]

    def __init__(self, cfg: Config, device: torch.device, env: DistEnv):
        self.cfg, self.device, self.env = cfg, device, env
        self.dtype = DTYPES[cfg.train.precision]  # the compute dtype of batches and frozen helpers

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse settings this backend cannot honour (ConfigError, before any heavy work)."""

    # ---- construction -------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, stage: Any, nets: dict[str, nn.Module]) -> None:
        """Wrap the stage's networks and build their optimizers and LR schedulers (collective)."""

    def describe(self) -> dict[str, Any]:
        """What a checkpoint of this backend needs to be read back (written to the tag's meta.json)."""
        return {}

    # ---- what the stage sees (train.stage.Models) -----------------------------------------------------
    @abstractmethod
    def __getitem__(self, name: str) -> Callable[..., Any]:
        """The training forward of network `name`."""

    @abstractmethod
    def unwrap(self, name: str) -> nn.Module:
        """The stage's own module of network `name` (for a plain call outside the training machinery)."""

    @contextmanager
    def frozen(self, name: str) -> Iterator[Callable[..., Any]]:
        module = self.unwrap(name)
        with frozen_params(module):
            yield module

    # ---- one step -----------------------------------------------------------------------------------
    @abstractmethod
    def train(self) -> None:
        """Put every network in training mode."""

    @abstractmethod
    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss (scaled for gradient accumulation here)."""

    @abstractmethod
    def step(self, name: str, log: bool) -> None:
        """After every micro-batch's backward: at the accumulation boundary, clip, step the optimizer and the
        LR schedule and clear the gradients. `log`: the gradient norm will be asked for."""

    @abstractmethod
    def lr(self, name: str) -> float:
        """The learning rate of network `name` for the next step."""

    @abstractmethod
    def grad_norm(self, name: str) -> Optional[torch.Tensor | float]:
        """The global gradient norm of the last optimizer step (collective where the backend reduces it)."""

    # ---- checkpoints and export ---------------------------------------------------------------------
    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write model + optimizer + scheduler of every network under `folder/<network>/` (collective)."""

    @abstractmethod
    def load(self, folder: Path, meta: dict[str, Any], scratch: Path) -> None:
        """Read back what `save` wrote; `meta` is the tag's meta.json (collective). Only weights-only loads.
        A checkpoint of another world size (meta["world_size"]) is resharded; `scratch` is a shared folder
        for conversions, removed by the engine afterwards."""

    def rank_state(self) -> dict[str, Any]:
        """Extra per-rank state this backend keeps in the engine's rank file (plain tensors and containers).
        After a reshard every rank gets saved rank 0's."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        pass

    @abstractmethod
    def full_state_dict(self, folder: Path, name: str) -> Optional[dict[str, torch.Tensor]]:
        """Network `name`'s full fp32 weights as saved in `folder` (the tag just written), on rank 0; None on
        other ranks (collective)."""


def check_backend_config(cfg: Config) -> type:
    """The backend class of `cfg` after its own config checks (named errors)."""
    from asset_dist.registry import UnknownName, resolve

    try:
        cls = resolve("backend", cfg.train.backend)
    except UnknownName as e:
        raise ConfigError(str(e)) from None
    cls.check_config(cfg)
    return cls

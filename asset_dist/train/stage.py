"""What a training stage is: the plain `nn.Module`s it builds and what one step computes. Nothing about
distribution: a backend (asset_dist/train/backends/) wraps the modules, runs backward and the optimizer,
and saves them; the engine (engine.py) runs the loop.

A stage trains one or more networks in a fixed order each step (the VQGAN: generator, then discriminator).
It calls a network through `nets[name](...)` (the backend's training forward) and keeps its own references
to the modules it built for everything else (methods, shapes), so it never sees a wrapper.

A new stage is a new file plus one line in asset_dist/registry.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Union

import torch
from torch import nn

from asset_dist.config import Config

Scalar = Union[torch.Tensor, float]


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar to backpropagate into this network
    # scalars for the logs: detached tensors on the device (never .item(): that would wait for the device
    # every step) or plain floats. The keys must be a function of the step and config alone (every rank
    # has the same keys), because the engine reduces them over ranks as one vector.
    logs: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class StepContext:
    step: int  # the optimizer step being computed (0-based)
    log: bool  # this step's logs are written: compute logging-only metrics only then
    scratch: dict = field(default_factory=dict)  # tensors passed between the networks of one micro-step


class Models(Protocol):
    """The stage's view of its networks during a step (implemented by every backend)."""

    def __getitem__(self, name: str) -> Callable[..., Any]:
        """The training forward of network `name` (gradients flow into its parameters)."""

    def frozen(self, name: str) -> AbstractContextManager[Callable[..., Any]]:
        """Run network `name` inside another network's step: gradients reach its input, never its parameters."""


class Stage(ABC):
    """Base class. Subclasses set `networks` and implement build/step; the rest has sensible defaults."""

    networks: tuple[str, ...] = ("model",)
    # networks this stage also runs frozen (Models.frozen) inside another network's step; a backend keeps
    # their parameters whole enough for that (DeepSpeed: ZeRO <= 2)
    frozen_use: tuple[str, ...] = ()

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device

    # ---- construction -------------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """Return the trainable networks by name. Frozen helpers (tokenizers, guide) live on `self`."""

    def param_groups(self, name: str, module: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def optimizer_args(self, name: str) -> dict[str, Any]:
        t = self.cfg.train
        return {"lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "kind": t.optimizer}

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        """Submodules that form natural units (blocks) for a sharding backend: each is gathered on its own,
        so only one unit's full parameters exist at a time. [] = the network is one unit."""
        return []

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move frozen helpers once the networks are wrapped (they stay outside the backend)."""

    def set_checkpointing(self, modules: dict[str, nn.Module], on: bool) -> None:
        for m in modules.values():
            for sub in m.modules():
                if hasattr(sub, "use_checkpoint"):
                    sub.use_checkpoint = on

    def extra_state(self) -> dict[str, Any]:
        """Extra per-rank state to checkpoint with the networks (e.g. an EMA of the weights): name -> object
        with state_dict() / load_state_dict(). Saved as plain tensors and containers (weights-only loads)."""
        return {}

    # ---- one step -----------------------------------------------------------------------------------
    @abstractmethod
    def step(self, name: str, nets: Models, batch: dict, ctx: StepContext) -> StepOutput:
        """Compute the loss of network `name` on `batch`."""

    @torch.no_grad()
    def images(self, nets: Models, batch: dict) -> dict[str, torch.Tensor]:
        """Image grids to log: name -> [N, 3, H, W] in [0, 1]."""
        return {}

    def parents(self) -> dict[str, str]:
        """The parent exports this stage consumed (their records go into the export's lineage)."""
        t = self.cfg.train
        return {k: v for k, v in {"vqgan_weights": t.vqgan_weights, "seg_weights": t.seg_weights,
                                  "guide_weights": t.guide_weights, "init_from": t.init_from}.items() if v}

    def export_name(self) -> str:
        """Which network's weights make the stage's exported file."""
        return self.networks[0]


def get_stage(cfg: Config, device: torch.device) -> Stage:
    from asset_dist.registry import resolve

    return resolve("stage", cfg.train.stage)(cfg, device)

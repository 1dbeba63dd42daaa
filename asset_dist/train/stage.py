"""What a training stage is: the models it builds and what one step computes. Nothing about distribution.

The engine (engine.py) owns DeepSpeed, precision, checkpoints, signals and logging for every stage.
A stage trains one or more networks in a fixed order each step (the VQGAN: generator, then
discriminator). Each network gets its own DeepSpeed engine, so a stage never calls backward/step.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asset_dist.config import Config


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar to backpropagate into this network
    logs: dict[str, float] = field(default_factory=dict)  # scalars for TensorBoard (already detached)


class Stage(ABC):
    """Base class. Subclasses set `networks` and implement build/step; the rest has sensible defaults."""

    networks: tuple[str, ...] = ("model",)

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

    def zero_stage(self, name: str, requested: int) -> int:
        return requested

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move frozen helpers once the engines exist (they stay outside DeepSpeed)."""

    def set_checkpointing(self, modules: dict[str, nn.Module], on: bool) -> None:
        for m in modules.values():
            for sub in m.modules():
                if hasattr(sub, "use_checkpoint"):
                    sub.use_checkpoint = on

    # ---- one step -----------------------------------------------------------------------------------
    @abstractmethod
    def step(self, name: str, nets: dict[str, nn.Module], batch: dict, step: int, scratch: dict) -> StepOutput:
        """Compute the loss of network `name` on `batch`. `scratch` carries tensors between the
        networks of one step (e.g. the reconstruction from the generator to the discriminator)."""

    @torch.no_grad()
    def images(self, nets: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        """Image grids to log: name -> [N, 3, H, W] in [0, 1]."""
        return {}

    def lineage(self) -> dict[str, Any]:
        """Which parents this stage consumed (recorded in the export)."""
        t = self.cfg.train
        return {k: v for k, v in {"vqgan_weights": t.vqgan_weights, "seg_weights": t.seg_weights,
                                  "guide_weights": t.guide_weights, "init_from": t.init_from}.items() if v}

    def export_name(self) -> str:
        """Which network's weights make the stage's exported file."""
        return self.networks[0]

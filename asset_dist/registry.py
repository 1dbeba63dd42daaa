"""Which stages and backends exist: name -> "module:Class", imported only when used.

A new stage or backend is a new file plus one line here. No torch import, so `config` checks and `--help`
stay cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

STAGES: dict[str, str] = {
    "vqgan": "asset_dist.train.stages.tokenizer:VQGANStage",
    "seg": "asset_dist.train.stages.tokenizer:SegStage",
    "guide": "asset_dist.train.stages.transformer:GuideStage",
    "sga": "asset_dist.train.stages.transformer:SGAStage",
}

BACKENDS: dict[str, str] = {
    "deepspeed": "asset_dist.train.backends.deepspeed:DeepSpeedBackend",
    "fsdp2": "asset_dist.train.backends.fsdp2:FSDP2Backend",
}


class UnknownName(ValueError):
    """A stage or backend name that no registry entry has (the message lists the known ones)."""


def check(kind: str, name: str) -> None:
    table = {"stage": STAGES, "backend": BACKENDS}[kind]
    if name not in table:
        raise UnknownName(f"train.{kind}: unknown {kind} {name!r} (known: {', '.join(table)})")


def resolve(kind: str, name: str) -> Any:
    """The class registered as `name` ("stage" or "backend")."""
    check(kind, name)
    mod, _, attr = {"stage": STAGES, "backend": BACKENDS}[kind][name].partition(":")
    return getattr(importlib.import_module(mod), attr)

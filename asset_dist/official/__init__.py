"""Importing the official ASSET release (DifanLiu/ASSET Lightning checkpoints) as asset_dist exports + config.

Names resolve lazily, so `asset-dist import-official --help` (official/args.py) imports no torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_official_checkpoint": "checkpoint", "read_official_file": "checkpoint",
    "ImportResult": "importer", "build_config": "importer", "import_official": "importer",
    "infer_transformer_config": "sizes", "infer_vq_config": "sizes", "read_official_config": "sizes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"asset_dist.official.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'asset_dist.official' has no attribute {name!r}")

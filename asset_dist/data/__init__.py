"""Data pipeline: shard writing (shardwriter), shard selection (shards), views (views), masks (masks),
and the resumable streaming loader (loader).

Names are imported lazily so that `data_tools/shard.py` (shardwriter only) does not pay for importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_loader": "loader", "iter_forever": "loader", "ShardLoader": "loader", "decode_sample": "loader",
    "finalize_batch": "loader", "check_sources": "loader",
    "make_views": "views", "crop_views": "views", "sample_rng": "views", "sample_mask": "masks",
    "run_sharding": "shardwriter", "write_tar": "shardwriter", "safe_key": "shardwriter",
    "resolve_shards": "shards", "read_manifest": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

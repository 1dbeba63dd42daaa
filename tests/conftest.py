"""Shared fixtures. The sample data lives in ../shared beside the repo (CI clones the repo next to it)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared/ folder beside the repository."""
    assert SHARED.is_dir(), f"shared data not found at {SHARED} (it must sit beside the repository)"
    return SHARED


@pytest.fixture(scope="session")
def sflckr_shards(tmp_path_factory, shared_dir) -> Path:
    """../shared/datasets/sflckr as shards: 4 samples per shard, 20% val (20 train in 5 shards, 5 val), seed 0.
    Returns the folder that holds manifest.json (usable as data.train_shards). Do not modify it."""
    from asset_dist.data.shardwriter import run_sharding

    src = shared_dir / "datasets" / "sflckr"
    out = tmp_path_factory.mktemp("sflckr_shards")
    run_sharding(src / "images", src / "segmentations", out, samples_per_shard=4, val_fraction=0.2, seed=0,
                 workers=1, log=lambda msg: None)
    return out

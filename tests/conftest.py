"""Shared fixtures. Every file the tests read lives in the repository: `sample_data/` (photos, label maps,
the official edits) and `tests/fixtures/` (the official-ASSET fixture pack)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
OFFICIAL_FIXTURE = REPO / "tests" / "fixtures" / "official_asset"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The bundled datasets: sflckr/, coco_stuff/, ade20k/ (images/ + segmentations/) and edits/."""
    assert (SAMPLE_DATA / "sflckr" / "images").is_dir(), f"{SAMPLE_DATA} is incomplete (it is part of the repository)"
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def sflckr_shards(tmp_path_factory, sample_data) -> Path:
    """sample_data/sflckr as shards: 4 samples per shard, 20% val (20 train in 5 shards, 5 val), seed 0.
    Returns the folder that holds manifest.json (usable as data.train_shards). Do not modify it."""
    from asset_dist.data.shardwriter import run_sharding

    src = sample_data / "sflckr"
    out = tmp_path_factory.mktemp("sflckr_shards")
    run_sharding(src / "images", src / "segmentations", out, samples_per_shard=4, val_fraction=0.2, seed=0,
                 workers=1, log=lambda msg: None)
    return out

"""The loader's position across another world size or worker count (elastic resume): within every epoch in
progress, each sample is consumed exactly once over the layouts (a multiset check of sample keys), and the
same layout still continues bit for bit."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from asset_dist.config import DataConfig
from asset_dist.data import build_loader

# sflckr_shards: 20 training samples in 5 shards of 4; rank 0 of 2 reads 3 shards, rank 1 reads 2, so ranks
# run out of an epoch at different steps
SMALL = dict(batch_size=2, resolution=64, guide_resolution=64, resize_short_side=64, shuffle_buffer=4)


def _cfg(shards, workers):
    return DataConfig(train_shards=str(shards), num_workers=workers, seed=5, **SMALL)


def _take(loader, it, n: int, log: list) -> None:
    """Consume n batches of `it` (over `loader`), logging (epoch, key) of every sample."""
    for _ in range(n):
        batch = next(it)
        log += [(loader.epoch, k) for k in batch["key"]]


def _forever(loader):
    from asset_dist.data import iter_forever

    return iter_forever(loader)


def _run_layouts(shards, layouts, until_epoch: int):
    """layouts: [(world, workers, [batches per rank])]; the last one runs every rank until it reaches
    `until_epoch`. Returns the (epoch, key) log of everything consumed, and the last layout's loaders."""
    log: list = []
    states = None
    for i, (world, workers, takes) in enumerate(layouts):
        loaders = [build_loader(_cfg(shards, workers), "train", r, world) for r in range(world)]
        for loader in loaders:
            if states is not None:
                loader.load_global_state(json.loads(json.dumps(states)))  # JSON-able, as in a checkpoint
        its = [_forever(loader) for loader in loaders]
        last = i == len(layouts) - 1
        for r, (loader, it) in enumerate(zip(loaders, its)):
            if last:
                while True:
                    batch = next(it)
                    if loader.epoch >= until_epoch:
                        break
                    log += [(loader.epoch, k) for k in batch["key"]]
            else:
                _take(loader, it, takes[r], log)
        states = [loader.state_dict() for loader in loaders]
    return log, loaders


@pytest.fixture(scope="module")
def epoch_keys(sflckr_shards):
    keys = [k for b in build_loader(_cfg(sflckr_shards, 0), "train", 0, 1) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 20
    return Counter(keys)


@pytest.mark.parametrize("layouts", [
    # 2 -> 3 processes (and 0 -> 2 workers); rank 1 is already one batch into epoch 1 when saved
    [(2, 0, [3, 5]), (3, 2, None)],
    # 2 -> 1 -> 3: the second layout consumes part of what is left, the third reshards again
    [(2, 2, [2, 1]), (1, 0, [3]), (3, 0, None)],
])
def test_every_sample_of_the_epochs_in_progress_is_consumed_once(sflckr_shards, epoch_keys, layouts):
    log, _ = _run_layouts(sflckr_shards, layouts, until_epoch=2)
    for epoch in (0, 1):
        seen = Counter(k for e, k in log if e == epoch)
        assert seen == epoch_keys, f"epoch {epoch}: repeated {+(seen - epoch_keys)}, missing {+(epoch_keys - seen)}"


def test_same_layout_still_resumes_bit_for_bit_after_a_reshard(sflckr_shards):
    """After a 2 -> 3 reshard the new layout checkpoints and resumes (same layout) exactly: the history of the
    earlier layout travels in its state."""
    cfg = _cfg(sflckr_shards, 0)
    olds = [build_loader(cfg, "train", r, 2) for r in range(2)]
    for loader, n in zip(olds, (2, 3)):
        _take(loader, _forever(loader), n, [])
    states = json.loads(json.dumps([loader.state_dict() for loader in olds]))
    new = build_loader(cfg, "train", 1, 3)
    new.load_global_state(states)
    it = _forever(new)
    for _ in range(2):
        next(it)
    mid = json.loads(json.dumps(new.state_dict()))
    assert mid["history"] and mid["world_size"] == 3
    rest = [next(it)["key"] for _ in range(4)]  # into the next epoch
    again = build_loader(cfg, "train", 1, 3)
    again.load_state_dict(mid)
    it = _forever(again)
    assert [next(it)["key"] for _ in range(4)] == rest


def test_reshard_needs_sample_counts(tmp_path, sflckr_shards):
    for tar in sflckr_shards.glob("train-*.tar"):  # shards without their manifest: no sample counts
        shutil.copy(tar, tmp_path / tar.name)
    pattern = str(tmp_path / "train-{000000..000004}.tar")
    cfg = DataConfig(train_shards=pattern, num_workers=0, seed=5, **SMALL)
    old = build_loader(cfg, "train", 0, 1)
    next(iter(old))
    with pytest.raises(ValueError, match="manifest"):
        build_loader(cfg, "train", 0, 2).load_global_state([old.state_dict()])

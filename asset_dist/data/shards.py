"""Which shards a reader gets: source resolution and the deterministic per-epoch split.

A "reader" is one dataloader worker of one rank; there are world_size * num_workers readers. Each epoch
the shard list is sorted, shuffled with (seed, epoch) for training, and dealt out by rank, then by worker.
When there are fewer shards than readers, each shard is cut into k interleaved parts (sample i of the
shard belongs to part i % k), so every reader has work and every sample is still read exactly once.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from webdataset.shardlists import expand_urls

from asset_dist.data.shardwriter import FORMAT, MANIFEST


@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None  # known from a manifest


@dataclass(frozen=True)
class Part:
    """Samples i of `shard` with i % stride == offset."""

    shard: Shard
    offset: int = 0
    stride: int = 1

    @property
    def samples(self) -> Optional[int]:
        n = self.shard.samples
        return None if n is None else len(range(self.offset, n, self.stride))


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the shard manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shard manifest (expected format {FORMAT!r}; made by data_tools/shard.py)")
    return m


def _from_manifest(path: Path, split: str) -> list[Shard]:
    m = read_manifest(path)
    if split not in m["splits"]:
        raise ValueError(f"{path}: no {split!r} split (has: {', '.join(m['splits']) or 'none'})")
    return [Shard(str(path.parent / s["name"]), s["samples"]) for s in m["splits"][split]["shards"]]


def resolve_shards(spec: str, split: str) -> list[Shard]:
    """`spec`: a directory holding manifest.json, a manifest file, or shard paths/brace patterns
    (`data/train-{000000..000099}.tar`, several joined by '::'). For patterns, sample counts are taken
    from a manifest.json next to the shards when it lists them."""
    if not spec:
        raise ValueError(f"no shards given for the {split!r} split")
    p = Path(spec)
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise ValueError(f"{p}: directory has no {MANIFEST} (make shards with data_tools/shard.py)")
        return _from_manifest(p / MANIFEST, split)
    if spec.endswith(".json"):
        if not p.is_file():
            raise ValueError(f"{p}: manifest not found")
        return _from_manifest(p, split)
    urls = expand_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"shard(s) not found: {', '.join(missing[:3])}{more} (from {spec!r})")
    counts: dict[str, int] = {}
    for d in {str(Path(u).parent) for u in local}:
        mp = Path(d) / MANIFEST
        if mp.is_file():
            m = read_manifest(mp)
            counts.update({str(Path(d) / s["name"]): s["samples"] for sp in m["splits"].values() for s in sp["shards"]})
    return [Shard(u, counts.get(str(Path(u)))) for u in urls]


def reader_parts(shards: list[Shard], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
                 worker: int, num_workers: int) -> list[Part]:
    """The parts reader (rank, worker) reads in `epoch`; the union over all readers is every sample once."""
    order = sorted(shards, key=lambda s: s.url)
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    readers = world_size * num_workers
    k = math.ceil(readers / len(order)) if order else 1
    parts = [Part(s, j, k) for s in order for j in range(k)]
    return parts[rank::world_size][worker::num_workers]

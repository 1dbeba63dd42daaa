"""Which shards a reader gets: source resolution and the deterministic per-epoch split.

A "reader" is one dataloader worker of one rank; there are world_size * num_workers readers. Each epoch
the shard list is sorted, shuffled with (seed, epoch) for training, and dealt out by rank, then by worker.
When there are fewer shards than readers, each shard is cut into k interleaved parts (sample i of the
shard belongs to part i % k), so every reader has work and every sample is still read exactly once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from webdataset.shardlists import expand_urls

from asset_dist.data.shardwriter import FORMAT, MANIFEST
from asset_dist.utils import InputError


class DataError(InputError):
    """Bad training or edit data (a shard that differs from its manifest, too many corrupt samples, ...): the
    message names the shard. Raised in a loader worker, it reaches the training process as this same error."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None  # known from a manifest
    nbytes: Optional[int] = None  # the manifest's size and sha256 of the file, when it lists them
    sha256: Optional[str] = None


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
    return [Shard(str(path.parent / s["name"]), s["samples"], s.get("bytes"), s.get("sha256"))
            for s in m["splits"][split]["shards"]]


def resolve_shards(spec: str, split: str, allow_pipe: bool = False) -> list[Shard]:
    """`spec`: a directory holding manifest.json, a manifest file, or shard paths/brace patterns
    (`data/train-{000000..000099}.tar`, several joined by '::'). For patterns, sample counts (and sizes and
    digests) are taken from a manifest.json next to the shards when it lists them. A `pipe:CMD` source runs a
    shell command (webdataset): refused unless allow_pipe (the config's data.allow_pipe)."""
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
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not allow_pipe:
        raise InputError(f"shard source {piped[0]!r} runs a shell command; it is refused unless the config says "
                         "data.allow_pipe=true (edit sets never take one)")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"shard(s) not found: {', '.join(missing[:3])}{more} (from {spec!r})")
    known: dict[str, Shard] = {}
    for d in {str(Path(u).parent) for u in local}:
        mp = Path(d) / MANIFEST
        if mp.is_file():
            m = read_manifest(mp)
            known.update({str(Path(d) / s["name"]): Shard(str(Path(d) / s["name"]), s["samples"], s.get("bytes"),
                                                          s.get("sha256"))
                          for sp in m["splits"].values() for s in sp["shards"]})
    return [dataclasses.replace(known[str(Path(u))], url=u) if str(Path(u)) in known else Shard(u) for u in urls]


_VERIFIED: set[tuple] = set()  # (path, size, mtime) whose sha256 matched, in this process


def remember_verified(keys) -> None:
    """Keys verify_shard returned in another process (a loader worker): this process, and the workers it forks
    later, need not hash those files again."""
    _VERIFIED.update(tuple(k) for k in keys)


def verify_shard(shard: Shard, sha256: bool = True) -> Optional[tuple]:
    """Refuse (DataError naming it) a shard that is not the file its manifest describes: the size always, the
    sha256 once per process and file version when asked (so a shard replaced by another valid tar is caught).
    Shards without manifest information (plain tar patterns) are not checked. Returns the key of a file whose
    sha256 was checked just now (for remember_verified), else None."""
    if shard.nbytes is None or "://" in shard.url or shard.url.startswith("pipe:"):
        return None
    try:
        st = os.stat(shard.url)
    except OSError as e:
        raise DataError(f"{shard.url}: cannot read the shard ({e.strerror or e})") from None
    hint = "it was replaced or changed after the manifest was written: restore it or rebuild the shards"
    if st.st_size != shard.nbytes:
        raise DataError(f"{shard.url}: {st.st_size} bytes, its manifest says {shard.nbytes}: {hint}")
    key = (shard.url, st.st_size, st.st_mtime_ns)
    if not sha256 or not shard.sha256 or key in _VERIFIED:
        return None
    h = hashlib.sha256()
    with open(shard.url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != shard.sha256:
        raise DataError(f"{shard.url}: sha256 {h.hexdigest()[:16]}... differs from its manifest's "
                        f"{shard.sha256[:16]}...: {hint}")
    _VERIFIED.add(key)
    return key


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

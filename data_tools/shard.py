#!/usr/bin/env python
"""Pack image folders + label-map folders into webdataset tar shards with a manifest.json.

Example:
  python data_tools/shard.py --images sample_data/sflckr/images \
      --labels sample_data/sflckr/segmentations --out data/sflckr --val-fraction 0.1 --workers 8

Bad inputs (unreadable/truncated files, size mismatch, missing label map, multi-channel label map) are
skipped, listed on stderr and in the manifest; --strict makes them an error. Exit codes: 0 done,
1 run error (--strict failure, empty input, ...). The logic lives in asset_dist/data/shardwriter.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from asset_dist.data.shardwriter import ShardError, run_sharding  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--labels", required=True, help="folder of 8-bit single-channel PNG label maps, same layout")
    p.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar and manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="max samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="approx. max bytes per shard (default 1 GiB)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of samples for val-*.tar (default 0)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) on any bad input")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out, keeping complete shards")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        run_sharding(a.images, a.labels, a.out, samples_per_shard=a.samples_per_shard,
                     max_shard_bytes=a.max_shard_bytes, workers=a.workers, val_fraction=a.val_fraction,
                     seed=a.seed, strict=a.strict, resume=a.resume)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

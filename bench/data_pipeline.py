#!/usr/bin/env python
"""Loader throughput vs. the decode limit: samples/s of asset_dist's loader and of a bare Pillow loop.

The bare loop only decodes each image and label map and resizes the short side to the resolution
(Pillow, in `workers` processes, jobs dispatched BARE_CHUNK at a time): no tar reading, cropping, masks,
256 views or tensors. The ratio loader / bare is the number that matters (target >= 0.9). Start-up is
not timed (the loader's first batch, the bare loop's first chunk per worker). The input is repeated
`--repeat` times so one epoch covers the run.
"uint8" is the loader with convert=False, as the training engine uses it (float conversion on the device);
"float" converts on the CPU (convert=True, the default for other callers).
--cpu adds CPU milliseconds per sample measured in one process (time.process_time, num_workers=0), which
a shared machine disturbs less than wall-clock rates.

Example: python bench/data_pipeline.py --resolutions 512 1024 --workers 1 2 --samples 100
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from asset_dist.config import DataConfig  # noqa: E402
from asset_dist.data import build_loader, iter_forever  # noqa: E402
from asset_dist.data.shardwriter import run_sharding  # noqa: E402

PAPER_BATCH = {256: 24, 512: 5, 1024: 1}  # per-GPU batch of the paper's stages


def _repeat_inputs(src: Path, dst: Path, repeat: int) -> list[tuple[Path, Path]]:
    """Symlink copies of the dataset (name prefix r<i>_) so that an epoch is long enough to time. Returns
    the (image, label map) pairs for the bare loop: the whole set, `repeat` times over, so that its first
    n jobs cover every image as the loader's shuffled samples do (not the first n/repeat images only)."""
    pairs = []
    for img in sorted((src / "images").rglob("*.jpg")):
        rel = img.relative_to(src / "images")
        lab = src / "segmentations" / rel.with_suffix(".png")
        for r in range(repeat):
            for kind, f in (("images", img), ("segmentations", lab)):
                link = dst / kind / f"r{r}_{rel.parent.as_posix().replace('/', '_')}_{f.name}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
        pairs.append((img, lab))
    return pairs * repeat


def _bare(job: tuple[str, str, int]) -> int:
    img_path, lab_path, res = job
    img = Image.open(img_path)
    if img.mode != "RGB":  # convert() would copy an RGB image for nothing
        img = img.convert("RGB")
    lab = Image.open(lab_path)
    w, h = img.size
    s = res / min(w, h)
    size = (round(w * s), round(h * s))
    img.resize(size, Image.BOX if s <= 1 else Image.BILINEAR)
    lab.resize(size, Image.NEAREST)
    return 1


BARE_CHUNK = 4  # jobs per dispatch: one at a time costs the bare loop ~0.5-1 ms per sample in IPC


def _warm(paths) -> None:
    """Read the inputs once just before timing: the VM's kernel evicts page cache that has gone unused
    for a few seconds (DAMON pageout), so whichever side ran second would otherwise start from disk."""
    for path in sorted({str(x) for x in paths}):
        Path(path).read_bytes()


def bare_rate(pairs: list[tuple[Path, Path]], res: int, workers: int, n: int) -> float:
    skip = BARE_CHUNK * workers  # the first chunk of every worker: start-up (and results that arrive together)
    jobs = [(str(a), str(b), res) for a, b in (pairs * ((n + skip) // len(pairs) + 1))[: n + skip]]
    _warm(x for job in jobs for x in job[:2])
    with mp.get_context().Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        it = pool.imap(_bare, jobs, chunksize=BARE_CHUNK)
        for _ in range(skip):
            next(it)
        t = time.perf_counter()
        done = sum(it)
        return done / (time.perf_counter() - t)


def _timed_loader(shards: Path, res: int, workers: int, n: int, batch_size: int, convert: bool, clock) -> tuple:
    """(samples, seconds by `clock`) for about n samples of the loader; its first batch (start-up) untimed."""
    _warm(shards.glob("*.tar"))
    cfg = DataConfig(train_shards=str(shards), resolution=res, num_workers=workers, batch_size=batch_size,
                     shuffle_buffer=16)
    it = iter_forever(build_loader(cfg, "train", 0, 1, convert=convert))
    next(it)
    t = clock()
    done = sum(len(b["key"]) for b in islice(it, max(1, n // batch_size)))
    return done, clock() - t


def loader_rate(shards: Path, res: int, workers: int, n: int, batch_size: int, convert: bool = True) -> float:
    done, secs = _timed_loader(shards, res, workers, n, batch_size, convert, time.perf_counter)
    return done / secs


def cpu_ms(pairs: list[tuple[Path, Path]], shards: Path, res: int, n: int, batch_size: int, rounds: int) -> dict:
    """CPU ms per sample in this process (num_workers=0): bare loop, loader float, loader uint8; best of rounds."""
    jobs = [(str(a), str(b), res) for a, b in (pairs * (n // len(pairs) + 1))[:n]]

    def bare() -> float:
        _warm(x for job in jobs for x in job[:2])
        t = time.process_time()
        for job in jobs:
            _bare(job)
        return (time.process_time() - t) / len(jobs) * 1e3

    def loader(convert: bool) -> float:
        done, secs = _timed_loader(shards, res, 0, n, batch_size, convert, time.process_time)
        return secs / done * 1e3

    best = {"bare": float("inf"), "float": float("inf"), "uint8": float("inf")}
    for _ in range(rounds):
        best = {"bare": min(best["bare"], bare()), "float": min(best["float"], loader(True)),
                "uint8": min(best["uint8"], loader(False))}
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "sample_data" / "sflckr"),
                   help="dataset folder with images/ and segmentations/ (default sample_data/sflckr)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=100, help="samples timed per measurement")
    p.add_argument("--batch-size", type=int, default=0, help="0: the paper's per-GPU batch (5 at 512, 1 at 1024)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best of each is kept")
    p.add_argument("--repeat", type=int, default=4, help="repeat the input files this many times")
    p.add_argument("--cpu", action="store_true", help="also measure CPU ms per sample in one process (see above)")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, cpu_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = _repeat_inputs(Path(a.data), tmp / "in", a.repeat)
        run_sharding(tmp / "in" / "images", tmp / "in" / "segmentations", tmp / "shards", samples_per_shard=10,
                     workers=max(a.workers), log=lambda m: None)
        for res in a.resolutions:
            bs = a.batch_size or PAPER_BATCH.get(res, 4)
            for w in a.workers:
                bare = ours = raw = 0.0
                for _ in range(a.rounds):  # interleaved, best of: the machine may be shared
                    bare = max(bare, bare_rate(pairs, res, w, a.samples))
                    ours = max(ours, loader_rate(tmp / "shards", res, w, a.samples, bs))
                    raw = max(raw, loader_rate(tmp / "shards", res, w, a.samples, bs, convert=False))
                rows.append({"resolution": res, "workers": w, "batch": bs, "loader_samples_s": round(ours, 2),
                             "loader_uint8_samples_s": round(raw, 2), "bare_samples_s": round(bare, 2),
                             "ratio": round(ours / bare, 3), "ratio_uint8": round(raw / bare, 3)})
                print(f"res {res:5d}  workers {w}  batch {bs}  loader {ours:7.2f}/s  uint8 {raw:7.2f}/s  "
                      f"bare {bare:7.2f}/s  ratio {ours / bare:.3f} / {raw / bare:.3f}", flush=True)
            if a.cpu:
                c = cpu_ms(pairs, tmp / "shards", res, a.samples, bs, a.rounds)
                cpu_rows.append({"resolution": res, **{k: round(v, 2) for k, v in c.items()},
                                 "ratio": round(c["bare"] / c["float"], 3),
                                 "ratio_uint8": round(c["bare"] / c["uint8"], 3)})
                print(f"res {res:5d}  CPU ms/sample in one process: loader {c['float']:.2f}  uint8 {c['uint8']:.2f}  "
                      f"bare {c['bare']:.2f}  ratio {c['bare'] / c['float']:.3f} / {c['bare'] / c['uint8']:.3f}",
                      flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}")
    print(f"\nmachine: {machine}\n")
    print("| resolution | workers | batch | loader float samples/s | loader uint8 samples/s | bare samples/s "
          "| ratio float | ratio uint8 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['workers']} | {r['batch']} | {r['loader_samples_s']} | "
              f"{r['loader_uint8_samples_s']} | {r['bare_samples_s']} | {r['ratio']} | {r['ratio_uint8']} |")
    if cpu_rows:
        print("\n| resolution | loader float CPU ms/sample | loader uint8 CPU ms/sample | bare CPU ms/sample "
              "| ratio float | ratio uint8 |")
        print("|---|---|---|---|---|---|")
        for r in cpu_rows:
            print(f"| {r['resolution']} | {r['float']} | {r['uint8']} | {r['bare']} | {r['ratio']} | "
                  f"{r['ratio_uint8']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "args": vars(a), "rows": rows, "cpu": cpu_rows},
                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pack (image, label map) pairs into webdataset tar shards plus a manifest.json.

A run has three steps, so that it is parallel, deterministic and resumable:
1. pair images with label maps by relative path without extension and check every pair in worker
   processes (a full decode of both files, so a truncated file is caught here and never reaches a shard);
2. plan: sort, shuffle with the seed, cut a val split, cut shards by sample count and bytes. The plan is
   saved (`.shard_plan.json`) before any shard is written, so `--resume` needs no second check pass;
3. write every shard in a worker, atomically (temp file, fsync, rename): a killed run never leaves a
   truncated file under a shard's name. `--resume` keeps shards whose members match the plan and
   rewrites the rest. Tar metadata is fixed (mtime 0, uid 0, ...), so shards are byte-reproducible and a
   resumed run equals an uninterrupted one. manifest.json is written last: its presence means "complete".

Sample layout in a tar: `<key>.jpg|png` (original image bytes), `<key>.seg.png` (8-bit label map, exact
values), `<key>.json` (source paths, width, height). Keys are `[A-Za-z0-9_-]` only: webdataset splits the
extension at the first '.', and a member name never holds '/', '..' or an absolute path.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
from PIL import Image

from asset_dist import __version__
from asset_dist.utils import atomic_write, atomic_write_json, check_id

MANIFEST = "manifest.json"
PLAN = ".shard_plan.json"
FORMAT = "asset_dist-shards-v1"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# PIL format -> extension under which the original bytes are stored; other formats are re-encoded as PNG.
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
_SPLITS = ("train", "val")
_TMP_RE = re.compile(r"^\.((train|val)-\d{6}\.tar|manifest\.json|\.shard_plan\.json)\..*\.tmp$")  # atomic_write temps


class ShardError(RuntimeError):
    """A run-level problem (empty input, bad arguments, --strict failure); the message says what and where."""


@dataclass
class Skipped:
    path: str
    reason: str


# ----------------------------------------------------------------------------------------------------------
# Keys and tar writing (reused by other dataset tools)


def safe_key(stem: str) -> str:
    """'lakes/39933489595_f0e5d85b6d_b' -> 'lakes_39933489595_f0e5d85b6d_b': only [A-Za-z0-9_-], no '.'."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    return key or "sample"


def check_key(key: str) -> None:
    check_id(key, "shard key")


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes (one pass: no re-read for the sha256)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Atomically write `[(key, {ext: bytes})]` as a webdataset tar; members of a sample stay together.

    Returns (bytes, sha256). The file appears under its name only once complete (temp file + rename).
    """
    result: dict[str, Any] = {}

    def writer(f) -> None:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, parts in samples:
                check_key(key)
                for ext, data in parts.items():
                    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", ext):
                        raise ValueError(f"unsafe member extension {ext!r} for key {key!r}")
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        result["bytes"], result["sha256"] = hw.n, hw.sha.hexdigest()

    atomic_write(path, writer, "wb")
    return result["bytes"], result["sha256"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Step 1: pairing and checking


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def pair_files(images: Path, labels: Path) -> tuple[list[dict], list[Skipped]]:
    """Match `images/a/b.jpg` with `labels/a/b.png`. Returns sorted pairs and the inputs that have no partner."""
    for name, d in (("--images", images), ("--labels", labels)):
        if not d.is_dir():
            raise ShardError(f"{name} {d}: not a directory")
    skipped: list[Skipped] = []
    image_by_stem: dict[str, Path] = {}
    for p in _walk(images):
        stem = p.relative_to(images).with_suffix("").as_posix()
        if p.suffix.lower() not in IMAGE_EXTS:
            skipped.append(Skipped(str(p), f"not an image (extension {p.suffix or 'none'!r})"))
        elif stem in image_by_stem:
            skipped.append(Skipped(str(p), f"duplicate image for {stem!r} (kept {image_by_stem[stem].name})"))
        else:
            image_by_stem[stem] = p
    label_by_stem: dict[str, Path] = {}
    for p in _walk(labels):
        stem = p.relative_to(labels).with_suffix("").as_posix()
        if p.suffix.lower() != ".png":
            skipped.append(Skipped(str(p), "label maps must be PNG files"))
        elif stem in image_by_stem:
            label_by_stem[stem] = p
        else:
            skipped.append(Skipped(str(p), "label map without an image"))
    if not image_by_stem:
        raise ShardError(f"no images found under {images} (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    pairs, used = [], set()
    for stem in sorted(image_by_stem):
        if stem not in label_by_stem:
            expected = f"{labels / stem}.png"
            skipped.append(Skipped(str(image_by_stem[stem]), f"image without a label map (expected {expected})"))
            continue
        key = safe_key(stem)
        if key in used:  # two paths that sanitize to one key: disambiguate deterministically
            key = f"{key}_{hashlib.sha1(stem.encode()).hexdigest()[:8]}"
        used.add(key)
        pairs.append({"key": key, "stem": stem, "image": str(image_by_stem[stem]), "label": str(label_by_stem[stem]),
                      "image_rel": image_by_stem[stem].relative_to(images).as_posix(),
                      "label_rel": label_by_stem[stem].relative_to(labels).as_posix()})
    return pairs, skipped


def check_pair(pair: dict) -> dict:
    """Fully decode both files; return the pair with metadata, or {'skip': Skipped} with the reason."""
    try:
        with Image.open(pair["image"]) as im:
            fmt, size = im.format, im.size
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
        return {"skip": Skipped(pair["image"], f"unreadable or truncated image ({type(e).__name__}: {e})")}
    try:
        with Image.open(pair["label"]) as lm:
            lfmt, lsize, lmode = lm.format, lm.size, lm.mode
            lm.load()
            if lmode not in ("L", "P"):
                return {"skip": Skipped(pair["label"], f"label map is not single-channel 8-bit (mode {lmode})")}
            arr = np.asarray(lm)
    except Exception as e:  # noqa: BLE001
        return {"skip": Skipped(pair["label"], f"unreadable or truncated label map ({type(e).__name__}: {e})")}
    if lsize != size:
        return {"skip": Skipped(pair["image"], f"size mismatch: image {size[0]}x{size[1]}, "
                                               f"label map {lsize[0]}x{lsize[1]} ({pair['label']})")}
    values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).tolist()
    return {**pair, "width": size[0], "height": size[1], "ext": _KEEP_FORMATS.get(fmt, "png"),
            "reencode_image": fmt not in _KEEP_FORMATS, "reencode_label": lfmt != "PNG" or lmode != "L",
            "label_values": values, "nbytes": os.path.getsize(pair["image"]) + os.path.getsize(pair["label"])}


# ----------------------------------------------------------------------------------------------------------
# Step 2: plan


def _tar_cost(n: int) -> int:
    return 512 + (n + 511) // 512 * 512  # header + padded data


def plan_shards(samples: list[dict], *, seed: int, val_fraction: float, samples_per_shard: int,
                max_shard_bytes: int) -> dict[str, list[list[dict]]]:
    """Deterministic shard plan: sort by key, shuffle with the seed, val first, then cut shards.

    A shard closes when it holds samples_per_shard samples or the next sample would push its estimated tar
    size past max_shard_bytes (a single larger sample gets a shard of its own).
    """
    order = sorted(samples, key=lambda s: s["key"])
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and n_val == 0 and len(order) > 1:
        n_val = 1
    if n_val >= len(order):
        raise ShardError(f"--val-fraction {val_fraction} leaves no training samples ({len(order)} valid pairs)")
    plan: dict[str, list[list[dict]]] = {}
    for split, part in (("val", order[:n_val]), ("train", order[n_val:])):
        shards: list[list[dict]] = []
        cur, cur_bytes = [], 1024  # end-of-archive blocks
        for s in part:
            cost = _tar_cost(s["nbytes"]) + _tar_cost(300) + 1024  # + json member, + slack for pax headers
            if cur and (len(cur) >= samples_per_shard or cur_bytes + cost > max_shard_bytes):
                shards.append(cur)
                cur, cur_bytes = [], 1024
            cur.append(s)
            cur_bytes += cost
        if cur:
            shards.append(cur)
        if shards:
            plan[split] = shards
    return plan


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


# ----------------------------------------------------------------------------------------------------------
# Step 3: writing


def _png_l(path: str) -> bytes:
    with Image.open(path) as im:
        arr = np.asarray(im)  # P mode -> palette indices, which are the label values
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def sample_members(s: dict) -> dict[str, bytes]:
    """The tar members of one planned sample: original image bytes, exact 8-bit label map, metadata."""
    if os.path.getsize(s["image"]) + os.path.getsize(s["label"]) != s["nbytes"]:
        raise ShardError(f"{s['image']} or {s['label']}: changed since the plan was made; rerun without --resume")
    if s["reencode_image"]:
        with Image.open(s["image"]) as im:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            image = buf.getvalue()
    else:
        image = Path(s["image"]).read_bytes()
    label = _png_l(s["label"]) if s["reencode_label"] else Path(s["label"]).read_bytes()
    meta = {"key": s["key"], "source": s["image_rel"], "label_source": s["label_rel"],
            "width": s["width"], "height": s["height"]}
    return {s["ext"]: image, "seg.png": label, "json": json.dumps(meta, sort_keys=True).encode()}


def _write_job(job: tuple[str, list[dict]]) -> dict:
    path, samples = job
    nbytes, sha = write_tar(path, ((s["key"], sample_members(s)) for s in samples))
    return {"name": Path(path).name, "samples": len(samples), "bytes": nbytes, "sha256": sha}


def _expected_members(samples: list[dict]) -> list[str]:
    return [f"{s['key']}.{ext}" for s in samples for ext in (s["ext"], "seg.png", "json")]


def _verify_existing(path: Path, samples: list[dict]) -> Optional[dict]:
    """A shard from an earlier run is kept if it reads to the end and holds exactly the planned members."""
    try:
        with tarfile.open(path, "r") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError):
        return None
    if names != _expected_members(samples):
        return None
    return {"name": path.name, "samples": len(samples), "bytes": path.stat().st_size, "sha256": _sha256_file(path)}


# ----------------------------------------------------------------------------------------------------------
# The run


def _pmap(fn: Callable, items: list, workers: int, desc: str) -> Iterable:
    """Map in worker processes (or in-process for workers <= 1) with a tqdm bar; results in completion order."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="it", disable=None, file=sys.stderr)
    try:
        if workers <= 1 or len(items) <= 1:
            for it in items:
                yield fn(it)
                bar.update()
        else:
            with mp.get_context().Pool(min(workers, len(items))) as pool:
                for r in pool.imap_unordered(fn, items, chunksize=1):
                    yield r
                    bar.update()
    finally:
        bar.close()


def _fingerprint(args: dict) -> dict:
    keys = ("images", "labels", "samples_per_shard", "max_shard_bytes", "val_fraction", "seed")
    return {k: args[k] for k in keys}


def run_sharding(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike, *,
                 samples_per_shard: int = 1000, max_shard_bytes: int = 1 << 30, workers: int = 1,
                 val_fraction: float = 0.0, seed: int = 0, strict: bool = False, resume: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Shard a folder pair; returns the manifest dict. Raises ShardError on run-level problems."""
    if samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be >= 1 (got {samples_per_shard})")
    if max_shard_bytes < 1:
        raise ShardError(f"--max-shard-bytes must be >= 1 (got {max_shard_bytes})")
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    images, labels, out = Path(images).resolve(), Path(labels).resolve(), Path(out).resolve()
    args = {"images": str(images), "labels": str(labels), "out": str(out), "samples_per_shard": samples_per_shard,
            "max_shard_bytes": max_shard_bytes, "workers": workers, "val_fraction": val_fraction, "seed": seed,
            "strict": strict, "resume": resume}
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir() if p.name in (MANIFEST, PLAN) or p.suffix == ".tar"]
    if existing and not resume:
        raise ShardError(f"{out} already holds shards ({', '.join(sorted(existing)[:3])}, ...): pass --resume to "
                         "finish an interrupted run, or choose an empty output folder")
    for p in out.iterdir():  # temp files of a killed run: never complete, safe to drop
        if _TMP_RE.match(p.name):
            p.unlink()

    plan_path = out / PLAN
    state = None
    if resume and plan_path.is_file():
        state = json.loads(plan_path.read_text())
        if state.get("fingerprint") != _fingerprint(args):
            diff = {k: (state.get("fingerprint", {}).get(k), v) for k, v in _fingerprint(args).items()
                    if state.get("fingerprint", {}).get(k) != v}
            raise ShardError(f"{plan_path}: --resume with different arguments than the interrupted run "
                             f"(saved vs now: {diff}); use the same arguments or an empty output folder")
        log(f"resume: using the saved plan in {plan_path}")
    if state is None:
        pairs, skipped = pair_files(images, labels)
        checked = list(_pmap(check_pair, pairs, workers, "check"))
        samples = [c for c in checked if "skip" not in c]
        skipped += [c["skip"] for c in checked if "skip" in c]
        skipped.sort(key=lambda s: s.path)
        for s in skipped:
            log(f"skipped: {s.path}: {s.reason}")
        if strict and skipped:
            raise ShardError(f"--strict: {len(skipped)} bad input(s), nothing written (see the messages above)")
        if not samples:
            raise ShardError(f"no valid (image, label map) pairs under {images} and {labels}")
        plan = plan_shards(samples, seed=seed, val_fraction=val_fraction, samples_per_shard=samples_per_shard,
                           max_shard_bytes=max_shard_bytes)
        state = {"format": FORMAT, "fingerprint": _fingerprint(args), "plan": plan,
                 "skipped": [vars(s) for s in skipped]}
        atomic_write_json(plan_path, state)
    elif strict and state["skipped"]:
        raise ShardError(f"--strict: the saved plan lists {len(state['skipped'])} bad input(s)")

    plan = state["plan"]
    done: dict[str, dict] = {}
    jobs = []
    for split in _SPLITS:
        for i, shard in enumerate(plan.get(split, [])):
            path = out / shard_name(split, i)
            info = _verify_existing(path, shard) if path.exists() else None
            if info:
                done[info["name"]] = info
            else:
                jobs.append((str(path), shard))
    if done:
        log(f"resume: {len(done)} complete shard(s) kept, {len(jobs)} to write")
    for info in _pmap(_write_job, jobs, workers, "write"):
        done[info["name"]] = info

    all_samples = [s for split in plan.values() for shard in split for s in shard]
    values = sorted({v for s in all_samples for v in s["label_values"]})
    formats: dict[str, int] = {}
    for s in all_samples:
        formats[s["ext"]] = formats.get(s["ext"], 0) + 1
    manifest = {
        "format": FORMAT,
        "tool": {"name": "data_tools/shard.py (asset_dist.data.shardwriter)", "version": __version__},
        "args": args,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_samples": len(all_samples),
        "splits": {split: {"samples": sum(len(s) for s in plan[split]),
                           "shards": [done[shard_name(split, i)] for i in range(len(plan[split]))]}
                   for split in _SPLITS if split in plan},
        "label_values": {"min": values[0], "max": values[-1], "distinct": values},
        "image_formats": formats,
        "skipped_count": len(state["skipped"]),
        "skipped": state["skipped"],
    }
    atomic_write_json(out / MANIFEST, manifest)
    log(f"wrote {len(done)} shard(s), {len(all_samples)} samples, {len(state['skipped'])} skipped -> {out / MANIFEST}")
    return manifest

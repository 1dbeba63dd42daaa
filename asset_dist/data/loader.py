"""Streaming, resumable loader over webdataset shards: batches of aligned high-res and 256 views + masks.

Determinism (what makes resume exact):
- reader = (rank, worker). Its shard parts for an epoch come from `shards.reader_parts` (sorted, shuffled
  by seed+epoch, split by rank then worker), its shuffle buffer is seeded by (seed, epoch, rank, worker),
  and each sample's crop and mask are seeded by (seed, epoch, key). So a reader's batch stream is a fixed
  function of the epoch.
- torch's DataLoader returns worker batches round-robin, dropping a worker once it is exhausted. The
  loader records, per worker, how many raw samples its consumed batches covered, and which worker is
  next. On resume each worker skips that many raw samples (before decoding: cheap) and worker ids are
  rotated so that the round-robin starts at the saved worker: the batch sequence continues exactly.
Trade-off: resuming re-reads (but does not decode) the consumed part of each reader's shards.

Another world size or worker count (elastic resume, `load_global_state` with every saved rank's state):
the rule is global sample accounting. A sample is (shard, index in shard); the samples a reader consumed
are the first `consumed[w]` of its stream, and that stream is a fixed function of the layout, the epoch
and the shard sample counts (manifest), so they are recomputed without reading a shard. Every epoch a
saved rank had started is resumed by the new layout's readers over all of that epoch's samples minus the
consumed ones (skipped before decoding): within it, every sample not yet consumed is seen exactly once and
none that was consumed is seen again. Ranks that had finished an epoch consumed all of their share. The
layouts of the epochs in progress are kept in the state (`history`), so a later change reshards again.
Exact as long as every shard reads completely (a truncated shard shortens its reader's stream).
Batches are formed inside a worker, so each worker's last batch of an epoch may be short (data.drop_last).
Ranks may see slightly different sample counts; `iter_forever` never ends, so ranks in lockstep are fine.
Memory: workers write each batch once, in place, into reused shared-memory slots, converted (float/long)
batches go into reused buffers; nothing is reused while any tensor of the caller still uses it (buffers.py).
"""
from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
import webdataset as wds

from asset_dist.config import DataConfig, validate
from asset_dist.data.shards import (DataError, Part, Shard, reader_parts, remember_verified, resolve_shards,
                                   verify_shard)
from asset_dist.data.buffers import BufferPool, MainSlots, WorkerSlots, batch_nbytes, batch_views, convert_into
from asset_dist.data.views import copy_plane, fill_views, sample_rng, unit_, warm_up

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
STATE_VERSION = 2


class CorruptSample(Exception):
    pass


def decode_sample(sample: dict, label_shift: int = 0, num_classes: int = 256) -> tuple[str, Image.Image, np.ndarray]:
    """webdataset sample (bytes per extension) -> (key, RGB image, uint8 label map). Raises CorruptSample."""
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "seg.png" not in sample:
        raise CorruptSample(f"missing members (has: {', '.join(k for k in sample if not k.startswith('__'))})")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()  # decode here, so a broken file is a CorruptSample
        with Image.open(io.BytesIO(sample["seg.png"])) as lm:
            if lm.mode not in ("L", "P"):
                raise CorruptSample(f"label map is not single-channel 8-bit (mode {lm.mode})")
            lm.load()
            seg = np.empty((lm.height, lm.width), dtype=np.uint8)
            if lm.mode == "L":
                copy_plane(lm, seg)
            else:  # palette indices (paste would apply the palette)
                seg[...] = np.asarray(lm, dtype=np.uint8)
    except CorruptSample:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error
        raise CorruptSample(f"cannot decode ({type(e).__name__}: {e})") from None
    if label_shift:
        seg += np.uint8(label_shift % 256)  # uint8 wrap-around: COCO's 255 (unlabeled) -> 0
    top = int(seg.max())
    if top >= num_classes:
        raise CorruptSample(f"label value {top} >= data.num_classes={num_classes}"
                            + (" (COCO-Stuff maps need data.label_shift=1)" if top == 255 and not label_shift else ""))
    return key, image, seg


class _Corruption:
    """Counts corrupt samples of one reader; raises once they exceed the allowed fraction."""

    def __init__(self, max_fraction: float, expected: Optional[int]):
        self.max_fraction, self.expected = max_fraction, expected
        self.seen, self.bad, self.per_shard = 0, 0, Counter()
        self.last = ("", "")  # (shard, reason) of the latest corrupt sample

    def ok(self) -> None:
        self.seen += 1

    def add(self, url: str, what: str, reason: str, n: int = 1) -> None:
        self.seen += n
        self.bad += n
        self.per_shard[url] += n
        self.last = (url, reason)
        print(f"data: skipped {what} in {url}: {reason}", file=sys.stderr, flush=True)
        self.check()

    def check(self, final: bool = False) -> None:
        if self.expected is None and not final and self.seen < 100:
            return  # without a manifest, wait for a meaningful denominator
        denom = max(self.expected or 0, self.seen, 1)
        if self.bad > self.max_fraction * denom:
            worst = ", ".join(f"{u}: {n}" for u, n in self.per_shard.most_common(5))
            raise DataError(f"data: {self.bad} of {denom} samples corrupt, above data.max_corrupt_fraction="
                               f"{self.max_fraction}; last in shard {self.last[0]}: {self.last[1]} "
                               f"(corrupt per shard: {worst})")


def _read_parts(parts: list[Part], corruption: _Corruption, verify: bool, verified: list,
                exclude: Optional[dict] = None) -> Iterator[dict]:
    """Raw samples (undecoded bytes) of the reader's parts, in order, via webdataset's tar iterator. verify: check
    each shard's sha256 against its manifest the first time this process reads it (DataError if it differs);
    the keys of shards checked here go to `verified` (sent to the main process with the next batch). Samples
    marked in `exclude` (url -> bool per index: consumed under an earlier layout) are passed over."""
    for part in parts:
        url, got = part.shard.url, 0
        skip = exclude.get(url) if exclude else None
        key = verify_shard(part.shard, sha256=verify)
        if key is not None:
            verified.append(key)
        try:
            for i, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                if i % part.stride == part.offset:
                    got += 1
                    if skip is not None and i < len(skip) and skip[i]:
                        continue
                    yield sample
        except Exception as e:  # noqa: BLE001 - unreadable or truncated shard: count what is lost
            lost = max(1, (part.samples or 0) - got)
            msg = e.args[0] if e.args else e  # webdataset appends the stream and url to args
            corruption.add(url, f"{lost} sample(s) of the shard", f"unreadable shard ({type(e).__name__}: {msg})", lost)


def _shuffled(items: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    buf: list[dict] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _shuffle_rng(cfg: DataConfig, epoch: int, rank: int, world_size: int, worker: int,
                 num_workers: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed % 2**63, epoch, rank, world_size, worker, num_workers])


def _reader_items(shards: list[Shard], cfg: DataConfig, train: bool, epoch: int, rank: int, world_size: int,
                  worker: int, num_workers: int, exclude: dict) -> Iterator[tuple[str, int]]:
    """(shard url, index) of what reader (rank, worker) of a layout pulls from its shuffle buffer in `epoch`,
    in order: the stream _ReaderStream reads, from the shard sample counts alone."""
    parts = reader_parts(shards, seed=cfg.seed, epoch=epoch, shuffle=train, rank=rank, world_size=world_size,
                         worker=worker, num_workers=num_workers)

    def items():
        for part in parts:
            skip = exclude.get(part.shard.url)
            for i in range(part.offset, part.shard.samples, part.stride):
                if skip is None or not skip[i]:
                    yield part.shard.url, i

    if train and cfg.shuffle_buffer > 1:
        return _shuffled(items(), cfg.shuffle_buffer, _shuffle_rng(cfg, epoch, rank, world_size, worker, num_workers))
    return items()


def consumed_samples(shards: list[Shard], cfg: DataConfig, train: bool, epoch: int,
                     history: list[dict]) -> dict[str, np.ndarray]:
    """url -> bool per sample index: what the layouts in `history` (oldest first; each {world_size,
    num_workers, ranks: [{epoch, consumed}]}) consumed of `epoch`. Each layout read with the exclusions of
    the ones before it."""
    mask = {s.url: np.zeros(s.samples, dtype=bool) for s in shards}
    for rec in history:
        seen = {u: m.copy() for u, m in mask.items()}  # what this layout's readers skipped
        for rank, st in enumerate(rec["ranks"]):
            if st["epoch"] < epoch:
                continue  # had not reached it
            for w in range(rec["num_workers"]):
                take = None if st["epoch"] > epoch else int(st["consumed"][w])  # finished: all of its share
                items = _reader_items(shards, cfg, train, epoch, rank, rec["world_size"], w, rec["num_workers"], seen)
                for url, i in itertools.islice(items, take):
                    mask[url][i] = True
    return mask


def finalize_batch(batch: dict, pin_memory: bool = False) -> dict:
    """uint8 batch -> image float [-1, 1], seg long, mask float {0, 1}, on the batch's device; pinned when
    asked (CPU only, so the host-to-device copy can be asynchronous). A GPU engine can take uint8 batches
    (`build_loader(..., convert=False)`), move them (4-8x fewer bytes) and call this on the device."""

    def to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.to(dtype)  # much faster than copy_ into a fresh tensor of another dtype
        return t.pin_memory() if pin_memory else t

    out = {k: unit_(to(batch[k], torch.float32)) for k in ("image", "image_lr")}
    out.update({k: to(batch[k], torch.int64) for k in ("seg", "seg_lr")})
    out.update({k: to(batch[k], torch.float32) for k in ("mask", "mask_lr")})
    out["key"] = batch["key"]
    return out


class _ReaderStream(IterableDataset):
    """The batches of one rank; inside a DataLoader each worker runs its own reader."""

    def __init__(self, shards: list[Shard], cfg: DataConfig, train: bool, rank: int, world_size: int,
                 num_workers: int, epoch: int, skip: list[int], rotation: int, returned: Optional[list] = None,
                 exclude: Optional[dict] = None):
        super().__init__()
        self.returned = returned  # per reader: receive end of the pipe that hands its slots back (workers)
        self.exclude = exclude  # url -> bool per sample: consumed under an earlier layout (elastic resume)
        self.shards, self.cfg, self.train = shards, cfg, train
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.skip, self.rotation = epoch, skip, rotation

    def parts(self, worker: int) -> list[Part]:
        return reader_parts(self.shards, seed=self.cfg.seed, epoch=self.epoch, shuffle=self.train, rank=self.rank,
                            world_size=self.world_size, worker=worker, num_workers=self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        """A DataError becomes a message (and the end of this reader): raised in a DataLoader worker it would
        reach the training process wrapped in the worker's traceback; ShardLoader raises it again, clean."""
        try:
            yield from self._batches()
        except DataError as e:
            yield {"_error": str(e)}

    def _batches(self) -> Iterator[dict]:
        cfg, info = self.cfg, get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.num_workers
        parts = self.parts(w)
        known = [p.samples for p in parts]
        corruption = _Corruption(cfg.max_corrupt_fraction, None if None in known else sum(known))
        verified: list = []
        raw = _read_parts(parts, corruption, cfg.verify, verified, self.exclude)
        if self.train and cfg.shuffle_buffer > 1:
            raw = _shuffled(raw, cfg.shuffle_buffer,
                            _shuffle_rng(cfg, self.epoch, self.rank, self.world_size, w, self.num_workers))
        mask_epoch = self.epoch if self.train else 0  # validation masks are the same every epoch
        r, g, cap = cfg.resolution, cfg.guide_resolution, cfg.batch_size
        slots = WorkerSlots(self.returned[w], (cap, r, g)) if info is not None else None
        local, nbytes = BufferPool(), batch_nbytes(cap, r, g)  # without workers: buffers reused here
        pos, n, keys, stats, batch = 0, 0, [], Counter(), None
        for sample in raw:
            pos += 1
            if pos <= self.skip[w]:
                continue  # resume: already consumed, skipped before decoding
            try:
                key, image, seg = decode_sample(sample, cfg.label_shift, cfg.num_classes)
            except CorruptSample as e:
                stats["corrupt"] += 1
                corruption.add(sample.get("__url__", "?"), f"sample {sample.get('__key__', '?')!r}", str(e))
                continue
            corruption.ok()
            if batch is None:  # the batch's buffer, filled in place sample by sample
                batch = slots.take() if slots else (0, local.get(nbytes), True)
                rows = {k: v.numpy() for k, v in batch_views(batch[1], cap, cap, r, g).items()}
            out = {k: (v[n, 0] if k.startswith("mask") else v[n]) for k, v in rows.items()}
            up = fill_views(out, image, seg, r, g, cfg.mask, sample_rng(cfg.seed % 2**63, mask_epoch, key),
                            self.train, short_side=cfg.resize_short_side, crop_grid=cfg.crop_grid)
            stats["upscaled"] += int(up)
            stats["samples"] += 1
            keys.append(key)
            n += 1
            if n == cap:
                msg = _message(batch, n, keys, w, pos, stats, verified)
                n, keys, stats, batch, rows, out = 0, [], Counter(), None, None, None  # drop our views of it
                yield msg
                del msg
        corruption.check(final=True)
        if n and not cfg.drop_last:
            yield _message(batch, n, keys, w, pos, stats, verified)


def _message(batch: tuple[int, torch.Tensor, bool], n: int, keys: list[str], w: int, pos: int,
             stats: Counter, verified: list) -> dict:
    """What a reader sends per batch; a slot's buffer only the first time (then the main process has it), and
    the shards it verified since the last batch (so that the next epoch's workers do not hash them again)."""
    slot, buf, first = batch
    msg = {"_slot": slot, "_n": n, "key": keys, "_worker": w, "_pos": pos, "_stats": dict(stats),
           "_verified": list(verified)}
    verified.clear()
    if first:
        msg["_buf"] = buf
    return msg


class ShardLoader:
    """Iterable of batch dicts for one rank and split; checkpointable with state_dict / load_state_dict.

    A new `iter()` starts the current epoch from the beginning, except right after `load_state_dict`,
    when it continues from the saved position. `stats` counts samples, corrupt samples and upscaled
    images seen by this rank (for logging).
    """

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int, epoch: int = 0,
                 pin_memory: bool = False, convert: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        validate(cfg, "data", "data")
        spec = cfg.train_shards if split == "train" else cfg.val_shards
        if split == "val" and not spec:
            if not (Path(cfg.train_shards).is_dir() or cfg.train_shards.endswith(".json")):
                raise ValueError("data.val_shards is empty and data.train_shards is not a manifest (or a folder "
                                 "holding one) that could name the val split")
            spec = cfg.train_shards  # the manifest holds the val split too
        self.cfg, self.split, self.train = cfg, split, split == "train"
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("data: pin_memory needs CUDA; ignored", stacklevel=3)
            pin_memory = False
        self.rank, self.world_size, self.pin_memory, self.convert = rank, world_size, pin_memory, convert
        self.shards = resolve_shards(spec, split, allow_pipe=cfg.allow_pipe)
        for shard in self.shards:  # sizes now (cheap); each sha256 when a reader first opens the shard
            verify_shard(shard, sha256=False)
        warm_up()  # Pillow self-checks once here, not in every (forked) worker of every epoch
        self.workers = max(1, cfg.num_workers)  # logical readers per rank (0 = one, in-process)
        self.epoch = epoch
        self.stats: Counter = Counter()
        self._reset()
        self._pending: Optional[tuple[list[int], int, int, int]] = None
        self._warned = False
        self._history: list[dict] = []  # earlier layouts of the epochs in progress (elastic resume)
        self._excluded: dict[int, Optional[dict]] = {}  # epoch -> consumed_samples of the history (cache)

    def _reset(self) -> None:
        self._consumed, self._next, self._batches, self._samples = [0] * self.workers, 0, 0, 0

    @property
    def num_samples(self) -> Optional[int]:
        """Samples this rank reads per epoch, when the shard counts are known (from a manifest)."""
        stream = self._stream(self.epoch, [0] * self.workers, 0)
        counts = [p.samples for w in range(self.workers) for p in stream.parts(w)]
        return None if None in counts else sum(counts)

    def _stream(self, epoch: int, skip: list[int], rotation: int, returned: Optional[list] = None) -> _ReaderStream:
        return _ReaderStream(self.shards, self.cfg, self.train, self.rank, self.world_size, self.workers,
                             epoch, skip, rotation, returned, self._exclusions(epoch))

    def _exclusions(self, epoch: int) -> Optional[dict]:
        if not any(st["epoch"] >= epoch for rec in self._history for st in rec["ranks"]):
            return None
        if epoch not in self._excluded:
            self._excluded = {epoch: consumed_samples(self.shards, self.cfg, self.train, epoch, self._history)}
        return self._excluded[epoch]

    def set_epoch(self, epoch: int) -> None:
        if self._pending is None or epoch != self.epoch:
            self._pending = None
            self._reset()
        self.epoch = epoch
        # layouts that never reached this epoch are done with
        self._history = [r for r in self._history if max(st["epoch"] for st in r["ranks"]) >= epoch]

    def __iter__(self) -> Iterator[dict]:
        if self._pending is not None:
            self._consumed, self._next, self._batches, self._samples = self._pending
            self._consumed = list(self._consumed)
            self._pending = None
        else:
            self._reset()
        workers = self.cfg.num_workers
        pipes = [mp.Pipe(duplex=False) for _ in range(workers)]  # per reader: main -> worker, freed slots
        ds = self._stream(self.epoch, list(self._consumed), self._next, [rx for rx, _ in pipes])
        it = iter(ds) if workers == 0 else iter(DataLoader(ds, batch_size=None, num_workers=workers))
        cap, r, g = self.cfg.batch_size, self.cfg.resolution, self.cfg.guide_resolution
        slots, outputs = MainSlots([tx for _, tx in pipes]), BufferPool()
        while True:
            slots.collect()  # lent slots the caller has let go of go back to their workers, before we wait
            packed = next(it, None)
            if packed is None:
                break
            if "_error" in packed:
                raise DataError(packed["_error"])
            w, pos, stats = packed["_worker"], packed["_pos"], packed["_stats"]
            remember_verified(packed["_verified"])
            if workers == 0:  # a fresh buffer per batch, owned by the caller
                key, buf, lend = None, packed["_buf"], False
            else:
                key, buf = slots.buffer(packed)
                lend = not self.convert and slots.lendable(key)  # before any view of it exists
            raw = {**batch_views(buf, packed["_n"], cap, r, g), "key": packed["key"]}
            if self.convert:
                batch = finalize_batch(raw, pin_memory=True) if self.pin_memory else convert_into(raw, outputs)
                if key is not None:
                    slots.release(key)  # read: the worker may refill it
            elif key is None or key[1] < 0:
                batch = raw  # the caller owns this buffer
            elif lend:
                batch = raw  # views of the worker's slot, handed back once the caller has let go of them
                slots.lend(key)
            else:  # reuse cannot be tracked: copy out
                batch = {**batch_views(buf.clone(), packed["_n"], cap, r, g), "key": packed["key"]}
                slots.release(key)
            del raw, buf, packed
            self._consumed[w], self._next = pos, (w + 1) % self.workers
            self._batches += 1
            self._samples += len(batch["key"])
            self.stats.update(stats)
            if stats.get("upscaled") and not self._warned:
                self._warned = True
                side = self.cfg.resize_short_side or self.cfg.resolution
                warnings.warn(f"data: images smaller than the short side {side} are upscaled "
                              "(count in loader.stats['upscaled'])", stacklevel=2)
            yield batch
            del batch  # so that only the caller's references keep a lent slot busy

    def state_dict(self) -> dict:
        """Position in the epoch: small, JSON-able; save one per rank."""
        return {"version": STATE_VERSION, "split": self.split, "seed": self.cfg.seed, "epoch": self.epoch,
                "rank": self.rank, "world_size": self.world_size, "num_workers": self.workers,
                "consumed": list(self._consumed), "next_worker": self._next, "batches": self._batches,
                "samples": self._samples, "stats": dict(self.stats), "history": self._history}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from `state` on the next iteration. With another world size, worker count, rank or seed
        the saved position means nothing: strict raises, strict=False restarts the saved epoch from its start."""
        self._check_state(state)
        self.epoch = int(state["epoch"])
        self._history, self._excluded = list(state.get("history", [])), {}
        self.stats = Counter({k: int(v) for k, v in state.get("stats", {}).items()})  # counts up to the save
        saved = (state["world_size"], state["num_workers"], state["rank"], state["seed"])
        if saved != (self.world_size, self.workers, self.rank, self.cfg.seed):
            msg = (f"loader state was saved with world_size={saved[0]}, workers={saved[1]}, rank={saved[2]}, "
                   f"data.seed={saved[3]}; now world_size={self.world_size}, workers={self.workers}, "
                   f"rank={self.rank}, data.seed={self.cfg.seed}")
            if strict:
                raise ValueError(msg + " (mid-epoch resume needs the same layout; strict=False restarts the epoch)")
            warnings.warn(msg + f": restarting epoch {self.epoch} from its start", stacklevel=2)
            self._pending = None
            self._reset()
            return
        self._pending = (list(state["consumed"]), int(state["next_worker"]), int(state["batches"]),
                         int(state["samples"]))

    def _check_state(self, state: dict) -> None:
        if state.get("version") not in (1, STATE_VERSION):  # 1: before `history` (same meaning otherwise)
            raise ValueError(f"loader state version {state.get('version')!r} not supported (expected {STATE_VERSION})")
        if state["split"] != self.split:
            raise ValueError(f"loader state is for the {state['split']!r} split, this loader reads {self.split!r}")

    def same_layout(self, state: dict) -> bool:
        """Whether `state` (one rank's) was saved by this rank of the same world size and worker count."""
        return (state["world_size"], state["num_workers"], state["rank"]) == (self.world_size, self.workers, self.rank)

    def load_global_state(self, states: list[dict]) -> None:
        """Continue from the saved states of every rank of a run (index = saved rank), whatever its world size
        and worker count (the module docstring gives the rule). The same layout continues exactly as
        `load_state_dict` does; another one resumes the earliest epoch in progress, and skips what was consumed."""
        first = states[0]
        for st in states:
            self._check_state(st)
        if len(states) != first["world_size"] or [st["rank"] for st in states] != list(range(len(states))):
            raise ValueError(f"loader states of ranks {[st['rank'] for st in states]}, expected all "
                             f"{first['world_size']} ranks of the saved run")
        if first["seed"] != self.cfg.seed:
            raise ValueError(f"loader state was saved with data.seed={first['seed']}, now {self.cfg.seed}")
        if self.same_layout(states[self.rank] if self.rank < len(states) else first):
            self.load_state_dict(states[self.rank])
            return
        if any(s.samples is None for s in self.shards):
            raise ValueError("data: resuming with another number of processes or data workers needs the shards' "
                             "sample counts: point data.train_shards at the folder holding manifest.json (or the "
                             "manifest), not a brace pattern")
        record = {"world_size": int(first["world_size"]), "num_workers": int(first["num_workers"]),
                  "ranks": [{"epoch": int(st["epoch"]), "consumed": [int(c) for c in st["consumed"]]} for st in states]}
        self._history, self._excluded = [*first.get("history", []), record], {}
        self.epoch = min(r["epoch"] for r in record["ranks"])
        self._history = [r for r in self._history if max(st["epoch"] for st in r["ranks"]) >= self.epoch]
        # the running totals of the logs: all of them on rank 0, so the sum over ranks stays right
        total: Counter = Counter()
        for st in states:
            total.update({k: int(v) for k, v in st.get("stats", {}).items()})
        self.stats = total if self.rank == 0 else Counter()
        self._pending = ([0] * self.workers, 0, 0, 0)  # marks a resumed epoch (it may have nothing left here)


def check_sources(cfg: DataConfig) -> None:
    """Before any heavy work: the training shards exist, are allowed (data.allow_pipe) and have their manifest's
    sizes. Raises InputError / DataError naming the source or shard."""
    validate(cfg, "data", "data")
    try:
        shards = resolve_shards(cfg.train_shards, "train", allow_pipe=cfg.allow_pipe)
    except ValueError as e:
        raise DataError(f"data.train_shards: {e}") from None
    for shard in shards:
        verify_shard(shard, sha256=False)


def build_loader(cfg: DataConfig, split: str, rank: int, world_size: int, epoch: int = 0,
                 pin_memory: bool = False, convert: bool = True) -> ShardLoader:
    """The loader of `split` ('train' or 'val') for one rank. convert=False yields uint8 batches (images
    uint8 CHW, labels and masks uint8) for `finalize_batch` on the device: views of a worker's shared
    buffer, valid for as long as you hold them (the worker refills it only after that)."""
    return ShardLoader(cfg, split, rank, world_size, epoch, pin_memory=pin_memory, convert=convert)


def iter_forever(loader: ShardLoader) -> Iterator[dict]:
    """Endless batches: when an epoch ends, the next one starts (loader.epoch + 1)."""
    while True:
        resumed = loader._pending is not None
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0 and not resumed:
            raise DataError(f"data: rank {loader.rank} got no batches in epoch {loader.epoch} "
                               f"({len(loader.shards)} shard(s); batch_size={loader.cfg.batch_size}, "
                               f"drop_last={loader.cfg.drop_last})")
        loader.set_epoch(loader.epoch + 1)

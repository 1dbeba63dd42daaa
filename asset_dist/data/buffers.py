"""Batch memory of the loader: packed uint8 batch buffers, their reuse across processes, and reused outputs.

Why: a fresh shared-memory buffer per batch costs about 1 ms per MB (created, faulted in by the worker,
mapped and faulted in again by the main process; measured on the 2-core VM of BENCHMARKS.md), as much as
decoding the sample, and fresh output memory costs page faults and cache misses too. So buffers are
reused once nobody uses them:
- a worker fills batches in shared-memory *slots*; a slot's buffer crosses to the main process once (one
  file descriptor), later batches just name the slot. The main process hands a slot back (through a pipe)
  when it has converted the batch, or, for uint8 batches lent to the caller, once no tensor uses its memory
  any more. A worker with no slot handed back allocates a new one (up to MAX_SLOTS, then a fresh buffer
  per batch, owned by the main process), so it never waits for the caller;
- float/long outputs of the conversion (and, without workers, the uint8 batches) are written into reused
  buffers of the main process, again only once no tensor uses them (`BufferPool`).
"Nobody uses it" = the storage's reference count is back to the pool's own references: every tensor view,
numpy view or storage object of the memory holds one (what torch's CUDA-graph trees check as well).
"""
from __future__ import annotations

import math

import torch

from asset_dist.data.views import unit_, view_shapes

MAX_SLOTS = 8  # reused shared buffers per worker: in flight (DataLoader prefetches 2) + held by the caller
KEEP_BUFFERS = 4  # reused buffers a BufferPool keeps
_ALIGN = 64


def _use_count(t: torch.Tensor) -> int:
    """References to t's memory (torch's storage reference count); -1 where torch does not expose it."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return -1
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_SOLE = _use_count(torch.empty(1))  # the count of memory that one tensor alone uses


def _sole(t: torch.Tensor) -> bool:
    """Only the owner's tensor t uses its memory (no view, numpy array or storage object of the caller)."""
    return _SOLE > 0 and _use_count(t) == _SOLE


def batch_layout(capacity: int, resolution: int, guide_resolution: int) -> list[tuple[str, tuple, int]]:
    """(field, batch shape, byte offset) of the uint8 fields packed in one batch buffer."""
    out, offset = [], 0
    for name, shape in view_shapes(resolution, guide_resolution).items():
        shape = (capacity, *((1, *shape) if name.startswith("mask") else shape))
        out.append((name, shape, offset))
        offset += math.prod(shape)
    return out


def batch_views(buf: torch.Tensor, n: int, capacity: int, resolution: int, guide_resolution: int) -> dict:
    """The first n samples of each field of a packed uint8 batch buffer (views, no copies): images
    (n,3,R,R), labels (n,R,R), masks (n,1,R,R), and the same at the guide resolution G as *_lr."""
    return {name: buf[off:off + math.prod(shape)].view(shape)[:n]
            for name, shape, off in batch_layout(capacity, resolution, guide_resolution)}


def batch_nbytes(capacity: int, resolution: int, guide_resolution: int) -> int:
    name, shape, off = batch_layout(capacity, resolution, guide_resolution)[-1]
    return off + math.prod(shape)


def alloc_batch(capacity: int, resolution: int, guide_resolution: int, shared: bool = False) -> torch.Tensor:
    """One uint8 buffer for a whole batch (in shared memory for a worker's slot)."""
    n = batch_nbytes(capacity, resolution, guide_resolution)
    if shared:  # straight into shared memory (share_memory_() would allocate, then copy)
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
    return torch.empty(n, dtype=torch.uint8)


class WorkerSlots:
    """A worker's reusable shared batch buffers; `returned` is its end of the pipe that gives slots back."""

    def __init__(self, returned, nbytes_args: tuple[int, int, int]):
        self.returned, self.args = returned, nbytes_args
        self.bufs: list[torch.Tensor] = []
        self.free: list[int] = []

    def take(self) -> tuple[int, torch.Tensor, bool]:
        """(slot, buffer, whether the main process has not seen this buffer yet). Slot -1: a one-off buffer."""
        try:
            while self.returned.poll():
                self.free.append(self.returned.recv())
        except (EOFError, OSError):  # the main process is gone; DataLoader stops this worker
            pass
        if self.free:
            k = self.free.pop()
            return k, self.bufs[k], False
        buf = alloc_batch(*self.args, shared=True)
        if len(self.bufs) < MAX_SLOTS:
            self.bufs.append(buf)
            return len(self.bufs) - 1, buf, True
        return -1, buf, True


class MainSlots:
    """The main process's side: the workers' slot buffers, and which are lent to the caller."""

    def __init__(self, give_back: list):
        self.give_back = give_back  # per reader: send end of its pipe
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}
        self.lent: list[tuple[int, int]] = []

    def buffer(self, packed: dict) -> tuple[tuple[int, int], torch.Tensor]:
        key = (packed["_worker"], packed["_slot"])
        if key[1] < 0:
            return key, packed["_buf"]
        if "_buf" in packed:
            self.bufs[key] = packed["_buf"]
        return key, self.bufs[key]

    def lendable(self, key: tuple[int, int]) -> bool:
        """Whether the slot's batch can be handed out as views (its reuse can be detected)."""
        return key[1] < 0 or _sole(self.bufs[key])

    def release(self, key: tuple[int, int]) -> None:
        """The batch in this slot has been read: the worker may refill it."""
        if key[1] >= 0:
            self.give_back[key[0]].send(key[1])

    def lend(self, key: tuple[int, int]) -> None:
        if key[1] >= 0:
            self.lent.append(key)

    def collect(self) -> None:
        """Hand back lent slots whose memory no tensor uses any more."""
        still = []
        for key in self.lent:
            if _sole(self.bufs[key]):
                self.release(key)
            else:
                still.append(key)
        self.lent = still


class BufferPool:
    """Reused flat uint8 buffers of one process; a buffer is reused once no tensor uses it."""

    def __init__(self):
        self.bufs: list[torch.Tensor] = []

    def get(self, nbytes: int) -> torch.Tensor:
        for buf in self.bufs:
            if buf.numel() == nbytes and _sole(buf):
                return buf
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.bufs = (self.bufs + [buf])[-KEEP_BUFFERS:]  # keep the newest
        return buf


_OUT_TYPES = {"image": torch.float32, "image_lr": torch.float32, "seg": torch.int64, "seg_lr": torch.int64,
              "mask": torch.float32, "mask_lr": torch.float32}


def convert_into(batch: dict, pool: BufferPool) -> dict:
    """`finalize_batch`'s conversion (same values, bit for bit), written into one reused pool buffer."""
    layout, nbytes = [], 0
    for k, dtype in _OUT_TYPES.items():
        size = batch[k].numel() * dtype.itemsize
        layout.append((k, dtype, nbytes, size))
        nbytes += -(-size // _ALIGN) * _ALIGN
    buf = pool.get(nbytes)
    out = {}
    for k, dtype, off, size in layout:
        t = out[k] = buf[off:off + size].view(dtype).view(batch[k].shape)
        t.copy_(batch[k])
        if k.startswith("image"):
            unit_(t)
    out["key"] = batch["key"]
    return out

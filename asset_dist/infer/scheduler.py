"""Continuous batching of the sampling rows of many edits (the vLLM idea, for this model).

A row = one (edit, sample): its tokens, condition, hole and guide picks, and its own random generator. The
sampler keeps `batch_size` slots (`models.decoding.Slots`) busy: at every step each active row feeds its own
run of decoder positions, from where it stopped to its next hole token (known tokens in between ride along
as its own prefill chunk), and samples that token; a row whose last hole token is sampled leaves, and a row
from the queue takes its slot before the next step. So every step samples one hole token per active row:
efficiency = steps x batch_size / hole tokens sampled is 1.0 while the queue lasts (the union schedule of
`sampler.sample_cached` steps every row at every position where ANY row has a hole: 3.7 at batch 16 on
training-style masks at 1024, against 1.02 here; BENCHMARKS.md "Continuous batching").

Tokens equal the union sampler's and the uncached oracle's (each row draws from its own generator, k uniforms
per hole token in strip order, whatever else is in the batch; tests/test_infer_continuous.py). With official
SGA semantics a row's known tokens enter in the same runs as when the row is sampled alone, so results no
longer depend on the other rows of a batch at all.

Rows of different token geometries (image sizes) or kinds (dense / SGA) never share a step: the queue is
served one geometry ("lane") at a time. `order="longest"` admits the row with the most hole tokens first among
the rows read ahead (`lookahead`), so the batch drains on short rows at the end of a run.
`prefill="separate"` feeds known-token runs in their own call before the decode step; measured equal to the
default "fused" at paper size on a CPU, which keeps one call per step (fewer kernel launches on a GPU).
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from asset_dist.infer.sampler import pick_tokens
from asset_dist.models.decoding import Run, Slots, small_gemm


@dataclass
class Row:
    """One (edit, sample) to sample. ids / cond / hole: [L] raster; guides {key: [n, H, nb, K]} or None."""

    key: Any
    ids: torch.Tensor
    cond: torch.Tensor
    hole: torch.Tensor
    gen: torch.Generator
    hw: tuple[int, int]
    guides: Optional[dict[str, torch.Tensor]] = None
    gen_state: Optional[torch.Tensor] = field(default=None, repr=False)  # the generator as admitted (reruns)
    seconds: float = 0.0  # its share of the encoder runs and steps it took part in

    @property
    def n_hole(self) -> int:
        return int(self.hole.sum())


@dataclass
class ScheduleStats:
    batch_size: int = 0
    rows: int = 0  # rows finished
    sampled: int = 0  # hole tokens sampled
    steps: int = 0  # decode steps (each samples one token per active row)
    active: int = 0  # rows active, summed over steps
    prefill_calls: int = 0  # separate prefill calls (prefill="separate")
    fed: int = 0  # decoder positions computed
    lanes: int = 0  # geometry switches (+1)
    encode_s: float = 0.0  # encoder runs for admitted rows
    step_s: float = 0.0  # decode steps (prefill included) and sampling draws
    step_cpu_s: float = 0.0  # the same in process CPU time (benchmarks on a shared CPU)
    first_s: float = 0.0  # the first step alone (allocations, warm-up: benchmarks leave it out)
    first_cpu_s: float = 0.0

    @property
    def efficiency(self) -> float:
        """Decode steps x batch size / hole tokens (1.0 = every slot samples one of its tokens every step)."""
        return self.steps * self.batch_size / self.sampled if self.sampled else 0.0

    @property
    def mean_active(self) -> float:
        return self.active / self.steps if self.steps else 0.0

    def add(self, o: "ScheduleStats") -> None:
        for k in ("rows", "sampled", "steps", "active", "prefill_calls", "fed", "lanes", "encode_s", "step_s",
                  "step_cpu_s"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.batch_size = max(self.batch_size, o.batch_size)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "rows": self.rows, "hole_tokens_sampled": self.sampled,
                "decode_steps": self.steps, "mean_rows_active": round(self.mean_active, 3),
                "efficiency": round(self.efficiency, 4), "prefill_calls": self.prefill_calls,
                "positions_fed": self.fed, "encode_s": round(self.encode_s, 3), "step_s": round(self.step_s, 3)}


@dataclass
class _Active:
    row: Row
    zs: torch.Tensor  # strip-order tokens [L]
    dec: torch.Tensor  # decoder inputs [L + 1]: position p >= 1 holds strip token p-1
    holes: list[int]  # strip positions of the hole, ascending
    ptr: int = 0
    prev: int = 0  # decoder positions fed

    def next_run(self, slot: int, separate: bool) -> list[Run]:
        u = self.holes[self.ptr]  # the output at position u predicts strip token u
        if separate and u > self.prev:
            return [Run(slot, self.prev, self.dec[self.prev:u], want=False), Run(slot, u, self.dec[u:u + 1])]
        return [Run(slot, self.prev, self.dec[self.prev:u + 1])]


@dataclass
class _Queue:
    """Rows read ahead from the source, served longest-first or in arrival order, one lane at a time."""

    source: Iterator[Row]
    order: str
    lookahead: int
    heaps: dict = field(default_factory=dict)  # lane -> heap of (priority, seq, row)
    n: int = 0
    seq: Iterator[int] = field(default_factory=itertools.count)
    done: bool = False

    def fill(self, lane=None) -> None:
        """Read rows up to the look-ahead; for `lane` (the one being served) up to 4x that while it has none, so
        rows of other image sizes in between do not drain the batch early."""
        while not self.done:
            short = self.lookahead > 0 and self.n >= self.lookahead
            if short and (lane is None or self.heaps.get(lane) or self.n >= 4 * self.lookahead):
                return
            row = next(self.source, None)
            if row is None:
                self.done = True
                return
            prio = -row.n_hole if self.order == "longest" else 0
            heapq.heappush(self.heaps.setdefault(_lane(row), []), (prio, next(self.seq), row))
            self.n += 1

    def pop(self, lane) -> Optional[Row]:
        self.fill(lane)
        h = self.heaps.get(lane)
        if not h:
            return None
        self.n -= 1
        return heapq.heappop(h)[2]

    def next_lane(self):
        """The lane of the first row in serving order (None: nothing left)."""
        self.fill()
        best = min(((h[0][:2], lane) for lane, h in self.heaps.items() if h), default=None, key=lambda x: x[0])
        return None if best is None else best[1]


def _lane(row: Row) -> tuple:
    """Rows that can share slots: token geometry and picks per block (0 = dense)."""
    return (tuple(row.hw), 0 if row.guides is None else int(row.guides["d_causal"].shape[-1]))


class ContinuousSampler:
    """Samples rows with continuous batching; see the module doc. done(row, tokens [L] raster) is called as
    each row finishes; failed(row, error) for a row whose sampling raised even alone (None: re-raise)."""

    def __init__(self, model, batch_size: int, *, top_k: int = 100, temperature: float = 1.0,
                 prefill: str = "fused", order: str = "longest", lookahead: int = 0,
                 slots_factory: Callable[..., Slots] = Slots):
        if prefill not in ("fused", "separate"):
            raise ValueError(f"prefill must be 'fused' or 'separate', got {prefill!r}")
        if order not in ("longest", "fifo"):
            raise ValueError(f"order must be 'longest' or 'fifo', got {order!r}")
        self.model, self.B = model, int(batch_size)
        self.top_k, self.temperature = top_k, temperature
        self.separate, self.order, self.lookahead = prefill == "separate", order, lookahead
        self.slots_factory = slots_factory  # benchmarks count the schedule with a model-free stand-in
        self.on_step: Optional[Callable[[int], None]] = None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def run(self, rows: Iterable[Row], done: Callable[[Row, torch.Tensor], None],
            failed: Optional[Callable[[Row, BaseException], None]] = None, max_steps: int = 0,
            on_step: Optional[Callable[[int], None]] = None) -> ScheduleStats:
        """max_steps > 0: stop after that many decode steps, unfinished rows dropped (benchmarks). on_step(n):
        after each step, n = hole tokens it sampled (progress)."""
        self.on_step = on_step
        with small_gemm(self.model):
            return self._run(rows, done, failed, max_steps)

    def _run(self, rows, done, failed, max_steps: int) -> ScheduleStats:
        stats = ScheduleStats(batch_size=self.B)
        queue = _Queue(iter(rows), self.order, self.lookahead)
        lane, slots, active = None, None, [None] * self.B
        while True:
            free = [j for j, a in enumerate(active) if a is None]
            new = []
            if lane is not None:
                for j in free:
                    row = queue.pop(lane)
                    if row is None:
                        break
                    new.append((j, row))
            if not new and len(free) == self.B:  # lane empty: switch to the next one
                lane = queue.next_lane()
                if lane is None:
                    return stats
                slots = self.slots_factory(self.model, self.B, lane[0], lane[1] > 0, self.device, self.dtype,
                                           lane[1] or None)
                stats.lanes += 1
                continue
            try:
                self._admit(slots, new, active, stats, done)
                if any(a is not None for a in active):
                    self._step(slots, active, stats, done)
                    if max_steps and stats.steps >= max_steps:
                        return stats
            except Exception as e:  # noqa: BLE001 - isolate the row that fails: rerun each alone
                if failed is None:
                    raise
                suspects = [a.row for a in active if a is not None]
                suspects += [r for _, r in new if all(r is not s for s in suspects)]
                active = [None] * self.B
                self._isolate(suspects, done, failed, stats, e)

    def _isolate(self, rows: list[Row], done, failed, stats: ScheduleStats, error: BaseException) -> None:
        solo = ContinuousSampler(self.model, 1, top_k=self.top_k, temperature=self.temperature,
                                 prefill="separate" if self.separate else "fused", order="fifo")
        for row in rows:
            if row.gen_state is not None:  # its draws start over
                row.gen.set_state(row.gen_state)
            try:
                stats.add(solo.run([row], done, failed=None))
            except Exception as e:  # noqa: BLE001
                failed(row, e)

    def _admit(self, slots: Slots, new: list[tuple[int, Row]], active: list, stats: ScheduleStats, done) -> None:
        if not new:
            return
        t0 = time.perf_counter()
        dev = self.device
        rows = [r for _, r in new]
        for r in rows:
            r.gen_state = r.gen.get_state()
        ids = torch.stack([r.ids for r in rows]).to(dev)
        cond = torch.stack([r.cond for r in rows]).to(dev)
        hole = torch.stack([r.hole for r in rows]).to(dev).bool()
        guides = None
        if rows[0].guides is not None:
            guides = {k: torch.stack([torch.as_tensor(r.guides[k]) for r in rows], 1).long().to(dev)
                      for k in rows[0].guides}
        slots.admit([j for j, _ in new], ids, cond, hole, guides)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = (time.perf_counter() - t0) / len(rows)
        for r in rows:
            r.seconds += dt
        lay = slots.lay
        for n, (j, row) in enumerate(new):
            zs = ids[n, lay.perm].clone()
            dec = torch.cat([zs.new_full((1,), self.model.start_id), zs])
            holes = hole[n, lay.perm].nonzero().view(-1).tolist()
            if not holes:  # nothing to sample
                stats.rows += 1
                done(row, zs[lay.inv])
                continue
            active[j] = _Active(row, zs, dec, holes)
        stats.encode_s += time.perf_counter() - t0

    def _step(self, slots: Slots, active: list, stats: ScheduleStats, done) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        live = [(j, a) for j, a in enumerate(active) if a is not None]
        runs = [r for j, a in live for r in a.next_run(j, self.separate)]
        stats.fed += sum(r.ids.numel() for r in runs)
        if self.separate:
            pre = [r for r in runs if not r.want]
            if pre:
                slots.step(pre)
                stats.prefill_calls += 1
            runs = [r for r in runs if r.want]
        logits = slots.step(runs)
        tok = pick_tokens(logits, [a.row.gen for _, a in live], self.top_k, self.temperature).to(self.device)
        lay = slots.lay
        finished = []
        for n, (j, a) in enumerate(live):
            u = a.holes[a.ptr]
            a.zs[u] = tok[n]
            a.dec[u + 1] = tok[n]
            a.prev, a.ptr = u + 1, a.ptr + 1
            if a.ptr == len(a.holes):
                active[j] = None
                finished.append(a)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if stats.steps == 0:
            stats.first_s, stats.first_cpu_s = dt, dc
        stats.step_cpu_s += dc
        for _, a in live:
            a.row.seconds += dt / len(live)
        stats.steps += 1
        stats.active += len(live)
        stats.sampled += len(live)
        stats.step_s += dt
        if self.on_step is not None:
            self.on_step(len(live))
        for a in finished:  # outside the clock: the caller's work (decode, blend, write)
            stats.rows += 1
            done(a.row, a.zs[lay.inv])


def sample_continuous(model, ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor, gens, *,
                      guides: Optional[dict[str, torch.Tensor]] = None, top_k: int = 100, temperature: float = 1.0,
                      hw: Optional[tuple[int, int]] = None, batch_size: Optional[int] = None, **kw
                      ) -> tuple[torch.Tensor, ScheduleStats]:
    """The samplers' contract (sampler.py) on continuous batching: rows [B, L] of one geometry -> tokens [B, L]
    raster. guides {key: [n, B, H, nb, K]} (or batch 1, shared). batch_size: slots (default B)."""
    B, L = ids.shape
    if hw is None:
        t = int(round(L ** 0.5))
        hw = (t, t)
    rows = [Row(i, ids[i], cond[i], hole[i], gens[i], hw,
                None if guides is None else {k: v[:, i if v.shape[1] > 1 else 0] for k, v in guides.items()})
            for i in range(B)]
    out = ids.clone()

    def done(row: Row, tokens: torch.Tensor) -> None:
        out[row.key] = tokens.to(out.device)

    on_step = kw.pop("on_step", None)
    stats = ContinuousSampler(model, batch_size or B, top_k=top_k, temperature=temperature, **kw).run(
        rows, done, on_step=on_step)
    return out, stats

"""Sampling the hole tokens of a batch of edits, in strip order, with top-k and temperature.

Three samplers with one contract, `fn(model, ids, cond, hole, gens, guides=..., top_k, temperature) ->
(tokens, stats)`: ids / cond / hole are [B, L] raster, `gens` one torch.Generator per row, tokens [B, L]
raster with only hole tokens replaced (known tokens are teacher-forced and kept).

- `sample_cached`: the production sampler. The encoder runs once; the decoder runs incrementally through
  `AssetTransformer.decode_step`, a key/value cache at token granularity on the model's attention pattern
  (dense or SGA; SGA token steps attend through per-block key/value buffers gathered once per block). Each
  step feeds the tokens between two hole positions (a run of known tokens in one call), so every decoder
  position is computed once.
- `sample_block_rerun`: the official test script's strategy (docs/ASSET_NOTES.md §7.4, §10.7): runs of known tokens
  in one call, but every hole token after a block's first re-runs its whole block. Benchmark baseline.
- `sample_uncached`: one full teacher-forced forward per hole token. The oracle.

Rows of a batch may have different holes: the schedule is the union of the rows' hole positions, and a row
without a hole at a position just keeps its known token there.

Randomness never depends on the batch: each row has its own generator (derived from the edit id and sample
index by `row_generator`) and draws exactly k uniforms per token it samples, on the CPU, in float64. The
token is the Gumbel-max choice over the top-k logits (a stable sort, so ties are broken by token id):
argmax(logit/T + Gumbel), which is a draw from softmax(top-k logits / T). A float difference between
batched and unbatched logits changes a token only if it moves two perturbed scores across each other
(probability ~ the logit error, ~1e-6 in fp32); fp64 makes it negligible.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from asset_dist.models.transformer import AssetTransformer, DecodeCache, EncoderState, Guides


@dataclass
class SampleStats:
    sampled: int = 0  # hole tokens sampled (summed over rows)
    steps: int = 0  # sampling steps (hole positions of the union schedule)
    fed: int = 0  # decoder positions computed per row (summed over calls)
    setup_s: float = 0.0  # encoder (seconds)
    loop_s: float = 0.0  # decoding and sampling (seconds)
    first_s: float = 0.0  # the first step alone (allocates the cache; benchmarks leave it out)
    loop_cpu_s: float = 0.0  # process CPU time of the loop (benchmarks on a shared CPU machine)
    first_cpu_s: float = 0.0


def row_seed(seed: int, edit_id: str, sample: int, phase: str) -> int:
    h = hashlib.sha256(f"{seed}/{edit_id}/{sample}/{phase}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def row_generator(seed: int, edit_id: str, sample: int, phase: str) -> torch.Generator:
    """The random stream of one (edit, sample, phase): independent of batch, rank and order."""
    return torch.Generator(device="cpu").manual_seed(row_seed(seed, edit_id, sample, phase))


def pick_tokens(logits: torch.Tensor, gens: Sequence[torch.Generator], top_k: int, temperature: float
                ) -> torch.Tensor:
    """logits [n, V] -> tokens [n] (CPU long): Gumbel-max over the top-k, one generator per row."""
    x = logits.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite logits while sampling (model weights or precision problem)")
    V = x.shape[-1]
    k = V if top_k <= 0 else min(top_k, V)
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    if temperature <= 0:
        return idx[:, 0].clone()
    out = torch.empty(len(gens), dtype=torch.long)
    for i, g in enumerate(gens):
        u = torch.rand(k, generator=g, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never picked
        out[i] = idx[i, int(torch.argmax(vals[i] / temperature + gumbel))]
    return out


def _schedule(hole_s: torch.Tensor, limit: Optional[int]) -> list[int]:
    pos = hole_s.any(0).nonzero().view(-1).tolist()
    return pos if limit is None else pos[:limit]


def _prepare(model: AssetTransformer, ids, cond, hole, hw):
    lay = model.layout(ids.shape[1], hw, ids.device)
    zs = ids[:, lay.perm].clone()
    hole_s = hole[:, lay.perm].bool()
    start = torch.full((ids.shape[0], 1), model.start_id, dtype=zs.dtype, device=zs.device)
    return lay, zs, hole_s, torch.cat([start, zs], 1)  # dec[:, p] = decoder input at position p


def _encode(model, ids, cond, hole, guides, hw, state, stats: SampleStats) -> EncoderState:
    t0 = time.perf_counter()
    if state is None:
        state = model.encode(ids, cond, hole, guides, hw)  # also builds the SGA token-step tables, once
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)  # so that setup_s / loop_s split the time honestly
    stats.setup_s = time.perf_counter() - t0
    return state


def _start(model: AssetTransformer, hole_s: torch.Tensor, cache: Optional[DecodeCache]) -> DecodeCache:
    """A fresh cache, or the caller's, which holds decoder positions 0..length-1 of these inputs: then no hole
    may lie among strip tokens 0..length-1 (the first step needs the output at the first hole's position)."""
    if cache is None:
        return model.new_cache()
    if bool(hole_s[:, :cache.length].any()):
        raise ValueError(f"the given cache holds decoder positions 0..{cache.length - 1}: the hole must start at "
                         f"strip token {cache.length} or later")
    return cache


def _commit(u: int, logits: torch.Tensor, hole_s, zs, dec, gens, top_k, temperature, stats: SampleStats,
            t0: tuple[float, float]) -> None:
    """Sample strip token u for the rows whose hole holds it; write it into the strip and decoder inputs."""
    rows = hole_s[:, u].nonzero().view(-1)
    tok = pick_tokens(logits[rows], [gens[int(r)] for r in rows], top_k, temperature).to(zs.device)
    zs[rows, u] = tok
    dec[rows, u + 1] = tok
    stats.sampled += int(rows.numel())
    stats.steps += 1
    if stats.steps == 1:
        stats.first_s = time.perf_counter() - t0[0]
        stats.first_cpu_s = time.process_time() - t0[1]


@torch.no_grad()
def sample_cached(model: AssetTransformer, ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor,
                  gens: Sequence[torch.Generator], *, guides: Optional[Guides] = None, top_k: int = 100,
                  temperature: float = 1.0, hw: Optional[tuple[int, int]] = None, limit: Optional[int] = None,
                  state: Optional[EncoderState] = None, cache: Optional[DecodeCache] = None
                  ) -> tuple[torch.Tensor, SampleStats]:
    """KV-cached sampling (see module doc). limit: stop after that many hole positions (benchmarks).
    state: a precomputed `model.encode(ids, cond, hole, guides, hw)` (its guides are used). cache: one that
    already holds the known prefix (positions 0..cache.length-1) of these inputs; it is extended in place."""
    lay, zs, hole_s, dec = _prepare(model, ids, cond, hole, hw)
    stats = SampleStats()
    state = _encode(model, ids, cond, hole, guides, hw, state, stats)
    cache = _start(model, hole_s, cache)
    prev = cache.length  # first decoder position not in the cache yet
    t0 = (time.perf_counter(), time.process_time())
    for u in _schedule(hole_s, limit):
        out = model.decode_step(state, cache, dec[:, prev:u + 1], prev)  # last row predicts token u
        stats.fed += u + 1 - prev
        _commit(u, out[:, -1], hole_s, zs, dec, gens, top_k, temperature, stats, t0)
        prev = u + 1
    stats.loop_s, stats.loop_cpu_s = time.perf_counter() - t0[0], time.process_time() - t0[1]
    return zs[:, lay.inv], stats


@torch.no_grad()
def sample_block_rerun(model: AssetTransformer, ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor,
                       gens: Sequence[torch.Generator], *, guides: Optional[Guides] = None, top_k: int = 100,
                       temperature: float = 1.0, hw: Optional[tuple[int, int]] = None,
                       limit: Optional[int] = None, state: Optional[EncoderState] = None,
                       cache: Optional[DecodeCache] = None) -> tuple[torch.Tensor, SampleStats]:
    """The official strategy: a block's first hole token from the previous chunk's last output, every later
    one by re-running the whole block (nt tokens through every decoder layer). state, cache: as
    `sample_cached`."""
    lay, zs, hole_s, dec = _prepare(model, ids, cond, hole, hw)
    nt = lay.nt
    stats = SampleStats()
    state = _encode(model, ids, cond, hole, guides, hw, state, stats)
    cache = _start(model, hole_s, cache)
    prev, last = cache.length, None
    t0 = (time.perf_counter(), time.process_time())
    for u in _schedule(hole_s, limit):
        b0 = (u // nt) * nt  # the block's first strip token; its decoder positions are b0+1 .. b0+nt
        if prev <= b0:  # known tokens up to the block: one chunk
            last = model.decode_step(state, cache, dec[:, prev:b0 + 1], prev)[:, -1]
            stats.fed += b0 + 1 - prev
            prev = b0 + 1
        if u == b0:
            logits = last
        else:  # re-run the block (rewinds the cache to its start); row u-b0-1 predicts token u
            logits = model.decode_step(state, cache, dec[:, b0 + 1:b0 + nt + 1], b0 + 1)[:, u - b0 - 1]
            stats.fed += nt
        _commit(u, logits, hole_s, zs, dec, gens, top_k, temperature, stats, t0)
        prev = u + 1  # cached entries from position u+1 on saw the old token u
    stats.loop_s, stats.loop_cpu_s = time.perf_counter() - t0[0], time.process_time() - t0[1]
    return zs[:, lay.inv], stats


@torch.no_grad()
def sample_uncached(model: AssetTransformer, ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor,
                    gens: Sequence[torch.Generator], *, guides: Optional[Guides] = None, top_k: int = 100,
                    temperature: float = 1.0, hw: Optional[tuple[int, int]] = None,
                    limit: Optional[int] = None) -> tuple[torch.Tensor, SampleStats]:
    """The oracle: a full teacher-forced forward (encoder + decoder) per hole position."""
    lay, zs, hole_s, dec = _prepare(model, ids, cond, hole, hw)
    stats = SampleStats()
    t0 = (time.perf_counter(), time.process_time())
    for u in _schedule(hole_s, limit):
        logits = model(zs[:, lay.inv], cond, hole, guides=guides, hw=hw)[:, u]
        stats.fed += lay.L
        _commit(u, logits, hole_s, zs, dec, gens, top_k, temperature, stats, t0)
    stats.loop_s, stats.loop_cpu_s = time.perf_counter() - t0[0], time.process_time() - t0[1]
    return zs[:, lay.inv], stats


SAMPLERS: dict[str, Callable[..., tuple[torch.Tensor, SampleStats]]] = {
    "cached": sample_cached, "block_rerun": sample_block_rerun, "uncached": sample_uncached}

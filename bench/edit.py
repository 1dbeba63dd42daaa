#!/usr/bin/env python
"""Editing speed: hole tokens sampled per second, KV-cached sampler vs the official strategy (re-run the block
per token) vs a full forward per token, batch 1 vs batch B, tiny and paper-size transformers, random weights.

Strategies (all give the same tokens; tests/test_infer_sampler.py):
  cached       the runner's: KV cache at token granularity; SGA token steps attend through per-block key/value
               buffers gathered once per block (AssetTransformer.decode_step, asset_dist/attention/decode.py)
  block_rerun  the official strategy: every hole token re-runs its whole block through the decoder
  uncached     a full forward (encoder + decoder) per token: the oracle (tiny only)

What is timed: the sampling loop only (decoder steps + top-k/temperature draws), at the given resolution with
random valid SGA picks and the hole starting one token into block --start-block (default 8: steady state, every
query block has its full window and picks; the timed cached steps cross one block boundary per 64 tokens, as
sampling does). The first step (cache and buffer set-up) is left out. The encoder runs before the clock starts;
for the paper-size model a random encoder state stands in and the known prefix is a random prefilled cache,
as their cost does not depend on the sampler (the known-prefix chunk at batch 16 would take minutes).
"edits/min" = sampling-only throughput for the official landscape edit: 2048 hole tokens x 2 samples at 1024.
On the CPU, rates come from the process's CPU time (the loop runs on --threads threads; with 1 thread on an
idle machine CPU time = wall time), so other jobs on a shared machine distort them less; wall rates are kept
in the JSON. On CUDA, rates are wall time.
--e2e also times whole edits through the runner (tokenizers, guide at 256, SGA sampling, decode, blend) on the
official landscape edit with tiny random-weight exports.

Examples:
  python bench/edit.py                                   # tiny + paper size, CPU, 1024 px, batch 1, 8, 16
  python bench/edit.py --models paper --device cuda --dtype bf16 --cached-tokens 256 --rerun-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asset_dist.config import TransformerConfig, load_config  # noqa: E402
from asset_dist.infer.sampler import SAMPLERS, row_generator  # noqa: E402
from asset_dist.models.transformer import AssetTransformer, DecodeCache, EncoderState  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EDIT_TOKENS = 2048 * 2  # official landscape edit at 1024 ("any" token rule) x 2 samples


def model_config(name: str) -> TransformerConfig:
    if name == "tiny":
        return load_config(REPO / "configs" / "tiny_base.yaml", require=False).model.transformer
    return TransformerConfig()  # the paper's: d 1024, 16 heads, 7 + 15 layers, V 1024


def random_picks(n: int, B: int, H: int, nb: int, k: int, causal: bool, g: torch.Generator) -> torch.Tensor:
    """Valid picks: outside the window; causal only blocks before b-2 (-1 where none is left)."""
    out = torch.full((n, B, H, nb, k), -1, dtype=torch.long)
    for b in range(nb):
        allowed = torch.tensor([c for c in range(nb) if (c < b - 2 if causal else abs(c - b) > 1)], dtype=torch.long)
        if allowed.numel() == 0:
            continue
        scores = torch.rand(n, B, H, allowed.numel(), generator=g)
        m = min(k, allowed.numel())
        out[..., b, :m] = allowed[scores.topk(m, -1).indices]
    return out


def synthetic_state(model: AssetTransformer, B: int, L: int, guides, device, dtype) -> EncoderState:
    """A random encoder state of the right shapes: decode-step cost does not depend on its values. One
    cross-attention key/value pair serves every layer (8 GB less at batch 16; token steps read it only when
    they enter a block)."""
    cfg = model.cfg
    lay = model.layout(L, device=device)
    hd = cfg.d_model // cfg.n_heads
    enc = torch.randn(B, L, cfg.d_model, device=device, dtype=dtype)
    kv = (torch.randn(B, cfg.n_heads, L, hd, device=device, dtype=dtype),
          torch.randn(B, cfg.n_heads, L, hd, device=device, dtype=dtype))
    peg = [None if layer.peg is None else torch.randn(B, L, cfg.d_model, device=device, dtype=dtype)
           for layer in model.decoder]
    return EncoderState(lay, enc, [kv] * len(model.decoder), peg, guides)


def prefilled_cache(model: AssetTransformer, B: int, L: int, known: int, device, dtype) -> DecodeCache:
    """A cache holding random keys/values at decoder positions 0..known-1 (the known prefix). Only the
    positions a short run can read (up to two blocks past the prefix) are written; the rest of each
    [B, H, L+1, hd] tensor stays untouched, so the OS never commits it."""
    cfg = model.cfg
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    nt = L // model.n_blocks
    end = min(L + 1, (known // nt + 3) * nt + 1)
    tile = torch.randn(1, H, known, hd, device=device, dtype=dtype)
    cache = model.new_cache()
    for i in range(len(model.decoder)):
        for store in (cache.k, cache.v):
            x = torch.empty(B, H, L + 1, hd, device=device, dtype=dtype)
            x[:, :, :known] = tile
            x[:, :, known:end] = 0
            store[i] = x
    cache.length = known
    return cache


def run_case(model, name, res, B, strategy, limit, device, dtype, real_encoder, start_block, seed=0) -> dict:
    cfg = model.cfg
    t = res // 16
    L = t * t
    g = torch.Generator().manual_seed(seed)
    nb = model.n_blocks
    guides = {"e_self": random_picks(cfg.encoder_layers, B, cfg.n_heads, nb, cfg.guide_k, False, g),
              "d_causal": random_picks(cfg.decoder_layers, B, cfg.n_heads, nb, cfg.guide_k, True, g),
              "d_cross": random_picks(cfg.decoder_layers, B, cfg.n_heads, nb, cfg.guide_k, False, g)}
    guides = {k: v.to(device) for k, v in guides.items()}
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g).to(device)
    cond = torch.randint(0, cfg.cond_vocab_size, (B, L), generator=g).to(device)
    nt = L // nb
    known = min(start_block, nb - 1) * nt + 1  # the hole starts one token into the block: every timed re-run
    hole = torch.zeros(B, L, dtype=torch.bool, device=device)  # step re-runs a block (no block-first shortcut)
    hole[:, known:] = True
    gens = [row_generator(seed, f"bench{i}", 0, "sga") for i in range(B)]
    kw = dict(guides=guides, top_k=100, temperature=1.0, limit=limit)
    if strategy != "uncached" and not real_encoder:
        kw["state"] = synthetic_state(model, B, L, guides, device, dtype)
        kw["cache"] = prefilled_cache(model, B, L, known, device, dtype)
    _, st = SAMPLERS[strategy](model, ids, cond, hole, gens, **kw)
    # the first step allocates the cache (and warms up kernels): leave it out
    more = st.steps > 1
    loop = st.loop_s - st.first_s if more else st.loop_s
    cpu = st.loop_cpu_s - st.first_cpu_s if more else st.loop_cpu_s
    steps = st.steps - 1 if more else st.steps
    # rates from CPU time on the CPU (robust on a shared machine; 1 thread = wall time when idle), else wall
    t = cpu if device.type == "cpu" else loop
    tps = B * steps / t
    return {"model": name, "res": res, "batch": B, "strategy": strategy, "tokens": B * steps,
            "wall_s": round(loop, 3), "cpu_s": round(cpu, 3), "first_step_s": round(st.first_s, 3),
            "tokens_per_s": round(tps, 2), "wall_tokens_per_s": round(B * steps / loop, 2),
            "ms_per_step": round(1000 * t / steps, 2), "edits_per_min": round(60 * tps / EDIT_TOKENS, 3)}


def e2e(device: str, edits: int) -> dict:
    """Whole edits through the runner: the official landscape edit (1024) with tiny random-weight exports."""
    from asset_dist.config import to_dict
    from asset_dist.infer.build import Builder, official
    from asset_dist.infer.classes import ClassTable
    from asset_dist.infer.edits import MemoryEdits
    from asset_dist.infer.runner import run_batch_edits
    from asset_dist.distenv import DistEnv
    from asset_dist.models.seg_vq import SegVQModel
    from asset_dist.models.vqgan import VQModel
    from asset_dist.artifacts import write_export

    tmp = Path(tempfile.mkdtemp(prefix="bench_edit_"))
    cfg = load_config(REPO / "configs" / "tiny_sga.yaml")
    torch.manual_seed(0)
    for stage, m in {"vqgan": VQModel(cfg.model.vqgan), "seg": SegVQModel(cfg.model.seg),
                     "guide": AssetTransformer(cfg.model.transformer),
                     "sga": AssetTransformer(cfg.model.transformer)}.items():
        write_export(tmp / f"{stage}.pt", stage=stage, network="model", state_dict=m.state_dict(),
                     config=to_dict(cfg), lineage={}, step=0)
        setattr(cfg.infer, f"{stage}_weights", str(tmp / f"{stage}.pt"))
    b = Builder(ClassTable(182), log=lambda m: None)
    official(b, REPO / "sample_data" / "edits", "landscape")
    recs = []
    for i in range(edits):  # copies under other ids: other random streams, same work
        r = b.records[0]
        recs.append(type(r)(f"land{i}", r.image, r.image_ext, r.seg, r.mask, r.meta, r.new_seg))
    t0 = time.perf_counter()
    run_batch_edits(cfg, "", tmp / "out", device=device, env=DistEnv(), edit_set=MemoryEdits(recs))
    dt = time.perf_counter() - t0
    rec = json.loads((tmp / "out" / "manifest.jsonl").read_text().splitlines()[0])
    return {"model": "tiny", "e2e_edits": edits, "samples": cfg.infer.samples, "batch_size": cfg.infer.batch_size,
            "seconds": round(dt, 1), "edits_per_min": round(60 * edits / dt, 3),
            "first_edit_timings_s": rec["timings_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["tiny", "paper"], choices=["tiny", "paper"],
                   help="transformers to time (none: only --e2e)")
    p.add_argument("--res", type=int, default=1024, help="image side (1024: 64 tokens per block)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--start-block", type=int, default=8, help="the hole starts one token into this block")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--cached-tokens", type=int, default=0, help="hole positions timed, cached (0: per model)")
    p.add_argument("--rerun-tokens", type=int, default=0, help="hole positions timed, block re-run (0: per model)")
    p.add_argument("--uncached-tokens", type=int, default=3, help="full-forward oracle steps (tiny only; 0: skip)")
    p.add_argument("--e2e", type=int, default=0, help="also time N whole edits through the runner (tiny)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    load0 = os.getloadavg()  # a shared machine shows here (the CPU-time rates still drift with it)
    rows = []
    for name in a.models:
        torch.manual_seed(0)
        model = AssetTransformer(model_config(name)).to(device=device, dtype=dtype).eval()
        tiny = name == "tiny"
        n_cached = a.cached_tokens or (256 if tiny else 65)
        n_rerun = a.rerun_tokens or (64 if tiny else 4)
        plan = [("cached", n_cached), ("block_rerun", n_rerun)]
        if tiny and a.uncached_tokens:
            plan.append(("uncached", a.uncached_tokens))
        for B in a.batches:
            for strategy, limit in plan:
                r = run_case(model, name, a.res, B, strategy, limit, device, dtype, tiny, a.start_block)
                rows.append(r)
                print(json.dumps(r), flush=True)
        del model
    print("\n| model | res | batch | strategy | tokens timed | tokens/s | ms/step | edits/min (sampling) "
          "| cached speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if (x["model"], x["batch"], x["strategy"]) == (r["model"], r["batch"], "cached"))
        sp = ref["tokens_per_s"] / r["tokens_per_s"]
        print(f"| {r['model']} | {r['res']} | {r['batch']} | {r['strategy']} | {r['tokens']} | {r['tokens_per_s']} | "
              f"{r['ms_per_step']} | {r['edits_per_min']} | {sp:.1f}x |")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
                       "threads": a.threads, "cores": os.cpu_count(),
                       "loadavg_1_5_15_before_after": [load0, os.getloadavg()]}, "args": vars(a), "rows": rows}
    if a.e2e:
        out["e2e"] = e2e(a.device, a.e2e)
        print("\ne2e:", json.dumps(out["e2e"]))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Continuous batching vs the union schedule on a random edit set with training-style masks.

The edit set: --edits crops of the bundled sflckr photos and label maps at --res (random 1024 crops, short side
resized to the crop), each with a hole drawn by the project's training mask sampler (asset_dist/data/masks.py,
the landscape_sga1024 mask settings: max_ratio 0.45, sampled at 512 and upsampled; crop and mask seeded by
--seed and the edit index, as `make_edits.py dataset` does), token hole rule "any".

1. Steps per hole token (no model: the schedule does not depend on token values, so the real scheduler runs
   with a model-free stand-in for the slots): union = today's sampler over consecutive chunks of B rows
   (every row steps at every position where any row of its chunk has a hole); continuous = the
   ContinuousSampler, queue order longest-first and arrival (fifo). efficiency = decode steps x B / hole tokens.
2. Tokens/s side by side at --speed-batch on the first --speed-rows edits, random-weight models (--models
   tiny and/or paper), random valid SGA picks: union (`sample_cached` per chunk) vs continuous (fused and
   separate prefill), encoder included, same rows, same generators (the tokens are checked equal).
   On the CPU rates use process CPU time (1 thread), wall time on CUDA.
3. --steady N (paper size on a small machine, where whole runs take hours): the cost of N decode steps at
   --speed-batch in the steady state, with bench/edit.py's synthetic encoder state (the encoder runs once per
   row in both samplers) and each row's known prefix already in the cache: union (`sample_cached` from the
   rows' first hole) and continuous (rows refilled from the edit set, longest first). tokens/s is then
   derived as batch / (efficiency x seconds per step), with the efficiencies of the whole edit set (table 1).

Examples:
  python bench/edit_batching.py                                      # table + tiny tokens/s, CPU
  python bench/edit_batching.py --models paper --device cuda --dtype bf16 --speed-rows 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from asset_dist.config import load_config  # noqa: E402
from asset_dist.data.views import crop_views, sample_rng  # noqa: E402
from asset_dist.infer.sampler import row_generator, sample_cached  # noqa: E402
from asset_dist.infer.scheduler import ContinuousSampler, Row  # noqa: E402
from asset_dist.models.tokens import token_hole  # noqa: E402
from asset_dist.models.transformer import AssetTransformer  # noqa: E402
from asset_dist.attention import decode as AD  # noqa: E402
from asset_dist.models.decoding import GUIDE_KEYS, Run, Slots  # noqa: E402
from edit import DTYPES, model_config, prefilled_cache, random_picks, synthetic_state  # noqa: E402

SFLCKR = REPO / "sample_data" / "sflckr"


def draw_holes(n: int, res: int, seed: int) -> torch.Tensor:
    """n training-style token holes [n, (res/16)^2] (raster), from the sflckr label maps."""
    mask_cfg = load_config(REPO / "configs" / "landscape_sga1024.yaml", require=False).data.mask
    imgs = sorted((SFLCKR / "images").rglob("*.jpg"))
    holes = []
    for i in range(n):
        p = imgs[i % len(imgs)]
        seg = np.asarray(Image.open(SFLCKR / "segmentations" / p.relative_to(SFLCKR / "images").with_suffix(".png")))
        v = crop_views(Image.open(p).convert("RGB"), seg, res, 256, mask_cfg, sample_rng(seed, 0, f"{p.stem}/{i}"),
                       False, short_side=res)
        holes.append(token_hole(torch.from_numpy(v["mask"]).float()[None, None], "any")[0])
    return torch.stack(holes)


class DrySlots:
    """Slots stand-in for counting the schedule: no model work, zero logits."""

    def __init__(self, model, n_slots, hw, sparse, device, dtype, guide_k=None):
        self.lay = model.layout(hw[0] * hw[1], hw, device)
        self.V = model.vocab_size

    def admit(self, *a, **k) -> None:
        pass

    def step(self, runs):
        return torch.zeros(sum(r.want for r in runs), self.V)


class SteadySlots(Slots):
    """Slots for the steady-state measurement: no encoder (zero state; attending costs the same), the row's known
    prefix counts as cached, and memory stays small: the cache is uncommitted fresh pages (read as zeros,
    committed where written), one cross-attention key/value pair serves every layer (as bench/edit.py)."""

    _shared: dict = {}

    def _big(self, *shape):  # fresh pages read as zeros, but reused allocator memory may hold anything: see step
        if shape[2] == self.L:  # cross-attention keys/values: shared by the layers
            key = (shape, self._device)
            if key not in self._shared:
                self._shared[key] = torch.zeros(*shape, device=self._device, dtype=self._dtype)
            return self._shared[key]
        return torch.empty(*shape, device=self._device, dtype=self._dtype)

    def __init__(self, model, n_slots, hw, sparse, device, dtype, guide_k=None):
        L = hw[0] * hw[1]
        self.L = L
        super().__init__(model, n_slots, hw, sparse, device, dtype, guide_k)
        for t in self.k + self.v:  # [start]; the rest: zeroed where a row goes (admit, step)
            t[:, :, :1] = 0
        self._first = [0] * n_slots
        self._zeroed = [set() for _ in range(n_slots)]

    def admit(self, slots, ids, cond, hole, guides=None):
        js = torch.as_tensor(list(slots), device=ids.device)
        sem = self.model.semantics.table
        for key in GUIDE_KEYS:
            self.guides[key][:, js] = guides[key]
        for w, key, causal in (("self", "d_causal", True), ("cross", "d_cross", False)):
            for i, g in enumerate(guides[key]):
                t = AD.step_table(g, self.model.n_blocks, causal, sem)
                self.tab[w][i][0][js], self.tab[w][i][1][js] = t.blocks, t.bias
        for n, j in enumerate(slots):
            first = int(hole[n, self.lay.perm].nonzero()[0])
            for t in self.k + self.v:  # the prefix, which a real run would have written
                t[j, :, 1:first + 1] = 0
            self.length[j], self.block[j], self._first[j] = first, -1, first
            self._zeroed[j] = set()

    def step(self, runs):
        runs = [r if r.start >= self.length[r.slot] else
                Run(r.slot, self.length[r.slot], r.ids[self.length[r.slot] - r.start:], r.want) for r in runs]
        runs = [r for r in runs if r.ids.numel()]  # a separate prefill that lies in the cached prefix
        if not runs:
            return torch.zeros(0, self.model.vocab_size)
        nt = self.nt
        for r in runs:  # masked keys are read too (0 x value): the blocks a run reaches must hold finite values
            for b in range(max(r.start - 1, 0) // nt, (r.start + r.ids.numel() - 2) // nt + 1):
                if b not in self._zeroed[r.slot]:
                    self._zeroed[r.slot].add(b)
                    lo = max(b * nt + 1, self._first[r.slot] + 1)
                    for t in self.k + self.v:
                        t[r.slot, :, lo:(b + 1) * nt + 1] = 0
        return super().step(runs)


def steady(name: str, holes: torch.Tensor, B: int, steps: int, device, dtype, eff: dict, seed: int = 0,
           prefills=("fused",)) -> list[dict]:
    """Seconds per decode step in the steady state: union vs continuous (see the module doc, 3.)."""
    torch.manual_seed(0)
    model = AssetTransformer(model_config(name)).to(device=device, dtype=dtype).eval()
    cfg = model.cfg
    n, L = holes.shape
    t = int(round(L ** 0.5))
    g = torch.Generator().manual_seed(seed)
    nb = model.n_blocks
    guides = {"e_self": random_picks(cfg.encoder_layers, n, cfg.n_heads, nb, cfg.guide_k, False, g),
              "d_causal": random_picks(cfg.decoder_layers, n, cfg.n_heads, nb, cfg.guide_k, True, g),
              "d_cross": random_picks(cfg.decoder_layers, n, cfg.n_heads, nb, cfg.guide_k, False, g)}
    ids = torch.randint(0, cfg.vocab_size, (n, L), generator=g)
    cond = torch.randint(0, cfg.cond_vocab_size, (n, L), generator=g)
    out = []
    # union: the first B rows from the union's first hole, `steps` positions
    lay = model.layout(L, (t, t))
    hb = holes[:B].to(device)
    known = int(hb[:, lay.perm].any(0).nonzero()[0])
    gb = {k: v[:, :B].to(device) for k, v in guides.items()}
    gens = [row_generator(seed, f"bench{i}", 0, "sga") for i in range(B)]
    _, st = sample_cached(model, ids[:B].to(device), cond[:B].to(device), hb, gens, guides=gb, hw=(t, t),
                          limit=steps + 1, state=synthetic_state(model, B, L, gb, device, dtype),
                          cache=prefilled_cache(model, B, L, known, device, dtype))
    wall, cpu = st.loop_s - st.first_s, st.loop_cpu_s - st.first_cpu_s
    sec = (cpu if device.type == "cpu" else wall) / (st.steps - 1)
    out.append({"model": name, "batch": B, "sampler": "union", "steps_timed": st.steps - 1,
                "s_per_step": round(sec, 4), "wall_s_per_step": round(wall / (st.steps - 1), 4),
                "efficiency": eff["union"], "tokens_per_s": round(B / (eff["union"] * sec), 2)})
    print(json.dumps(out[-1]), flush=True)
    del st
    for prefill in prefills:
        rows = [Row(i, ids[i], cond[i], holes[i], row_generator(seed, f"bench{i}", 0, "sga"), (t, t),
                    {k: v[:, i] for k, v in guides.items()}) for i in range(n)]
        SteadySlots._shared.clear()
        st = ContinuousSampler(model, B, top_k=100, prefill=prefill, slots_factory=SteadySlots).run(
            rows, lambda r, x: None, max_steps=steps + 1)
        wall, cpu = st.step_s - st.first_s, st.step_cpu_s - st.first_cpu_s
        sec = (cpu if device.type == "cpu" else wall) / (st.steps - 1)
        out.append({"model": name, "batch": B, "sampler": f"continuous_{prefill}", "steps_timed": st.steps - 1,
                    "s_per_step": round(sec, 4), "wall_s_per_step": round(wall / (st.steps - 1), 4),
                    "mean_rows_active": round(st.mean_active, 2), "efficiency": eff["continuous"],
                    "tokens_per_s": round(B / (eff["continuous"] * sec), 2)})
        print(json.dumps(out[-1]), flush=True)
    SteadySlots._shared.clear()
    return out


def schedule_table(holes: torch.Tensor, batches: list[int], orders: list[str]) -> list[dict]:
    n, L = holes.shape
    t = int(round(L ** 0.5))
    model = AssetTransformer(model_config("tiny"))
    total = int(holes.sum())
    rows_out = []
    for B in batches:
        union = sum(int(holes[i:i + B].any(0).sum()) for i in range(0, n, B))
        r = {"batch": B, "rows": n, "hole_tokens": total, "ideal_steps": -(-total // B), "union_steps": union,
             "union_efficiency": round(union * B / total, 3)}
        for order in orders:
            rows = [Row(i, torch.zeros(L, dtype=torch.long), torch.zeros(L, dtype=torch.long), holes[i],
                        row_generator(0, f"e{i}", 0, "dry"), (t, t)) for i in range(n)]
            st = ContinuousSampler(model, B, order=order, slots_factory=DrySlots).run(rows, lambda r, x: None)
            r[f"continuous_{order}_steps"] = st.steps
            r[f"continuous_{order}_efficiency"] = round(st.efficiency, 3)
        rows_out.append(r)
    return rows_out


def speed(name: str, holes: torch.Tensor, B: int, device, dtype, seed: int = 0,
          prefills=("fused", "separate")) -> list[dict]:
    torch.manual_seed(0)
    model = AssetTransformer(model_config(name)).to(device=device, dtype=dtype).eval()
    cfg = model.cfg
    n, L = holes.shape
    t = int(round(L ** 0.5))
    g = torch.Generator().manual_seed(seed)
    nb = model.n_blocks
    guides = {"e_self": random_picks(cfg.encoder_layers, n, cfg.n_heads, nb, cfg.guide_k, False, g),
              "d_causal": random_picks(cfg.decoder_layers, n, cfg.n_heads, nb, cfg.guide_k, True, g),
              "d_cross": random_picks(cfg.decoder_layers, n, cfg.n_heads, nb, cfg.guide_k, False, g)}
    ids = torch.randint(0, cfg.vocab_size, (n, L), generator=g)
    cond = torch.randint(0, cfg.cond_vocab_size, (n, L), generator=g)
    gens = lambda: [row_generator(seed, f"bench{i}", 0, "sga") for i in range(n)]  # noqa: E731
    total = int(holes.sum())
    out, results = [], {}

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter(), time.process_time()

    def record(strategy, t0, extra):
        t1 = clock()
        wall, cpu = t1[0] - t0[0], t1[1] - t0[1]
        sec = cpu if device.type == "cpu" else wall
        r = {"model": name, "res": 16 * t, "batch": B, "rows": n, "hole_tokens": total, "strategy": strategy,
             "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens_per_s": round(total / sec, 2), **extra}
        out.append(r)
        print(json.dumps(r), flush=True)

    # union: today's runner, consecutive chunks of B rows
    gs, tok = gens(), []
    t0 = clock()
    steps = 0
    for i in range(0, n, B):
        sl = slice(i, i + B)
        x, st = sample_cached(model, ids[sl].to(device), cond[sl].to(device), holes[sl].to(device), gs[sl],
                              guides={k: v[:, sl].to(device) for k, v in guides.items()}, hw=(t, t))
        tok.append(x.cpu())
        steps += st.steps
    record("union", t0, {"decode_steps": steps, "efficiency": round(steps * B / total, 3)})
    results["union"] = torch.cat(tok)
    for prefill in prefills:
        gs = gens()
        got = torch.empty_like(ids)
        rows = [Row(i, ids[i], cond[i], holes[i], gs[i], (t, t), {k: v[:, i] for k, v in guides.items()})
                for i in range(n)]
        t0 = clock()
        st = ContinuousSampler(model, B, prefill=prefill).run(rows, lambda r, x: got.__setitem__(r.key, x.cpu()))
        record(f"continuous_{prefill}", t0, {"decode_steps": st.steps, "efficiency": round(st.efficiency, 3),
                                             "encode_s": round(st.encode_s, 2)})
        results[prefill] = got
    same = all(torch.equal(results["union"], v) for v in results.values())
    for r in out:
        r["tokens_equal_union"] = same
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=120, help="edits drawn (>= 100 for the table)")
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--orders", nargs="+", default=["longest", "fifo"], choices=["longest", "fifo"])
    p.add_argument("--models", nargs="*", default=["tiny"], choices=["tiny", "paper"],
                   help="models for the tokens/s comparison (none: only the table)")
    p.add_argument("--speed-batch", type=int, default=16)
    p.add_argument("--speed-rows", type=int, default=48, help="edits in the tokens/s comparison")
    p.add_argument("--prefills", nargs="+", default=["fused", "separate"], choices=["fused", "separate"],
                   help="continuous-batching prefill modes in the tokens/s comparison")
    p.add_argument("--speed-res", type=int, default=0, help="resolution of the tokens/s comparison (0: --res; "
                                                            "its own edit set, same seed)")
    p.add_argument("--steady", type=int, default=0, help="steady-state steps timed per sampler (3.; 0: skip)")
    p.add_argument("--steady-models", nargs="*", default=["paper"], choices=["tiny", "paper"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    holes = draw_holes(a.edits, a.res, a.seed)
    sizes = holes.sum(1).float()
    frac = 100 * sizes.mean() / holes.shape[1]
    print(f"{a.edits} edits at {a.res} px: hole tokens mean {sizes.mean():.0f} ({frac:.1f}%)"
          f", min {int(sizes.min())}, max {int(sizes.max())} (drawn in {time.perf_counter() - t0:.1f} s)", flush=True)
    table = schedule_table(holes, a.batches, a.orders)
    print("\n| batch | hole tokens | ideal steps | union steps | union steps x B / token | "
          + " | ".join(f"continuous ({o}) steps | steps x B / token" for o in a.orders) + " |")
    print("|---|---|---|---|---|" + "---|---|" * len(a.orders))
    for r in table:
        print(f"| {r['batch']} | {r['hole_tokens']} | {r['ideal_steps']} | {r['union_steps']} | "
              f"{r['union_efficiency']} | " + " | ".join(
                  f"{r[f'continuous_{o}_steps']} | {r[f'continuous_{o}_efficiency']}" for o in a.orders) + " |",
              flush=True)
    speeds = []
    sholes = holes if a.speed_res in (0, a.res) else draw_holes(a.speed_rows, a.speed_res, a.seed)
    for name in a.models:
        speeds += speed(name, sholes[:a.speed_rows], a.speed_batch, torch.device(a.device), DTYPES[a.dtype],
                        prefills=a.prefills)
    if speeds:
        print("\n| model | res | batch | rows | hole tokens | sampler | decode steps | steps x B / token | tokens/s | "
              "vs union |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in speeds:
            ref = next(x for x in speeds if x["model"] == r["model"] and x["strategy"] == "union")
            print(f"| {r['model']} | {r['res']} | {r['batch']} | {r['rows']} | {r['hole_tokens']} | {r['strategy']} | "
                  f"{r['decode_steps']} | {r['efficiency']} | {r['tokens_per_s']} | "
                  f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
        print(f"tokens equal to the union sampler's: {all(r['tokens_equal_union'] for r in speeds)}")
    steadies = []
    if a.steady:
        row = next(r for r in table if r["batch"] == a.speed_batch)
        eff = {"union": row["union_efficiency"], "continuous": row[f"continuous_{a.orders[0]}_efficiency"]}
        for name in a.steady_models:
            steadies += steady(name, holes, a.speed_batch, a.steady, torch.device(a.device), DTYPES[a.dtype], eff,
                               prefills=a.prefills)
        print("\n| model | batch | sampler | steps timed | s/step | steps x B / token (whole set) | tokens/s "
              "| vs union |")
        print("|---|---|---|---|---|---|---|---|")
        for r in steadies:
            ref = next(x for x in steadies if x["model"] == r["model"] and x["sampler"] == "union")
            print(f"| {r['model']} | {r['batch']} | {r['sampler']} | {r['steps_timed']} | {r['s_per_step']} | "
                  f"{r['efficiency']} | {r['tokens_per_s']} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads,
                        "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor(),
                        "loadavg_before_after": [load0, os.getloadavg()]},
            "args": vars(a), "schedule": table, "speed": speeds, "steady": steadies}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

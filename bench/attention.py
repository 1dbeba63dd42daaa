"""Benchmark sga_attention against dense SDPA (and the dense masked oracle): time and peak memory.

Dense and sparse runs are interleaved in one process (round robin, median of --reps) so that load from
other processes hits both alike; the ratios are what count. Peak memory is the extra memory of one call
above its inputs: on CPU the high-water mark of live tensor bytes from torch.profiler memory events, on
CUDA torch.cuda.max_memory_allocated.

  python bench/attention.py --quick                      # CPU smoke run, L=1024
  python bench/attention.py                               # CPU: L=1024, 4096
  bench/gpu_check.sh gpu_attention.md                      # GPU: oracle checks, then bf16 timings incl. flex
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asset_dist.attention import pick_blocks, sga_attention  # noqa: E402
from asset_dist.attention.layout import block_table  # noqa: E402
from asset_dist.attention.sga import flex_sga  # noqa: E402

GRID = (16, 4)


def peak_bytes(fn, device: torch.device) -> int:
    """Extra memory high-water mark of fn() above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(L, heads, dim, batch, causal, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, L, dim, generator=g).to(device, dtype) for _ in range(3))
    nb = GRID[0] * GRID[1]
    pooled = torch.rand(batch, heads, nb, nb, generator=g)
    guide = pick_blocks(pooled, 3, causal).to(device)  # realistic picks, -1 pads in early causal blocks
    return q, k, v, guide


def variants(args, device, L, causal):
    """name -> callable(q, k, v, guide) for every kernel to time at this size."""
    out = {"dense_sdpa": lambda q, k, v, g: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    if L <= args.oracle_max_l:
        out["dense_mask"] = lambda q, k, v, g: sga_attention(q, k, v, g, GRID, causal, impl="dense_mask")
    for impl in args.impls:
        if impl.startswith("flex"):
            continue
        out[impl] = (lambda name: lambda q, k, v, g: sga_attention(q, k, v, g, GRID, causal, impl=name))(impl)
    if any(i.startswith("flex") for i in args.impls):
        nb = GRID[0] * GRID[1]
        for tile in args.flex_tiles:
            if tile > L:
                continue
            opts = None
            if tile < 128 and device.type == "cuda":
                opts = {"BLOCK_M": tile, "BLOCK_N": tile}
            name = f"flex_t{tile}"

            def run(q, k, v, g, tile=tile, opts=opts):
                return flex_sga(q, k, v, block_table(g, nb, causal), causal, tile=tile, kernel_options=opts)

            out[name] = run
    return out


def bench_size(args, device, dtype, L, causal, log):
    q, k, v, guide = make_inputs(L, args.heads, args.head_dim, args.batch, causal, device, dtype)
    fns = variants(args, device, L, causal)
    rows = {n: {"fwd": [], "fwdbwd": [], "err": ""} for n in fns}
    gout = torch.randn_like(q)
    with torch.no_grad():
        ref = sga_attention(q, k, v, guide, GRID, causal, impl="gather").float()

    def fwd(fn):
        with torch.no_grad():
            return fn(q, k, v, guide)

    def fwdbwd(fn):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv, guide).backward(gout)

    # warm-up (compiles flex), correctness vs the gather kernel, and which modes each variant supports
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            o = fwd(fn)
            sync(device)
            rows[name]["first_s"] = time.perf_counter() - t0
            if name != "dense_sdpa":
                rows[name]["maxdiff"] = (o.float() - ref).abs().max().item()
            rows[name]["has_bwd"] = True
            if not (name.startswith("flex") and device.type == "cpu"):
                fwdbwd(fn)
            else:
                rows[name]["has_bwd"] = False
        except Exception as e:  # record and keep going: one failing kernel must not lose the others
            rows[name]["err"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"  {name}: {rows[name]['err']}")
    live = [n for n in fns if not rows[n]["err"]]
    for _ in range(args.reps):  # interleaved: every rep runs every variant once
        for name in live:
            for mode, call in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                if mode == "fwdbwd" and not rows[name]["has_bwd"]:
                    continue
                sync(device)
                t0 = args.clock()
                call(fns[name])
                sync(device)
                rows[name][mode].append(args.clock() - t0)
    for name in live:
        rows[name]["peak_fwd"] = peak_bytes(lambda: fwd(fns[name]), device)
        if rows[name]["has_bwd"]:
            rows[name]["peak_fwdbwd"] = peak_bytes(lambda: fwdbwd(fns[name]), device)
    return rows


def run_checks(device, log) -> list[str]:
    """Every kernel vs the dense masked oracle on this device (fp32, L=1024, prefix 1): outputs and grads."""
    lines = ["| check (fp32, L=1024, B=2, 4 heads, prefix 1) | causal | max abs diff out | grads | ok |",
             "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(1)
    B, H, L, D, P = 2, 4, 1024, 64, 1
    for causal in (False, True):
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device) for _ in range(3))
        pk, pv = (torch.randn(B, H, P, D, generator=gen).to(device) for _ in range(2))
        guide = torch.randint(-1, 64, (B, H, 64, 3), generator=gen).to(device)  # pads, repeats, future picks
        go = torch.randn(B, H, L, D, generator=gen).to(device)

        def run(impl, grads):
            xs = [t.clone().requires_grad_(grads) for t in (q, k, v, pk, pv)]
            with torch.set_grad_enabled(grads):
                out = sga_attention(*xs[:3], guide, GRID, causal, xs[3], xs[4], impl=impl)
            if not grads:
                return out, None
            return out, torch.autograd.grad(out, xs, go)

        ref, ref_g = run("dense_mask", True)
        for impl in ("gather", "sdpa_gather", "flex"):
            grads = not (impl == "flex" and device.type == "cpu")
            try:
                out, g = run(impl, grads)
                d_out = (out - ref).abs().max().item()
                d_g = max((a - b).abs().max().item() for a, b in zip(g, ref_g)) if grads else float("nan")
                ok = d_out < 1e-4 and (not grads or d_g < 1e-4)
                lines.append(f"| {impl} | {'y' if causal else 'n'} | {d_out:.1e} | "
                             f"{'n/a (no backward here)' if not grads else f'{d_g:.1e}'} | {'yes' if ok else 'NO'} |")
            except Exception as e:
                lines.append(f"| {impl} | {'y' if causal else 'n'} | failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]} | | NO |")
            log(lines[-1])
    return lines


def fmt_table(results, device_desc, cmd, checks=()):
    lines = [f"Command: `{cmd}`  ", f"Machine: {device_desc}  ", "", *checks, *([""] if checks else []),
             "| L | causal | variant | fwd ms | fwd+bwd ms | speed-up fwd / fwd+bwd vs dense SDPA | "
             "peak MB fwd / fwd+bwd | peak vs dense fwd / fwd+bwd | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (L, causal), rows in results.items():
        d = rows["dense_sdpa"]
        dfw, dbw = statistics.median(d["fwd"]), statistics.median(d["fwdbwd"])
        for name, r in rows.items():
            if r["err"]:
                lines.append(f"| {L} | {'y' if causal else 'n'} | {name} | failed: {r['err']} | | | | | |")
                continue
            fw = statistics.median(r["fwd"])
            bw = statistics.median(r["fwdbwd"]) if r["fwdbwd"] else math.nan
            pf, pb = r["peak_fwd"] / 2**20, r.get("peak_fwdbwd", math.nan) / 2**20
            rf, rb = d["peak_fwd"] / 2**20, d["peak_fwdbwd"] / 2**20

            def n(x, f="%.1f"):
                return "—" if math.isnan(x) else f % x

            lines.append(
                f"| {L} | {'y' if causal else 'n'} | {name} | {n(fw * 1e3)} | {n(bw * 1e3)} | "
                f"{dfw / fw:.2f} / {n(dbw / bw, '%.2f')} | {pf:.0f} / {n(pb, '%.0f')} | "
                f"{n(pf / max(rf, 1e-9), '%.2f')} / {n(pb / max(rb, 1e-9), '%.2f')} | "
                f"{r.get('maxdiff', float('nan')):.1e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--L", type=int, nargs="+", default=None,
                   help="sequence lengths (default cpu: 1024 4096; cuda: 256 1024 4096 16384)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--impls", nargs="+", default=None,
                   help="sparse kernels to time (default cpu: sdpa_gather gather; cuda: flex sdpa_gather gather)")
    p.add_argument("--flex-tiles", type=int, nargs="+", default=[128], help="BlockMask tile sizes for flex")
    p.add_argument("--oracle-max-l", type=int, default=1024,
                   help="time the dense masked oracle up to this L (at 4096 it needs ~1.3 GB and minutes on CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="cpu: process CPU time (robust on a shared CPU with --threads 1); wall: elapsed time. "
                        "auto: cpu for a 1-thread CPU run, else wall")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 cpu, bfloat16 cuda)")
    p.add_argument("--quick", action="store_true", help="L=1024 only, 3 reps: a smoke run of a few seconds")
    p.add_argument("--check", action="store_true",
                   help="first check every kernel against the dense oracle on this device (fp32, outputs and grads)")
    p.add_argument("--out", default=None, help="write the markdown table (and a .json beside it) here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.impls is None:
        args.impls = ["flex", "sdpa_gather", "gather"] if device.type == "cuda" else ["sdpa_gather", "gather"]
    if args.L is None:
        args.L = [256, 1024, 4096, 16384] if device.type == "cuda" else [1024, 4096]
    if args.quick:
        args.L, args.reps = [1024], 3
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" and args.threads == 1 else "wall")
    args.clock = time.process_time if clock == "cpu" else time.perf_counter
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}"
    else:
        desc = (f"{_cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {dtype}, "
                f"{clock} clock")
    cmd = "python bench/attention.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    checks = run_checks(device, log) if args.check else []
    results = {}
    for L in args.L:
        for causal in causals:
            log(f"L={L} causal={causal} ...")
            results[(L, causal)] = bench_size(args, device, dtype, L, causal, log)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.out:  # after every size, so a run cut short still leaves its results
                write_results(Path(args.out), results, desc, cmd, checks)
    print(fmt_table(results, desc, cmd, checks))


def write_results(out: Path, results, desc: str, cmd: str, checks: list[str]) -> None:
    """The markdown table at `out` and the raw timings at `out` with suffix .json, both written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js = {f"L{L}_{'causal' if c else 'full'}": rows for (L, c), rows in results.items()}
    for path, text in ((out, fmt_table(results, desc, cmd, checks) + "\n"),
                       (out.with_suffix(".json"), json.dumps({"machine": desc, "command": cmd, "checks": checks,
                                                              "results": js}, indent=1))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""edit-batch with 2 workers of unequal speed: static split by rank vs chunks claimed dynamically.

Two ranks of one job (RANK / WORLD_SIZE / MASTER_* set here, as torchrun would, so the benchmark knows each
worker's pid) run `asset-dist edit-batch` on CPU over --edits edits (sflckr crops at --res with rectangular
holes, tiny random-weight exports as in the tests); rank 1 is throttled to about half speed from outside by a
SIGSTOP/SIGCONT duty cycle (--on-s running, --off-s stopped). Modes:
  static   infer.claim_chunk=0: rank r takes every 2nd edit of the sorted ids (the old split)
  dynamic  infer.claim_chunk=--chunk: each worker claims the next chunk when it needs work
Reported per mode: wall time of the batch (launch to the last exit), each worker's edits, busy time and idle
time at the end (OUT/summary.json: the last worker to run out of work minus this one), and the idle fraction =
idle / (busy + idle) summed over the workers. The outputs of every mode are checked byte-identical to each
other (same seeds: who computes an edit does not matter).

  flock /tmp/asset_cpu.lock python bench/edit_claims.py [--edits 24] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_infer_common import make_exports, many_edits  # noqa: E402


def throttle(pid: int, stop: threading.Event, on_s: float, off_s: float) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(off_s)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(on_s)


def run(args, cfg: Path, edits: Path, out: Path, chunk: int, port: int) -> dict:
    cmd = [sys.executable, "-m", "asset_dist.cli", "edit-batch", "--config", str(cfg), "--edits", str(edits),
           "--out", str(out), "--device", "cpu", "--set", f"infer.claim_chunk={chunk}",
           "--set", f"infer.batch_size={args.batch}"]
    procs = []
    t0 = time.perf_counter()
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    stop = threading.Event()
    t = threading.Thread(target=throttle, args=(procs[1].pid, stop, args.on_s, args.off_s), daemon=True)
    t.start()
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    for p, e in zip(procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"edit-batch failed ({p.returncode}):\n{e[-3000:]}")
    summ = json.loads((out / "summary.json").read_text())
    workers = {r["worker"]: r for r in summ["ranks"]}
    return {"wall_s": wall, "workers": workers, "idle_fraction": summ["total"]["idle_fraction"],
            "busy_s": summ["total"]["busy_s"], "idle_s": summ["total"]["idle_end_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=24, help="edits in the batch")
    ap.add_argument("--res", type=int, default=256, help="photo side (px)")
    ap.add_argument("--batch", type=int, default=2, help="infer.batch_size")
    ap.add_argument("--chunk", type=int, default=1, help="infer.claim_chunk of the dynamic mode")
    ap.add_argument("--on-s", type=float, default=0.1, help="throttled worker: seconds running per cycle")
    ap.add_argument("--off-s", type=float, default=0.1, help="throttled worker: seconds stopped per cycle")
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode (alternating static, dynamic)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edit_claims_"))
    cfg = make_exports(tmp / "w")
    ids = many_edits(tmp / "edits", args.edits, args.res)
    results: dict[str, list[dict]] = {"static": [], "dynamic": []}
    port = 29000 + os.getpid() % 1000
    for r in range(args.repeat):
        for mode, chunk in (("static", 0), ("dynamic", args.chunk)):
            out = tmp / f"{mode}{r}"
            results[mode].append(run(args, cfg, tmp / "edits", out, chunk, port))
            port += 1
            print(f"{mode} run {r}: wall {results[mode][-1]['wall_s']:.1f} s, idle fraction "
                  f"{results[mode][-1]['idle_fraction']:.3f}", file=sys.stderr, flush=True)
    # the same bytes whoever computed each edit
    ref = tmp / "static0"
    for mode in results:
        for r in range(args.repeat):
            for eid in ids:
                for k in (0, 1):
                    a = (ref / eid / f"sample_{k}.png").read_bytes()
                    assert a == (tmp / f"{mode}{r}" / eid / f"sample_{k}.png").read_bytes(), (mode, r, eid, k)
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads 1 per worker; {args.edits} edits at {args.res} px, 2 samples, batch {args.batch}; "
          f"worker rank1 throttled: {args.on_s} s running / {args.off_s} s stopped\n")
    print("| mode | wall s (runs) | edits rank0 / rank1 | busy s rank0 / rank1 | idle at end s rank0 / rank1 "
          "| idle fraction |")
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        w = [x["workers"] for x in runs]

        def col(key: str, fmt: str) -> str:
            return ", ".join(f"{format(x['rank0'][key], fmt)} / {format(x['rank1'][key], fmt)}" for x in w)
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        fr = ", ".join(f"{x['idle_fraction']:.3f}" for x in runs)
        label = "static (claim_chunk=0)" if mode == "static" else f"dynamic (claim_chunk={args.chunk})"
        print(f"| {label} | {walls} | {col('edits', 'd')} | {col('busy_s', '.1f')} | {col('idle_end_s', '.1f')} "
              f"| {fr} |")
    print(f"\n(outputs of all runs byte-identical; folders under {tmp})")


if __name__ == "__main__":
    main()

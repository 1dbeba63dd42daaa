"""Test double of `asset-dist train` for the launch-layer tests (tests/test_slurm.py).

It honours the same contract as the real trainer, with a step counter instead of a model:
  fake_trainer.py train --config C [--set key=value ...] [--resume auto]
  - rank and rendezvous from asset_dist.distenv; torch.distributed over gloo (env://);
  - SIGUSR1 / SIGTERM set a stop flag; at the next step boundary the flag is all-reduced (MAX), every
    rank saves its state and the process exits EXIT_REQUEUE;
  - `--resume auto` continues from the saved state if there is one.
Keys read from --set: paths.run_dir (required), train.max_steps, fake.step_seconds, fake.exit_code
(exit with it right after start-up), fake.dist (false: no torch.distributed), fake.ignore_usr1 (true:
miss the warning, so only the TERM at the time limit stops it), fake.startup_seconds (time spent starting
up; a signal during it saves at the resumed step, as the real trainer does).
Files in run_dir: launches/restart<R>-rank<r>.json (what the rank saw), steps/rank<r>.log (one line per
step taken), ckpt/rank<r>.json (the saved step), checkpoints/latest (rank 0: the saved step's tag, as
the trainer writes it: the launchers read progress from it), done/rank<r> (finished).
"""
import signal

# Handlers first: a warning that arrives while torch is still importing must not be lost or fatal.
_stop = {"signal": None}


def _on_signal(signum, _frame):
    _stop["signal"] = signal.Signals(signum).name


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from asset_dist.distenv import dist_env, export_torch_env  # noqa: E402
from asset_dist.exitcodes import EXIT_REQUEUE  # noqa: E402
from asset_dist.utils import atomic_write_json, atomic_write_text  # noqa: E402


def _quiet_exit() -> None:
    # Python puts SIGUSR1/SIGTERM back to "terminate" while it shuts down: a late warning would turn a
    # finished (or saved) run into a death by signal. The real trainer does the same before returning.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _save(run_dir: Path, rank: int, step: int, sig) -> None:
    atomic_write_json(run_dir / "ckpt" / f"rank{rank}.json", {"step": step, "signal": sig})
    if rank == 0:
        atomic_write_text(run_dir / "checkpoints" / "latest", f"step_{step:08d}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["train"])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", default="")
    args = p.parse_args()
    sets = dict(kv.split("=", 1) for kv in args.overrides)
    run_dir = Path(sets["paths.run_dir"])
    max_steps = int(sets.get("train.max_steps", "5"))
    step_seconds = float(sets.get("fake.step_seconds", "0.1"))
    use_dist = sets.get("fake.dist", "true").lower() == "true"
    if sets.get("fake.ignore_usr1", "false").lower() == "true":  # a trainer that misses the warning
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    env = dist_env()
    export_torch_env(env)
    r = env.rank
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    ckpt = run_dir / "ckpt" / f"rank{r}.json"
    start = json.loads(ckpt.read_text())["step"] if args.resume == "auto" and ckpt.is_file() else 0
    info = {
        "rank": r, "local_rank": env.local_rank, "world_size": env.world_size, "node_rank": env.node_rank,
        "num_nodes": env.num_nodes, "master_addr": env.master_addr, "master_port": env.master_port,
        "launcher": env.launcher, "restart": restart, "hostname": socket.gethostname(), "pid": os.getpid(),
        "argv": sys.argv[1:], "config": args.config, "resume": args.resume, "start_step": start,
    }
    if "fake.exit_code" in sets:
        info["exit_code"] = int(sets["fake.exit_code"])
        atomic_write_json(run_dir / "launches" / f"restart{restart}-rank{r}.json", info)
        return info["exit_code"]

    dist = None
    if use_dist and env.world_size > 1:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        t = torch.tensor([float(r)])
        dist.all_reduce(t)
        info["allreduce_rank_sum"] = t.item()
    atomic_write_json(run_dir / "launches" / f"restart{restart}-rank{r}.json", info)

    time.sleep(float(sets.get("fake.startup_seconds", "0")))  # building the model, loading data...

    def stop_now() -> bool:
        stop = _stop["signal"] is not None
        if dist is not None:  # every rank stops at the same step, whoever got the signal
            import torch

            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        return stop

    def save_and_exit(step: int) -> int:
        _save(run_dir, r, step, _stop["signal"])
        if dist is not None:
            dist.barrier()
            dist.destroy_process_group()
        _quiet_exit()
        print(f"rank {r}: {_stop['signal'] or 'peer signal'} at step {step}: saved, exit {EXIT_REQUEUE}", flush=True)
        return EXIT_REQUEUE

    steps_log = run_dir / "steps" / f"rank{r}.log"
    steps_log.parent.mkdir(parents=True, exist_ok=True)
    step = start
    if step < max_steps and stop_now():  # signalled during start-up: saved where it resumed, as the trainer does
        return save_and_exit(step)
    with open(steps_log, "a") as log:
        while step < max_steps:
            time.sleep(step_seconds)
            step += 1
            log.write(f"{step}\n")
            log.flush()
            if stop_now() and step < max_steps:
                return save_and_exit(step)
    _save(run_dir, r, step, None)
    (run_dir / "done").mkdir(exist_ok=True)
    (run_dir / "done" / f"rank{r}").write_text(f"{step}\n")
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    _quiet_exit()
    print(f"rank {r}: finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

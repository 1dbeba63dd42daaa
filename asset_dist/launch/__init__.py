"""Launching: where this process sits in the job (env), for torchrun, deepspeed's launcher and srun.

The sbatch side lives in slurm/ (common.sh + one script per stage); both share EXIT_REQUEUE.
Names resolve lazily so `python -m asset_dist.launch.env` (print this task's placement) runs cleanly.
"""
from typing import Any

__all__ = ["EXIT_REQUEUE", "DistEnv", "dist_env", "expand_hostlist", "export_torch_env", "torch_backend"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from asset_dist.launch import env

        return getattr(env, name)
    raise AttributeError(f"module 'asset_dist.launch' has no attribute {name!r}")

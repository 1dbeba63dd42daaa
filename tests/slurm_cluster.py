"""Pytest fixture: a real one-node SLURM cluster (scripts/local_slurm.sh) for the sbatch tests.

`slurm_cluster` (session scope) starts the cluster, or reuses one already running in ASSET_SLURM_DIR
(and then leaves it running). SLURM missing and not installable (not root, no apt-get): the tests
skip, unless CI is set, where they fail. Import the fixture into a test module:
    from slurm_cluster import slurm_cluster  # noqa: F401
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
EXIT_UNAVAILABLE = 3  # local_slurm.sh: SLURM not installed and not installable here

# states after which a job record no longer changes by itself (requeued jobs go back to PENDING first)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    conf: str
    env: dict[str, str] = field(default_factory=dict)  # os.environ + SLURM_CONF

    def run(self, *args: str, check: bool = True, env: Optional[dict] = None, cwd: Optional[Path] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), capture_output=True, text=True, env={**self.env, **(env or {})},
                           cwd=cwd or REPO, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def sbatch(self, *args: str, env: Optional[dict] = None, cwd: Optional[Path] = None) -> int:
        """Submit (from the repository root unless cwd) and return the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", text))

    def wait(self, job_id: int, states: Iterable[str] = TERMINAL, timeout: float = 300,
             poll: float = 1.0) -> dict[str, str]:
        """Poll until the job's state is one of `states`; return its record (fails with it on timeout)."""
        states = set(states)
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(poll)
            info = self.job(job_id)
        return info

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)


def _start() -> tuple[subprocess.CompletedProcess, bool]:
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode == 0:
        return status, False
    return subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600), True


@pytest.fixture(scope="session")
def slurm_cluster():
    proc, started = _start()
    if proc.returncode == EXIT_UNAVAILABLE:
        msg = f"SLURM is not installed and cannot be installed here: {proc.stderr.strip()}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " (CI is set: this must work)")
        pytest.skip(msg)
    if proc.returncode != 0:
        pytest.fail(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert m, f"no SLURM_CONF in: {proc.stdout!r}"
    conf = m.group(1)
    cluster = SlurmCluster(conf=conf, env={**os.environ, "SLURM_CONF": conf})
    try:
        yield cluster
    finally:
        if started:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)

"""Pytest fixture: a real SLURM cluster on this machine (scripts/local_slurm.sh) for the launch tests.

`slurm_cluster` (session scope) starts a cluster of ASSET_SLURM_NODES nodes (default 3: each node its own
network and UTS namespace, so multi-node jobs really cross a network), or reuses one already running in
ASSET_SLURM_DIR with at least that many nodes (and then leaves it running). SLURM missing and not
installable (not root, no apt-get, no network namespaces): the tests skip, unless CI is set, where they
fail. Import the fixture into a test module:
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
NODES = int(os.environ.get("ASSET_SLURM_NODES", "3"))

# states after which a job record no longer changes by itself (requeued jobs go back to PENDING first)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    conf: str
    env: dict[str, str] = field(default_factory=dict)  # os.environ + SLURM_CONF
    nodes: list[str] = field(default_factory=list)

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

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """scripts/local_slurm.sh ARGS (kill-node, revive-node, exec ...) for this cluster."""
        return self.run("bash", str(SCRIPT), *args, env={"ASSET_SLURM_NODES": str(len(self.nodes))},
                        timeout=timeout)

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-n", node, "-o", "%t").stdout.strip()

    def wait_node(self, node: str, states: Iterable[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.node_state(node)) not in set(states):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node} still {state!r} after {timeout:.0f} s")
            time.sleep(1)
        return state


def _nodes() -> list[str]:
    p = subprocess.run(["bash", str(SCRIPT), "nodes"], capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def _start() -> tuple[subprocess.CompletedProcess, bool]:
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode == 0 and len(_nodes()) >= NODES:
        return status, False
    env = {**os.environ, "ASSET_SLURM_NODES": str(NODES)}
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode == EXIT_UNAVAILABLE and NODES > 1 and not _ci():
        # no network namespaces here: one node still runs the single-node tests (the multi-node ones skip)
        env["ASSET_SLURM_NODES"] = "1"
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600, env=env)
    return proc, True


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster():
    proc, started = _start()
    if proc.returncode == EXIT_UNAVAILABLE:
        msg = f"SLURM is not installed and cannot be installed here: {proc.stderr.strip()}"
        if _ci():
            pytest.fail(msg + " (CI is set: this must work)")
        pytest.skip(msg)
    if proc.returncode != 0:
        pytest.fail(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert m, f"no SLURM_CONF in: {proc.stdout!r}"
    conf = m.group(1)
    cluster = SlurmCluster(conf=conf, env={**os.environ, "SLURM_CONF": conf}, nodes=_nodes())
    try:
        yield cluster
    finally:
        if started:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)

"""asset_dist/launch/contract.py: the one copy of what slurm/common.sh and submitit agree on (exit codes,
stale launcher variables, rendezvous port, progress, the requeue rule). No cluster needed; the same paths on
a real cluster: tests/test_slurm*.py."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asset_dist import exitcodes
from asset_dist.launch import contract as C

REPO = Path(__file__).resolve().parents[1]


def test_shell_reads_exit_codes_and_stale_vars_from_the_package():
    """common.sh evals `contract shell`: the values a shell sees are the package's, and nothing is hard-coded."""
    out = subprocess.run(["bash", "-c", 'eval "$("$0" -m asset_dist.launch.contract shell)"; '
                          'echo "$EXIT_REQUEUE $EXIT_BAD_INPUT $EXIT_NONFINITE|$STALE_VARS"', sys.executable],
                         capture_output=True, text=True, check=True).stdout.strip()
    codes, stale = out.split("|")
    assert codes.split() == [str(exitcodes.EXIT_REQUEUE), str(exitcodes.EXIT_BAD_INPUT), str(exitcodes.EXIT_NONFINITE)]
    assert tuple(stale.split()) == C.STALE_VARS and "MASTER_ADDR" in stale
    common = (REPO / "slurm" / "common.sh").read_text()
    assert "EXIT_REQUEUE=" not in common and "unset RANK" not in common and "contract shell" in common


def test_free_port_is_free_and_below_the_ephemeral_range():
    low = C._ephemeral_low()
    port = C.free_port(seed=7)
    assert 20000 <= port < low
    with socket.socket() as s:  # a port someone listens on is never handed out
        s.bind(("", port))
        s.listen()
        for seed in range(20):
            assert C.free_port(seed=7) != port


def test_rendezvous_probes_on_the_first_node_only(monkeypatch):
    me = socket.gethostname()
    env = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": f"{me},other"}
    host, port = C.rendezvous(env)
    assert host == me and port < C._ephemeral_low()
    host, port = C.rendezvous({"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (host, port) == ("gpu07", 20000 + 4711)  # not on the first node: derived, every task agrees


def test_progress_reads_checkpoint_and_edit_records(tmp_path):
    assert C.progress(tmp_path) == "-/0"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000020\n")
    for e in ("a", "b"):
        (tmp_path / e).mkdir()
        (tmp_path / e / "record.json").write_text("{}")
    assert C.progress(tmp_path) == "step_00000020/2"


R = exitcodes.EXIT_REQUEUE


@pytest.mark.parametrize("rc, kw, requeue, reason", [
    (0, {}, False, "exit 0"),
    (2, {}, False, "bad config"),
    (3, {}, False, "non-finite"),
    (1, {"signal_seen": "usr1"}, False, "exit 1"),  # a crash is not requeued (a dead node is SLURM's to requeue)
    (R, {"signal_seen": "usr1"}, True, "time limit"),
    (128 + signal.SIGUSR1, {"signal_seen": "usr1"}, True, "requeueing"),  # killed by the warning itself
    (128 + signal.SIGUSR1, {}, False, "killed by SIGUSR1"),  # nobody asked: a real failure
    (R, {"signal_seen": "term", "term_at": 1000.0, "end_time": 5000.0}, False, "scancel"),
    (R, {"signal_seen": "term", "term_at": 4995.0, "end_time": 5000.0}, True, "time limit"),
    (-signal.SIGTERM, {"signal_seen": "term", "term_at": 4995.0, "end_time": 5000.0}, True, "requeueing"),
    (R, {"preempted": True, "mode": "REQUEUE"}, True, "preempted"),
    (R, {"signal_seen": "term", "term_at": 1000.0, "end_time": 5000.0, "preempted": True, "mode": "REQUEUE"},
     True, "preempted"),
    (R, {"preempted": True, "mode": "CANCEL"}, False, "PreemptMode=CANCEL makes preemption final"),
    (R, {"signal_seen": "usr1", "progress_before": "step_00000010/0", "progress_after": "step_00000010/0"},
     True, "no progress in this run, 1 of 2 allowed"),  # one slow start is forgiven
    (R, {"signal_seen": "usr1", "progress_before": "step_00000010/0", "progress_after": "step_00000010/0",
         "stalled_before": 1}, False, "no progress in 2 runs in a row"),
    (R, {"signal_seen": "usr1", "progress_before": "-/3", "progress_after": "-/5"}, True, "requeueing"),
    (R, {"signal_seen": "usr1", "restarts": 5, "max_restarts": 5}, False, "limit of 5"),
])
def test_requeue_rule(rc, kw, requeue, reason):
    d = C.decide(rc, **kw)
    assert d.requeue is requeue and reason in d.reason, d


def test_decide_command_line_answers_with_its_exit_status(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "asset_dist.launch.contract", "decide", *args],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})

    for stalled, rc in ((1, 0), (2, 1)):  # nothing saved since the start: once forgiven, then stopped
        p = run("--rc", str(R), "--signal", "usr1", "--run-dir", str(tmp_path), "--progress-before=-/0")
        assert p.returncode == rc and "no progress in" in p.stdout, p.stdout
        assert (tmp_path / C.STALLED_FILE).read_text().strip() == str(stalled)  # counted in the run folder
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    p = run("--rc", str(R), "--signal", "usr1", "--run-dir", str(tmp_path), "--progress-before=-/0")
    assert p.returncode == 0 and "requeueing" in p.stdout and "no progress" not in p.stdout
    assert not (tmp_path / C.STALLED_FILE).exists()  # progress resets the count
    p = run("--rc", "2", "--run-dir", str(tmp_path))
    assert p.returncode == 1 and "bad config" in p.stdout


PEER = r"""
import sys, time
import torch, torch.distributed as dist
from asset_dist.distenv import dist_env, init_process_group
env = dist_env()
init_process_group(env, torch.device("cpu"), timeout_s=float(sys.argv[1]))
if env.rank == 1:  # joins, then goes silent (a frozen process, a cut link): never takes part again
    time.sleep(300)
try:
    dist.all_reduce(torch.ones(1))
    print("no error")
except Exception as e:  # noqa: BLE001 - the message is what the test checks
    print("collective failed:", str(e).splitlines()[0])
"""


def test_collective_timeout_bounds_a_silent_peer(tmp_path):
    """dist.timeout_s reaches the process group: rank 0's all-reduce fails instead of waiting for a peer that
    never answers (gloo names the bound in its message)."""
    import os

    script = tmp_path / "peer.py"
    script.write_text(PEER)
    port = str(C.free_port(seed=os.getpid()))
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), "3"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=120)  # torch's default bound would be 30 min
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "collective failed" in out and "3000ms" in out, out


def test_preempt_mode_partition_first_then_cluster(monkeypatch):
    answers = {("show", "partition", "-o", "scav"): "PartitionName=scav PreemptMode=CANCEL GraceTime=30",
               ("show", "partition", "-o", "debug"): "PartitionName=debug PreemptMode=(null)",
               ("show", "config"): "PreemptMode             = REQUEUE\nPreemptType = preempt/partition_prio"}
    monkeypatch.setattr(C, "_scontrol", lambda *a: answers.get(a, ""))
    assert C.preempt_mode({"Partition": "scav"}) == "CANCEL"
    assert C.preempt_mode({"Partition": "debug"}) == "REQUEUE"  # the partition says nothing: the cluster's
    assert C.preemption_requeues()


@pytest.mark.parametrize("mode, active", [("REQUEUE", True), ("CANCEL", False), ("OFF", False)])
def test_a_preempted_job_is_waited_for_only_where_it_comes_back(monkeypatch, mode, active):
    from asset_dist.launch import submit

    monkeypatch.setattr(C, "_scontrol", lambda *a: f"PreemptMode = {mode}\n" if a == ("show", "config") else "")
    assert submit.state_active("PREEMPTED") is active
    assert submit.state_active("PENDING") and not submit.state_active("COMPLETED")


def test_a_job_slurm_requeued_itself_is_left_to_slurm(monkeypatch, tmp_path):
    """`scontrol requeue` (or a node failure) moves the job's Restarts on at once: the launcher must not decide
    anything (neither requeue it again nor call it a scancel)."""
    monkeypatch.setattr(C, "scontrol_job", lambda job_id: {"Restarts": "3", "JobState": "COMPLETING"})
    d = C.decide_for_job(R, "7", signal_seen="term", term_at=1.0, end_time=9999.0, run_dir=str(tmp_path), restarts=2)
    assert not d.requeue and "SLURM has requeued this job itself" in d.reason
    d = C.decide_for_job(R, "7", signal_seen="term", term_at=1.0, end_time=9999.0, run_dir=str(tmp_path), restarts=3)
    assert not d.requeue and "scancel" in d.reason

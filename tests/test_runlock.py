"""Output-folder locks (asset_dist/runlock.py) and umask-respecting atomic writes (asset_dist/utils.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from asset_dist.runlock import LOCK_NAME, LockHeld, RunLock
from asset_dist.utils import atomic_write_text


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_respects_umask(tmp_path, umask, want):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.txt").st_mode & 0o777 == want


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("old")
    os.chmod(f, 0o640)
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and os.stat(f).st_mode & 0o777 == 0o640


def test_second_holder_is_refused_with_a_named_error(tmp_path):
    with RunLock(tmp_path, "edit-batch"):
        with pytest.raises(LockHeld, match=r"in use by edit-batch \(host .*pid %d" % os.getpid()):
            RunLock(tmp_path, "edit-batch").acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with RunLock(tmp_path, "again"):  # free again
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": dead, "token": "x"}))
    import socket
    assert socket.gethostname() == os.uname().nodename
    with RunLock(tmp_path, "train") as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.me["token"]


def test_lock_without_heartbeat_is_stale_and_a_live_one_is_not(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "other-node", "pid": 1, "token": "x"}))
    with pytest.raises(LockHeld, match="other-node"):
        RunLock(tmp_path, "train", stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path, "train", stale_after_s=60):
        pass


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    with RunLock(tmp_path, "train", heartbeat_s=0.05):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(tmp_path / LOCK_NAME).st_mtime < 5


def test_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-a", "pid": 1, "slurm_job_id": "77", "token": "x"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(LockHeld, match="SLURM job 77"):
        RunLock(tmp_path, "train").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto another node
    with RunLock(tmp_path, "train"):
        pass

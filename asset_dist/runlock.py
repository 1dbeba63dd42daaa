"""One writer per output folder: a lock file that names its holder, with stale-lock detection.

Two trainings into one run folder, or two `edit-batch` runs into one output folder, would compute and
write the same files; the second is refused with a named error instead. Works across nodes of a cluster
(the lock is a file on the shared filesystem, created with O_EXCL), so it cannot rely on flock/fcntl (NFS
and parallel filesystems implement them unevenly). The holder is recorded as host, pid and SLURM job id;
a lock is stale, and is taken over, when
  - its holder ran on this host and that pid is gone,
  - it was written by an earlier run of the same SLURM job (a requeue; the old tasks are dead by then),
  - or its heartbeat (the file's mtime, touched every `heartbeat_s` by a daemon thread) is older than
    `stale_after_s` (a holder on another node that died or froze).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

LOCK_NAME = ".asset_dist.lock"


class LockHeld(RuntimeError):
    """Another live run holds the folder; the message names it and says what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}


class RunLock:
    """`with RunLock(folder, "edit-batch"):` holds `folder/.asset_dist.lock` for the block (or acquire/release)."""

    def __init__(self, folder: str | os.PathLike, what: str, *, heartbeat_s: float = 30.0,
                 stale_after_s: float = 300.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.me: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- inspection -------------------------------------------------------------------------------------
    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder that died between create and write: judged by its age

    def stale_reason(self, rec: dict) -> Optional[str]:
        """Why the lock described by `rec` no longer protects anything (None: it is live)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        host, pid, job = rec.get("host"), rec.get("pid"), rec.get("slurm_job_id")
        here = host == socket.gethostname() and isinstance(pid, int)
        if here and not _pid_alive(pid):
            return f"its process {pid} on {host} is gone"
        if job and job == os.environ.get("SLURM_JOB_ID", "") and not here:
            # one process per job takes the lock (rank 0): the same job id from another host is a requeue
            return f"an earlier run of this SLURM job ({job}) on {host} wrote it"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    # ---- acquire / release ------------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = _holder() | {"what": self.what}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                rec = self.read()
                if rec is None:
                    continue  # released meanwhile
                why = self.stale_reason(rec)
                if why is None:
                    raise LockHeld(
                        f"{self.folder} is in use by {rec.get('what', 'another run')} (host {rec.get('host')}, pid "
                        f"{rec.get('pid')}, SLURM job {rec.get('slurm_job_id') or '-'}, since {rec.get('started')}). "
                        f"Wait for it or stop it; if it is really gone, delete {self.path}")
                # move the stale file aside under a unique name: of several racing takers exactly one wins
                aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
                try:
                    os.rename(self.path, aside)
                    os.unlink(aside)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.me = me
            self._thread = threading.Thread(target=self._beat, name="asset-dist-lock", daemon=True)
            self._thread.start()
            return self
        raise LockHeld(f"{self.path}: could not take the lock (other runs keep racing for it)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.read() or {}).get("token") != self.me["token"]:
                    return  # taken over (we were judged stale): never touch another holder's file
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.me is not None and (self.read() or {}).get("token") == self.me["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.me = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

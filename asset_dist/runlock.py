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

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

LOCK_NAME = ".asset_dist.lock"


class LockHeld(RuntimeError):
    """Another live run holds the folder; the message names it and says what to do."""


class JoinRefused(LockHeld):
    """`edit-batch --join`: the live run that holds the folder is not one this command can help."""


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
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
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
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        if job and job == os.environ.get("SLURM_JOB_ID", "") and not here and rec.get("slurm_restart") != restart:
            # one process per job takes the lock (rank 0): the same job id from another host is a requeue (the
            # same restart count: another step of this very run, e.g. a helper joining it, and the holder lives)
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


# ----------------------------------------------------------------------------------------------------------
# A lock for a whole job (torchrun / srun: several processes write into one folder)

HANDSHAKE_TIMEOUT_S = 600.0  # every rank must reach the lock within this of the others
JOB_WAIT = datetime.timedelta(days=30)  # rank 0 keeps the lock until the slowest rank is done


@contextlib.contextmanager
def job_lock(folder: str | os.PathLike, what: str, env=None, *, setup: Optional[Callable[[RunLock], Any]] = None,
             join: Optional[Callable[[dict], Any]] = None,
             wait_all: Callable[[Any], bool] = lambda payload: True) -> Iterator[Any]:
    """Hold `folder`'s lock for every process of this job (rank and world size from asset_dist.distenv).

    Rank 0 alone takes it (one holder per job, so the stale-lock rules hold), then runs `setup(lock)`; every
    rank learns the outcome over a small gloo group (one process: none needed) and yields setup's result (None
    without setup), or raises what rank 0 met (LockHeld naming the holder, setup's error). With `join`, a folder
    held by a live run of the same kind is no error: rank 0 calls join(holder's lock record), whose result is
    yielded (or whose error raised) everywhere, and the job runs beside that run without the lock (edit-batch
    --join). At the end rank 0 waits for every rank before it releases, so a second run can never start while a
    slow rank still writes - unless wait_all(the yielded value) says the work needs no such wait (edit claims: a
    new run voids what old workers hold), so ranks that stop leave at once even when a peer's node died."""
    from asset_dist.distenv import dist_env

    env = env or dist_env()
    group = _Handshake(env) if env.world_size > 1 else None
    lock, box = (_take(folder, what, setup, join, group is None) if env.rank == 0 else (None, None))
    if group is not None:
        box = group.broadcast(box)
    if box[0] is not None:
        if lock is not None:
            lock.release()
        if group is not None:
            group.close()
        if isinstance(box[0], BaseException):
            raise box[0]
        raise _ERRORS.get(box[0], RuntimeError)(box[1])
    try:
        yield box[1]
    finally:
        if group is not None and wait_all(box[1]):
            group.wait_for_all()
        if lock is not None:
            lock.release()
        if group is not None:
            group.close()


def _errors() -> dict[str, type]:
    from asset_dist.utils import InputError

    return {c.__name__: c for c in (LockHeld, JoinRefused, InputError, ValueError, OSError, RuntimeError)}


_ERRORS = _errors()


def _take(folder: str | os.PathLike, what: str, setup=None, join=None, single: bool = True
          ) -> tuple[Optional[RunLock], tuple]:
    """(the lock or None, (error, payload)) - never raises, so every rank hears the answer. error: None, or on
    one process the exception itself, else its class name (payload: the message)."""
    lock = None
    try:
        try:
            lock = RunLock(folder, what).acquire()
        except LockHeld:
            holder = RunLock(folder, what).read() or {}
            if join is None or holder.get("what") != what:
                raise
            return None, (None, join(holder))
        except OSError as e:
            raise OSError(f"{folder}: cannot take the output-folder lock ({e.strerror or e})") from None
        return lock, (None, setup(lock) if setup is not None else None)
    except Exception as e:  # noqa: BLE001 - broadcast, then raised on every rank
        if lock is not None:
            lock.release()
        if single:
            return None, (e, str(e))
        kind = next((c.__name__ for c in type(e).__mro__ if c.__name__ in _ERRORS), "RuntimeError")
        return None, (kind, str(e))  # the nearest kind the other ranks know (an InputError stays one)


class _Handshake:
    """A gloo group for the lock's two collectives (the outcome, the final wait); our own when none exists."""

    def __init__(self, env) -> None:
        import torch.distributed as dist

        from asset_dist.distenv import init_process_group

        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            init_process_group(env, "cpu", timeout_s=HANDSHAKE_TIMEOUT_S)
            self.group = None  # the default group, gloo
        else:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=HANDSHAKE_TIMEOUT_S))

    def broadcast(self, err: Optional[str]) -> Optional[str]:
        box = [err]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def wait_for_all(self) -> None:
        try:
            self.dist.monitored_barrier(group=self.group, timeout=JOB_WAIT, wait_all_ranks=True)
        except Exception as e:  # noqa: BLE001 - a rank that died: nothing left to wait for
            print(f"lock: not every rank finished cleanly ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  "releasing the output folder", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()
        elif self.group is not None:
            self.dist.destroy_process_group(self.group)

"""Edits claimed dynamically on the shared filesystem: workers of any speed, count and arrival time share a batch.

A static split by rank makes a job as slow as its slowest rank, leaves a dead node's share undone until a
restart and cannot use a worker that arrives later. Here the sorted edit ids are cut into chunks of
`infer.claim_chunk` edits and every worker (a rank of the job, or a helper started with `edit-batch --join`)
claims the next free chunk whenever it needs work:

    OUT/claims/session.json          the running batch: session id (= the output-folder lock's token), the
                                     digest of its settings and edit set, chunk size, lease
    OUT/claims/<session>/<i>.claim   chunk i is being edited: created with O_EXCL (one creator wins); holds the
                                     owner (host, pid, SLURM job, rank, worker, token); its mtime is the
                                     owner's heartbeat, touched every lease/4 by a thread of the owner
    OUT/claims/<session>/<i>.done    every edit of chunk i has its record (written before the claim is removed)

A claim is expired when its heartbeat is older than `infer.claim_lease_s`, or at once when its owner ran on
this host and that process is gone. A stealer first creates (O_EXCL) a ticket named after the expired file's
inode and mtime, so of the stealers that judged that file one goes on; it renames the file aside (a rename:
never two winners), checks it moved the very file it judged (else it links it back), and then claims the
chunk like a free one (O_EXCL again: a worker that found the chunk free in between may win instead). Before it
writes an edit (files) or a tar (shards) an owner checks that the claim file is still its own, and drops the
edits of a chunk it lost: each edit is written by one worker, whatever froze or died. Left open:
a worker frozen for longer than the lease exactly between that check and its write; and the nodes' clocks
must agree to well within the lease (mtimes are compared with the reader's clock, as for the lock).

A new run (the lock taken again: a restart, a requeue) starts a new session and removes the old session's
claims, so whatever an old worker still holds is void; what is done is known from the records themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from asset_dist.runlock import JoinRefused, _pid_alive
from asset_dist.utils import atomic_write_json

CLAIMS = "claims"
SESSION = "session.json"


class SessionGone(RuntimeError):
    """The session this worker works in was replaced by a new run of the batch (its claims are void)."""


def chunks(ids: list[str], size: int) -> list[list[str]]:
    """The sorted ids in chunks of `size` (chunk i = ids[i*size:(i+1)*size]): every worker cuts them alike."""
    ids = sorted(ids)
    return [ids[c:c + size] for c in range(0, len(ids), size)]


def edit_set_digest(eset) -> str:
    """What identifies an edit set without reading its images: the ids and, for shards, each member's size."""
    h = hashlib.sha256()
    refs = getattr(eset, "refs", None)
    for eid in eset.ids:
        h.update(eid.encode() + b"\0")
        if refs is not None:
            h.update(json.dumps(sorted((m[0], m[2]) for m in refs[eid].members)).encode())
    return h.hexdigest()


def owner(rank: int, worker: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "rank": rank, "worker": worker, "token": uuid.uuid4().hex}


# ----------------------------------------------------------------------------------------------------------
# The session: what a joining worker checks before it helps


def session_path(out: Path) -> Path:
    return Path(out) / CLAIMS / SESSION


def open_session(out: Path, token: str, plan: dict, lease_s: float) -> dict:
    """Start a new session (the caller holds the output-folder lock): old sessions' claims go, session.json
    names this one. plan: {"digest", "chunk", "n_chunks", "parts"} (parts: what the digest covers, by name)."""
    root = Path(out) / CLAIMS
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and old.name != token:
            shutil.rmtree(old, ignore_errors=True)  # void: their owners' checks fail, nothing they hold is written
    (root / token).mkdir(exist_ok=True)
    sess = {"session": token, "lease_s": lease_s, "started": time.time(), **plan}
    atomic_write_json(root / SESSION, sess)
    return sess


def read_session(out: Path) -> Optional[dict]:
    try:
        s = json.loads(session_path(out).read_text())
        return s if isinstance(s, dict) else None
    except (OSError, ValueError):
        return None


def join_session(out: Path, plan: dict, holder: dict, wait_s: float = 30.0) -> dict:
    """The session of the live edit-batch that holds `out` (holder: its lock record), if it is the same batch as
    ours (digest); else JoinRefused naming what differs. Waits up to wait_s for a holder still setting up."""
    deadline = time.monotonic() + wait_s
    while True:
        sess = read_session(out)
        if sess is not None and sess.get("session") == holder.get("token"):
            break
        if time.monotonic() > deadline:
            raise JoinRefused(f"{out} is held by {holder.get('what', 'a run')} (host {holder.get('host')}, pid "
                              f"{holder.get('pid')}) but it has no claim session to join ({session_path(out)} "
                              "missing or from another run); it may be an older version, or it is starting up: "
                              "try again")
        time.sleep(0.5)
    if not sess.get("chunk"):
        raise JoinRefused(f"the batch running in {out} splits its edits statically (infer.claim_chunk=0): "
                          "workers cannot join it; wait for it to finish")
    if sess.get("digest") != plan["digest"]:
        theirs, mine = sess.get("parts", {}), plan["parts"]
        diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine))
                if theirs.get(k) != mine.get(k)}
        raise JoinRefused(f"cannot join the batch running in {out} (host {holder.get('host')}, pid "
                          f"{holder.get('pid')}): it is another batch (running vs this command: {diff}); use the "
                          "same config, overrides and --edits, or another --out")
    return sess


# ----------------------------------------------------------------------------------------------------------
# Claims


class Board:
    """This worker's view of one session's claims. clock: wall-clock seconds (tests pass a fake one); mtimes
    are set from it and ages measured with it."""

    def __init__(self, out: Path, session: str, n_chunks: int, me: dict, lease_s: float,
                 clock: Callable[[], float] = time.time, log: Callable[[str], None] = lambda m: None):
        self.dir = Path(out) / CLAIMS / session
        self.n, self.me, self.lease_s, self.clock, self.log = n_chunks, me, float(lease_s), clock, log
        self.token = me["token"]
        self.held: set[int] = set()
        self.lost: set[int] = set()
        self.cursor = 0
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- files --------------------------------------------------------------------------------------------
    def path(self, i: int, kind: str = "claim") -> Path:
        return self.dir / f"{i:07d}.{kind}"

    def is_done(self, i: int) -> bool:
        return self.path(i, "done").exists()

    def read(self, i: int) -> Optional[dict]:
        """The claim's owner; None: no claim; {}: unreadable (an owner that died between create and write)."""
        try:
            rec = json.loads(self.path(i).read_text())
            return rec if isinstance(rec, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _touch(self, p: Path) -> None:
        now = self.clock()
        os.utime(p, (now, now))

    def _create(self, i: int) -> bool:
        p = self.path(i)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise SessionGone(f"{self.dir} is gone: a new run of this batch started") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        self._touch(p)
        return True

    # ---- expiry -------------------------------------------------------------------------------------------
    def stale_reason(self, rec: dict, age: float) -> Optional[str]:
        """Why the claim of `rec` (heartbeat `age` s old) protects nothing any more (None: it is live)."""
        host, pid = rec.get("host"), rec.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
            return f"its worker (pid {pid} on {host}) is gone"
        if age > self.lease_s:
            return f"no heartbeat for {age:.0f} s (lease {self.lease_s:g} s)"
        return None

    def steal(self, i: int) -> bool:
        """Remove chunk i's expired claim (True), or leave a live one (False). Of racing stealers one wins."""
        p = self.path(i)
        try:
            st = p.stat()
        except FileNotFoundError:
            return True  # gone already: free
        rec = self.read(i)
        if rec is None:
            return True
        if rec.get("token") == self.token:
            return False
        why = self.stale_reason(rec, self.clock() - st.st_mtime)
        if why is None:
            return False
        # one ticket per expired file (inode and mtime: a heartbeat makes a new one): of the stealers that judged
        # this very file, one goes on; tickets stay (a late stealer of an old file finds its ticket taken)
        ticket = self.dir / f".{i:07d}.steal.{st.st_ino}-{st.st_mtime_ns}"
        try:
            os.close(os.open(ticket, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            return False
        aside = self.dir / f".{i:07d}.stolen.{self.token}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(p, aside)
        except FileNotFoundError:
            return True  # the owner finished or released it meanwhile: try to claim it like a free one
        got = aside.stat()
        if (got.st_ino, got.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):  # not the file judged: a new claim
            try:
                os.link(aside, p)  # put it back (fails if a third worker claimed the chunk meanwhile)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.log(f"chunk {i}: took over the claim of {rec.get('worker', '?')} (host {rec.get('host')}, pid "
                 f"{rec.get('pid')}): {why}")
        return True

    # ---- claiming -----------------------------------------------------------------------------------------
    def try_claim(self, i: int) -> bool:
        if self.is_done(i) or not self._create(i):
            return False
        if self.is_done(i):  # finished (done written, claim removed) between our two looks
            self.path(i).unlink(missing_ok=True)
            return False
        with self._mu:
            self.held.add(i)
        return True

    def next_chunk(self) -> Optional[int]:
        """Claim the next free chunk (ascending), else an expired one; None: every chunk is done or held live."""
        while self.cursor < self.n:
            i = self.cursor
            self.cursor += 1
            if self.try_claim(i):
                return i
        for i in self.others():
            if self.steal(i) and self.try_claim(i):
                return i
        return None

    def _listing(self) -> tuple[set[str], set[str]]:
        """(chunks with a done marker, chunks with a claim file) of this session, as zero-padded names."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            raise SessionGone(f"{self.dir} is gone: a new run of this batch started") from None
        return ({n.split(".")[0] for n in names if n.endswith(".done")},
                {n.split(".")[0] for n in names if n.endswith(".claim") and not n.startswith(".")})

    def others(self) -> list[int]:
        """Chunks not done and claimed by another worker (or whose claim went without a done marker)."""
        done, claimed = self._listing()
        with self._mu:
            mine = {f"{i:07d}" for i in self.held}
        out = [int(s) for s in claimed - done - mine]
        # a chunk passed by the cursor with neither file: released by a worker that stopped; claim it again
        out += [i for i in range(min(self.cursor, self.n)) if f"{i:07d}" not in done | claimed | mine]
        return sorted(set(out))

    def owns(self, i: int) -> bool:
        """Is chunk i's claim still ours? (read right before writing its edits). A lost chunk is forgotten."""
        rec = self.read(i)
        if rec is not None and rec.get("token") == self.token:
            try:
                self._touch(self.path(i))
                return True
            except FileNotFoundError:
                pass
        with self._mu:
            if i in self.held:
                self.held.discard(i)
                self.lost.add(i)
                self.log(f"chunk {i}: claim lost (taken over by {(rec or {}).get('worker', 'another run')}): "
                         "its unwritten edits are dropped here")
        return False

    def done(self, i: int, info: dict) -> None:
        """Every edit of chunk i is written: the done marker, then the claim goes."""
        atomic_write_json(self.path(i, "done"), {**info, "worker": self.me.get("worker"), "time": self.clock()})
        self.release(i)

    def release(self, i: int) -> None:
        with self._mu:
            self.held.discard(i)
        rec = self.read(i)
        if rec is not None and rec.get("token") == self.token:
            self.path(i).unlink(missing_ok=True)

    def release_all(self) -> None:
        for i in sorted(self.held):
            self.release(i)

    def progress(self) -> tuple[int, int]:
        """(chunks done, chunks claimed by others and not done)."""
        done, claimed = self._listing()
        return len(done), len(claimed - done)

    def all_done(self) -> bool:
        return self.progress()[0] >= self.n

    # ---- heartbeat ----------------------------------------------------------------------------------------
    def beat(self) -> None:
        """Touch every claim we hold (checking each is still ours first: never touch another owner's file)."""
        with self._mu:
            held = sorted(self.held)
        for i in held:
            try:
                if (self.read(i) or {}).get("token") == self.token:
                    self._touch(self.path(i))
            except OSError:
                pass

    def start(self) -> "Board":
        period = max(0.05, self.lease_s / 4)

        def run() -> None:
            while not self._stop.wait(period):
                self.beat()
        self._thread = threading.Thread(target=run, name="asset-dist-claims", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

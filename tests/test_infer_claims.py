"""Edits claimed dynamically (asset_dist/infer/claims.py, edit-batch).

Unit tests with a fake clock: claiming is exclusive, a live claim is never taken, an expired one is taken over by
exactly one of several stealers, an owner notices a lost claim (and its edits are not written), a dead process's
claim on this host goes at once, a new session voids the old one, joining checks the digest.
End to end with real processes (tiny exports, CPU): two independent `edit-batch --join` workers, one throttled
with a SIGSTOP/SIGCONT duty cycle, finish with the bytes of a one-process run and the fast one did more; a worker
killed with SIGKILL mid-run has its claims taken over by the other, every edit written exactly once (files and
shards); a worker frozen past the lease loses its chunk to the other and drops it when it wakes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asset_dist.infer import claims as C
from asset_dist.runlock import JoinRefused
from tests.test_infer_common import REPO, check, cli, cli_env, make_exports, many_edits


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _board(out: Path, worker: str, clock: Clock, n: int = 4, lease: float = 10.0, session: str = "s1") -> C.Board:
    (out / C.CLAIMS / session).mkdir(parents=True, exist_ok=True)
    me = C.owner(0, worker)
    return C.Board(out, session, n, me, lease, clock=clock)


def test_claims_are_exclusive_and_done_chunks_stay_done(tmp_path):
    clk = Clock()
    a, b = _board(tmp_path, "a", clk), _board(tmp_path, "b", clk)
    assert a.next_chunk() == 0 and b.next_chunk() == 1 and a.next_chunk() == 2 and b.next_chunk() == 3
    assert a.next_chunk() is None and b.next_chunk() is None  # all held live
    assert a.owns(0) and not b.owns(0) and a.held == {0, 2}
    a.done(0, {"edits": 1})
    assert a.is_done(0) and not a.path(0).exists() and a.held == {2}
    assert not b.try_claim(0)  # done: never claimed again
    assert a.progress() == (1, 3)
    for i in (1, 3):
        b.done(i, {})
    a.done(2, {})
    assert a.all_done() and b.all_done()


def test_expired_claim_is_taken_over_and_the_owner_notices(tmp_path):
    clk = Clock()
    a, b = _board(tmp_path, "a", clk, n=1), _board(tmp_path, "b", clk, n=1)
    assert a.next_chunk() == 0
    clk.t += 9.0
    assert b.next_chunk() is None  # 9 s < lease 10 s: live
    a.beat()  # heartbeat: mtime = now
    clk.t += 9.0
    assert b.next_chunk() is None
    clk.t += 2.0  # 11 s since the last heartbeat
    assert b.next_chunk() == 0 and json.loads(b.path(0).read_text())["worker"] == "b"
    a.beat()  # a woke up: its heartbeat must not refresh b's claim... nor take it back
    assert json.loads(a.path(0).read_text())["token"] == b.token
    assert not a.owns(0) and 0 in a.lost and 0 not in a.held  # a drops the chunk's edits
    assert b.owns(0)
    a.release(0)  # releasing what it lost removes nothing
    assert b.path(0).exists()


def test_of_several_stealers_one_wins(tmp_path):
    clk = Clock()
    dead = _board(tmp_path, "dead", clk, n=1)
    assert dead.next_chunk() == 0
    clk.t += 100.0
    stealers = [_board(tmp_path, f"s{k}", clk, n=1) for k in range(8)]
    for s in stealers:
        s.cursor = 1  # straight to the expired claims
    got, start = [], threading.Barrier(len(stealers))

    def run(s):
        start.wait()
        got.append(s.next_chunk())
    threads = [threading.Thread(target=run, args=(s,)) for s in stealers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda x: x is None) == [0] + [None] * 7
    winner = [s for s in stealers if 0 in s.held]
    assert len(winner) == 1 and json.loads(winner[0].path(0).read_text())["token"] == winner[0].token
    assert not list((tmp_path / C.CLAIMS / "s1").glob(".*stolen*"))  # nothing left aside


def test_steal_puts_back_a_claim_renewed_in_between(tmp_path, monkeypatch):
    """The stealer judged an expired claim, but by its rename the owner woke up and beat (a new mtime): the
    stealer links the file back and loses; the owner keeps the chunk. Meanwhile other stealers of that very
    file find its ticket taken."""
    clk = Clock()
    old = _board(tmp_path, "old", clk, n=1)
    assert old.next_chunk() == 0
    clk.t += 100.0
    slow, late = _board(tmp_path, "slow", clk, n=1), _board(tmp_path, "late", clk, n=1)
    real_rename, first = os.rename, [True]

    def rename(src, dst):
        if first[0] and slow.token in str(dst):
            first[0] = False
            assert late.steal(0) is False  # the same expired file: its ticket is slow's
            old.beat()  # the owner wakes up just before the rename
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    assert slow.steal(0) is False and not first[0]
    assert old.owns(0) and 0 not in slow.held
    assert not list((tmp_path / C.CLAIMS / "s1").glob(".*stolen*"))


def test_dead_process_on_this_host_expires_at_once(tmp_path):
    clk = Clock()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    ghost = _board(tmp_path, "ghost", clk, n=1)
    ghost.me["pid"] = p.pid  # a claim written by a process of this host that is gone
    assert ghost.next_chunk() == 0
    other = _board(tmp_path, "other", clk, n=1)
    assert other.next_chunk() == 0  # no need to wait for the lease


def test_released_chunk_is_claimed_again(tmp_path):
    clk = Clock()
    a, b = _board(tmp_path, "a", clk, n=2), _board(tmp_path, "b", clk, n=2)
    assert a.next_chunk() == 0 and b.next_chunk() == 1
    assert b.next_chunk() is None
    a.release(0)  # a stopped (USR1) before finishing chunk 0
    assert b.next_chunk() == 0


def test_new_session_voids_the_old(tmp_path):
    clk = Clock()
    plan = {"digest": "d", "parts": {}, "chunk": 1, "n_chunks": 2}
    C.open_session(tmp_path, "s1", plan, 10.0)
    a = C.Board(tmp_path, "s1", 2, C.owner(0, "a"), 10.0, clock=clk)
    assert a.next_chunk() == 0
    C.open_session(tmp_path, "s2", plan, 10.0)  # a restart took the lock
    assert not a.owns(0)
    with pytest.raises(C.SessionGone):
        a.next_chunk()
    assert C.read_session(tmp_path)["session"] == "s2"


def test_join_checks_the_running_batch(tmp_path):
    parts = {"settings": {"seed": 0}, "edits": {"count": 3, "digest": "x"}}
    plan = {"digest": "d1", "parts": parts, "chunk": 2, "n_chunks": 2}
    C.open_session(tmp_path, "tok", plan, 10.0)
    holder = {"what": "edit-batch", "token": "tok", "host": "h", "pid": 1}
    assert C.join_session(tmp_path, plan, holder)["session"] == "tok"
    other = {"digest": "d2", "parts": {**parts, "settings": {"seed": 1}}, "chunk": 2, "n_chunks": 2}
    with pytest.raises(JoinRefused, match=r"another batch \(running vs this command: \{'settings': "
                                          r"\(\{'seed': 0\}, \{'seed': 1\}\)\}\)"):
        C.join_session(tmp_path, other, holder)
    with pytest.raises(JoinRefused, match="no claim session to join"):
        C.join_session(tmp_path, plan, {**holder, "token": "other"}, wait_s=0.2)
    C.open_session(tmp_path, "tok", {**plan, "chunk": 0, "n_chunks": 0}, 10.0)
    with pytest.raises(JoinRefused, match="statically"):
        C.join_session(tmp_path, plan, holder)


# ----------------------------------------------------------------------------------------------------------
# Real processes


N_EDITS = 12
S = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny exports, 12 small edits, and the one-process reference output."""
    tmp = tmp_path_factory.mktemp("claims")
    cfg = make_exports(tmp / "w")
    ids = many_edits(tmp / "edits", N_EDITS)
    base = ["edit-batch", "--config", str(cfg), "--edits", str(tmp / "edits"), "--device", "cpu",
            "--set", "infer.batch_size=2"]
    check(cli([*base, "--out", str(tmp / "ref")]))
    return {"tmp": tmp, "cfg": cfg, "ids": ids, "base": base, "ref": tmp / "ref"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "asset_dist.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _written(out: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((out / "logs").glob("rank*.jsonl")) if not p.name.endswith(".stats.jsonl")
            for x in p.read_text().splitlines()]


def _same_as_ref(world, out: Path) -> None:
    man = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["edit"] for m in man] == world["ids"] and {m["status"] for m in man} == {"ok"}
    for eid in world["ids"]:
        for k in range(S):
            assert (out / eid / f"sample_{k}.png").read_bytes() == \
                (world["ref"] / eid / f"sample_{k}.png").read_bytes(), (eid, k)


def _wait_for(cond, what: str, timeout: float = 180.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"{what}: a worker ended early: {p.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _throttle(pid: int, stop: threading.Event, on_s: float = 0.1, off_s: float = 0.1) -> None:
    """Half speed: the process runs on_s, is stopped off_s, and so on (SIGSTOP / SIGCONT from outside)."""
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(off_s)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(on_s)


def test_joined_workers_of_unequal_speed_share_the_batch(world):
    out = world["tmp"] / "joined"
    args = [*world["base"], "--out", str(out), "--join"]
    fast = _start(args)
    _wait_for(lambda: C.read_session(out) is not None, "the first worker's session", procs=[fast])
    slow = _start(args)
    stop = threading.Event()
    t = threading.Thread(target=_throttle, args=(slow.pid, stop), daemon=True)
    t.start()
    try:
        err_fast = fast.communicate(timeout=300)[1]
        err_slow = slow.communicate(timeout=300)[1]
    finally:
        stop.set()
        t.join()
        os.kill(slow.pid, signal.SIGCONT) if slow.poll() is None else None
    assert fast.returncode == 0 and slow.returncode == 0, (err_fast[-3000:], err_slow[-3000:])
    assert "(joined the running batch)" in err_slow and "(joined the running batch)" not in err_fast
    _same_as_ref(world, out)
    done = _written(out)
    assert sorted(d["edit"] for d in done) == world["ids"]  # each edit written once, by one of the two
    by = {}
    for d in done:
        by.setdefault(d["worker"], []).append(d["edit"])
    assert set(by) == {"rank0", next(w for w in by if w.startswith("rank0-"))}, by
    helper = next(w for w in by if w != "rank0")
    assert len(by["rank0"]) > len(by[helper]) >= 1, by  # the fast worker did more
    summ = json.loads((out / "summary.json").read_text())
    got = {r["worker"]: r for r in summ["ranks"]}
    assert {w: got[w]["edits"] for w in got} == {w: len(e) for w, e in by.items()}
    assert all(r["busy_s"] > 0 and r["idle_end_s"] >= 0 for r in got.values())
    assert summ["total"]["edits"] == N_EDITS and summ["nodes"][0]["workers"] == 2
    assert "idle at the end" in err_fast and "idle at the end" in err_slow


def test_join_refuses_another_batch(world, tmp_path):
    """A worker whose settings differ from the running batch's: a named error, nothing written."""
    out = tmp_path / "o"
    first = _start([*world["base"], "--out", str(out), "--join"])
    try:
        _wait_for(lambda: C.read_session(out) is not None, "the first worker's session", procs=[first])
        p = cli([*world["base"], "--out", str(out), "--join", "--samples", "3"])
        assert p.returncode != 0 and "cannot join the batch running in" in p.stderr, p.stderr[-2000:]
        assert "'samples': 2" in p.stderr and "Traceback" not in p.stderr
        p = cli([*world["base"], "--out", str(out)])  # without --join: the lock's error, as before
        assert p.returncode != 0 and "is in use by edit-batch" in p.stderr
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_killed_worker_claims_are_taken_over(world, fmt):
    """kill -9 of one of two workers mid-run: the other takes over its claims (its pid is gone on this host) and
    finishes the batch; every edit is written exactly once, the images equal the one-process run's."""
    out = world["tmp"] / f"killed_{fmt}"
    args = [*world["base"], "--out", str(out), "--join", "--out-format", fmt, "--shard-size", "2",
            "--set", "infer.claim_lease_s=600"]  # takeover by the dead pid, not by the lease
    a = _start(args)
    _wait_for(lambda: C.read_session(out) is not None, "the first worker's session", procs=[a])
    b = _start(args)
    session = out / C.CLAIMS / C.read_session(out)["session"]

    def b_holds() -> bool:
        return any(json.loads(p.read_text() or "{}").get("pid") == b.pid
                   for p in session.glob("*.claim") if p.stat().st_size)
    _wait_for(lambda: b_holds() and len(list(session.glob("*.done"))) >= 2, "worker b to hold a claim mid-run",
              procs=[a, b])
    b.kill()
    b.communicate()
    err = a.communicate(timeout=300)[1]
    assert a.returncode == 0, err[-3000:]
    assert "took over the claim of rank0-" in err and f"(pid {b.pid} on" in err
    man = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["edit"] for m in man] == world["ids"] and {m["status"] for m in man} == {"ok"}
    assert sorted(d["edit"] for d in _written(out)) == world["ids"]  # written once each, across both workers
    if fmt == "files":
        _same_as_ref(world, out)
    else:
        import io

        import numpy as np
        from PIL import Image

        from asset_dist.infer.results import open_results
        store = open_results(out)
        keys = []
        for t in sorted((out / "shards").glob("*.tar")):
            import tarfile
            with tarfile.open(t) as tar:
                keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".record.json")]
        assert sorted(keys) == world["ids"]  # each edit in exactly one tar
        for eid in world["ids"]:
            for k in range(S):
                ref = np.asarray(Image.open(world["ref"] / eid / f"sample_{k}.png"))
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(store.read_file(eid, f"sample_{k}.png")))),
                                      ref), (eid, k)


def test_frozen_worker_loses_its_chunk_and_drops_it(world):
    """A worker frozen (SIGSTOP) for longer than the lease: the other takes its chunk over and writes it; when the
    frozen one wakes, it finds the claim lost and drops that chunk's edits: every edit written once."""
    out = world["tmp"] / "frozen"
    args = [*world["base"], "--out", str(out), "--join", "--set", "infer.claim_lease_s=3"]
    a = _start(args)
    _wait_for(lambda: C.read_session(out) is not None, "the first worker's session", procs=[a])
    b = _start(args)
    session = out / C.CLAIMS / C.read_session(out)["session"]

    def held_by(pid: int) -> set[str]:
        got = set()
        for p in session.glob("*.claim"):
            try:
                if json.loads(p.read_text() or "{}").get("pid") == pid:
                    got.add(p.name)
            except (OSError, ValueError):
                pass
        return got
    _wait_for(lambda: held_by(b.pid), "worker b to hold a claim", procs=[a, b])
    b.send_signal(signal.SIGSTOP)
    try:
        frozen = held_by(b.pid)
        _wait_for(lambda: frozen & held_by(a.pid) or all((session / n).with_suffix(".done").exists() for n in frozen),
                  "worker a to take over b's chunk", procs=[a])
    finally:
        b.send_signal(signal.SIGCONT)
    err_b = b.communicate(timeout=300)[1]
    err_a = a.communicate(timeout=300)[1]
    assert a.returncode == 0 and b.returncode == 0, (err_a[-3000:], err_b[-3000:])
    assert "took over the claim of rank0-" in err_a and "no heartbeat for" in err_a, err_a[-3000:]
    assert "claim lost" in err_b, err_b[-3000:]
    assert sorted(d["edit"] for d in _written(out)) == world["ids"]  # the woken worker wrote nothing twice
    _same_as_ref(world, out)

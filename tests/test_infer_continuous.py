"""Continuous batching (asset_dist/models/decoding.py, asset_dist/infer/scheduler.py): every slot at its own
decoder position gives forward's logits (runs of any length: token steps, known chunks through the buffers,
block-kernel chunks, [start]); the continuous sampler's tokens equal the union sampler's and the uncached
oracle's on mixed holes, mixed sizes and rows finishing at different times; official SGA semantics; the
schedule's efficiency; a failing row is isolated."""
from __future__ import annotations

import pytest
import torch

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist.infer.sampler import SAMPLERS, sample_cached
from asset_dist.infer.scheduler import ContinuousSampler, Row, sample_continuous
from asset_dist.models import decoding as D
from asset_dist.models.decoding import Run, Slots
from tests.test_infer_sampler import NC, H, V, batch, gens, official_guides, tiny

torch.set_num_threads(1)


def rows_of(n, L=64, seed=5, K=2, nb=8):
    """n rows with varied holes: early, late, scattered, tiny, whole-block, starting at token 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, V, (n, L), generator=g)
    c = torch.randint(0, NC, (n, L), generator=g)
    hole = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        kind = i % 5
        if kind == 0:
            hole[i, int(torch.randint(0, L // 2, (1,), generator=g)):] = True
        elif kind == 1:
            hole[i] = torch.rand(L, generator=g) < 0.25
        elif kind == 2:
            hole[i, :2] = True
        elif kind == 3:
            hole[i, L - 3:] = True
        else:
            hole[i, 10:40] = True
    gd = {k: torch.randint(-1, nb, (2, n, H, nb, K), generator=g) for k in ("e_self", "d_causal", "d_cross")}
    return z, c, hole, gd


def random_runs(L, g, lo=1, hi=20):
    """Decoder positions 0..L cut into runs of random lengths."""
    out, p = [], 0
    while p <= L:
        n = min(int(torch.randint(lo, hi, (1,), generator=g)), L + 1 - p)
        out.append((p, n))
        p += n
    return out


@pytest.mark.parametrize("sparse,grid,side", [(False, (4, 2), 8), (True, (4, 2), 8), (True, (2, 2), 16)])
def test_slots_equal_forward(sparse, grid, side):
    """3 slots, 5 rows admitted as slots free up; every step each row feeds a run of random length (1 token,
    chunks inside a block, chunks across blocks, whole blocks, [start]; with 64-token blocks also runs longer
    than the batched call's padding); the logits at each run's end equal forward's. Rows finish at different
    times and the next row takes the slot."""
    m = tiny(grid=grid)
    L, nb = side * side, grid[0] * grid[1]
    z, c, hole, gd = rows_of(5, L=L, nb=nb)
    gd = gd if sparse else None
    full = m(z, c, hole, guides=gd, hw=(side, side))
    dec = torch.cat([torch.full((5, 1), m.start_id), m.to_strip(z, (side, side))], 1)
    g = torch.Generator().manual_seed(0)
    plans = {r: random_runs(L, g, hi=(4 if r % 2 else (20 if L == 64 else 50))) for r in range(5)}
    slots = Slots(m, 3, (side, side), sparse, "cpu", torch.float64, guide_k=2)
    queue, active, checked, step_no = list(range(5)), {}, 0, 0
    while queue or active:
        new = [(j, queue.pop(0)) for j in range(3) if j not in active and queue]
        if new:
            rs = [r for _, r in new]
            slots.admit([j for j, _ in new], z[rs], c[rs], hole[rs],
                        None if gd is None else {k: v[:, rs] for k, v in gd.items()})
            active.update({j: [r, 0] for j, r in new})
        step_no += 1
        runs, meta = [], []
        for j, (r, k) in sorted(active.items()):
            if r == 1 and step_no % 3 == 2:  # now and then a slot sits a step out
                continue
            s, n = plans[r][k]
            runs.append(Run(j, s, dec[r, s:s + n]))
            meta.append((j, r, s + n - 1))
        if not runs:
            continue
        for (j, r, p), row in zip(meta, slots.step(runs)):
            if p < L:  # position L predicts nothing
                torch.testing.assert_close(row, full[r, p], rtol=0, atol=1e-12)
                checked += 1
            active[j][1] += 1
            if active[j][1] == len(plans[r]):
                del active[j]
    assert checked == sum(len(p) for p in plans.values()) - 5
    if side == 16:  # runs of 17+ tokens inside one block took the per-slot path
        assert any(n > 16 and (s - 1) // 64 == (s + n - 3) // 64 for p in plans.values() for s, n in p if s > 0)


@pytest.mark.parametrize("leak", [False, True])
def test_slots_official_semantics_equal_decode_step(leak):
    """Official semantics (imported weights): repeats count twice, warm-up rows, self-picks that show the own
    block up to the run's last query, a pick of the next block (spill). Slots == the model's decode_step on
    the same runs, row by row (with self-picks a run's length matters, so the runs are the same)."""
    m = tiny(sga_semantics="official", causal_picks="official")
    z, c, hole = batch()
    gd = official_guides(leak=leak)
    dec = torch.cat([torch.full((3, 1), m.start_id), m.to_strip(z)], 1)
    g = torch.Generator().manual_seed(1)
    plans = [random_runs(64, g, hi=12) for _ in range(3)]
    # row 1 picks block 7 from block 6 (leak): its run 53..58 crosses from 6 into 7 (kernel); 11..15 stays in a
    # block (buffer), 1..10 and 16..35 are known chunks
    plans[1] = [(0, 1), (1, 10), (11, 5), (16, 20), (36, 9), (45, 8), (53, 6), (59, 6)]
    want = []
    for r in range(3):
        st = D.encode(m, z[r:r + 1], c[r:r + 1], hole[r:r + 1], {k: v[:, r:r + 1] for k, v in gd.items()})
        cache = D.new_cache(m)
        want.append([D.decode_step(m, st, cache, dec[r:r + 1, s:s + n], s)[0, -1] for s, n in plans[r]])
    slots = Slots(m, 3, (8, 8), True, "cpu", torch.float64, guide_k=3)
    slots.admit([0, 1, 2], z, c, hole, gd)
    for k in range(max(map(len, plans))):
        runs = [Run(r, plans[r][k][0], dec[r, plans[r][k][0]:sum(plans[r][k])]) for r in range(3)
                if k < len(plans[r])]
        out = slots.step(runs)
        for run, row in zip(runs, out):
            torch.testing.assert_close(row, want[run.slot][k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_continuous_equals_union_and_oracle(sparse):
    """Tokens of the continuous sampler == union sampler == uncached oracle, whatever the batch size, prefill
    mode and queue order, for 7 rows with mixed holes finishing at different times."""
    m = tiny()
    z, c, hole, gd = rows_of(7)
    gd = gd if sparse else None
    ref, _ = SAMPLERS["uncached"](m, z, c, hole, gens(7), guides=gd, top_k=6)
    uni, ust = sample_cached(m, z, c, hole, gens(7), guides=gd, top_k=6)
    assert torch.equal(uni, ref)
    for bs in (1, 3, 7, 9):
        for prefill in ("fused", "separate"):
            for order in ("longest", "fifo"):
                got, st = sample_continuous(m, z, c, hole, gens(7), guides=gd, top_k=6, batch_size=bs,
                                            prefill=prefill, order=order)
                assert torch.equal(got, ref), (bs, prefill, order)
                assert st.sampled == int(hole.sum()) and st.rows == 7
                assert st.steps * min(bs, 7) >= st.sampled and st.active == st.sampled
    # the union schedule steps every row at every position where any row has a hole
    assert ust.steps == int(hole.any(0).sum())
    _, st = sample_continuous(m, z, c, hole, gens(7), guides=gd, top_k=6, batch_size=7)
    assert st.steps == int(hole.sum(1).max()) < ust.steps


def test_mixed_sizes_share_one_queue():
    """Rows of two token geometries (8x8 and 16x16 tokens, 8- and 32-token blocks) in one queue: served lane by
    lane, each row's tokens equal the union sampler's (the oracle's: test above)."""
    m = tiny()
    z8, c8, h8, g8 = rows_of(3)
    z16, c16, h16, g16 = rows_of(3, L=256, seed=9)
    rows, want = [], {}
    for tag, (z, c, h, gd, hw) in {"s": (z8, c8, h8, g8, (8, 8)), "l": (z16, c16, h16, g16, (16, 16))}.items():
        ref, _ = sample_cached(m, z, c, h, gens(3, tag), guides=gd, top_k=6, hw=hw)
        for i in range(3):
            want[(tag, i)] = ref[i]
    gs = {"s": gens(3, "s"), "l": gens(3, "l")}
    for i in range(3):  # interleaved
        rows.append(Row(("s", i), z8[i], c8[i], h8[i], gs["s"][i], (8, 8), {k: v[:, i] for k, v in g8.items()}))
        rows.append(Row(("l", i), z16[i], c16[i], h16[i], gs["l"][i], (16, 16), {k: v[:, i] for k, v in g16.items()}))
    got = {}
    st = ContinuousSampler(m, 2, top_k=6).run(rows, lambda r, t: got.__setitem__(r.key, t))
    assert st.lanes == 2 and set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_official_continuous_equals_rows_alone():
    """Official semantics with self-picks: a row's result no longer depends on its batch companions: the
    continuous sampler at any batch == the union sampler run on each row alone."""
    m = tiny(sga_semantics="official", causal_picks="official")
    z, c, hole = batch()
    gd = official_guides(leak=True)
    alone = torch.stack([sample_cached(m, z[i:i + 1], c[i:i + 1], hole[i:i + 1], gens(3)[i:i + 1],
                                       guides={k: v[:, i:i + 1] for k, v in gd.items()}, top_k=6)[0][0]
                         for i in range(3)])
    for bs in (1, 3):
        got, _ = sample_continuous(m, z, c, hole, gens(3), guides=gd, top_k=6, batch_size=bs)
        assert torch.equal(got, alone)


def test_fp32_batch_invariance():
    m = tiny(torch.float32)
    z, c, hole, gd = rows_of(6)
    uni, _ = sample_cached(m, z, c, hole, gens(6), guides=gd, top_k=5)
    for bs in (1, 4):
        got, _ = sample_continuous(m, z, c, hole, gens(6), guides=gd, top_k=5, batch_size=bs)
        assert torch.equal(got, uni)


def test_a_failing_row_is_isolated():
    """A row whose sampling raises (here: a pick outside the block grid, caught by the encoder) fails alone;
    the rows that shared its steps are re-run alone and finish with the oracle's tokens."""
    m = tiny()
    z, c, hole, gd = rows_of(5)
    ref, _ = SAMPLERS["uncached"](m, z, c, hole, gens(5), guides=gd, top_k=6)
    bad = {k: v.clone() for k, v in gd.items()}
    bad["e_self"][0, 3, 0, 0, 0] = 99
    rows = [Row(i, z[i], c[i], hole[i], gens(5)[i], (8, 8), {k: v[:, i] for k, v in bad.items()}) for i in range(5)]
    got, failed = {}, {}
    ContinuousSampler(m, 3, top_k=6).run(rows, lambda r, t: got.__setitem__(r.key, t),
                                          lambda r, e: failed.__setitem__(r.key, e))
    assert list(failed) == [3] and "block ids" in str(failed[3])
    assert sorted(got) == [0, 1, 2, 4] and all(torch.equal(got[i], ref[i]) for i in got)
    with pytest.raises(ValueError, match="block ids"):
        ContinuousSampler(m, 3, top_k=6).run(rows, lambda r, t: None)

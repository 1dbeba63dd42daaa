"""SGA layout and kernels against an independent dense oracle (outputs and gradients, float64)."""
import itertools
import os

import pytest
import torch

from asset_dist.attention import (
    IMPLS,
    block_ids,
    block_table,
    dense_attention,
    inverse_strip_order,
    pick_blocks,
    resolve_impl,
    sga_attention,
    sga_mask,
    strip_order,
    visible_key_blocks,
    visible_key_positions,
    window_table,
)
from asset_dist.attention import sga as sga_mod

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")  # eager flex: unfused (known)
GRIDS = [(16, 4), (8, 8)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny kernels on a shared 2-core machine: intra-op threads only add wake-up latency."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------
# Layout


def test_strip_order_matches_facts_formula():
    # ASSET fixture README 3c: at t=32, strip index of (row, col) = (4*(row//2) + col//8)*16 + (row%2)*8 + col%8
    t = 32
    perm = strip_order(t, t)
    expect = torch.empty(t * t, dtype=torch.long)
    for row, col in itertools.product(range(t), range(t)):
        expect[(4 * (row // 2) + col // 8) * 16 + (row % 2) * 8 + col % 8] = row * t + col
    assert torch.equal(perm, expect)
    x = torch.randn(3, t * t)
    assert torch.equal(x[..., perm][..., inverse_strip_order(t, t)], x)


@pytest.mark.parametrize("grid", GRIDS)
def test_strip_order_is_block_major(grid):
    h = w = 32
    perm = strip_order(h, w, grid)
    bs = h * w // (grid[0] * grid[1])
    assert torch.equal(block_ids(h, w, grid)[perm], torch.arange(h * w) // bs)
    assert torch.equal(torch.sort(perm).values, torch.arange(h * w))


def test_strip_order_at_guide_resolution_is_raster():
    assert torch.equal(strip_order(16, 16), torch.arange(256))  # 1x4 blocks (docs/ASSET_NOTES.md §5.1)


def test_block_ids_values():
    ids = block_ids(64, 64).view(64, 64)  # 4x16-token blocks
    assert ids[0, 0] == 0 and ids[0, 16] == 1 and ids[3, 63] == 3 and ids[4, 0] == 4 and ids[63, 63] == 63


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        strip_order(30, 32)


def test_window_and_union_semantics():
    assert window_table(64, False)[0].tolist() == [-1, 0, 1]
    assert window_table(64, False)[63].tolist() == [62, 63, -1]
    assert window_table(64, True)[1].tolist() == [-1, 0, 1]
    g = torch.full((1, 1, 64, 3), -1)
    g[0, 0, 10] = torch.tensor([11, 3, 3])  # non-causal: 11 is a window block, 3 repeated
    t = block_table(g, 64, False)[0, 0, 10].tolist()
    assert t == [9, 10, 11, -1, 3, -1]
    g[0, 0, 10] = torch.tensor([8, 12, 2])  # causal: 8 in the window, 12 in the future
    t = block_table(g, 64, True)[0, 0, 10].tolist()
    assert t == [8, 9, 10, -1, -1, 2]


def test_visible_key_blocks():
    assert visible_key_blocks(10, [11, 3, -1], 64, False).tolist() == [3, 9, 10, 11]
    assert visible_key_blocks(10, [8, 12, 2], 64, True).tolist() == [2, 8, 9, 10]
    assert visible_key_blocks(0, None, 64, True).tolist() == [0]
    with pytest.raises(ValueError):
        visible_key_blocks(64, None, 64, False)


# ----------------------------------------------------------------------------------------------------------
# Oracle: a mask written straight from the spec with Python loops (independent of block_table)


def brute_mask(L, guide, n_blocks, causal, prefix):
    B, H = guide.shape[:2]
    bs = L // n_blocks
    m = torch.zeros(B, H, L, prefix + L, dtype=torch.bool)
    m[..., :prefix] = True
    for b, h, qb in itertools.product(range(B), range(H), range(n_blocks)):
        win = [qb - 2, qb - 1, qb] if causal else [qb - 1, qb, qb + 1]
        blocks = {x for x in win if 0 <= x < n_blocks} | {int(x) for x in guide[b, h, qb] if x >= 0}
        for kb in blocks:
            m[b, h, qb * bs:(qb + 1) * bs, prefix + kb * bs:prefix + (kb + 1) * bs] = True
    if causal:
        m[..., prefix:] &= torch.ones(L, L, dtype=torch.bool).tril()
    return m


def rand_guide(B, H, nb, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, nb, (B, H, nb, K), generator=g)  # pads, repeats, window and future picks


def problem(grid, causal, prefix, seed=0, bs=4, B=2, H=2, D=8, dtype=torch.float64):
    nb = grid[0] * grid[1]
    L = nb * bs
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    pk = torch.randn(B, H, prefix, D, generator=gen, dtype=dtype).requires_grad_() if prefix else None
    pv = torch.randn(B, H, prefix, D, generator=gen, dtype=dtype).requires_grad_() if prefix else None
    guide = rand_guide(B, H, nb, 3, seed)
    return q, k, v, pk, pv, guide


def oracle(q, k, v, pk, pv, guide, grid, causal):
    nb = grid[0] * grid[1]
    P = 0 if pk is None else pk.shape[2]
    mask = brute_mask(q.shape[2], guide, nb, causal, P)
    kk, vv = (k, v) if pk is None else (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
    return dense_attention(q, kk, vv, mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix", [0, 2])
def test_sga_mask_matches_brute_force(causal, prefix):
    for grid in GRIDS:
        guide = rand_guide(2, 3, 64, 3, seed=1)
        m = sga_mask(256, guide, grid, causal, prefix)
        assert torch.equal(m, brute_mask(256, guide, 64, causal, prefix))


def test_visible_key_helpers_agree_with_mask():
    guide = rand_guide(1, 1, 64, 3, seed=2)
    for causal in (False, True):
        m = sga_mask(64, guide, (16, 4), causal)[0, 0]  # 1-token blocks: mask = block visibility
        for b in range(64):
            assert visible_key_blocks(b, guide[0, 0, b], 64, causal).tolist() == torch.nonzero(m[b]).flatten().tolist()
        m = sga_mask(256, guide, (16, 4), causal)[0, 0]  # 4-token blocks: every query position
        for pos in range(256):
            keys = visible_key_positions(pos, guide[0, 0, pos // 4], 64, 4, causal)
            assert keys.tolist() == torch.nonzero(m[pos]).flatten().tolist()


def _check(impl_fn, grid, causal, prefix, grads=True, seed=0, **kw):
    q, k, v, pk, pv, guide = problem(grid, causal, prefix, seed=seed, **kw)
    inputs = [q, k, v] + ([pk, pv] if prefix else [])
    ref = oracle(q, k, v, pk, pv, guide, grid, causal)
    if not grads:
        with torch.no_grad():
            pre = [None if x is None else x.detach() for x in (pk, pv)]
            out = impl_fn(q.detach(), k.detach(), v.detach(), guide, *pre)
        torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=0)
        return
    out = impl_fn(q, k, v, guide, pk, pv)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    go = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, go)
    g_out = torch.autograd.grad(out, inputs, go)
    for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=lambda m: f"grad {name}: {m}")


BACKWARD_IMPLS = ["gather", "sdpa_gather", "dense_mask"]


@pytest.mark.parametrize("impl", BACKWARD_IMPLS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_kernels_match_oracle(impl, grid, causal, prefix):
    def fn(q, k, v, guide, pk, pv):
        return sga_attention(q, k, v, guide, grid, causal, pk, pv, impl=impl)

    _check(fn, grid, causal, prefix)


@pytest.mark.parametrize("impl", ["gather", "sdpa_gather"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_with_small_chunks(monkeypatch, impl, causal):
    # A chunk smaller than a head splits rows into clean (unmasked / shared-triangle) and masked chunks.
    monkeypatch.setattr(sga_mod, "_CHUNK_BYTES", 3000)

    def fn(q, k, v, guide, pk, pv):
        return sga_attention(q, k, v, guide, (16, 4), causal, pk, pv, impl=impl)

    _check(fn, (16, 4), causal, prefix=1, bs=8)
    # realistic picks: most rows clean
    q, k, v, pk, pv, _ = problem((16, 4), causal, 0, bs=8)
    guide = pick_blocks(torch.rand(2, 2, 64, 64, dtype=torch.float64), 3, causal)
    ref = oracle(q, k, v, None, None, guide, (16, 4), causal)
    torch.testing.assert_close(fn(q, k, v, guide, None, None), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_sdpa_gather_checkpointed_path(causal, prefix):
    """The non-CPU sdpa_gather path (public SDPA + activation checkpointing), run here on CPU."""
    def fn(q, k, v, guide, pk, pv):
        table = block_table(guide, 64, causal)
        return sga_mod._sdpa_gather_checkpointed(q, k, v, table, causal, pk, pv)

    _check(fn, (16, 4), causal, prefix)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_flex_eager_forward_matches_oracle(grid, causal, prefix):
    def fn(q, k, v, guide, pk, pv):
        return sga_attention(q, k, v, guide, grid, causal, pk, pv, impl="flex_eager")

    _check(fn, grid, causal, prefix, grads=False)


@pytest.mark.parametrize("tile", [16, 32, 128])
def test_flex_block_mask_tiles(tile):
    # Tiles smaller than, equal to and larger than the 16-token blocks.
    for causal in (False, True):
        q, k, v, pk, pv, guide = problem((16, 4), causal, 1, bs=16, B=1)
        ref = oracle(q, k, v, pk, pv, guide, (16, 4), causal)
        with torch.no_grad():
            out = sga_mod.flex_sga(q.detach(), k.detach(), v.detach(), block_table(guide, 64, causal), causal,
                                   pk.detach(), pv.detach(), compiled=False, tile=tile)
        torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=0)


@pytest.mark.skipif(os.environ.get("ASSET_TEST_COMPILE") != "1",
                    reason="torch.compile of flex takes ~20-40 s per shape on this CPU; set ASSET_TEST_COMPILE=1")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_compiled_forward_matches_oracle(causal):
    q, k, v, pk, pv, guide = problem((16, 4), causal, 1, bs=16, B=1, D=16, dtype=torch.float32)
    ref = oracle(q, k, v, pk, pv, guide, (16, 4), causal).detach()
    with torch.no_grad():
        out = sga_attention(q, k, v, guide, (16, 4), causal, pk, pv, impl="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_float32_auto_matches_oracle():
    q, k, v, pk, pv, guide = problem((16, 4), True, 1, bs=16, dtype=torch.float32)
    ref = oracle(q, k, v, pk, pv, guide, (16, 4), True)
    out = sga_attention(q, k, v, guide, (16, 4), True, pk, pv)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    out.sum().backward()  # auto picks a kernel with backward on CPU


def test_resolve_impl_and_errors():
    q = torch.zeros(1, 1, 1024, 8)
    assert resolve_impl("auto", q, block_size=16) == "sdpa_gather"
    assert resolve_impl("auto", q, block_size=4) == "dense_mask"
    assert resolve_impl("gather", q) == "gather"
    assert set(IMPLS) >= {"gather", "sdpa_gather", "flex", "dense_mask"}
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("fast", q)
    q, k, v, _, _, guide = problem((16, 4), False, 0)
    with pytest.raises(ValueError, match=r"\[-1, 64\)"):
        sga_attention(q, k, v, guide + 64, (16, 4))
    with pytest.raises(ValueError, match="no backward on CPU"):
        sga_attention(q, k, v, guide, (16, 4), impl="flex")
    with pytest.raises(ValueError, match="multiple"):
        sga_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], guide, (16, 4))


# ----------------------------------------------------------------------------------------------------------
# Sparse means sparse: peak memory at L = 4096 stays far below one L x L score matrix per head


def peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("impl", ["gather", "sdpa_gather"])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_paths_never_allocate_l_by_l(impl, causal):
    B, H, L, D = 1, 2, 4096, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).requires_grad_() for _ in range(3))
    guide = pick_blocks(torch.rand(B, H, 64, 64, generator=gen), 3, causal)
    dense_scores = L * L * 4 * H  # one fp32 score matrix per head: 128 MiB

    def step():
        sga_attention(q, k, v, guide, (16, 4), causal, impl=impl).sum().backward()

    peak = peak_bytes(step)
    assert peak < dense_scores / 4, f"{impl}: peak {peak / 2**20:.0f} MiB"
    assert peak > 3 * q.numel() * 4  # sanity: at least the output and the q/k/v grads were seen

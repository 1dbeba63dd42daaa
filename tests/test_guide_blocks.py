"""guide_blocks / pick_blocks: brute-force references, the union semantics, and the official fixture picks."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asset_dist.attention import (
    guide_blocks,
    official_mask,
    pick_blocks,
    pool_blocks,
    sga_mask,
)
from asset_dist.official.guides import causal_rows_from_official, causal_rows_to_official

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_asset"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny kernels on a shared 2-core machine: intra-op threads only add wake-up latency."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixture(name: str):
    return np.load(FIXTURES / name)  # part of the repository: a missing file is a failure


# ----------------------------------------------------------------------------------------------------------
# Brute-force references written from the spec


def brute_pool(attn, nb):
    L = attn.shape[-1]
    bs = L // nb
    out = torch.zeros(*attn.shape[:-2], nb, nb, dtype=torch.float64)
    for i, j in itertools.product(range(nb), range(nb)):
        out[..., i, j] = attn[..., i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].double().mean((-2, -1))
    return out


def brute_pick(pooled, k, causal):
    nb = pooled.shape[-1]
    flat = pooled.reshape(-1, nb, nb)
    out = torch.full((flat.shape[0], nb, k), -1, dtype=torch.long)
    for m, b in itertools.product(range(flat.shape[0]), range(nb)):
        allowed = [c for c in range(nb) if (c < b - 2 if causal else abs(c - b) > 1)]
        best = sorted(allowed, key=lambda c: -float(flat[m, b, c]))[:k]
        out[m, b, :len(best)] = torch.tensor(best, dtype=torch.long)
    return out.view(*pooled.shape[:-1], k)


@pytest.mark.parametrize("L", [256, 1024])
def test_pool_blocks_matches_brute_force(L):
    attn = torch.rand(2, 3, L, L)
    torch.testing.assert_close(pool_blocks(attn, (16, 4)).double(), brute_pool(attn, 64), atol=1e-6, rtol=0)


def test_pool_blocks_equals_official_avg_pool_at_256():
    attn = torch.softmax(torch.randn(2, 4, 256, 256), -1)
    torch.testing.assert_close(pool_blocks(attn, (16, 4)), F.avg_pool2d(attn, 4, 4), atol=1e-7, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_pick_blocks_fixed_matches_brute_force(causal, k):
    pooled = torch.rand(2, 3, 64, 64)
    assert torch.equal(pick_blocks(pooled, k, causal), brute_pick(pooled, k, causal))


def test_guide_blocks_is_pool_then_pick():
    attn = torch.softmax(torch.randn(1, 2, 1024, 1024), -1)
    for causal in (False, True):
        assert torch.equal(guide_blocks(attn, (8, 8), 3, causal), brute_pick(brute_pool(attn, 64), 3, causal))


def test_fixed_picks_never_touch_the_window_or_future():
    pooled = torch.rand(4, 64, 64)
    full = pick_blocks(pooled, 3, False)
    b = torch.arange(64)[:, None]
    assert ((full - b).abs() > 1).all() and (full >= 0).all()
    causal = pick_blocks(pooled, 3, True)
    assert ((causal < b - 2) | (causal == -1)).all()
    assert (causal[:, :3] == -1).all()  # blocks 0-2 have nothing before b-2
    assert (causal[:, 3] == torch.tensor([0, -1, -1])).all()
    assert (causal[:, 4].sort(-1).values == torch.tensor([-1, 0, 1])).all()
    assert (causal[:, 5].sort(-1).values == torch.tensor([0, 1, 2])).all()
    assert (causal[:, 6:] >= 0).all()


def test_small_block_grid_pads():
    picks = pick_blocks(torch.rand(4, 4), 3, False)  # 4 blocks: block 0 may pick only 2 and 3
    assert picks[0].sort().values.tolist() == [-1, 2, 3]
    assert picks[1].tolist()[1:] == [-1, -1]


@pytest.mark.parametrize("mode", ["fixed", "official"])
def test_early_decoder_blocks_are_dense_causal(mode):
    """With the window+guide union, fixed picks make blocks 0..k+2 dense causal; official mode blocks 0..4."""
    pooled = torch.rand(1, 2, 64, 64)
    guide = pick_blocks(pooled, 3, True, mode)
    bs = 2
    m = sga_mask(64 * bs, guide, (16, 4), True)
    dense_causal = torch.ones(64 * bs, 64 * bs, dtype=torch.bool).tril()
    last = 5 if mode == "fixed" else 4
    rows = slice(0, (last + 1) * bs)
    assert torch.equal(m[..., rows, :], dense_causal[rows].expand_as(m[..., rows, :]))
    if mode == "fixed":  # from block 6 on 3 of the earlier blocks are skipped
        assert not m[0, 0, 6 * bs, :7 * bs].all()


# ----------------------------------------------------------------------------------------------------------
# Official mode against the fixtures of the official code


def test_official_masks_match_fixture():
    idx = fixture("sga_indices.npz")
    assert torch.equal(official_mask(64, False), torch.from_numpy(idx["rand_full_mask"]))
    assert torch.equal(official_mask(64, True), torch.from_numpy(idx["rand_causal_mask"]))


@pytest.mark.parametrize("name,causal", [("e_self", False), ("d_cross", False), ("d_causal", True)])
def test_official_picks_match_fixture_exactly(name, causal):
    pooled = torch.from_numpy(fixture("guide_dense_256.npz")[f"pooled_{name}"])
    expect = torch.from_numpy(fixture("sga_indices.npz")[f"{name}_rand_attn"])
    picks = pick_blocks(pooled, 3, causal, "official")
    assert picks.shape == (2, 1, 4, 64, 3)
    if causal:
        assert torch.equal(causal_rows_to_official(picks), expect)
        assert torch.equal(causal_rows_from_official(expect), picks)  # warm-up rows are the same fill
    else:
        assert torch.equal(picks, expect)
    fixed = pick_blocks(pooled, 3, causal, "fixed")
    if causal:
        # docs/ASSET_NOTES.md §10.1: the two modes differ exactly at blocks 5 and 6, where the official picks leak
        differs = (causal_rows_to_official(fixed) != expect).any(-1).flatten(0, -2).any(0)
        assert torch.nonzero(differs).flatten().tolist() == [0, 1]
        b = torch.arange(5, 64)[:, None]
        leak = (expect >= b - 2)
        assert leak[..., 0, :].any() and leak[..., 1, :].any() and not leak[..., 2:, :].any()
        assert (expect[0, 0, 0, 0] == torch.tensor([0, 2, 3])).all()  # README 3b: block 5, layer 0 head 0
    else:
        assert torch.equal(fixed, expect)


def test_pooling_fp16_full_maps_reproduces_pooled_maps():
    full = fixture("guide_attn_full_fp16.npz")
    pooled = fixture("guide_dense_256.npz")
    maps = {
        "e_self": torch.from_numpy(full["encoder_self"]),
        "d_causal": torch.from_numpy(full["decoder_causal"])[..., 1:, 1:],  # drop the [start] row and column
        "d_cross": torch.from_numpy(full["decoder_cross"])[..., 1:, :],  # drop the [start] query row
    }
    for name, attn in maps.items():
        torch.testing.assert_close(pool_blocks(attn, (16, 4)), torch.from_numpy(pooled[f"pooled_{name}"]),
                                   atol=1e-3, rtol=0)


def test_converters_round_trip_and_validate():
    picks = torch.randint(0, 64, (2, 3, 59, 3))
    ours = causal_rows_from_official(picks)
    assert ours.shape == (2, 3, 64, 3)
    assert ours[0, 0, :5].tolist() == [[-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [0, -1, -1], [0, 1, -1]]
    assert torch.equal(causal_rows_to_official(ours), picks)
    with pytest.raises(ValueError, match="59 rows"):
        causal_rows_from_official(picks[..., :58, :])
    with pytest.raises(ValueError, match="unknown pick mode"):
        pick_blocks(torch.rand(64, 64), 3, False, "paper")

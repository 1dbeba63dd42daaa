"""The samplers: KV-cached == official block re-run == uncached full forward (same seeds), dense and SGA, for a
batch whose rows have different holes; batch invariance; only hole tokens change; top-k / temperature rules;
guide picks and their storage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asset_dist.config import TransformerConfig
from asset_dist.infer import guides as G
from asset_dist.infer.decode import IncrementalTransformer
from asset_dist.infer.sampler import SAMPLERS, pick_tokens, row_generator, sample_cached
from asset_dist.models.transformer import AssetTransformer

torch.set_num_threads(1)
V, NC, H = 16, 8, 4


def tiny(dtype=torch.float64, grid=(4, 2), seed=0, cls=AssetTransformer) -> AssetTransformer:
    cfg = TransformerConfig(vocab_size=V, cond_vocab_size=NC, d_model=32, n_heads=H, ffn_dim=64, encoder_layers=2,
                            decoder_layers=2, block_grid=list(grid), max_position_embeddings=4)
    torch.manual_seed(seed)
    m = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # peaked logits: samples depend on the context, so mistakes in it show
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def batch(B=3, L=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, V, (B, L), generator=g)
    c = torch.randint(0, NC, (B, L), generator=g)
    hole = torch.zeros(B, L, dtype=torch.bool)
    hole[0, 5:30] = True  # rows with different holes, including one that starts at token 0
    hole[1] = torch.rand(L, generator=g) < 0.3
    hole[2, :3] = True
    hole[2, 50:] = True
    return z, c, hole


def guides(B=3, nb=8, K=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-1, nb, (2, B, H, nb, K), generator=g) for k in ("e_self", "d_causal", "d_cross")}


def gens(n, phase="t", seed=0):
    return [row_generator(seed, f"edit{i}", i % 2, phase) for i in range(n)]


@pytest.mark.parametrize("sparse", [False, True])
def test_incremental_transformer_decodes_like_forward(sparse):
    """Token-granular SGA steps (infer/decode.py) == the model's forward, for runs of any length, and the same
    state dict as the base model."""
    m, f = tiny(), tiny(cls=IncrementalTransformer)
    assert m.state_dict().keys() == f.state_dict().keys()
    z, c, hole = batch()
    gd = guides() if sparse else None
    full = m(z, c, hole, guides=gd)
    st, cache = f.encode(z, c, hole, gd), f.new_cache()
    assert (st.tables is not None) == sparse
    dec = torch.cat([torch.full((3, 1), f.start_id), f.to_strip(z)], 1)
    outs, p = [], 0
    for n in (1, 1, 2, 5, 9, 1, 1, 1, 15, 28):  # below and above the block size (8)
        outs.append(f.decode_step(st, cache, dec[:, p:p + n], p))
        p += n
    torch.testing.assert_close(torch.cat(outs, 1), full.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_cached_equals_block_rerun_and_uncached(sparse):
    m, fast = tiny(), tiny(cls=IncrementalTransformer)
    z, c, hole = batch()
    gd = guides() if sparse else None
    out = {name: fn(m, z, c, hole, gens(3), guides=gd, top_k=6, temperature=1.0) for name, fn in SAMPLERS.items()}
    out["cached_incremental"] = SAMPLERS["cached"](fast, z, c, hole, gens(3), guides=gd, top_k=6, temperature=1.0)
    ref, st = out["uncached"]
    for name, (tok, s) in out.items():
        assert torch.equal(tok, ref), name
        assert s.sampled == int(hole.sum()) and s.steps == int(hole.any(0).sum())
    assert torch.equal(torch.where(hole, z, ref), z)  # known tokens are kept
    assert (ref[hole] != z[hole]).float().mean() > 0.5  # and the hole really is resampled
    # the cached sampler feeds every decoder position once; the re-run strategy much more
    assert out["cached"][1].fed <= 64 < out["block_rerun"][1].fed


@pytest.mark.parametrize("sparse", [False, True])
def test_batch_invariance_fp32(sparse):
    """Each row sampled alone (other schedule, batch 1) gives the same tokens as in the batch: the randomness
    is per row, and the sampling rule does not see float noise between batch shapes."""
    m = tiny(torch.float32, cls=IncrementalTransformer)
    z, c, hole = batch()
    gd = guides() if sparse else None
    both, _ = sample_cached(m, z, c, hole, gens(3), guides=gd, top_k=5)
    for i in range(3):
        gi = None if gd is None else {k: v[:, i:i + 1] for k, v in gd.items()}
        one, _ = sample_cached(m, z[i:i + 1], c[i:i + 1], hole[i:i + 1], gens(3)[i:i + 1], guides=gi, top_k=5)
        assert torch.equal(one[0], both[i])
    # and the seed matters
    other, _ = sample_cached(m, z, c, hole, gens(3, seed=1), guides=gd, top_k=5)
    assert not torch.equal(other, both)


def test_pick_rules():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 3.0, 0.0, 0.0]])
    g = gens(2)
    assert pick_tokens(logits, g, top_k=1, temperature=1.0).tolist() == [1, 0]  # ties: lowest id first
    assert pick_tokens(logits, g, top_k=4, temperature=0.0).tolist() == [1, 0]  # temperature 0 = greedy
    draws = torch.stack([pick_tokens(logits, g, top_k=2, temperature=1.0) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 1}  # only the top 2
    frac = (draws[:, 0] == 1).float().mean().item()  # softmax([5, 4.9]) = [0.525, 0.475]
    assert 0.4 < frac < 0.65
    # the stream is per row: row 1's draws do not depend on row 0 being sampled too
    a = pick_tokens(logits, gens(2), top_k=4, temperature=1.0)
    b = pick_tokens(logits[1:], gens(2)[1:], top_k=4, temperature=1.0)
    assert a[1] == b[0]
    with pytest.raises(FloatingPointError):
        pick_tokens(torch.tensor([[float("nan"), 0.0]]), gens(1), 2, 1.0)


def test_guide_picks_and_storage(tmp_path):
    """At 256 (16x16 tokens, 64 blocks of 1x4) the guide's completion + teacher-forced maps -> picks; stored
    compactly and read back; a fingerprint mismatch reads as missing."""
    m = tiny(torch.float32, grid=(16, 4))
    g = torch.Generator().manual_seed(3)
    z = torch.randint(0, V, (2, 256), generator=g)
    c = torch.randint(0, NC, (2, 256), generator=g)
    hole = torch.zeros(2, 256, dtype=torch.bool)
    hole[0, 100:180] = True
    hole[1, 0:40] = True
    tokens, picks, stats = G.run_guide(m, z, c, hole, gens(2), top_k=8, temperature=1.0)
    assert stats.sampled == 120 and torch.equal(torch.where(hole, z, tokens), z)
    assert {k: tuple(v.shape) for k, v in picks.items()} == {"e_self": (2, 2, H, 64, 3), "d_causal": (2, 2, H, 64, 3),
                                                           "d_cross": (2, 2, H, 64, 3)}
    b = torch.arange(64).view(64, 1)
    d = picks["d_causal"]
    assert ((d < b - 2) | (d == -1)).all()  # causal picks only before the window ("fixed" rows)
    assert ((picks["e_self"] - b).abs() > 1).all()  # never a window block
    # one row alone gives the same picks (per-row maps pass)
    _, p1, _ = G.run_guide(m, z[1:], c[1:], hole[1:], gens(2)[1:], top_k=8, temperature=1.0)
    assert all(torch.equal(p1[k][:, 0], picks[k][:, 1]) for k in picks)
    fp = {"guide": "abc", "seed": 0}
    path = G.picks_path(tmp_path, "e", 1)
    G.save_picks(path, G.row_picks(picks, 1), tokens[1], fp)
    with np.load(path) as f:
        assert f["e_self"].dtype == np.int8 and f["tokens"].dtype == np.int16
    got, tok = G.load_picks(path, fp)
    assert all(torch.equal(got[k], picks[k][:, 1]) for k in picks) and torch.equal(tok, tokens[1])
    assert G.load_picks(path, {**fp, "seed": 1}) is None and G.load_picks(tmp_path / "none.npz", fp) is None
    stacked = G.stack_picks([G.row_picks(picks, 0), got])
    assert all(torch.equal(stacked[k], picks[k]) for k in picks)


def test_gather_rows_layouts():
    """Row gather over the storage == plain indexing, for the layouts decode steps meet: the cache sliced past
    [start], the cross-attention keys (a transposed view), a batch-expanded tensor, and a fallback layout."""
    from asset_dist.infer.decode import gather_rows

    g = torch.Generator().manual_seed(0)
    B, Hh, L, d = 2, 3, 12, 4
    cache = torch.randn(B, Hh, L + 1, d, generator=g)
    cross = torch.randn(B, L, Hh, d, generator=g).transpose(1, 2)
    one = torch.randn(1, Hh, L, d, generator=g).expand(B, Hh, L, d)
    odd = torch.randn(B, Hh, d, L, generator=g).transpose(2, 3)  # last dim not contiguous: fallback
    idx = torch.randint(0, L, (B, Hh, 7), generator=g)
    for x in (cache[:, :, 1:], cross, one, odd):
        want = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(Hh)]) for b in range(B)])
        assert torch.equal(gather_rows(x, idx), want)

"""The samplers: KV-cached == official block re-run == uncached full forward (same seeds), dense and SGA, for a
batch whose rows have different holes; batch invariance; only hole tokens change; top-k / temperature rules;
guide picks and their storage. And `decode_step`'s token steps (per-block key/value buffers) == forward, at
block boundaries, after known chunks, when rewinding, in both SGA semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist.config import TransformerConfig
from asset_dist.infer import guides as G
from asset_dist.infer.sampler import SAMPLERS, pick_tokens, row_generator, sample_cached
from asset_dist.models import decoding as D
from asset_dist.models.transformer import AssetTransformer

torch.set_num_threads(1)
V, NC, H = 16, 8, 4


def tiny(dtype=torch.float64, grid=(4, 2), seed=0, **kw) -> AssetTransformer:
    cfg = TransformerConfig(vocab_size=V, cond_vocab_size=NC, d_model=32, n_heads=H, ffn_dim=64, encoder_layers=2,
                            decoder_layers=2, block_grid=list(grid), max_position_embeddings=4, **kw)
    torch.manual_seed(seed)
    m = AssetTransformer(cfg).to(dtype).eval()
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


# runs of decoder positions (tiny: 8 blocks of nt = 8): [start]; a block's first token; a run ending on a
# block's last token; a known chunk (>= nt: block kernel) ending inside a block, then token steps in that block
# (its buffers gathered from the chunk's cache); a short run across two blocks; a chunk ending on a block's last
# token, then its next block's first token
RUNS = (1, 1, 2, 5, 1, 9, 1, 3, 7, 11, 1, 6, 1, 7, 2, 6)


def decode_runs(m, st, dec, runs=RUNS, cache=None, p=0):
    cache = cache or D.new_cache(m)
    outs = []
    for n in runs:
        outs.append(D.decode_step(m, st, cache, dec[:, p:p + n], p))
        p += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("sparse", [False, True])
def test_token_steps_decode_like_forward(sparse):
    """decode_step == forward for runs of any length: token steps through the per-block buffers, block-kernel
    chunks, and both mixed (see RUNS); rewinding into an earlier block re-gathers the buffers."""
    m = tiny()
    z, c, hole = batch()
    gd = guides() if sparse else None
    full = m(z, c, hole, guides=gd)
    st = D.encode(m, z, c, hole, gd)
    assert (st.tables is not None) == sparse
    dec = torch.cat([torch.full((3, 1), m.start_id), m.to_strip(z)], 1)
    out, cache = decode_runs(m, st, dec)
    assert sum(RUNS) == 64 and cache.length == 64
    torch.testing.assert_close(out, full, rtol=0, atol=1e-12)
    if sparse:  # the buffers are those of the last query block, for every layer
        assert [b.block for b in cache.self_kv] == [b.block for b in cache.cross_kv] == [7, 7]
    # rewind to strip token 19 (block 2) with other tokens there, continue by token steps; a state built
    # outside `encode` (no tables yet) gets them on its first step
    perm = m.layout(64).perm
    z2 = z.clone()
    z2[:, perm[19:23]] = (z2[:, perm[19:23]] + 3) % V
    full2 = m(z2, c, hole, guides=gd)
    st2 = D.encode(m, z2, c, hole, gd)
    st2 = type(st2)(st2.layout, st2.enc, st2.mem, st2.peg, st2.guides)
    dec2 = torch.cat([torch.full((3, 1), m.start_id), m.to_strip(z2)], 1)
    decode_runs(m, st2, dec, runs=(20, 1, 1, 3, 10, 5), cache=cache)  # positions 0..39 from the first input
    out2, _ = decode_runs(m, st2, dec2, runs=(1, 2, 6, 1, 7, 3), cache=cache, p=20)  # back into block 2
    torch.testing.assert_close(out2, full2[:, 20:40], rtol=0, atol=1e-12)
    out3, _ = decode_runs(m, st2, dec2, runs=(1, 2), cache=cache, p=37)  # back inside the own block (4)
    torch.testing.assert_close(out3, full2[:, 37:40], rtol=0, atol=1e-12)
    assert (st2.tables is not None) == sparse


def official_guides(B=3, nb=8, seed=4, leak=True):
    """Causal picks with the official quirks: window repeats, repeated picks, self-picks (the rows-5/6 leak)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randint(-1, nb, (2, B, H, nb, 3), generator=g) for k in ("e_self", "d_causal", "d_cross")}
    b = torch.arange(nb).view(nb, 1)
    d = torch.where(out["d_causal"] > b - (0 if leak else 1), -1, out["d_causal"])  # nothing after the block
    d[0, 0, 0, 5] = torch.tensor([5 if leak else 4, 3, 3])  # a self-pick (or window repeat) and a repeated pick
    out["d_causal"] = d
    out["d_cross"][0, 1, 2, 3] = torch.tensor([3, 2, 2])  # window repeats in cross-attention
    if leak:  # a pick of the next block: the run of RUNS from block 6 into 7 must take the block kernel
        out["d_causal"][1, 1, 2, 6] = torch.tensor([7, -1, -1])
    return out


@pytest.mark.parametrize("leak", [False, True])
def test_token_steps_official_semantics(leak, monkeypatch):
    """Official SGA semantics (imported weights): a block listed twice counts twice, warm-up rows, and a causal
    self-pick shows the own block up to the run's last query. Token steps == the block kernel on the same runs,
    and without self-picks == forward."""
    m = tiny(sga_semantics="official", causal_picks="official")
    z, c, hole = batch()
    gd = official_guides(leak=leak)
    st = D.encode(m, z, c, hole, gd)
    assert (st.tables["self"][0].own_picks is not None) == leak and st.tables["self"][1].spill[6] == leak
    dec = torch.cat([torch.full((3, 1), m.start_id), m.to_strip(z)], 1)
    out, _ = decode_runs(m, st, dec)
    monkeypatch.setattr(D, "_token_steps", lambda *a: False)  # every run through official_block_attention
    ref, _ = decode_runs(m, st, dec)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    if not leak:
        torch.testing.assert_close(out, m(z, c, hole, guides=gd), rtol=0, atol=1e-12)
    # the union semantics differ on these guides: the repeats matter
    u = tiny()
    monkeypatch.undo()
    assert (decode_runs(u, D.encode(u, z, c, hole, gd), dec)[0] - out).abs().max() > 1e-6


@pytest.mark.parametrize("sparse", [False, True])
def test_cached_equals_block_rerun_and_uncached(sparse):
    m = tiny()
    z, c, hole = batch()
    gd = guides() if sparse else None
    out = {name: fn(m, z, c, hole, gens(3), guides=gd, top_k=6, temperature=1.0) for name, fn in SAMPLERS.items()}
    ref, st = out["uncached"]
    for name, (tok, s) in out.items():
        assert torch.equal(tok, ref), name
        assert s.sampled == int(hole.sum()) and s.steps == int(hole.any(0).sum())
    assert torch.equal(torch.where(hole, z, ref), z)  # known tokens are kept
    assert (ref[hole] != z[hole]).float().mean() > 0.5  # and the hole really is resampled
    # the cached sampler feeds every decoder position once; the re-run strategy much more
    assert out["cached"][1].fed <= 64 < out["block_rerun"][1].fed


@pytest.mark.parametrize("name", ["cached", "block_rerun"])
def test_samplers_continue_a_prefix_cache(name):
    """A cache that already holds the known prefix (positions 0..19) gives the same tokens as starting empty;
    a hole inside the cached prefix is refused."""
    m = tiny()
    z, c, hole = batch()
    perm = m.layout(64).perm
    hole[:, perm[:20]] = False
    gd = guides()
    st = D.encode(m, z, c, hole, gd)

    def prefix():
        cache = D.new_cache(m)
        D.decode_step(m, st, cache, torch.cat([torch.full((3, 1), m.start_id), m.to_strip(z)[:, :19]], 1), 0)
        return cache
    want, _ = SAMPLERS[name](m, z, c, hole, gens(3), guides=gd, top_k=6)
    got, stats = SAMPLERS[name](m, z, c, hole, gens(3), guides=gd, top_k=6, state=st, cache=prefix())
    assert torch.equal(got, want) and stats.sampled == int(hole.sum())
    hole[0, perm[5]] = True
    with pytest.raises(ValueError, match="hole must start"):
        SAMPLERS[name](m, z, c, hole, gens(3), guides=gd, state=st, cache=prefix())


@pytest.mark.parametrize("sparse", [False, True])
def test_batch_invariance_fp32(sparse):
    """Each row sampled alone (other schedule, batch 1) gives the same tokens as in the batch: the randomness
    is per row, and the sampling rule does not see float noise between batch shapes."""
    m = tiny(torch.float32)
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
    from asset_dist.attention.decode import gather_rows

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

"""SGA token-step kernels (asset_dist/attention/decode.py): per-block key/value buffers == the block kernels
(union and official semantics) for every run inside a block, whatever the cache holds after the run."""
from __future__ import annotations

import pytest
import torch

from asset_dist.attention import block_table
from asset_dist.attention import decode as AD
from asset_dist.official.attention import official_block_attention, official_table

torch.set_num_threads(1)
B, H, NB, NT, D = 2, 3, 8, 4, 8


def picks(causal: bool, seed: int = 0) -> torch.Tensor:
    """Random picks with repeats, window picks, self-picks and -1; causal: nothing after the block."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-1, NB, (B, H, NB, 3), generator=g)
    p[0, 0, 6] = torch.tensor([6, 4, 4])
    if causal:
        p = torch.where(p > torch.arange(NB).view(NB, 1), -1, p)
    return p


@pytest.mark.parametrize("causal", [False, True])
def test_step_table_is_the_union(causal):
    g = picks(causal)
    t = AD.step_table(g, NB, causal)
    ref = block_table(g, NB, causal)
    for b_ in range(B):
        for h in range(H):
            for q in range(NB):
                want = sorted(x for x in ref[b_, h, q].tolist() if x >= 0)
                got = t.blocks[b_, h, q]
                assert sorted(x for x in got.tolist() if x >= 0) == want
                assert (got[:len(want)] >= 0).all() and (got[len(want):] < 0).all()  # valid slots first
                assert len(want) <= t.width[q]
                if causal:
                    assert int(got[0]) == q  # own block first
    assert (t.bias[t.blocks >= 0] == 0).all() and (t.bias[t.blocks < 0] == float("-inf")).all()


@pytest.mark.parametrize("semantics", ["union", "official"])
@pytest.mark.parametrize("causal", [False, True])
def test_buffer_attention_equals_block_kernel(semantics, causal):
    """Every run inside a block, through a buffer gathered at the run's start (the cache then holds junk after
    the run) and filled by write_own, == the block kernel on the same run."""
    gen = torch.Generator().manual_seed(1)
    L = NB * NT
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64) for _ in range(2))
    g = picks(causal, seed=2)
    table = AD.step_table(g, NB, causal, official_table if semantics == "official" else block_table)
    kernel = official_block_attention if semantics == "official" else AD.block_attention
    prefix = (pk, pv) if causal else None
    for b in range(NB):
        for t0 in range(b * NT, (b + 1) * NT):
            for t1 in range(t0, (b + 1) * NT):
                run = torch.arange(t0, t1 + 1)
                want = kernel(q[:, :, run], run, k, v, g, NT, causal, prefix)
                if causal:  # the cache when the block is entered: keys from t0 on not written yet
                    k2, v2 = k.clone(), v.clone()
                    k2[:, :, t0:], v2[:, :, t0:] = 1e3, -1e3
                    buf = AD.gather_block_kv(k2, v2, table, b, NT, prefix)
                    AD.write_own(buf, k[:, :, run], v[:, :, run], t0 - b * NT)
                    got = AD.block_kv_attention(q[:, :, run], buf, NT, t0 - b * NT, t1 - b * NT)
                else:
                    got = AD.block_kv_attention(q[:, :, run], AD.gather_block_kv(k, v, table, b, NT), NT)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_official_table_counts_repeats():
    """Official: a block listed twice is one buffer slot with weight 2; a causal self-pick is an extra copy of
    the own block, not a slot."""
    g = torch.full((1, 1, NB, 3), -1)
    g[0, 0, 6] = torch.tensor([6, 4, 4])  # self-pick, window block 4 picked twice (+ its window copy)
    t = AD.step_table(g, NB, True, official_table)
    row = dict(zip(t.blocks[0, 0, 6].tolist(), t.bias[0, 0, 6].tolist()))
    assert row == {6: 0.0, 4: pytest.approx(torch.tensor(3.0).log().item()), 5: 0.0, -1: float("-inf")}
    assert t.own_picks[0, 0, 6] == 1 and t.own_picks[0, 0, 5] == 0
    u = AD.step_table(g, NB, True)
    assert u.own_picks is None and sorted(x for x in u.blocks[0, 0, 6].tolist() if x >= 0) == [4, 5, 6]


def test_small_gemm_equals_linear():
    """decoding.small_gemm: while the samplers decode, the decoder's linear layers run 2-64 rows without autograd
    through weight slices; same numbers as F.linear, with and without bias, for every row count around the
    switch; the plain path with autograd; and the model's layers are plain nn.Linear again afterwards."""
    from asset_dist.config import TransformerConfig
    from asset_dist.models.decoding import _sliced_linear, small_gemm
    from asset_dist.models.transformer import AssetTransformer

    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(48, 512, bias=bias).double()
        for shape in ((1, 1), (1, 2), (1, 3), (2, 4), (1, 16), (4, 16), (1, 65)):  # rows 1..65, 2-d leading dims
            x = torch.randn(*shape, 48, dtype=torch.float64)
            with torch.no_grad():
                got = _sliced_linear(lin, x)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-12)
    x = torch.randn(4, 48, dtype=torch.float64, requires_grad=True)
    _sliced_linear(lin, x).sum().backward()
    assert x.grad is not None
    m = AssetTransformer(TransformerConfig(vocab_size=512, cond_vocab_size=8, d_model=32, n_heads=4, ffn_dim=512,
                                           encoder_layers=1, decoder_layers=1, block_grid=[2, 2]))
    fc1 = m.decoder[0].ffn.fc1
    assert type(fc1) is torch.nn.Linear and "forward" not in fc1.__dict__
    with small_gemm(m):
        assert fc1.forward.func is _sliced_linear and m.lm_head.forward.func is _sliced_linear
        with small_gemm(m):  # nested: patched once, restored by the outer one
            pass
        assert "forward" in fc1.__dict__
        assert "forward" not in m.encoder[0].ffn.fc1.__dict__  # the encoder runs whole sequences
    assert "forward" not in fc1.__dict__ and "forward" not in m.lm_head.__dict__

"""AssetTransformer behaviour at tiny sizes, float64: SGA vs dense, causality, hole invisibility, incremental
decoding, parameter counts, weight-decay groups, activation checkpointing, no host reads in a training step."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist.config import TransformerConfig
from asset_dist.models import decoding as D
from asset_dist.models.transformer import AssetTransformer, guides_from_maps, param_groups

torch.set_num_threads(1)

GRID = (4, 2)  # 8 blocks of 2x4 tokens on an 8x8 token grid
HW = (8, 8)
B, H, V, NC = 2, 4, 16, 8


def tiny(grid=GRID, **kw) -> AssetTransformer:
    cfg = TransformerConfig(vocab_size=V, cond_vocab_size=NC, d_model=32, n_heads=H, ffn_dim=64, encoder_layers=2,
                            decoder_layers=2, block_grid=list(grid), max_position_embeddings=4, **kw)
    torch.manual_seed(0)
    m = AssetTransformer(cfg).double().eval()
    with torch.no_grad():  # larger than the 0.02 init so that every path visibly moves the logits
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def inputs(seed=1, L=64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, V, (B, L), generator=g)
    c = torch.randint(0, NC, (B, L), generator=g)
    hole = torch.rand(B, L, generator=g) < 0.5
    return z, c, hole


def random_guides(nb=8, K=2, seed=2, n_enc=2, n_dec=2):
    """Arbitrary picks, including window blocks, the own block, future blocks and repeats: the model must stay
    causal and count a block once whatever the picks are."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: torch.randint(-1, nb, (n, B, H, nb, K), generator=g)  # noqa: E731
    return {"e_self": pick(n_enc), "d_causal": pick(n_dec), "d_cross": pick(n_dec)}


def covering_guides(nb, n_enc=2, n_dec=2):
    """Picks that, with the window, cover every block (non-causal) / every earlier block (causal)."""
    K = nb
    full = torch.full((nb, K), -1)
    causal = torch.full((nb, K), -1)
    for b in range(nb):
        rest = [j for j in range(nb) if abs(j - b) > 1]
        full[b, :len(rest)] = torch.tensor(rest, dtype=torch.long)
        early = list(range(max(b - 2, 0)))
        causal[b, :len(early)] = torch.tensor(early, dtype=torch.long)
    rep = lambda t, n: t.expand(n, B, H, nb, K).clone()  # noqa: E731
    return {"e_self": rep(full, n_enc), "d_causal": rep(causal, n_dec), "d_cross": rep(full, n_dec)}


def test_sga_equals_dense_when_picks_cover_everything():
    m = tiny()
    z, c, hole = inputs()
    dense = m(z, c, hole)
    sga = m(z, c, hole, guides=covering_guides(8))
    assert dense.shape == (B, 64, V)
    torch.testing.assert_close(sga, dense, rtol=0, atol=1e-10)
    # and it is not vacuous: with no picks at all the sparse model differs
    none = {k: torch.full_like(v, -1) for k, v in covering_guides(8).items()}
    assert (m(z, c, hole, guides=none) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("sparse", [False, True])
def test_decoder_is_causal(sparse):
    """Changing decoder input token j (inside the hole, so the encoder cannot see it) leaves every logit that
    predicts tokens 0..j unchanged, and does change the next one."""
    m = tiny()
    z, c, hole = inputs()
    hole[:] = True
    guides = random_guides() if sparse else None
    base = m(z, c, hole, guides=guides)
    perm = m.layout(64).perm
    for j in (0, 13, 16, 40, 62):  # strip positions: block starts/ends and interiors
        z2 = z.clone()
        z2[:, perm[j]] = (z2[:, perm[j]] + 1) % V
        out = m(z2, c, hole, guides=guides)
        torch.testing.assert_close(out[:, :j + 1], base[:, :j + 1], rtol=0, atol=0)
        assert (out[:, j + 1] - base[:, j + 1]).abs().max() > 1e-6


@pytest.mark.parametrize("sparse", [False, True])
def test_hole_content_invisible(sparse):
    """The encoder replaces hole tokens by [mask]; the logit predicting a hole token never depends on it or on
    any later token."""
    m = tiny()
    z, c, hole = inputs()
    guides = random_guides() if sparse else None
    z2 = torch.where(hole, (z + 1 + torch.arange(64) % 5) % V, z)
    st1, st2 = D.encode(m, z, c, hole, guides), D.encode(m, z2, c, hole, guides)
    torch.testing.assert_close(st1.enc, st2.enc, rtol=0, atol=0)
    a, b = m(z, c, hole, guides=guides), m(z2, c, hole, guides=guides)
    hole_s = m.to_strip(hole)
    for i in range(B):
        first = int(hole_s[i].nonzero()[0])  # everything up to the first hole token is predicted identically
        torch.testing.assert_close(a[i, :first + 1], b[i, :first + 1], rtol=0, atol=0)
    # the [mask] replacement really happens: changing a known token changes the encoder
    z3 = z.clone()
    z3[~hole] = (z3[~hole] + 1) % V
    assert (D.encode(m, z3, c, hole, guides).enc - st1.enc).abs().max() > 1e-6


@pytest.mark.parametrize("sparse", [False, True])
def test_incremental_decoding_equals_forward(sparse):
    m = tiny()
    z, c, hole = inputs()
    guides = random_guides() if sparse else None
    full = m(z, c, hole, guides=guides)
    state = D.encode(m, z, c, hole, guides)
    cache = D.new_cache(m)
    dec_in = torch.cat([torch.full((B, 1), m.start_id), m.to_strip(z)], 1)  # [start] + strip tokens
    outs, p = [], 0
    for n in (1, 1, 5, 9, 1, 1, 1, 17, 28):  # single tokens, runs inside a block and across several blocks
        outs.append(D.decode_step(m, state, cache, dec_in[:, p:p + n], torch.arange(p, p + n)))
        p += n
    assert p == 64 and cache.length == 64
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    # rewinding: re-feed positions 20..23 with other tokens, then continue; equals a forward on the edited input
    z2 = z.clone()
    perm = m.layout(64).perm
    z2[:, perm[19:23]] = (z2[:, perm[19:23]] + 3) % V
    full2 = m(z2, c, hole, guides=guides)  # the encoder changes too unless those tokens are holes
    state2 = D.encode(m, z2, c, hole, guides)
    cache2 = D.new_cache(m)
    dec2 = torch.cat([torch.full((B, 1), m.start_id), m.to_strip(z2)], 1)
    D.decode_step(m, state2, cache2, dec_in[:, :30], 0)
    out = D.decode_step(m, state2, cache2, dec2[:, 20:40], 20)
    torch.testing.assert_close(out, full2[:, 20:40], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="positions"):
        D.decode_step(m, state2, cache2, dec2[:, 50:52], 50)  # a gap after the cache end


@pytest.mark.parametrize("sparse", [False, True])
def test_greedy_decoding_matches_forward_on_its_output(sparse):
    """Greedy fill of the hole one token at a time through the cache; a forward pass on the completed image
    gives the same logits at every step."""
    m = tiny()
    z, c, hole = inputs(seed=5)
    guides = random_guides(seed=6) if sparse else None
    state = D.encode(m, z, c, hole, guides)
    cache = D.new_cache(m)
    zs, hole_s = m.to_strip(z).clone(), m.to_strip(hole)
    logits = [D.decode_step(m, state, cache, torch.full((B, 1), m.start_id), 0)]
    for p in range(64):  # logits[-1] predicts strip token p
        zs[:, p] = torch.where(hole_s[:, p], logits[-1][:, 0].argmax(-1), zs[:, p])
        if p < 63:
            logits.append(D.decode_step(m, state, cache, zs[:, p:p + 1], p + 1))
    full = m(m.to_raster(zs), c, hole, guides=guides)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=0, atol=1e-12)
    assert not torch.equal(zs, m.to_strip(z))


def test_maps_and_explicit_path():
    m = tiny()
    z, c, hole = inputs()
    plain = m(z, c, hole)
    logits, maps = m(z, c, hole, return_attn=True)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-12)
    assert maps["e_self"].shape == maps["d_causal"].shape == maps["d_cross"].shape == (2, B, H, 64, 64)
    torch.testing.assert_close(maps["e_self"].sum(-1), torch.ones(2, B, H, 64, dtype=torch.float64))
    torch.testing.assert_close(maps["d_cross"].sum(-1), torch.ones(2, B, H, 64, dtype=torch.float64))
    assert (maps["d_causal"].triu(1) == 0).all()
    # the causal rows lost the [start] column: they sum to < 1
    assert (maps["d_causal"].sum(-1) < 1).all()
    g = guides_from_maps(maps, GRID, k=2)
    assert {k: tuple(v.shape) for k, v in g.items()} == {k: (2, B, H, 8, 2) for k in ("e_self", "d_causal", "d_cross")}
    with pytest.raises(ValueError, match="dense"):
        m(z, c, hole, guides=random_guides(), return_attn=True)


def test_loss_and_raster_helpers():
    m = tiny()
    z, c, hole = inputs()
    logits = m(z, c, hole)
    raster = m.to_raster(logits)  # raster[:, r] predicts raster token r
    want = torch.nn.functional.cross_entropy(raster[hole], z[hole])  # pooled over the batch
    torch.testing.assert_close(m.loss(logits, z, hole), want.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.to_strip(raster), logits, rtol=0, atol=0)
    assert m.loss(logits, z, torch.zeros_like(hole)).item() == 0.0


@pytest.mark.parametrize("sparse", [False, True])
def test_activation_checkpointing_same_gradients(sparse):
    m = tiny().train()
    z, c, hole = inputs()
    guides = random_guides() if sparse else None
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.use_checkpoint = ckpt
        m.loss(m(z, c, hole, guides=guides), z, hole).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_init_and_param_groups():
    cfg = TransformerConfig(vocab_size=V, cond_vocab_size=NC, d_model=32, n_heads=H, ffn_dim=64, encoder_layers=1,
                            decoder_layers=1, block_grid=list(GRID), max_position_embeddings=4)
    torch.manual_seed(0)
    m = AssetTransformer(cfg)
    assert abs(m.encoder[0].ffn.fc1.weight.std().item() - 0.02) < 0.003
    assert m.encoder[0].ffn.fc1.bias.abs().max() == 0 and m.lm_head.bias is None
    decay, rest = param_groups(m, 0.01)
    assert decay["weight_decay"] == 0.01 and rest["weight_decay"] == 0.0
    linear = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert {id(p) for p in decay["params"]} == {id(p) for p in linear}
    assert len(decay["params"]) + len(rest["params"]) == len(list(m.parameters()))


@pytest.mark.parametrize("V_img, millions", [(1024, 343.8), (8192, 365.8)])
def test_full_size_parameter_count(V_img, millions):
    cfg = TransformerConfig(vocab_size=V_img, cond_vocab_size=V_img)  # official COCO keeps an 8192-row seg table
    with torch.device("meta"):
        m = AssetTransformer(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - millions) < 0.1, n
    assert len(m.encoder) == 7 and len(m.decoder) == 15
    assert sum(layer.peg is not None for layer in m.encoder) == 7
    assert [layer.peg is not None for layer in m.decoder] == [True] + [False] * 14


def test_bad_inputs_named():
    m = tiny()
    z, c, hole = inputs()
    g = random_guides()
    g["d_cross"] = g["d_cross"][:1]
    with pytest.raises(ValueError, match="d_cross"):
        m(z, c, hole, guides=g)
    with pytest.raises(ValueError, match="block grid"):
        m(z[:, :36], c[:, :36], hole[:, :36])


class _HostReads(TorchDispatchMode):
    """Records ops that read a tensor's values on the host: on a GPU each is a device sync."""

    SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in self.SYNCS or bool_index:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("semantics", ["union", "official"])
def test_training_step_reads_nothing_on_the_host(semantics):
    """forward + loss + backward with SGA guides (and a batch with no hole at all) never reads a tensor value on
    the host: the guides' values are checked where they come in (check_guides, decoding.encode), not per step.
    check_guides itself does read them."""
    m = tiny(sga_semantics=semantics).train()
    z, c, hole = inputs()
    hole[1] = False  # a row without hole tokens
    guides = random_guides()
    with _HostReads() as reads:
        logits = m(z, c, hole, guides=guides)
        loss = m.loss(logits, z, hole)
        loss.backward()
    assert reads.seen == [], reads.seen
    sel = m.to_strip(hole[..., None]).squeeze(-1)
    ref = F.cross_entropy(logits.detach()[sel].float(), m.to_strip(z[..., None]).squeeze(-1)[sel])  # the old form
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)
    zero = m.loss(logits, z, torch.zeros_like(hole))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    with _HostReads() as reads:
        m.check_guides(guides, B)
    assert reads.seen
    bad = {**guides, "d_cross": guides["d_cross"] + 8}
    with pytest.raises(ValueError, match=r"block ids in \[-1, 8\)"):
        m.check_guides(bad, B)
    with pytest.raises(ValueError, match=r"block ids in \[-1, 8\)"):
        D.encode(m, z, c, hole, bad)

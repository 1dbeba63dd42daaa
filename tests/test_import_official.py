"""`asset-dist import-official` against the official fixture pack (tests/fixtures/official_asset, README):
the combined guide checkpoint, plus the SGA / standalone-VQGAN / standalone-seg variants built from it in tmp_path
(README "Checkpoint layout"), are imported through the CLI; every model is then rebuilt from the written
config.yaml and the exports only, and reproduces the saved official outputs (README tolerances). Also: the sparse
official-semantics SGA kernel (asset_dist/official/attention.py) against the dense reference, the error cases,
and configs/official_*.yaml against the full-size official layouts.

Float64: every transformer output, the sparse kernel and the seg encoder run in both precisions here. The image
VQGAN and the seg decoder run in float32 only: their float64 passes (~20 s on a busy CPU) are test_vq_official.py's,
on weights and configs this file asserts bitwise / field-for-field equal to the imported ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asset_dist.config import load_config
from asset_dist.models import SegVQModel, VQModel
from asset_dist.models import decoding as D
from asset_dist.models.tokens import Tokenizers, load_weights
from asset_dist.models.transformer import AssetTransformer, guides_from_maps
from asset_dist.official import CheckpointError, import_official, infer_transformer_config, infer_vq_config
from asset_dist.official import attention as AO
from asset_dist.official import dense as OD
from asset_dist.official import transformer as OT
from asset_dist.official.args import add_args
from asset_dist.official.guides import causal_rows_from_official
from asset_dist.official.vq import load_official_vq, vq_config_from_official
from asset_dist.official.importer import main
from asset_dist.official.sizes import read_official_config
from asset_dist.artifacts import read_export

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official_asset"
CKPT = FIX / "asset_guide_tiny.ckpt"
ATOL = 1e-4  # README: VQ latents, decoder outputs and transformer logits
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def npz(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(FIX / name).items()}


def close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL, msg: str = "") -> None:
    assert ours.shape == ref.shape, (msg, ours.shape, ref.shape)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=atol, msg=msg or None)


def cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    add_args(p)
    return main(p.parse_args([str(a) for a in argv]))


# --------------------------------------------------------------------------------------------------------------
# The import


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """The official layouts the fixture does not ship, made from it as the README describes."""
    d = tmp_path_factory.mktemp("official_variants")
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    sga = dict(sd)
    sga.update({"guiding_" + k: v for k, v in sd.items() if k.startswith("transformer.")})
    torch.save({"state_dict": sga, "epoch": 3, "global_step": 77, "optimizer_states": []}, d / "sga.ckpt")
    vq = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vq["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)  # main.py VQGANs carry their loss
    vq["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save({"state_dict": vq, "global_step": 5}, d / "vqgan.ckpt")
    seg = {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    torch.save({"state_dict": seg}, d / "seg.ckpt")  # with `colorize`, as landscape_VQ_seg_model.ckpt
    layouts = json.loads((FIX / "key_layouts.json").read_text())  # the layouts the README lists
    for made, name in ((sga, "tiny_sga_ckpt"), (vq, "tiny_standalone_vqgan"), (seg, "tiny_standalone_seg_vq")):
        want = {e[0] for k, v in layouts.items() if k.startswith(name) for e in v}
        assert {k for k in made if not k.startswith("loss.")} == want, name
    return {"sga": d / "sga.ckpt", "vqgan": d / "vqgan.ckpt", "seg": d / "seg.ckpt", "dir": d}


@pytest.fixture(scope="module")
def imported(variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("official_import") / "weights"
    rc = cli("--vqgan", variants["vqgan"], "--seg", variants["seg"], "--guide", CKPT, "--sga", variants["sga"],
             "--official-config", FIX / "configs.json", "--out", out)
    assert rc == 0
    return out, load_config(out / "config.yaml")


def build(cfg, stage: str, dtype=torch.float32):
    """A model from the written config and its export, nothing else."""
    if stage == "vqgan":
        m, path = VQModel(cfg.model.vqgan), cfg.train.vqgan_weights
    elif stage == "seg":
        m, path = SegVQModel(cfg.model.seg), cfg.train.seg_weights
    else:
        m = AssetTransformer(cfg.model.transformer)
        path = cfg.train.guide_weights if stage == "guide" else cfg.infer.sga_weights
    load_weights(m, path, stage)
    return m.to(dtype).eval()


def test_exports_config_and_sources(imported):
    out, cfg = imported
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    params = json.loads((FIX / "configs.json").read_text())
    for stage in ("vqgan", "seg", "guide", "sga"):
        rec = read_export(out / f"{stage}.pt", expect_stage=stage)
        assert rec["config"]["model"]["transformer"]["sga_semantics"] == "official"
        assert len(rec["lineage"]["imported_from"]["sha256"]) == 64
    assert read_export(out / "sga.pt")["step"] == 77 and read_export(out / "vqgan.pt")["step"] == 5
    # compatibility modes on, sizes of the official configs, data at the SGA resolution (d_size)
    assert cfg.model.vqgan == vq_config_from_official(params["first_stage_config"]["params"], "official")
    assert cfg.model.seg == vq_config_from_official(params["cond_stage_config"]["params"])
    t = cfg.model.transformer
    assert (t.n_heads, t.block_grid, t.vocab_size, t.cond_vocab_size, t.encoder_layers) == (4, [16, 4], 64, 64, 2)
    assert (t.causal_picks, t.sga_semantics, cfg.model.token_hole) == ("official", "official", "nearest")
    assert (cfg.data.resolution, cfg.data.guide_resolution, cfg.data.num_classes, cfg.train.stage) == (512, 256, 182,
                                                                                                      "sga")
    assert cfg.infer.sga_weights == str((out / "sga.pt").resolve()) == cfg.train.init_from
    # every exported tensor is bitwise what the model-level loaders give (so their fixture tests carry over)
    for stage, model, prefix in (("vqgan", VQModel(cfg.model.vqgan), "first_stage_model."),
                                 ("seg", SegVQModel(cfg.model.seg), "cond_stage_model.")):
        ref = load_official_vq(model, ckpt, prefix).state_dict()
        got = read_export(out / f"{stage}.pt")["state_dict"]
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), stage
    ref = OT.load_official_transformer(AssetTransformer(t), ckpt).state_dict()
    for stage in ("guide", "sga"):
        got = read_export(out / f"{stage}.pt")["state_dict"]
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), stage


def test_sga_checkpoint_alone_gives_every_model(imported, variants, tmp_path):
    """Only the SGA checkpoint: VQ models from first_stage_model./cond_stage_model., the guide from
    guiding_transformer.*; identical exports. Without the official config the head count is the paper's
    (d_model / 64) and a note says so."""
    out0, _ = imported
    res = import_official(tmp_path / "a", sga=variants["sga"], official_config=FIX / "configs.json")
    assert set(res.files) == {"vqgan", "seg", "guide", "sga", "config"}
    for stage in ("vqgan", "seg", "guide", "sga"):
        a, b = read_export(res.files[stage])["state_dict"], read_export(out0 / f"{stage}.pt")["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in b), stage
    assert read_export(res.files["guide"])["lineage"]["imported_from"]["prefix"] == "guiding_transformer."
    assert not res.notes  # no differing copies
    res = import_official(tmp_path / "b", guide=CKPT)
    assert res.config.model.transformer.n_heads == 1 and any("head count" in n for n in res.notes)
    assert res.config.train.stage == "guide" and set(res.files) == {"vqgan", "seg", "guide", "config"}


# --------------------------------------------------------------------------------------------------------------
# Outputs through the imported files


def image_inputs(S: int, dtype=torch.float32):
    inp = np.load(FIX / "inputs.npz")
    x = torch.from_numpy(inp[f"image_{S}"].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(dtype)
    mask = torch.from_numpy(inp[f"mask_{S}"].astype(np.float32))[None, None].to(dtype)
    seg = torch.from_numpy(inp[f"seg_{S}"].astype(np.int64))[None]
    return x, mask, seg


@pytest.fixture(scope="module")
def tokens(imported):
    """Tokenizers built from the written config (weights from its train.* paths, token_hole nearest) at 256 and
    512, with the pre-quant latents captured."""
    _, cfg = imported
    tok = Tokenizers(cfg)
    seen: dict[str, torch.Tensor] = {}
    tok.vqgan.quant_conv.register_forward_hook(lambda m, i, o: seen.__setitem__("vq", o))
    tok.seg.quant_conv.register_forward_hook(lambda m, i, o: seen.__setitem__("seg", o))
    out = {}
    for S in (256, 512):
        x, mask, seg = image_inputs(S)
        ids, cond, hole = tok(x, seg, mask)
        out[S] = {"ids": ids, "cond": cond, "hole": hole, "h": seen["vq"], "h_seg": seen["seg"]}
    return out


def test_tokenizers_reproduce_official_tokens(tokens):
    vq, seg, dense, sga = npz("vqgan_outputs.npz"), npz("seg_vq_outputs.npz"), npz("guide_dense_256.npz"), \
        npz("sga_512.npz")
    for S, t, ref in ((256, tokens[256], dense), (512, tokens[512], sga)):
        close(t["h"], vq[f"h_{S}"], msg=f"h_{S}")
        assert torch.equal(t["ids"], vq[f"indices_{S}"].view(1, -1)) and torch.equal(t["ids"], ref["z_indices"])
        assert torch.equal(t["cond"], seg[f"indices_{S}"].view(1, -1)) and torch.equal(t["cond"], ref["c_indices"])
        assert torch.equal(t["hole"], ref[f"token_mask_{S // 16}"].bool().view(1, -1))  # the nearest rule
    close(tokens[256]["h_seg"], seg["h_256"], msg="seg h_256")


def test_vqgan_256(imported, tokens):
    """float32 only: float64 of this masked encoder/decoder takes ~20 s here, and test_vq_official.py runs it on
    bitwise the same weights and config (test_exports_config_and_sources asserts both)."""
    ref = npz("vqgan_outputs.npz")
    m = build(imported[1], "vqgan")
    with torch.no_grad():
        quant, emb_loss, idx = m.quantize(tokens[256]["h"])  # h_256 of the imported tokenizer, checked above
        dec = m.decode_indices(idx)  # the official decode_to_img path
    assert torch.equal(idx, ref["indices_256"])
    close(quant, ref["quant_256"])
    close(emb_loss, ref["emb_loss_256"], atol=1e-6)
    close(dec, ref["dec_256"])


@DTYPES
def test_seg_vq_256(imported, dtype):
    ref = npz("seg_vq_outputs.npz")
    m = build(imported[1], "seg", dtype)
    _, _, labels = image_inputs(256)
    with torch.no_grad():
        h = m.encode_pre_quant(labels)
        quant, emb_loss, idx = m.quantize(h)
        close(h, ref["h_256"])
        assert torch.equal(idx, ref["indices_256"])
        close(quant, ref["quant_256"])
        close(emb_loss, ref["emb_loss_256"], atol=1e-6)
        if dtype == torch.float32:  # the 182-channel decoder at 256 (float64: test_vq_official.py's model path)
            logits = m.decode(quant)
            close(logits[:, :, 8::16, 8::16], ref["logits_sub_256"])
            close(logits[:, :, 120:136, 120:136], ref["logits_crop_256"])
            assert torch.equal(logits.argmax(1).to(torch.uint8), ref["logits_argmax_256"])
            close(logits.double().sum(dim=(2, 3)), ref["logits_sum_256"], atol=0.05)  # 65,536 pixels x 1e-4 bound


@pytest.fixture(scope="module")
def guide_pass(imported):
    """The imported guide, dense and teacher-forced at 256 on the official tokens, in both precisions."""
    d = npz("guide_dense_256.npz")
    out = {}
    for dtype in (torch.float32, torch.float64):
        m = build(imported[1], "guide", dtype)
        with torch.no_grad():
            logits, maps = m(d["z_indices"], d["c_indices"], d["token_mask_16"].bool().view(1, -1), return_attn=True)
        out[dtype] = (m, logits, maps)
    return out


@DTYPES
def test_guide_dense_256(guide_pass, dtype):
    d = npz("guide_dense_256.npz")
    m, logits, maps = guide_pass[dtype]
    close(logits, d["logits"][:, :256])  # strip = raster at 256; official index 256 predicts nothing
    close(m.loss(logits, d["z_indices"], d["token_mask_16"].bool().view(1, -1)), d["loss"], atol=1e-5)
    for key in ("e_self", "d_causal", "d_cross"):
        pooled = F.avg_pool2d(maps[key].reshape(-1, 1, 256, 256), 4, 4).reshape(2, 1, 4, 64, 64)
        close(pooled, d[f"pooled_{key}"], atol=1e-6, msg=key)
    full = FIX / "guide_attn_full_fp16.npz"  # optional file
    if dtype == torch.float32 and full.is_file():
        f = npz(full.name)
        ref = {"e_self": f["encoder_self"], "d_causal": f["decoder_causal"][..., 1:, 1:],
               "d_cross": f["decoder_cross"][..., 1:, :]}
        for key, r in ref.items():
            close(maps[key], r, atol=1e-3, msg=key)


@DTYPES
def test_official_picks_from_our_maps(imported, guide_pass, dtype):
    """guide_blocks in the config's pick mode (official) on our maps = the official top-3 picks, bit for bit,
    including the unmasked rows 5 and 6 (the causal leak)."""
    t = imported[1].model.transformer
    ix = npz("sga_indices.npz")
    g = guides_from_maps({k: v.float() for k, v in guide_pass[dtype][2].items()}, t.block_grid, k=t.guide_k,
                         causal_mode=t.causal_picks)
    assert torch.equal(g["e_self"], ix["e_self_rand_attn"]) and torch.equal(g["d_cross"], ix["d_cross_rand_attn"])
    assert torch.equal(g["d_causal"][..., 5:, :], ix["d_causal_rand_attn"])
    assert torch.equal(g["d_causal"][0, 0, 0, 5], torch.tensor([0, 2, 3]))  # README 3b: block 5, layer 0 head 0
    assert (g["d_causal"][..., 5:7, :] >= torch.tensor([3, 4]).view(2, 1)).any()  # picks inside the window


@DTYPES
def test_sga_512_from_exports(imported, guide_pass, dtype):
    """The whole official SGA pass: our guide's picks, the imported SGA weights, the sparse official-semantics
    kernel the config selects: official logits and loss at 512. Incremental decoding (whole blocks, as the
    official sampler) gives the same outputs."""
    cfg = imported[1]
    d = npz("sga_512.npz")
    m = build(cfg, "sga", dtype)
    assert m.sga_fn is AO.official_sga_attention and D.block_kernel(m) is AO.official_block_attention
    t = cfg.model.transformer
    g = guides_from_maps({k: v.float() for k, v in guide_pass[dtype][2].items()}, t.block_grid, k=t.guide_k,
                         causal_mode=t.causal_picks)
    z, c, hole = d["z_indices"], d["c_indices"], d["token_mask_32"].bool().view(1, -1)
    ref = torch.cat([d["logits"][:, :1], m.to_strip(d["logits"][:, 1:])], 1)[:, :-1]  # [:, p] predicts strip p
    with torch.no_grad():
        logits = m(z, c, hole, guides=g)
    close(logits, ref)
    close(m.loss(logits, z, hole), d["loss"], atol=1e-5)
    state, cache = D.encode(m, z, c, hole, g), D.new_cache(m)
    dec = torch.cat([torch.full((1, 1), m.start_id), m.to_strip(z)], 1)
    steps = [D.decode_step(m, state, cache, dec[:, :1], 0)]
    for p in range(1, 1025, 16):  # one block (16 tokens at 512) per step
        steps.append(D.decode_step(m, state, cache, dec[:, p:p + 16], p))
    close(torch.cat(steps, 1)[:, :1024], logits, atol=1e-5 if dtype == torch.float32 else 1e-10)


# --------------------------------------------------------------------------------------------------------------
# The sparse kernel against the dense reference of the official semantics


def _guide(B: int, H: int, nb: int, causal: bool, seed: int) -> torch.Tensor:
    """Random picks with the cases that matter: repeats of window blocks, self-picks, -1 pads."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(0, nb, (B, H, nb, 3), generator=gen)
    b = torch.arange(nb).view(nb, 1)
    g[0, 0] = torch.cat([b, (b - 1).clamp(min=0), (b + 1) % nb], 1)  # self and window repeats everywhere
    g[..., 2] = torch.where(torch.rand(g.shape[:-1], generator=gen) < 0.2, -1, g[..., 2])
    return causal_rows_from_official(g[..., 5:, :], nb) if causal else g  # warm-up rows as the model gets them


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("prefix", [False, True], ids=["no_prefix", "start_prefix"])
def test_sparse_official_kernel_matches_dense(causal, prefix):
    torch.manual_seed(0)
    B, H, nt, d, grid = 2, 3, 4, 8, (16, 4)
    L = 64 * nt
    x = [torch.randn(B, H, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    pre = [torch.randn(B, H, 1, d, dtype=torch.float64, requires_grad=True) for _ in range(2)] if prefix else []
    g = _guide(B, H, 64, causal, seed=1)
    kw = dict(causal=causal, prefix_k=pre[0] if pre else None, prefix_v=pre[1] if pre else None)
    ours = AO.official_sga_attention(*x, g, grid, **kw)
    ref = OD.official_sga_attention(*x, g, grid, **kw)
    close(ours, ref, atol=1e-12)
    w = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, x + pre, w), torch.autograd.grad(ref, x + pre, w)):
        close(a, b, atol=1e-12)
    # it is not our union semantics: repeats and self-picks change the numbers
    from asset_dist.attention import sga_attention
    assert (sga_attention(*x, g, grid, **kw) - ours).abs().max() > 1e-3


def test_sparse_official_kernel_rules():
    """Causal blocks 0-4 are dense causal whatever their guide rows say; broadcast guides; incremental form."""
    torch.manual_seed(1)
    B, H, nt, d, grid = 1, 2, 4, 8, (16, 4)
    L = 64 * nt
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64) for _ in range(3))
    pk, pv = torch.randn(B, H, 1, d, dtype=torch.float64), torch.randn(B, H, 1, d, dtype=torch.float64)
    g = _guide(1, 1, 64, True, seed=2)
    junk = g.clone()
    junk[..., :5, :] = torch.tensor([7, 5, 4])  # a row the official code never reads
    a = AO.official_sga_attention(q, k, v, g, grid, True, pk, pv)
    close(AO.official_sga_attention(q, k, v, junk, grid, True, pk, pv), a, atol=0)
    # dense causal over blocks 0..b (with [start]) for the warm-up rows
    s = (q[:, :, :5 * nt] @ torch.cat([pk, k[:, :, :5 * nt]], 2).transpose(-1, -2)) * d ** -0.5
    s[..., 1:] = s[..., 1:].masked_fill(torch.ones(5 * nt, 5 * nt, dtype=torch.bool).triu(1), float("-inf"))
    close(a[:, :, :5 * nt], s.softmax(-1) @ torch.cat([pv, v[:, :, :5 * nt]], 2), atol=1e-12)
    # the incremental form: any run of whole blocks, the cache holding the keys of every block
    for causal in (False, True):
        full = AO.official_sga_attention(q, k, v, g.expand(B, H, 64, 3), grid, causal, *(pk, pv) if causal else ())
        run = torch.arange(6 * nt, 9 * nt)
        part = AO.official_block_attention(q[:, :, run], run, k, v, g, nt, causal, (pk, pv) if causal else None)
        close(part, full[:, :, run], atol=1e-12)
    # a causal run ending inside a block never reads cache entries after its last query, self-pick or not
    g5 = g.clone()
    g5[..., 5, 0] = 5  # the official leak
    run = torch.arange(5 * nt, 5 * nt + 2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, run[-1] + 1:], v2[:, :, run[-1] + 1:] = 1e3, 1e3  # stale / never written
    close(AO.official_block_attention(q[:, :, run], run, k2, v2, g5, nt, True, (pk, pv)),
          AO.official_block_attention(q[:, :, run], run, k, v, g5, nt, True, (pk, pv)), atol=0)
    with pytest.raises(ValueError, match="block ids"):
        AO.official_sga_attention(q, k, v, g + 64, grid)


# --------------------------------------------------------------------------------------------------------------
# Errors


def _save(tmp_path: Path, name: str, sd: dict, **extra) -> Path:
    path = tmp_path / name
    torch.save({"state_dict": sd, **extra}, path)
    return path


def test_unknown_missing_misshaped_tensors_are_named(tmp_path, variants):
    sd = dict(torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"])
    sd["first_stage_model.encoder.extra.weight"] = torch.zeros(3)
    sd["transformer.decoder.layers.1.extra.weight"] = torch.zeros(3)
    del sd["cond_stage_model.decoder.conv_out.bias"]
    sd["transformer.decoder.layers.1.fc2.weight"] = torch.zeros(64, 7)
    bad = _save(tmp_path, "bad.ckpt", sd)
    with pytest.raises(ValueError) as e:
        import_official(tmp_path / "out", guide=bad, official_config=FIX / "configs.json")
    msg = str(e.value)
    for name in ("first_stage_model.encoder.extra.weight", "decoder.layers.1.extra.weight",
                 "cond_stage_model.decoder.conv_out.bias", "decoder.layers.1.fc2.weight", "(64, 7)", str(bad)):
        assert name in msg, (name, msg)
    assert not (tmp_path / "out").exists()  # nothing written
    sd = dict(torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"])
    sd["permuter.foo"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unknown tensors outside .*permuter\.foo"):
        import_official(tmp_path / "out", guide=_save(tmp_path, "bad2.ckpt", sd))
    cfg = json.loads((FIX / "configs.json").read_text())
    cfg["first_stage_config"]["params"]["n_embed"] = 1024
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"n_embed: checkpoint 64 vs config 1024"):
        import_official(tmp_path / "out", guide=CKPT, official_config=tmp_path / "cfg.json")
    with pytest.raises(ValueError, match=r"182 input channels is not the image tokenizer; pass it as --seg"):
        import_official(tmp_path / "out", vqgan=variants["seg"])
    del sd["permuter.foo"]
    with pytest.raises(ValueError, match="pass it as --sga"):
        import_official(tmp_path / "out", guide=_save(tmp_path, "sga_as_guide.ckpt", {
            **sd, **{"guiding_" + k: v for k, v in sd.items() if k.startswith("transformer.")}}))


def test_pickled_checkpoint_needs_trust(tmp_path, capsys):
    """A Lightning checkpoint with an argparse.Namespace (as PL 1.x stores hyper-parameters) needs full
    unpickling: refused by default, loaded with --trust-pickle and a warning."""
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    path = tmp_path / "pl.ckpt"
    torch.save({**ckpt, "hyper_parameters": argparse.Namespace(base="configs/x.yaml")}, path)
    rc = cli("--guide", path, "--official-config", FIX / "configs.json", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 1 and "argparse.Namespace" in err and "--trust-pickle" in err
    assert not (tmp_path / "out").exists()
    # a class that is not importable here (as pytorch_lightning's callbacks for PL 1.x checkpoints)
    mod = type(sys)("_gone_module")
    mod.Callback = type("Callback", (), {"__module__": "_gone_module"})
    sys.modules["_gone_module"] = mod
    try:
        torch.save({**ckpt, "callbacks": {mod.Callback: {}}}, tmp_path / "pl14.ckpt")
    finally:
        del sys.modules["_gone_module"]
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="_gone_module.*pytorch-lightning"):
        import_official(tmp_path / "out", guide=tmp_path / "pl14.ckpt", trust_pickle=True)
    with pytest.warns(UserWarning, match="full unpickling"):
        rc = cli("--guide", path, "--official-config", FIX / "configs.json", "--out", tmp_path / "out",
                 "--trust-pickle")
    assert rc == 0 and (tmp_path / "out" / "guide.pt").is_file()
    out = capsys.readouterr().out
    assert "training state, not weights: epoch, global_step, hyper_parameters" in out
    rc = cli("--guide", CKPT, "--official-config", FIX / "configs.json", "--out", tmp_path / "out")
    assert rc == 1 and "--force" in capsys.readouterr().err  # never overwrites silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli("--guide", CKPT, "--official-config", FIX / "configs.json", "--out", tmp_path / "out",
                   "--force", "--set", "data.resolution=1024") == 0
    assert load_config(tmp_path / "out" / "config.yaml").data.resolution == 1024


# --------------------------------------------------------------------------------------------------------------
# The released models: configs/official_*.yaml vs the full-size official layouts


@pytest.mark.parametrize("dataset", ["landscape", "coco"])
def test_official_configs_describe_the_release(dataset):
    cfg = load_config(ROOT / "configs" / f"official_{dataset}.yaml")
    t = cfg.model.transformer
    assert (cfg.model.vqgan.region_norm, t.causal_picks, t.sga_semantics, cfg.model.token_hole) == \
           ("official", "official", "official", "nearest")
    layout = json.loads((FIX / "key_layouts.json").read_text())[f"official_full_{dataset}_guide_ckpt"]
    meta = {name: torch.empty(shape, device="meta") for name, shape, *_ in layout}

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}

    # the sizes the importer infers from the official tensors (paper defaults where shapes are silent) ...
    assert infer_vq_config(sub("first_stage_model."), masked=True) == cfg.model.vqgan
    assert infer_vq_config(sub("cond_stage_model."), masked=False) == cfg.model.seg
    inferred = infer_transformer_config(sub("transformer."))
    assert inferred == type(t)(**{**vars(t), "causal_picks": "fixed", "sga_semantics": "union"})
    # ... and every official tensor maps onto the models these configs build
    with torch.device("meta"):
        models = {"first_stage_model.": VQModel(cfg.model.vqgan), "cond_stage_model.": SegVQModel(cfg.model.seg)}
        tr = AssetTransformer(t)
    from asset_dist.official.vq import official_vq_state_dict
    for prefix, model in models.items():
        assert set(official_vq_state_dict(sub(prefix), "", expected=model)) == set(model.state_dict())
    assert set(OT.convert_official_state_dict(sub("transformer."), tr)) == set(tr.state_dict())


def test_official_project_yaml_is_read(tmp_path):
    """The release ships Lightning project configs (model.params.{*_config, d_size}); the fixture's configs.json
    holds the same dicts at the top level."""
    js = json.loads((FIX / "configs.json").read_text())
    import yaml
    doc = {"model": {"target": "asset.models.cond_transformer.Net2NetTransformer", "params": {
        "is_SGA": True, "d_size": [1024, 256], "first_stage_config": js["first_stage_config"],
        "cond_stage_config": js["cond_stage_config"], "transformer_config": js["transformer_config"]}}}
    (tmp_path / "landscape_1024.yaml").write_text(yaml.safe_dump(doc))
    a, b = read_official_config(tmp_path / "landscape_1024.yaml"), read_official_config(FIX / "configs.json")
    assert a.transformer == b.transformer == js["transformer_config"]["params"]
    assert a.first_stage == b.first_stage and a.cond_stage == b.cond_stage
    assert a.d_size == [1024, 256] and b.d_size == [512, 256]


# --------------------------------------------------------------------------------------------------------------
# Editing on imported weights: `asset-dist edit` and `edit-batch` take the written config.yaml unchanged


def test_edit_and_edit_batch_run_on_imported_weights(imported, tmp_path):
    """The fixture's 512 photo, label map and official mask: `edit` (guide precompute included) and `edit-batch`
    over an edit set built by make_edits.py from the same files give the same samples (same id and seed), keep
    every pixel outside the blend band byte-identical and change the hole."""
    import subprocess

    from PIL import Image

    from asset_dist.infer.blend import dilate

    out, cfg = imported
    inp = np.load(FIX / "inputs.npz")
    image, seg, mask = inp["image_512"], inp["seg_512"], inp["mask_512"].astype(np.uint8) * 255
    d = tmp_path / "in"
    d.mkdir()
    for name, arr in (("photo.png", image), ("seg.png", seg), ("mask.png", mask)):
        Image.fromarray(arr).save(d / name)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    conf = str(out / "config.yaml")
    run("-m", "asset_dist.cli", "edit", "--config", conf, "--input", str(d / "photo.png"), "--seg",
        str(d / "seg.png"), "--mask", str(d / "mask.png"), "--class", "tree", "--id", "lake", "--samples", "1",
        "--device", "cpu", "--out", str(tmp_path / "one"))
    (d / "edits.csv").write_text("id,image,seg,mask,class\nlake,photo.png,seg.png,mask.png,tree\n")
    run("data_tools/make_edits.py", "files", "--list", str(d / "edits.csv"), "--config", conf,
        "--out", str(tmp_path / "edits"))
    run("-m", "asset_dist.cli", "edit-batch", "--config", conf, "--edits", str(tmp_path / "edits"),
        "--samples", "1", "--device", "cpu", "--out", str(tmp_path / "batch"))
    rec = json.loads((tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "ok" and rec["mode"] == "sga" and rec["tokens_sampled"]["target"] > 0, rec
    a = np.asarray(Image.open(tmp_path / "one" / "lake" / "sample_0.png"))
    b = np.asarray(Image.open(tmp_path / "batch" / "lake" / "sample_0.png"))
    assert np.array_equal(a, b)
    keep = dilate(mask, cfg.infer.blend_band)
    assert a.shape == image.shape and np.array_equal(a[~keep], image[~keep])
    assert not np.array_equal(a[mask > 0], image[mask > 0])

"""`asset-dist evaluate`: metric functions against hand values, the tokenizer and transformer commands on tiny
random-weight exports over the sflckr val split (checked against independent recomputations with the models'
own APIs), the attention settings' equalities and differences, the edit-output check on a synthetic folder
with a known tampered pixel, and FID through a local feature extractor."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asset_dist import attention as A
from asset_dist.cli import main as cli_main
from asset_dist.config import load_config, to_dict
from asset_dist.eval import metrics as M
from asset_dist.eval.common import rank_share
from asset_dist.distenv import DistEnv
from tests.train_utils import REPO, make_tiny_parents, train_env

torch.set_num_threads(1)

# tiny_sga.yaml with cheaper tokenizers (no res blocks, no attention): 512 px tokenization stays CPU-cheap
SGA_YAML = """base: {repo}/configs/tiny_sga.yaml
model:
  vqgan: {{num_res_blocks: 0, decoder_res_blocks: 0, attn_resolutions: []}}
  seg: {{num_res_blocks: 0, decoder_res_blocks: 0, attn_resolutions: []}}
  transformer: {{block_grid: {grid}}}
data: {{batch_size: 1, train_shards: {shards}, val_shards: {shards}}}
train: {{vqgan_weights: {w}/vqgan.pt, seg_weights: {w}/seg.pt, guide_weights: {w}/guide.pt}}
"""


def run_cli(*argv: str) -> int:
    return cli_main(["evaluate", *map(str, argv)])


def sga_exports(out: Path, shards: Path, grid: list[int]) -> Path:
    """Random exports (tokenizers, guide, sga) for the block grid; weights larger than the init so attention is
    peaked and the settings give visibly different logits. Returns the config path."""
    from asset_dist.models.seg_vq import SegVQModel
    from asset_dist.models.transformer import AssetTransformer
    from asset_dist.models.vqgan import VQModel
    from asset_dist.artifacts import write_export

    out.mkdir(parents=True, exist_ok=True)
    path = out / "sga.yaml"
    path.write_text(SGA_YAML.format(repo=REPO, grid=grid, shards=shards, w=out))
    cfg = load_config(path)
    torch.manual_seed(0)
    nets = {"vqgan": VQModel(cfg.model.vqgan), "seg": SegVQModel(cfg.model.seg),
            "guide": AssetTransformer(cfg.model.transformer), "sga": AssetTransformer(cfg.model.transformer)}
    with torch.no_grad():
        for name in ("guide", "sga"):
            for p in nets[name].parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.15)
    for stage, m in nets.items():
        write_export(out / f"{stage}.pt", stage=stage, network="model", state_dict=m.state_dict(), config=to_dict(cfg),
                     lineage={"test": "random"}, step=0)
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    return make_tiny_parents(tmp_path_factory.mktemp("eval_parents"))


# ----------------------------------------------------------------------------------------------------------
# metric functions


def test_metric_functions_against_hand_values():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.5  # mse 0.25 on range 2: 10 log10(4 / 0.25) = 12.0412 dB
    b[1, :, 0, 0] = 1.0  # one pixel off by 1 in 16: mse 1/16 -> 10 log10(64)
    p = M.psnr(b, a)
    assert torch.allclose(p, torch.tensor([10 * math.log10(16), 10 * math.log10(64)], dtype=torch.float64))
    assert float(M.psnr(a, a)[0]) == M.PSNR_CAP
    w = torch.zeros(2, 1, 4, 4)
    w[:, :, 0, 0] = 1  # only the changed pixel counts: mse 1 for image 1 -> 10 log10(4)
    assert math.isclose(float(M.psnr(b, a, w)[1]), 10 * math.log10(4), rel_tol=1e-12)

    counts = torch.tensor([2, 2, 0, 0])  # two codes equally often: usage 1/2, perplexity 2
    u = M.codebook_usage(counts)
    assert (u["usage"], u["codes_used"], u["n_embed"]) == (0.5, 2, 4) and math.isclose(u["perplexity"], 2.0)
    u = M.codebook_usage(M.code_histogram(torch.tensor([[0, 0, 0, 1]]), 4))  # p = (3/4, 1/4)
    assert math.isclose(u["perplexity"], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))

    target = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    s = M.segmentation_scores(M.confusion(pred, target, 4))
    # IoU: class 0: 1/(2+2-1) = 1/3, class 1: 2/(2+3-2) = 2/3, class 2: 0/(1+0-0) = 0; class 3 absent
    assert s["pixel_accuracy"] == 3 / 5 and s["classes"] == 3 and math.isclose(s["miou"], (1 / 3 + 2 / 3 + 0) / 3)

    t = M.token_scores(6.0, 1, 4)
    assert t == {"nll": 1.5, "top1": 0.25, "perplexity": math.exp(1.5), "tokens": 4}

    # diagonal covariances: FID = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    fid = M.frechet_distance(np.array([0.0, 1.0]), np.diag(s1), np.array([3.0, 1.0]), np.diag(s2))
    assert math.isclose(fid, 9.0 + (1 + 9 - 6) + (4 + 1 - 4), rel_tol=1e-9)

    img = np.zeros((4, 4, 3), np.uint8)
    other = img.copy()
    other[0, 0] = 7  # outside the keep region
    other[3, 3, 1] = 9  # inside it
    keep = np.zeros((4, 4), bool)
    keep[2:, 2:] = True
    assert M.unchanged_outside(other, img, keep) == (11, 12)
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    assert M.pairwise_l1([img, other, img], mask) == pytest.approx([3.5 / 255, 0.0, 3.5 / 255])  # 1 of 2 px, 3 ch
    ys, xs = M.mask_box(np.pad(mask, ((20, 20), (20, 20))), margin=1, min_side=8)
    assert (ys.stop - ys.start, xs.stop - xs.start) == (8, 8) and ys.start <= 19 and ys.stop >= 22
    assert M.summarize([1.0, 2.0, 3.0])["mean"] == 2.0 and M.summarize([1.0, 3.0])["total"] == 4.0
    assert [rank_share(5, DistEnv(rank=r, world_size=2)) for r in (0, 1)] == [3, 2]
    assert [rank_share(1, DistEnv(rank=r, world_size=2)) for r in (0, 1)] == [1, 0]  # 0 = nothing, not "all"
    assert rank_share(0, DistEnv()) is None


def test_random_and_window_picks():
    from asset_dist.eval.transformer import random_picks, window_picks
    from asset_dist.models.transformer import AssetTransformer

    cfg = load_config(REPO / "configs" / "tiny_sga.yaml")
    model = AssetTransformer(cfg.model.transformer)
    nb, k = model.n_blocks, 3
    keys = ["a", "b"]
    g = random_picks(model, keys, k, seed=5)
    assert all(torch.equal(g[key], v) for key, v in random_picks(model, keys, k, seed=5).items())
    assert torch.equal(g["e_self"][:, 1:], random_picks(model, ["b"], k, seed=5)["e_self"])  # per key, not batch
    assert not torch.equal(g["e_self"], random_picks(model, keys, k, seed=6)["e_self"])
    for key, causal in (("e_self", False), ("d_causal", True), ("d_cross", False)):
        assert g[key].shape == (2, 2, model.n_heads, nb, k)
        forbidden = A.forbidden_blocks(nb, causal)
        for b in range(nb):
            rows = g[key][..., b, :].reshape(-1, k)
            n_ok = int((~forbidden[b]).sum())
            for row in rows.tolist():
                got = [c for c in row if c >= 0]
                assert len(got) == min(k, n_ok) and len(set(got)) == len(got)  # all distinct, -1 only as padding
                assert not any(forbidden[b, c] for c in got)  # never a window block; causal: only < b-2
    # spread over the eligible blocks, never the last three (48 picks of 61 blocks: ~33 distinct expected)
    seen = torch.bincount(g["d_causal"][..., nb - 1, :].reshape(-1), minlength=nb)
    assert (seen[: nb - 3] > 0).sum() >= nb // 4 and seen[nb - 3:].sum() == 0
    w = window_picks(model, k)
    assert w["d_cross"].shape == (len(model.decoder), 1, model.n_heads, nb, k) and (w["d_cross"] == -1).all()


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_command(sflckr_shards, parents, tmp_path):
    from asset_dist.data import build_loader
    from asset_dist.models.seg_vq import SegVQModel
    from asset_dist.models.tokens import load_weights
    from asset_dist.models.vqgan import VQModel

    cfg_path = REPO / "configs" / "tiny_vqgan.yaml"
    sets = [f"data.train_shards={sflckr_shards}", f"data.val_shards={sflckr_shards}", "data.batch_size=2",
            f"train.vqgan_weights={parents['vqgan']}", f"train.seg_weights={parents['seg']}"]
    args = ["tokenizer", "--config", cfg_path, "--out", tmp_path, "--device", "cpu",
            *sum((["--set", s] for s in sets), [])]
    assert run_cli(*args) == 0
    rep = json.loads((tmp_path / "eval_tokenizer.json").read_text())
    assert "| vqgan |" in (tmp_path / "eval_tokenizer.md").read_text()
    assert rep["samples"] == 5 and rep["resolution"] == 64 and rep["split"] == "val"  # the whole val split
    vq, seg = rep["models"]["vqgan"], rep["models"]["seg"]
    assert 0 < vq["psnr"] < 100 and 0 < vq["psnr_known_masked"] < 100
    for m in (vq, seg):
        assert 0 < m["usage"] <= 1 and 1 <= m["perplexity"] <= m["codes_used"] <= m["n_embed"] == 64
    assert 0 <= seg["pixel_accuracy"] <= 1 and 0 <= seg["miou"] <= 1

    # the same numbers by hand: the val samples through the models' own forward
    cfg = load_config(cfg_path, sets)
    batches = list(build_loader(cfg.data, "val", 0, 1))
    x = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["seg"] for b in batches])
    v, s = VQModel(cfg.model.vqgan), SegVQModel(cfg.model.seg)
    load_weights(v, str(parents["vqgan"]), "vqgan")
    load_weights(s, str(parents["seg"]), "seg")
    with torch.no_grad():
        rec, _, idx = v.eval()(x)
        logits, _, sidx = s.eval()(labels)
    mse = (rec.clamp(-1, 1).double() - x.double()).square().mean((1, 2, 3))
    assert math.isclose(vq["psnr"], float((10 * torch.log10(4 / mse)).mean()), rel_tol=1e-5)  # other batching
    assert vq["codes_used"] == len(torch.unique(idx)) and seg["codes_used"] == len(torch.unique(sidx))
    assert math.isclose(seg["pixel_accuracy"], float((logits.argmax(1) == labels).double().mean()), rel_tol=1e-12)

    # two ranks (torchrun, gloo): each reads its shards, the sums are all-reduced -> the same report
    port = 31000 + os.getpid() % 1000
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "asset_dist.cli", "evaluate", *map(str, args[:4]), str(tmp_path / "two"),
                           *map(str, args[5:])], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_tokenizer.json").read_text())
    assert two["world_size"] == 2 and two["samples"] == 5
    for name, m in rep["models"].items():
        for key, val in m.items():
            assert two["models"][name][key] == (val if isinstance(val, (str, int)) else pytest.approx(val, rel=1e-6))

    # one export alone: its stage decides; a transformer export is refused with a clear message
    assert run_cli("tokenizer", "--config", cfg_path, "--weights", parents["seg"], "--max-samples", 1, "--out",
                   tmp_path / "seg", *sum((["--set", s] for s in sets[:2]), [])) == 0
    one = json.loads((tmp_path / "seg" / "eval_tokenizer.json").read_text())
    assert list(one["models"]) == ["seg"] and one["samples"] == 1
    assert run_cli("tokenizer", "--config", cfg_path, "--weights", parents["guide"], "--out", tmp_path / "x",
                   *sum((["--set", s] for s in sets[:2]), [])) == 2


# ----------------------------------------------------------------------------------------------------------
# transformer


def _transformer_run(cfg_path: Path, out: Path, settings: str) -> dict:
    w = cfg_path.parent
    assert run_cli("transformer", "--config", cfg_path, "--weights", w / "sga.pt", "--max-samples", 1, "--out", out,
                   "--settings", settings, "--device", "cpu") == 0
    assert (out / "eval_transformer.md").read_text().count("| 512 |") == len(settings.split(",")) - \
        ("guide256" in settings)
    return json.loads((out / "eval_transformer.json").read_text())


def test_transformer_settings_differ_and_guided_is_the_models_loss(sflckr_shards, tmp_path):
    from asset_dist.data import build_loader
    from asset_dist.models.tokens import Tokenizers, load_weights
    from asset_dist.models.transformer import AssetTransformer, guides_from_maps

    cfg_path = sga_exports(tmp_path / "w", sflckr_shards, [16, 4])
    rep = _transformer_run(cfg_path, tmp_path / "out", "guided,window,random,guide256")
    s = rep["settings"]
    assert rep["samples"] == 1 and rep["resolution"] == 512 and s["guide256"]["resolution"] == 256
    assert s["guided"]["tokens"] == s["window"]["tokens"] == s["random"]["tokens"] > 0
    nll = [s[k]["nll"] for k in ("guided", "window", "random")]
    assert len({round(v, 6) for v in nll}) == 3, nll  # the picks matter
    for row in s.values():
        assert 0 <= row["top1"] <= 1 and math.isclose(row["perplexity"], math.exp(row["nll"]))

    # guided = the SGA stage's computation on the same sample: frozen guide on the 256 view -> picks -> loss
    cfg = load_config(cfg_path)
    batch = next(iter(build_loader(cfg.data, "val", 0, 1)))
    tok = Tokenizers(cfg)
    guide, model = AssetTransformer(cfg.model.transformer), AssetTransformer(cfg.model.transformer)
    load_weights(guide, cfg.train.guide_weights, "guide")
    load_weights(model, str(cfg_path.parent / "sga.pt"), "sga")
    t = cfg.model.transformer
    with torch.no_grad():
        ids, cond, hole = tok(batch["image"], batch["seg"], batch["mask"])
        lr = tok(batch["image_lr"], batch["seg_lr"], batch["mask_lr"])
        glogits, maps = guide.eval()(*lr, return_attn=True)
        picks = guides_from_maps(maps, t.block_grid, k=t.guide_k, causal_mode=t.causal_picks)
        logits = model.eval()(ids, cond, hole, guides=picks)
        loss = model.loss(logits, ids, hole)
        gloss = guide.loss(glogits, lr[0], lr[2])
    lay = model.layout(ids.shape[1])
    sel = hole[:, lay.perm]
    acc = float((logits[sel].argmax(-1) == ids[:, lay.perm][sel]).double().mean())
    assert math.isclose(s["guided"]["nll"], float(loss), rel_tol=1e-5)
    assert s["guided"]["tokens"] == int(hole.sum()) and math.isclose(s["guided"]["top1"], acc)
    assert math.isclose(s["guide256"]["nll"], float(gloss), rel_tol=1e-5)
    assert s["guide256"]["tokens"] == int(lr[2].sum())


def test_transformer_settings_agree_when_the_window_covers_everything(sflckr_shards, tmp_path):
    # 2 blocks: the window of every query block holds every block, so no pick is possible (all -1 in every
    # setting) and SGA is full attention: guided == window == random exactly, and == dense up to kernel rounding
    cfg_path = sga_exports(tmp_path / "w", sflckr_shards, [2, 1])
    s = _transformer_run(cfg_path, tmp_path / "out", "guided,window,random,dense")["settings"]
    assert s["guided"]["nll"] == s["window"]["nll"] == s["random"]["nll"]
    assert s["guided"]["top1"] == s["window"]["top1"] == s["random"]["top1"]
    assert math.isclose(s["guided"]["nll"], s["dense"]["nll"], rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# edits


def _png(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_edit_out(root: Path, tamper: bool) -> tuple[Path, Path]:
    """Two 32x32 edits, 2 samples each, one failed record. Masks are 8x8 squares, band 2 px: 12x12 = 144 pixels
    may change, 880 per sample must not. Edit a: mask filled with 10 vs 50 (L1 40/255), plus a change inside
    the band; edit b: both samples 100 in the mask (L1 0). tamper: one pixel just outside the band."""
    from asset_dist.infer.edits import make_record, write_edit_shards

    rng = np.random.default_rng(0)
    masks = {"a": (slice(8, 16), slice(8, 16)), "b": (slice(20, 28), slice(4, 12))}
    recs, images = [], {}
    for eid, (ys, xs) in masks.items():
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[ys, xs] = 255
        seg = np.full((32, 32), 3, np.uint8)
        recs.append(make_record(eid, _bytes(img), _bytes(seg), _bytes(mask), class_id=5, class_name="x",
                                num_classes=182, label_shift=0))
        images[eid] = img
    edits = root / "edits"
    write_edit_shards(edits, recs)
    out = root / "out"
    fills = {"a": (10, 50), "b": (100, 100)}
    for eid, (ys, xs) in masks.items():
        for k, v in enumerate(fills[eid]):
            s = images[eid].copy()
            s[ys, xs] = v
            if eid == "a":
                s[ys.start - 2, xs.start - 2] = 0  # inside the band: allowed
            if tamper and eid == "b" and k == 1:
                s[17, 8] ^= 1  # 3 px from b's mask: outside the 2 px band
            _png(s, out / eid / f"sample_{k}.png")
    lines = [{"edit": "a", "status": "ok", "samples": 2, "timings_s": {"prepare": 0.5, "sample": 2.0}},
             {"edit": "b", "status": "ok", "samples": 2, "timings_s": {"prepare": 1.5, "sample": 4.0, "guide": 1.0}},
             {"edit": "c", "status": "failed", "error": "edit 'c': broken"}]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "run.json").write_text(json.dumps({"blend_band": 2, "samples": 2}))
    (out / "config.yaml").write_text(f"infer: {{edits: {edits}}}\n")
    return out, edits


def test_edits_check_and_scores(tmp_path, capsys):
    out, _ = synthetic_edit_out(tmp_path / "clean", tamper=False)
    assert run_cli("edits", "--edit-out", out) == 0  # band and inputs from run.json / config.yaml
    rep = json.loads((out / "eval_edits.json").read_text())
    p = rep["preservation"]
    assert p["passed"] and p["unchanged_fraction"] == 1.0 and p["pixels_checked"] == 4 * 880
    assert (rep["records"], rep["ok"], rep["failed"], rep["band"]) == (3, 2, 1, 2)
    assert rep["failed_errors"] == [{"edit": "c", "error": "edit 'c': broken"}]
    assert rep["diversity"]["pixel_l1_in_mask"] == pytest.approx((40 / 255 + 0.0) / 2, rel=1e-12)
    t = rep["timings_s"]
    assert t["sample"]["mean"] == 3.0 and t["prepare"]["total"] == 2.0 and t["guide"]["count"] == 1
    assert t["per_edit"]["mean"] == (2.5 + 6.5) / 2
    assert rep["fid"]["fid"] is None and "--fid-extractor" in rep["fid"]["note"]
    assert "PASS" in (out / "eval_edits.md").read_text()

    bad, edits = synthetic_edit_out(tmp_path / "tampered", tamper=True)
    capsys.readouterr()
    assert run_cli("edits", "--edit-out", bad, "--edits", edits, "--out", tmp_path / "rep") == 1
    assert "FAILED" in capsys.readouterr().err
    p = json.loads((tmp_path / "rep" / "eval_edits.json").read_text())["preservation"]
    assert p["pixels_changed"] == 1 and p["unchanged_fraction"] == (4 * 880 - 1) / (4 * 880) < 1.0
    assert p["changed"] == [{"edit": "b", "sample": 1, "changed_pixels": 1}] and not p["passed"]
    # a band wide enough to cover the tampered pixel passes
    assert run_cli("edits", "--edit-out", bad, "--band", 3, "--out", tmp_path / "rep2") == 0
    assert json.loads((tmp_path / "rep2" / "eval_edits.json").read_text())["preservation"]["pixels_checked"] == 4 * 828
    # a missing sample fails the check too
    (bad / "a" / "sample_1.png").unlink()
    assert run_cli("edits", "--edit-out", bad, "--band", 3, "--out", tmp_path / "rep3") == 1
    assert "sample_1.png missing" in json.loads((tmp_path / "rep3" / "eval_edits.json").read_text())["problems"][0]


def test_edits_lpips_and_fid_through_the_api(tmp_path):
    from asset_dist.eval.edits import evaluate_edits
    from asset_dist.models.losses import LPIPS

    out, _ = synthetic_edit_out(tmp_path, tamper=False)
    fn = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).double()  # noqa: E731 - a stand-in extractor
    rep = evaluate_edits(out, lpips=LPIPS(random_init=True), extractor=fn)
    assert rep["diversity"]["lpips_mask_box"] > 0 and rep["diversity"]["lpips_note"] is None
    assert rep["fid"]["n_real"] == 2 and rep["fid"]["n_fake"] == 4 and rep["fid"]["fid"] >= 0


# ----------------------------------------------------------------------------------------------------------
# FID


class _Feat(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_fid_command_with_a_local_extractor(tmp_path, capsys):
    rng = np.random.default_rng(1)
    sets = {name: [rng.integers(lo, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
            for name, lo in (("real", 0), ("fake", 60))}
    for name, ims in sets.items():
        for i, im in enumerate(ims):
            _png(im, tmp_path / name / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Feat()).save(str(tmp_path / "feat.pt"))
    feats = {name: np.stack([np.concatenate([im.reshape(-1, 3).mean(0), im.reshape(-1, 3).std(0, ddof=1)])
                             for im in ims]) for name, ims in sets.items()}
    want = M.frechet_distance(feats["real"].mean(0), np.cov(feats["real"], rowvar=False),
                              feats["fake"].mean(0), np.cov(feats["fake"], rowvar=False))
    assert run_cli("fid", "--real", tmp_path / "real", "--fake", tmp_path / "fake", "--extractor",
                   tmp_path / "feat.pt", "--out", tmp_path / "o") == 0
    got = json.loads((tmp_path / "o" / "eval_fid.json").read_text())
    assert got["n_real"] == got["n_fake"] == 8 and got["feature_dim"] == 6
    assert math.isclose(got["fid"], want, rel_tol=1e-6) and want > 1
    for name, f in feats.items():
        np.save(tmp_path / f"{name}.npy", f)
    assert run_cli("fid", "--real", tmp_path / "real.npy", "--fake", tmp_path / "fake.npy",
                   "--out", tmp_path / "n") == 0
    assert math.isclose(json.loads((tmp_path / "n" / "eval_fid.json").read_text())["fid"], want, rel_tol=1e-9)
    capsys.readouterr()
    assert run_cli("fid", "--real", tmp_path / "real", "--fake", tmp_path / "fake") == 2
    assert "--extractor" in capsys.readouterr().err  # no weights, no download: a clear message


def test_every_subcommand_has_help(capsys):
    for what in ("", "tokenizer", "transformer", "edits", "fid"):
        with pytest.raises(SystemExit) as e:
            cli_main(["evaluate", *([what] if what else []), "--help"])
        assert e.value.code == 0
    assert "guide256" in capsys.readouterr().out

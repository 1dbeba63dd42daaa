"""Official-ASSET compatibility of the tokenizers: key layouts and outputs of the tiny official fixture.

The fixture (tests/fixtures/official_asset, README sections 1, 2 and "Checkpoint layout") was produced by the
unmodified official code with random weights. Tolerances are the README's: indices exact, latents / decoder
outputs atol 1e-4.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asset_dist.config import VQConfig
from asset_dist.models import SegVQModel, VQModel
from asset_dist.official.vq import load_official_vq, official_vq_state_dict, vq_config_from_official
from asset_dist.models.seg_vq import seg_config

torch.set_num_threads(1)  # small shared CI box

FIX = Path(__file__).resolve().parent / "fixtures" / "official_asset"
ATOL = 1e-4


@pytest.fixture(scope="module")
def fx():
    if not (FIX / "asset_guide_tiny.ckpt").is_file():
        pytest.fail(f"official fixture missing under {FIX}")
    ckpt = torch.load(FIX / "asset_guide_tiny.ckpt", map_location="cpu", weights_only=True)
    return {
        "sd": ckpt["state_dict"],
        "configs": json.loads((FIX / "configs.json").read_text()),
        "layouts": json.loads((FIX / "key_layouts.json").read_text()),
        "inputs": np.load(FIX / "inputs.npz"),
        "vq": np.load(FIX / "vqgan_outputs.npz"),
        "seg": np.load(FIX / "seg_vq_outputs.npz"),
    }


def build(fx, which: str, dtype: torch.dtype):
    if which == "vqgan":
        cfg = vq_config_from_official(fx["configs"]["first_stage_config"]["params"], region_norm="official")
        model, prefix = VQModel(cfg), "first_stage_model."
    else:
        cfg = vq_config_from_official(fx["configs"]["cond_stage_config"]["params"])
        model, prefix = SegVQModel(cfg), "cond_stage_model."
    return load_official_vq(model, fx["sd"], prefix).to(dtype).eval()


def image_inputs(fx, S: int, dtype):
    """Exactly as the official loader: x = u8/127.5 - 1 (NCHW), mask float N1HW with 1 = hole."""
    x = torch.from_numpy(fx["inputs"][f"image_{S}"].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    mask = torch.from_numpy(fx["inputs"][f"mask_{S}"].astype(np.float32))[None, None]
    return x.to(dtype), mask.to(dtype)


def close(ours: torch.Tensor, ref: np.ndarray, atol: float = ATOL) -> None:
    ref_t = torch.from_numpy(np.asarray(ref)).to(ours.dtype)
    assert ours.shape == ref_t.shape
    torch.testing.assert_close(ours, ref_t, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# Key layouts


def test_config_from_official_params(fx):
    cfg = vq_config_from_official(fx["configs"]["first_stage_config"]["params"])
    assert cfg.masked and cfg.region_norm == "official" and not cfg.legacy_downsample and cfg.ch_mult == [2, 1, 1, 1, 1]
    seg = vq_config_from_official(fx["configs"]["cond_stage_config"]["params"])
    assert not seg.masked and seg.legacy_downsample and seg.in_channels == seg.out_channels == 182


def _meta_sd(layout, prefix):
    return {name: torch.empty(shape, device="meta") for name, shape, *_ in layout if name.startswith(prefix)}


@pytest.mark.parametrize("dataset,n_embed,n_labels", [("landscape", 1024, 182), ("coco", 8192, 183)])
def test_full_size_official_layouts_map_onto_our_models(fx, dataset, n_embed, n_labels):
    layout = fx["layouts"][f"official_full_{dataset}_guide_ckpt"]
    with torch.device("meta"):
        vq = VQModel(VQConfig(n_embed=n_embed, region_norm="official"))
        seg = SegVQModel(seg_config(n_labels))
    vq_sd = official_vq_state_dict(_meta_sd(layout, "first_stage_model."), "first_stage_model.", expected=vq)
    seg_sd = official_vq_state_dict(_meta_sd(layout, "cond_stage_model."), "cond_stage_model.", expected=seg)
    assert len(vq_sd) == len(vq.state_dict()) and len(seg_sd) == len(seg.state_dict())


def test_standalone_layouts_and_ignored_tensors(fx):
    """Standalone files: prefix ''. `colorize` and `loss.*` (LPIPS, discriminator) are dropped on purpose."""
    model = build(fx, "seg", torch.float32)
    standalone = {k[len("cond_stage_model."):]: v for k, v in fx["sd"].items() if k.startswith("cond_stage_model.")}
    assert "colorize" in standalone
    standalone["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    standalone["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    out = official_vq_state_dict({"state_dict": standalone}, "", expected=model)
    assert "colorize" not in out and not any(k.startswith("loss.") for k in out)
    assert set(out) == set(model.state_dict())


def test_mapping_names_unknown_missing_and_misshaped(fx):
    model = build(fx, "vqgan", torch.float32)
    sd = dict(fx["sd"])
    sd["first_stage_model.encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown tensors \(1\): first_stage_model\.encoder\.extra\.weight"):
        official_vq_state_dict(sd, "first_stage_model.", expected=model)
    sd = dict(fx["sd"])
    del sd["first_stage_model.decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing tensors \(1\): first_stage_model\.decoder\.conv_out\.bias"):
        official_vq_state_dict(sd, "first_stage_model.", expected=model)
    sd = dict(fx["sd"])
    sd["first_stage_model.quantize.embedding.weight"] = torch.zeros(65, 32)
    with pytest.raises(ValueError, match=r"mis-shaped.*quantize\.embedding\.weight: checkpoint \(65, 32\)"):
        official_vq_state_dict(sd, "first_stage_model.", expected=model)
    with pytest.raises(ValueError, match="no tensors under prefix"):
        official_vq_state_dict(fx["sd"], "guiding_transformer")
    # prefix "" over the combined checkpoint: the other models' tensors are unknown here
    with pytest.raises(ValueError, match="unknown tensors"):
        official_vq_state_dict(fx["sd"], "", expected=model)


# ----------------------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_vqgan_reproduces_official_outputs(fx, dtype):
    model = build(fx, "vqgan", dtype)
    ref = fx["vq"]
    x, mask = image_inputs(fx, 256, dtype)
    with torch.no_grad():
        close(model.encode_pre_quant(x, mask), ref["h_256"])
        quant, emb_loss, indices = model.encode(x, mask)
        assert torch.equal(indices, torch.from_numpy(ref["indices_256"]))
        close(quant, ref["quant_256"])
        close(emb_loss, ref["emb_loss_256"], atol=1e-6)
        close(model.decode_indices(indices), ref["dec_256"])  # the official decode_to_img path
        if dtype == torch.float32:  # the 512 encoder is slow in fp64 on a CPU; fp32 covers it
            x5, mask5 = image_inputs(fx, 512, dtype)
            h5 = model.encode_pre_quant(x5, mask5)
            close(h5, ref["h_512"])
            assert torch.equal(model.quantize.nearest(h5), torch.from_numpy(ref["indices_512"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_seg_vq_reproduces_official_outputs(fx, dtype):
    model = build(fx, "seg", dtype)
    ref, inp = fx["seg"], fx["inputs"]
    labels = torch.from_numpy(inp["seg_256"].astype(np.int64))[None]
    onehot = torch.from_numpy(np.eye(182, dtype=np.float32)[inp["seg_256"]]).permute(2, 0, 1)[None].to(dtype)
    with torch.no_grad():
        h = model.encode_pre_quant(labels)  # gather path from the long label map
        close(h, ref["h_256"])
        if dtype == torch.float32:  # (fp64 gather == one-hot conv is checked in test_vqgan.py)
            close(model.encode_pre_quant(onehot), ref["h_256"])  # the official one-hot input
        quant, emb_loss, indices = model.encode(labels)
        assert torch.equal(indices, torch.from_numpy(ref["indices_256"]))
        close(quant, ref["quant_256"])
        close(emb_loss, ref["emb_loss_256"], atol=1e-6)
        labels5 = torch.from_numpy(inp["seg_512"].astype(np.int64))[None]
        assert torch.equal(model.encode_to_indices(labels5), torch.from_numpy(ref["indices_512"]))
        if dtype == torch.float32:  # the 182-channel decoder at 256 is slow in fp64 on a CPU
            logits = model.decode(quant)
            close(logits[:, :, 8::16, 8::16], ref["logits_sub_256"])
            close(logits[:, :, 120:136, 120:136], ref["logits_crop_256"])
            assert torch.equal(model.predict_labels(logits).to(torch.uint8),
                               torch.from_numpy(ref["logits_argmax_256"]))
            # per-channel sums over 65,536 pixels: atol 1e-4 per pixel bounds them by ~6.6; seen: 3e-3
            close(logits.double().sum(dim=(2, 3)), ref["logits_sum_256"], atol=0.05)

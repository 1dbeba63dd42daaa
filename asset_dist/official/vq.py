"""Official ASSET / taming VQ checkpoints -> this package's VQModel / SegVQModel state dicts.

The modules here are named like the official ones, so the mapping is: take the keys under `prefix`, strip it,
and drop the tensors this package does not use. Nothing is renamed.

  official key (combined guide/SGA checkpoint)        ours (VQModel / SegVQModel.state_dict())
  first_stage_model.<rest>                       ->    <rest>       prefix "first_stage_model."
  cond_stage_model.<rest>                        ->    <rest>       prefix "cond_stage_model."
  <rest> (standalone VQGAN / seg-VQ checkpoint)  ->    <rest>       prefix ""

Ignored on purpose (documented, never silently anything else):
  colorize   the seg-VQ's random RGB projection buffer, used only to draw label maps in the official logger;
  loss.*     the training loss of a VQGAN trained with main.py (LPIPS + discriminator). This package keeps the
             loss outside the tokenizer (models/losses.py); load those weights there if training resumes.
Everything else under the prefix must be a known tensor with the right shape, and every tensor of the model
must be present: unknown, missing and mis-shaped tensors raise a ValueError naming them.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

IGNORED_NAMES = ("colorize",)
IGNORED_PREFIXES = ("loss.",)


def _unwrap(sd: Mapping) -> Mapping:
    """Accept a Lightning checkpoint ({'state_dict': ...}) or a bare state dict."""
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        return sd["state_dict"]
    return sd


def official_vq_state_dict(sd: Mapping[str, torch.Tensor], prefix: str,
                           expected: Optional[Union[nn.Module, Mapping[str, torch.Tensor]]] = None
                           ) -> dict[str, torch.Tensor]:
    """Select and strip `prefix` (e.g. "first_stage_model.", "cond_stage_model." or ""), drop the ignored tensors.

    expected: the target model (or its state_dict). When given, the result is checked against it and any
    unknown, missing or mis-shaped tensor raises a ValueError that lists them. Pass it unless you only want
    the raw renaming (the loaders in this package always pass it).
    """
    sd = _unwrap(sd)
    if prefix and not prefix.endswith("."):
        prefix += "."
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in IGNORED_NAMES or name.startswith(IGNORED_PREFIXES):
            continue
        out[name] = value
    if not out:
        raise ValueError(f"no tensors under prefix {prefix!r} (first keys: {list(sd)[:5]})")
    if expected is None:
        return out
    ref = expected.state_dict() if isinstance(expected, nn.Module) else expected
    unknown = sorted(set(out) - set(ref))
    missing = sorted(set(ref) - set(out))
    bad_shape = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(ref[k].shape)}"
                       for k in set(out) & set(ref) if tuple(out[k].shape) != tuple(ref[k].shape))
    problems = []
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): {', '.join(prefix + k for k in unknown)}")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(prefix + k for k in missing)}")
    if bad_shape:
        problems.append(f"mis-shaped tensors ({len(bad_shape)}): {'; '.join(prefix + s for s in bad_shape)}")
    if problems:
        raise ValueError("official VQ checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    return out


def load_official_vq(model: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str) -> nn.Module:
    """Strictly load official weights (under `prefix`) into `model` (a VQModel or SegVQModel); returns model."""
    model.load_state_dict(official_vq_state_dict(sd, prefix, expected=model), strict=True)
    return model


def vq_config_from_official(params: Mapping, region_norm: str = "official"):
    """An official VQModel / VQSegmentationModel `params` dict (ddconfig, n_embed, embed_dim) -> VQConfig.

    The official masked encoder is `conv_type: PartialConv` + `norm_type: RegionNorm`; loading its weights
    needs region_norm="official". `downsample_legacy` defaults to True in the official Encoder.
    """
    from asset_dist.config import VQConfig

    dd = params["ddconfig"]
    masked = dd.get("conv_type", "") == "PartialConv"
    if masked != (dd.get("norm_type", "") == "RegionNorm"):
        raise ValueError("official configs pair PartialConv with RegionNorm; got "
                         f"conv_type={dd.get('conv_type')!r} norm_type={dd.get('norm_type')!r}")
    if dd.get("double_z", False):
        raise ValueError("double_z=True (a KL autoencoder) is not a VQ tokenizer config")
    legacy = bool(dd.get("downsample_legacy", True))
    if masked and legacy:
        raise ValueError("official PartialConv encoders with downsample_legacy=True are not supported")
    return VQConfig(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"], ch=dd["ch"], ch_mult=list(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"], attn_resolutions=list(dd["attn_resolutions"]),
        resolution=dd["resolution"], z_channels=dd["z_channels"], embed_dim=params["embed_dim"],
        n_embed=params["n_embed"], dropout=float(dd.get("dropout", 0.0)), masked=masked,
        region_norm=region_norm if masked else "true", legacy_downsample=legacy and not masked,
    )

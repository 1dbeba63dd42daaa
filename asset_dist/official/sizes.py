"""Model configs of official checkpoints: inferred from tensor shapes, completed from the official config.

Inferable from shapes: every width, depth, codebook and vocabulary size, which VQ levels have attention, the PEG
layers and kernel. Not inferable: the transformer's head count (d_model splits into any number of heads), the
16x4 block grid (only its product, the rows of `shared_block`), the VQ models' nominal resolution (which fixes
where attention sits, default 256), dropouts, and whether the image encoder is masked (PartialConv + RegionNorm
have no extra weights). Those come from the official config when one is given (`read_official_config`), else
from the paper: 64-dim heads, the 16x4 grid, resolution 256, a masked image encoder with the official RegionNorm,
a plain seg encoder with the legacy downsample. When an official config is given, every inferable size must
agree with it; a disagreement is an error that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import yaml

from asset_dist.config import TransformerConfig, VQConfig
from asset_dist.official.transformer import config_from_official
from asset_dist.official.vq import vq_config_from_official

PAPER_HEAD_DIM = 64  # 1024 / 16 heads (docs/ASSET_NOTES.md §4.1)
PAPER_GRID = [16, 4]
VQ_SHAPE_FIELDS = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                   "z_channels", "embed_dim", "n_embed", "decoder_res_blocks")
TRANSFORMER_SHAPE_FIELDS = ("vocab_size", "cond_vocab_size", "d_model", "ffn_dim", "encoder_layers",
                            "decoder_layers", "max_position_embeddings", "peg", "peg_kernel")


@dataclasses.dataclass
class OfficialParams:
    """The parts of an official config the importer uses (each None when absent)."""

    first_stage: Optional[dict] = None  # VQModel params (ddconfig, n_embed, embed_dim)
    cond_stage: Optional[dict] = None  # VQSegmentationModel params
    transformer: Optional[dict] = None  # ASSET params (vocab_size, layers, heads, PEG_list, block_h/w, ...)
    d_size: Optional[list] = None  # [high resolution, guide resolution] of an SGA config
    source: str = ""


def _params(node: Any) -> Optional[dict]:
    if isinstance(node, Mapping):
        return dict(node["params"]) if isinstance(node.get("params"), Mapping) else dict(node)
    return None


def read_official_config(path: "str | os.PathLike") -> OfficialParams:
    """An official project config (configs/*.yaml of the release: model.params.{first_stage_config,
    cond_stage_config, transformer_config, d_size}) or a JSON/YAML dict holding those *_config entries at the
    top level (the fixture's configs.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official config not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: top level must be a mapping")
    node = data
    if isinstance(data.get("model"), Mapping):
        node = _params(data["model"]) or {}
    out = OfficialParams(_params(node.get("first_stage_config")), _params(node.get("cond_stage_config")),
                         _params(node.get("transformer_config")), node.get("d_size"), str(path))
    if out.d_size is None:  # the fixture keeps the SGA-only params in their own entry
        out.d_size = next((v["d_size"] for v in data.values() if isinstance(v, Mapping) and "d_size" in v), None)
    if not (out.first_stage or out.cond_stage or out.transformer):
        raise ValueError(f"{path}: no first_stage_config, cond_stage_config or transformer_config found "
                         "(expected an official model config)")
    return out


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers i of keys '<prefix><i>.<...>'; must be 0..n-1."""
    found = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys
                    if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})
    if found != list(range(len(found))):
        raise ValueError(f"tensors under '{prefix}*' have indices {found}, expected 0..{len(found) - 1}")
    return found


class _Shapes:
    def __init__(self, sd: Mapping[str, torch.Tensor], src: str, what: str):
        self.sd, self.src, self.what = sd, src, what

    def __call__(self, name: str) -> tuple[int, ...]:
        if name not in self.sd:
            raise ValueError(f"{self.src}: cannot infer the {self.what} sizes, tensor '{name}' is missing")
        return tuple(self.sd[name].shape)


def _agree(inferred: Any, declared: Any, fields, src: str, what: str, norm: Callable = lambda f, v: v) -> None:
    bad = [f"{f}: checkpoint {norm(f, getattr(inferred, f))!r} vs config {norm(f, getattr(declared, f))!r}"
           for f in fields if norm(f, getattr(inferred, f)) != norm(f, getattr(declared, f))]
    if bad:
        raise ValueError(f"{src}: the official config does not describe this {what} checkpoint: " + "; ".join(bad))


def infer_vq_config(sd: Mapping[str, torch.Tensor], masked: bool, params: Optional[Mapping] = None,
                    src: str = "<state dict>") -> VQConfig:
    """VQConfig of an official VQModel / VQSegmentationModel state dict (prefix removed). masked=True for the
    image VQGAN (PartialConv + RegionNorm, official arithmetic), False for the seg tokenizer; params: the
    official model params, which then decide what shapes cannot (and must agree with the shapes)."""
    shape = _Shapes(sd, src, "VQ")
    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    levels = _indices(sd, "encoder.down.")
    if not levels:
        raise ValueError(f"{src}: no 'encoder.down.*' tensors: not a VQ model state dict")
    ch_mult = []
    for i in levels:
        out = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out % ch:
            raise ValueError(f"{src}: encoder level {i} has {out} channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    n_res = len(_indices(sd, "encoder.down.0.block."))
    n_dec = len(_indices(sd, "decoder.up.0.block."))
    z = shape("decoder.conv_in.weight")[1]
    if shape("encoder.conv_out.weight")[0] != z:
        raise ValueError(f"{src}: encoder.conv_out has {shape('encoder.conv_out.weight')[0]} channels for "
                         f"z_channels={z} (double_z / KL autoencoders are not VQ tokenizers)")
    n_embed, embed_dim = shape("quantize.embedding.weight")
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    if params is not None:
        declared = vq_config_from_official(params, region_norm="official")
        resolution = declared.resolution
    else:
        declared, resolution = None, 256
    inferred = VQConfig(
        in_channels=in_ch, out_channels=shape("decoder.conv_out.weight")[0], ch=ch, ch_mult=ch_mult,
        num_res_blocks=n_res, attn_resolutions=[resolution // 2 ** i for i in attn_levels], resolution=resolution,
        z_channels=z, embed_dim=embed_dim, n_embed=n_embed, masked=masked,
        region_norm="official" if masked else "true", legacy_downsample=not masked,
        decoder_res_blocks=None if n_dec == n_res + 1 else n_dec)
    if declared is None:
        return inferred
    _agree(inferred, declared, VQ_SHAPE_FIELDS, src, "VQ")
    return declared


def _peg_layers(items, n_enc: int, n_dec: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    enc, dec = set(), set()
    for item in items:
        side, _, which = str(item).partition("_")
        n, target = (n_enc, enc) if side == "E" else (n_dec, dec)
        target.update(range(n) if which == "all" else {int(which)})
    return tuple(sorted(enc)), tuple(sorted(dec))


def _peg_list(enc, dec, n_enc: int, n_dec: int) -> list[str]:
    out = ["E_all"] if enc and len(enc) == n_enc else [f"E_{i}" for i in enc]
    return out + (["D_all"] if dec and len(dec) == n_dec else [f"D_{i}" for i in dec])


def infer_transformer_config(sd: Mapping[str, torch.Tensor], params: Optional[Mapping] = None,
                             src: str = "<state dict>", notes: Optional[list[str]] = None) -> TransformerConfig:
    """TransformerConfig of an official ASSET transformer state dict (prefix removed). Without official params,
    the head count is d_model / 64 and the grid 16x4 (the paper's), and a note says so."""
    shape = _Shapes(sd, src, "transformer")
    V, d = shape("lm_head.weight")
    n_enc = len(_indices(sd, "encoder.layers."))
    n_dec = len(_indices(sd, "decoder.layers."))
    if not n_enc or not n_dec:
        raise ValueError(f"{src}: no encoder/decoder layers found: not an ASSET transformer state dict")
    enc_peg = tuple(i for i in range(n_enc) if f"encoder.layers.{i}.PEG_net.proj.0.weight" in sd)
    dec_peg = tuple(i for i in range(n_dec) if f"decoder.layers.{i}.PEG_net.proj.0.weight" in sd)
    if not enc_peg and not dec_peg:
        raise ValueError(f"{src}: no PEG layers: the learned-raster-position variant of the official code (empty "
                         "PEG_list) is not supported; every released model uses PEG")
    first = f"encoder.layers.{enc_peg[0]}" if enc_peg else f"decoder.layers.{dec_peg[0]}"
    n_blocks = shape("shared_block.weight")[0] if "shared_block.weight" in sd else shape(
        "encoder.embed_blocks.weight")[0]
    pos_rows = shape("shared_pos.weight")[0] if "shared_pos.weight" in sd else shape(
        "encoder.embed_positions.weight")[0]
    inferred = TransformerConfig(
        vocab_size=V, cond_vocab_size=shape("encoder.embed_cond.weight")[0], d_model=d,
        ffn_dim=shape("encoder.layers.0.fc1.weight")[0], encoder_layers=n_enc, decoder_layers=n_dec,
        max_position_embeddings=pos_rows - 1, peg=_peg_list(enc_peg, dec_peg, n_enc, n_dec),
        peg_kernel=shape(f"{first}.PEG_net.proj.0.weight")[-1])
    if params is not None:
        declared = config_from_official(params)

        def norm(f, v):
            return _peg_layers(v, n_enc, n_dec) if f == "peg" else v

        _agree(inferred, declared, TRANSFORMER_SHAPE_FIELDS, src, "transformer", norm)
        gh, gw = declared.block_grid
        if gh * gw != n_blocks:
            raise ValueError(f"{src}: block_h x block_w = {gh}x{gw} in the official config, but the checkpoint has "
                             f"{n_blocks} block embeddings")
        return dataclasses.replace(declared, peg=inferred.peg)
    if d % PAPER_HEAD_DIM or n_blocks != PAPER_GRID[0] * PAPER_GRID[1]:
        raise ValueError(f"{src}: d_model={d} / {n_blocks} blocks: the head count and block grid cannot be taken "
                         "from the paper (64-dim heads, 16x4 blocks); pass the official config (--official-config)")
    if notes is not None:
        notes.append(f"{src}: head count not stored in the weights; assumed {d // PAPER_HEAD_DIM} "
                     f"(d_model {d} / {PAPER_HEAD_DIM}, the paper's) and the 16x4 block grid. Pass "
                     "--official-config to take them from the official config.")
    return dataclasses.replace(inferred, n_heads=d // PAPER_HEAD_DIM, block_grid=list(PAPER_GRID))

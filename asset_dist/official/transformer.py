"""Official ASSET (DifanLiu/ASSET) transformer checkpoints <-> AssetTransformer.

- Key mapping: the official `ASSET` module (HF-BART style names, separate q/k/v projections, tied embedding tables
  stored under several names) to our state dict (fused qkv / kv projections, one table per embedding). Loading is
  strict: unknown, missing and mis-shaped tensors are all reported by name, and tied copies must be equal.
- Config: `config_from_official(params)` builds a TransformerConfig from the official `transformer_config.params`.

Picks in the official layout: official/guides.py; the official attention rule: official/attention.py (sparse,
registered as `transformer.sga_semantics: official`) and official/dense.py (its dense reference).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from asset_dist.config import TransformerConfig
from asset_dist.models.transformer import AssetTransformer

# ours (without the weight/bias suffix) -> official modules whose tensors are concatenated along dim 0
_TOP = {
    "tok_embed": ["shared"],
    "pos_embed": ["shared_pos"],
    "block_embed": ["shared_block"],
    "cond_embed": ["encoder.embed_cond"],
    "enc_ln": ["encoder.layernorm_embedding"],
    "dec_ln": ["decoder.layernorm_embedding"],
    "lm_head": ["lm_head"],
}
_ENC = {
    "peg.proj": ["PEG_net.proj.0"],
    "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.out": ["self_attn.out_proj"],
    "ln1": ["self_attn_layer_norm"],
    "ffn.fc1": ["fc1"],
    "ffn.fc2": ["fc2"],
    "ln2": ["final_layer_norm"],
}
_DEC = {
    "peg.proj": ["PEG_net.proj.0"],
    "self_attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.out": ["self_attn.out_proj"],
    "ln1": ["self_attn_layer_norm"],
    "cross_attn.q": ["encoder_attn.q_proj"],
    "cross_attn.kv": ["encoder_attn.k_proj", "encoder_attn.v_proj"],
    "cross_attn.out": ["encoder_attn.out_proj"],
    "ln2": ["encoder_attn_layer_norm"],
    "ffn.fc1": ["fc1"],
    "ffn.fc2": ["fc2"],
    "ln3": ["final_layer_norm"],
}
# one storage, several names in the official state dict: the first name is the one we read
TIED = {
    "shared.weight": ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
    "shared_pos.weight": ["encoder.embed_positions.weight", "decoder.embed_positions.weight"],
    "shared_block.weight": ["encoder.embed_blocks.weight", "decoder.embed_blocks.weight"],
}


def official_names(key: str) -> list[str]:
    """Our state-dict key -> the official key(s) (without the `transformer.` prefix), concatenated along dim 0."""
    module, _, suffix = key.rpartition(".")
    side, _, rest = module.partition(".")
    if side in ("encoder", "decoder") and rest:
        idx, _, sub = rest.partition(".")
        table = _ENC if side == "encoder" else _DEC
        if idx.isdigit() and sub in table:
            return [f"{side}.layers.{idx}.{m}.{suffix}" for m in table[sub]]
    if module in _TOP:
        return [f"{m}.{suffix}" for m in _TOP[module]]
    raise KeyError(f"no official name for model key '{key}'")


def _fmt(names: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_official_state_dict(official: Mapping[str, torch.Tensor], model: AssetTransformer,
                                src: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Official transformer tensors (prefix already removed) -> our state dict for `model`; raises ValueError that
    names every unknown, missing or mis-shaped tensor."""
    official = dict(official)
    missing, badshape, tied_bad = [], [], []
    for primary, aliases in TIED.items():
        names = [n for n in [primary] + aliases if n in official]
        for n in names[1:]:
            a, b = official[n], official[names[0]]
            if a.shape != b.shape or not (a.is_meta or b.is_meta or torch.equal(a, b)):  # meta: layout checks
                tied_bad.append(f"{n} != {names[0]}")
        if names and primary not in official:
            official[primary] = official[names[0]]  # an export that kept only an alias
        for n in aliases:
            official.pop(n, None)
    out, used = {}, set()
    for key, ref in model.state_dict().items():
        names = official_names(key)
        absent = [n for n in names if n not in official]
        if absent:
            missing += absent
            continue
        used.update(names)
        parts = [official[n] for n in names]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if t.shape != ref.shape:
            shapes = " + ".join(str(tuple(p.shape)) for p in parts)
            badshape.append(f"{'/'.join(names)} {shapes} -> {key} expects {tuple(ref.shape)}")
            continue
        out[key] = t.to(ref.dtype)
    unknown = sorted(set(official) - used)
    errors = []
    if missing:
        errors.append(f"missing official tensors: {_fmt(missing)}")
    if unknown:
        errors.append(f"unknown official tensors: {_fmt(unknown)}")
    if badshape:
        errors.append(f"shape mismatch: {_fmt(badshape, 6)}")
    if tied_bad:
        errors.append(f"tied tables differ: {_fmt(tied_bad)}")
    if errors:
        raise ValueError(f"{src}: cannot load as this transformer: " + "; ".join(errors))
    return out


def to_official_state_dict(model: AssetTransformer) -> dict[str, torch.Tensor]:
    """Our weights in the official layout (prefix-less), with every tied name present, as the official module has."""
    out = {}
    for key, t in model.state_dict().items():
        names = official_names(key)
        for n, part in zip(names, t.chunk(len(names), 0) if len(names) > 1 else [t]):
            out[n] = part.clone()
    for primary, aliases in TIED.items():
        for n in aliases:
            out[n] = out[primary]
    return out


def extract_transformer(ckpt: Mapping[str, Any], prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """From a Lightning checkpoint dict ({'state_dict': ...}) or a bare state dict, the tensors under `prefix`
    (`transformer.` for the trained model, `guiding_transformer.` for the frozen guide of an SGA checkpoint)."""
    sd = ckpt.get("state_dict", ckpt)
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        tops = sorted({k.split(".", 1)[0] for k in sd})
        raise ValueError(f"no tensors under '{prefix}' (top-level names: {_fmt(tops)})")
    return out


def load_official_transformer(model: AssetTransformer, source: "str | os.PathLike | Mapping[str, Any]",
                              prefix: str = "transformer.") -> AssetTransformer:
    """Load official ASSET transformer weights (a .ckpt path or an already loaded dict) into `model`, strictly."""
    src = str(source) if isinstance(source, (str, os.PathLike)) else "<checkpoint dict>"
    if isinstance(source, (str, os.PathLike)):
        from asset_dist.utils import torch_load

        source = torch_load(source)
    try:
        sd = convert_official_state_dict(extract_transformer(source, prefix), model, src)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(src) else f"{src}: {e}") from None
    model.load_state_dict(sd, strict=True)
    return model


def config_from_official(params: Mapping[str, Any]) -> TransformerConfig:
    """TransformerConfig from the official `transformer_config.params` dict (configs/*.yaml, configs.json)."""
    p = dict(params)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if p.get(a, 16) != p.get(b, 16):
            raise ValueError(f"official config: {a} != {b} is not supported")
    return TransformerConfig(
        vocab_size=p["vocab_size"], cond_vocab_size=p["vocab_size"], d_model=p.get("d_model", 1024),
        n_heads=p.get("encoder_attention_heads", 16), ffn_dim=p.get("encoder_ffn_dim", 4096),
        encoder_layers=p.get("encoder_layers", 12), decoder_layers=p.get("decoder_layers", 12),
        block_grid=[p.get("block_h", 16), p.get("block_w", 4)],
        max_position_embeddings=p.get("max_position_embeddings", 256),
        peg=list(p.get("PEG_list", [])), peg_kernel=p.get("PEG_ks", 5),
        dropout=p.get("dropout", 0.0), attention_dropout=p.get("attention_dropout", 0.0))

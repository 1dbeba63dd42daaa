"""`asset-dist import-official`: the official ASSET release -> this package's exports + a config.

    asset-dist import-official --sga landscape_1024.ckpt --guide landscape_guiding.ckpt \\
        --official-config landscape_1024.yaml --out weights/official_landscape

writes OUT/vqgan.pt, OUT/seg.pt, OUT/guide.pt, OUT/sga.pt (train/export.py format, stages "vqgan", "seg",
"guide", "sga") and OUT/config.yaml, a config for `load_config` that rebuilds the official models with every
compatibility mode on (docs/OFFICIAL_COMPAT.md) and points train.* / infer.* at the exports.

Where each model comes from (each flag takes any official file; the first that holds the model wins):
  VQGAN   --vqgan (standalone, or first_stage_model.*), else --sga, --guide, any other file (first_stage_model.*)
  seg VQ  --seg (standalone, or cond_stage_model.*),    else --sga, --guide, any other file (cond_stage_model.*)
  guide   --guide (transformer.*), else --sga (guiding_transformer.*)
  SGA     --sga (transformer.*)
The official test script runs the SGA checkpoint's VQ models and the guide from the guiding checkpoint, which is
what this order gives. A model present in several files is imported from one; the other copies are compared with
it and any difference is reported.

Strictness: every tensor of every file is either mapped onto a model (shapes checked), a documented ignore
(`colorize`, `loss.*`, see official/vq.py), or a copy of a model imported from another file (reported);
anything else is an error naming the tensors. All files are validated before anything is written, and the
outputs replace existing files only with --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from asset_dist.config import Config, apply_overrides, config_from_dict, load_config, to_dict
from asset_dist.models.seg_vq import SegVQModel
from asset_dist.models.transformer import AssetTransformer
from asset_dist.models.vqgan import VQModel
from asset_dist.official.checkpoint import OfficialFile, read_official_file, under
from asset_dist.official.sizes import OfficialParams, infer_transformer_config, infer_vq_config, read_official_config
from asset_dist.official.transformer import convert_official_state_dict
from asset_dist.official.vq import IGNORED_NAMES, IGNORED_PREFIXES, official_vq_state_dict
from asset_dist.artifacts import file_digest, write_export
from asset_dist.utils import atomic_write_text

STAGES = ("vqgan", "seg", "guide", "sga")
NETWORK = {"vqgan": "gen", "seg": "model", "guide": "model", "sga": "model"}  # as the training stages export
# label count -> the released model's dataset: config name, SGA resolution, data settings (configs/official_*.yaml)
PRESETS = {
    182: ("official_landscape", 1024, ["data.num_classes=182", "data.label_shift=0", "data.mask.kind=landscape"]),
    183: ("official_coco", 512, ["data.num_classes=183", "data.label_shift=1", "data.mask.kind=coco",
                                 "data.mask.max_ratio=0.6"]),
}
STAGE_OF = {"first_stage_model.": "vqgan", "cond_stage_model.": "seg", "guiding_transformer.": "guide"}


@dataclass
class Part:
    """One model to import: which file and prefix it comes from, and its config."""

    stage: str
    file: OfficialFile
    prefix: str
    cfg: Any = None  # VQConfig or TransformerConfig


@dataclass
class ImportResult:
    out_dir: Path
    files: dict[str, Path]  # stage -> export, and "config" -> config.yaml
    config: Config
    ignored: dict[str, list[str]] = field(default_factory=dict)  # file -> what was not imported from it, and why
    notes: list[str] = field(default_factory=list)  # assumptions and differences between copies


# --------------------------------------------------------------------------------------------------------------
# Choosing the sources


def _choose(files: dict[str, OfficialFile]) -> dict[str, Part]:
    g, s = files.get("guide"), files.get("sga")
    if g is not None and g.has("guiding_transformer."):
        raise ValueError(f"{g.path}: has guiding_transformer.* tensors, so it is an SGA checkpoint; pass it as --sga")
    for role in ("guide", "sga"):
        f = files.get(role)
        if f is not None and not f.has("transformer."):
            raise ValueError(f"{f.path} (--{role}): no transformer.* tensors; expected an official "
                             f"{'guiding-transformer' if role == 'guide' else 'SGA'} checkpoint")
    if g is not None and s is not None and g.path.resolve() == s.path.resolve():
        raise ValueError(f"--guide and --sga name the same file {g.path}")
    parts: dict[str, Part] = {}
    for stage, prefix in (("vqgan", "first_stage_model."), ("seg", "cond_stage_model.")):
        own = files.get(stage)
        if own is not None:
            if not (own.has(prefix) or own.has("")):
                raise ValueError(f"{own.path} (--{stage}): neither a standalone {stage} checkpoint nor one with "
                                 f"{prefix}* tensors")
            parts[stage] = Part(stage, own, prefix if own.has(prefix) else "")
            continue
        src = next((f for f in (s, g, *files.values()) if f is not None and f.has(prefix)), None)
        if src is not None:
            parts[stage] = Part(stage, src, prefix)
    if g is not None:
        parts["guide"] = Part("guide", g, "transformer.")
    elif s is not None and s.has("guiding_transformer."):
        parts["guide"] = Part("guide", s, "guiding_transformer.")
    if s is not None:
        parts["sga"] = Part("sga", s, "transformer.")
    return parts


def _account(files: dict[str, OfficialFile], parts: dict[str, Part]) -> dict[str, list[str]]:
    """Per file: what it holds that is not imported from it, and why (training state, documented ignores,
    copies of models taken from another file)."""
    used = {(str(p.file.path), p.prefix) for p in parts.values()}
    report: dict[str, list[str]] = {}
    for f in files.values():
        key = str(f.path)
        if key in report:
            continue
        lines = [f"training state, not weights: {', '.join(map(str, f.extra))}"] if f.extra else []
        for prefix, keys in f.groups.items():
            if not keys:
                continue
            if (key, prefix) in used:
                ign = [k for k in keys
                       if k[len(prefix):] in IGNORED_NAMES or k[len(prefix):].startswith(IGNORED_PREFIXES)]
                if ign:
                    lines.append(f"documented ignores (not used by ASSET): {', '.join(_short(ign))}")
                continue
            owner = parts.get(STAGE_OF.get(prefix, ""))
            if owner is not None:
                lines.append(f"{prefix}* ({len(keys)} tensors): a copy of the {owner.stage} model, which is taken "
                             f"from {owner.file.label(owner.prefix)}")
            else:  # a transformer inside a file given as --vqgan / --seg
                roles = ", ".join(f"--{r}" for r, x in files.items() if x is f)
                lines.append(f"{prefix}* ({len(keys)} tensors): not imported, the file was given as {roles} only "
                             "(pass it as --guide or --sga to import its transformer)")
        report[key] = lines
    return report


def _short(keys: list[str], limit: int = 6) -> list[str]:
    return keys[:limit] + ([f"... (+{len(keys) - limit} more)"] if len(keys) > limit else [])


# --------------------------------------------------------------------------------------------------------------
# Mapping


def _meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


def _model(part: Part) -> torch.nn.Module:
    with torch.device("meta"):
        if part.stage == "vqgan":
            return VQModel(part.cfg)
        if part.stage == "seg":
            return SegVQModel(part.cfg)
        return AssetTransformer(part.cfg)


def _mapped(part: Part, meta: bool) -> dict[str, torch.Tensor]:
    """Our state dict for `part` (meta=True: names and shapes only, for validation before writing)."""
    model = _model(part)
    if part.stage in ("vqgan", "seg"):  # errors name the full keys, prefix included
        sd = {k: part.file.state[k] for k in part.file.groups[part.prefix]}
        try:
            return official_vq_state_dict(_meta(sd) if meta else sd, part.prefix, expected=model)
        except ValueError as e:
            raise ValueError(f"{part.file.path}: {e}") from None
    sd = under(part.file, part.prefix)
    return convert_official_state_dict(_meta(sd) if meta else sd, model, part.file.label(part.prefix))


def _weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the documented ignores (colorize, loss.*)."""
    return {k: v for k, v in sd.items() if k not in IGNORED_NAMES and not k.startswith(IGNORED_PREFIXES)}


def _compare_copies(parts: dict[str, Part], files: dict[str, OfficialFile]) -> list[str]:
    """Notes for models present in more than one file whose copies differ from the imported one."""
    notes = []
    for stage, part in parts.items():
        if stage == "sga":
            continue
        ref = _weights(under(part.file, part.prefix))
        copies = {(str(f.path), p): f for f in files.values() for p, st in STAGE_OF.items() if st == stage and f.has(p)}
        if stage == "guide" and "guide" in files:
            copies[(str(files["guide"].path), "transformer.")] = files["guide"]
        copies.pop((str(part.file.path), part.prefix), None)
        for (_, prefix), f in copies.items():
            other = _weights(under(f, prefix))
            diff = sorted(k for k in set(ref) | set(other) if k not in ref or k not in other
                          or ref[k].shape != other[k].shape or not torch.equal(ref[k], other[k]))
            if diff:
                notes.append(f"{f.label(prefix)} differs from the imported {stage} model "
                             f"({part.file.label(part.prefix)}) in {len(diff)} tensors, e.g. {', '.join(diff[:3])}")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Configs


def _configs(parts: dict[str, Part], params: OfficialParams, notes: list[str]) -> None:
    for stage, masked, p in (("vqgan", True, params.first_stage), ("seg", False, params.cond_stage)):
        if stage in parts:
            part = parts[stage]
            part.cfg = infer_vq_config(under(part.file, part.prefix), masked, p, part.file.label(part.prefix))
    for stage, want in (("vqgan", "image"), ("seg", "label map")):  # same architecture: catch swapped files
        cfg = parts[stage].cfg if stage in parts else None
        if cfg is not None and (cfg.in_channels == 3) != (stage == "vqgan"):
            other = "seg" if stage == "vqgan" else "vqgan"
            raise ValueError(f"{parts[stage].file.label(parts[stage].prefix)}: a VQ model with {cfg.in_channels} "
                             f"input channels is not the {want} tokenizer; pass it as --{other}")
    for stage in ("guide", "sga"):
        if stage in parts:
            part = parts[stage]
            part.cfg = infer_transformer_config(under(part.file, part.prefix), params.transformer,
                                                part.file.label(part.prefix), notes)
    if "guide" in parts and "sga" in parts and parts["guide"].cfg != parts["sga"].cfg:
        raise ValueError(f"guide ({parts['guide'].file.label(parts['guide'].prefix)}) and SGA "
                         f"({parts['sga'].file.label('transformer.')}) transformers differ in size: "
                         f"{parts['guide'].cfg} vs {parts['sga'].cfg}")


def build_config(parts: dict[str, Part], out_files: dict[str, Path], params: OfficialParams,
                 base: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The written config: `base` (else the defaults + the dataset preset picked by the label count), the
    imported model sizes, every official compatibility mode on, train.* / infer.* pointing at the exports, then
    the `overrides` (KEY=VALUE)."""
    n_labels = parts["seg"].cfg.in_channels if "seg" in parts else None
    name, sga_res, preset = PRESETS.get(n_labels, ("official", 512, []))
    if base:
        cfg = load_config(base, require=False)
    else:
        cfg = config_from_dict(apply_overrides(to_dict(Config()), preset), "<preset>")
        cfg.name = name
        if n_labels:
            cfg.data.num_classes = n_labels
        cfg.data.resolution = sga_res if "sga" in parts else 256
        cfg.train.stage = "vqgan"
    if "vqgan" in parts:
        cfg.model.vqgan = dataclasses.replace(parts["vqgan"].cfg)
    if "seg" in parts:
        cfg.model.seg = dataclasses.replace(parts["seg"].cfg)
    t = parts.get("sga", parts.get("guide"))
    if t is not None:
        cfg.model.transformer = dataclasses.replace(t.cfg, causal_picks="official", sga_semantics="official",
                                                    attention_impl=cfg.model.transformer.attention_impl, guide_k=3)
        cfg.train.stage = "sga" if "sga" in parts else "guide"
    cfg.model.token_hole = "nearest"
    if params.d_size:  # the official SGA config's [high resolution, guide resolution]
        cfg.data.resolution, cfg.data.guide_resolution = int(params.d_size[0]), int(params.d_size[1])
    if not base and cfg.data.label_shift:  # COCO: short side 296 per 256 before the crop (docs/ASSET_NOTES.md §6.1)
        cfg.data.resize_short_side = cfg.data.resolution * 296 // 256
    if cfg.data.train_shards == "???":
        cfg.data.train_shards = ""  # set it to fine-tune; editing does not read it
    paths = {k: str(v.resolve()) for k, v in out_files.items()}
    cfg.train.vqgan_weights = paths.get("vqgan", cfg.train.vqgan_weights)
    cfg.train.seg_weights = paths.get("seg", cfg.train.seg_weights)
    cfg.train.guide_weights = paths.get("guide", cfg.train.guide_weights)
    cfg.train.init_from = paths.get("sga", paths.get("guide", cfg.train.init_from))
    infer = getattr(cfg, "infer", None)  # the editing section
    for stage, path in paths.items():
        if infer is not None and hasattr(infer, f"{stage}_weights"):
            setattr(infer, f"{stage}_weights", path)
    if overrides:
        cfg = config_from_dict(apply_overrides(to_dict(cfg), list(overrides)), "--set")
    return cfg


def _config_text(cfg: Config, parts: dict[str, Part]) -> str:
    head = ["# Written by `asset-dist import-official`: the official ASSET models with every compatibility mode on",
            "# (docs/OFFICIAL_COMPAT.md). Imported from:"]
    head += [f"#   {p.stage:6s} {p.file.label(p.prefix)}" for p in parts.values()]
    head += ["# data.train_shards is empty: set it to fine-tune; editing does not read it."]
    return "\n".join(head) + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Entry points


def import_official(out_dir: "str | os.PathLike", *, vqgan: Optional[str] = None, seg: Optional[str] = None,
                    guide: Optional[str] = None, sga: Optional[str] = None, official_config: Optional[str] = None,
                    base_config: Optional[str] = None, overrides: Sequence[str] = (), trust_pickle: bool = False,
                    force: bool = False, log: Callable[[str], None] = lambda m: None) -> ImportResult:
    """Import official ASSET checkpoints (paths; see the module doc for which model comes from where) into
    out_dir: {stage}.pt exports and config.yaml. Raises ValueError (CheckpointError, ConfigError) naming every
    unknown, missing or mis-shaped tensor; nothing is written unless every model maps and the config loads."""
    given = {k: v for k, v in (("vqgan", vqgan), ("seg", seg), ("guide", guide), ("sga", sga)) if v}
    if not given:
        raise ValueError("nothing to import: pass at least one of --vqgan, --seg, --guide, --sga")
    out_dir = Path(out_dir)
    loaded: dict[str, OfficialFile] = {}
    files: dict[str, OfficialFile] = {}
    for role, path in given.items():
        key = str(Path(path).resolve())
        if key not in loaded:
            log(f"reading {path}")
            loaded[key] = read_official_file(path, trust_pickle, warn=lambda m: warnings.warn(m, stacklevel=2))
        files[role] = loaded[key]
    parts = _choose(files)
    notes: list[str] = []
    params = read_official_config(official_config) if official_config else OfficialParams()
    _configs(parts, params, notes)
    errors = []
    for part in parts.values():  # names and shapes of everything, before anything is written
        try:
            _mapped(part, meta=True)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    ignored = _account(files, parts)
    notes += _compare_copies(parts, files)
    missing = [s for s in STAGES if s not in parts]
    if missing:
        notes.append(f"not imported (no file holds them): {', '.join(missing)}")
    out_files = {s: out_dir / f"{s}.pt" for s in parts}
    cfg_path = out_dir / "config.yaml"
    exists = [str(p) for p in [*out_files.values(), cfg_path] if p.exists()]
    if exists and not force:
        raise FileExistsError(f"{out_dir}: would overwrite {', '.join(exists)} (pass --force to replace them)")
    cfg = build_config(parts, out_files, params, base_config, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {name: out_dir / f".{path.name}.importing" for name, path in [*out_files.items(), ("config", cfg_path)]}
    digests: dict[Path, str] = {}
    try:
        atomic_write_text(tmp["config"], _config_text(cfg, parts))
        load_config(tmp["config"])  # the file must load as written (types, required values, validation)
        cfg_dict = to_dict(cfg)
        for stage, part in parts.items():
            log(f"mapping {part.file.label(part.prefix)} -> {out_files[stage]}")
            sd = {k: v.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
                  for k, v in _mapped(part, meta=False).items()}  # own storage: no checkpoint storage is saved
            if part.file.path not in digests:
                digests[part.file.path] = file_digest(part.file.path)
            lineage = {"imported_from": {"path": str(part.file.path.resolve()), "prefix": part.prefix,
                                         "sha256": digests[part.file.path]},
                       "official_config": str(Path(official_config).resolve()) if official_config else ""}
            write_export(tmp[stage], stage=stage, network=NETWORK[stage], state_dict=sd, config=cfg_dict,
                         lineage=lineage, step=part.file.step)
            del sd
        for name, path in tmp.items():
            os.replace(path, cfg_path if name == "config" else out_files[name])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return ImportResult(out_dir, {**out_files, "config": cfg_path}, cfg, ignored, notes)


def main(args: argparse.Namespace) -> int:
    try:
        res = import_official(args.out, vqgan=args.vqgan, seg=args.seg, guide=args.guide, sga=args.sga,
                              official_config=args.official_config, base_config=args.base,
                              overrides=args.overrides, trust_pickle=args.trust_pickle, force=args.force,
                              log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ConfigError / CheckpointError are ValueErrors
        print(f"import-official: error: {e}", file=sys.stderr)
        return 1
    for name, path in res.files.items():
        print(f"wrote {name:7s} {path}")
    for src, lines in res.ignored.items():
        for line in lines:
            print(f"not imported from {src}: {line}")
    for note in res.notes:
        print(f"note: {note}")
    return 0

"""`asset-dist precompute-guides | edit-batch | edit`: argument parsing only; the work is in runner.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asset_dist.config import add_config_args, int_arg, load_config, path_arg
from asset_dist.utils import InputError, check_id


def _common(p: argparse.ArgumentParser, edits_required: bool = True) -> None:
    add_config_args(p)
    if edits_required:
        p.add_argument("--edits", default=None, type=path_arg,
                       help="edit shards (folder with manifest.json, a manifest, or tar paths/brace patterns) made "
                            "by data_tools/make_edits.py; default infer.edits")
    p.add_argument("--samples", type=int_arg(1), default=None, help="samples per edit (default infer.samples)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the local rank's GPU when CUDA is available, else CPU")


def _cfg(args):
    cfg = load_config(args.config, args.overrides)
    given = any(o.split("=", 1)[0].strip() == "infer.sga_weights" for o in args.overrides or [])
    own = "" if given else own_sga_export(cfg, args.config)
    if own:
        cfg.infer.sga_weights = own
        print(f"infer.sga_weights: the run's own export {own}", file=sys.stderr)
    return cfg


def own_sga_export(cfg, config_path) -> str:
    """An SGA run's config (RUN/config.yaml, train.stage sga) with infer.sga_weights unset edits with that
    run's own export, RUN/export/sga.pt next to the config. "" when there is none (guide-only, as before) or
    infer.sga_weights is set (`--set infer.sga_weights=` keeps guide-only)."""
    if cfg.infer.sga_weights or cfg.train.stage != "sga" or not config_path:
        return ""
    export = Path(config_path).resolve().parent / "export" / "sga.pt"
    return str(export) if export.is_file() else ""


def _edits(args, cfg) -> str:
    spec = args.edits or cfg.infer.edits
    if not spec:
        raise InputError("no edits: pass --edits or set infer.edits")
    return spec


# ------------------------------------------------------------------------------------------- precompute-guides


def add_precompute_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Run the guide at 256 px on every edit (its own sampled completion per sample, then a "
                     "teacher-forced pass for the attention maps) and store the SGA block picks as "
                     "OUT/<edit_id>/guide_<k>.npz. Distributed over ranks (torchrun/srun); resumable: "
                     "valid files are kept.")
    _common(p)
    p.add_argument("--out", required=True, type=path_arg,
                   help="folder for the block picks (pass it to edit-batch --guides)")


def precompute_main(args) -> int:
    from asset_dist.infer.runner import run_precompute

    cfg = _cfg(args)
    return run_precompute(cfg, _edits(args, cfg), args.out, samples=args.samples, device=args.device)


# ------------------------------------------------------------------------------------------- edit-batch


def add_batch_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Edit every record of an edit set (photos of any size): one process per GPU (torchrun or srun "
                     "via slurm/edit_batch.sh), each edit done once, the edits' rows sampled with continuous "
                     "batching; workers claim chunks of edits as they go (infer.claim_chunk), so fast and slow "
                     "ones finish together and `--join` adds workers to a running batch. Writes "
                     "OUT/<edit_id>/sample_<k>.png and a preview (or WebDataset shards: --out-format shards), "
                     "OUT/manifest.jsonl and OUT/summary.json. Restart the same command to finish a killed run.")
    _common(p)
    p.add_argument("--guides", default=None, type=path_arg,
                   help="precomputed block picks (precompute-guides --out); missing or stale ones are computed "
                        "on the fly. Default infer.guides")
    p.add_argument("--out", default=None, type=path_arg, help="output folder (default paths.run_dir)")
    p.add_argument("--retry-failed", action="store_true", help="redo edits recorded as failed")
    p.add_argument("--out-format", choices=("files", "shards"), default="files",
                   help="files: OUT/<edit_id>/sample_<k>.png ... (default); shards: WebDataset tars of --shard-size "
                        "edits per rank under OUT/shards/ (for large runs; gallery and evaluate read both)")
    p.add_argument("--shard-size", type=int_arg(1), default=100, help="edits per tar with --out-format shards")
    p.add_argument("--join", action="store_true",
                   help="help the edit-batch already running into --out (another process, sbatch job, array task "
                        "or node): this command's config, overrides, --edits, --samples and --out-format must "
                        "match it (else a named error); starts the batch itself when none runs")


def batch_main(args) -> int:
    from asset_dist.infer.runner import run_batch_edits

    cfg = _cfg(args)
    out = args.out or cfg.paths.run_dir
    return run_batch_edits(cfg, _edits(args, cfg), out, guides_dir=args.guides or cfg.infer.guides or None,
                           samples=args.samples, device=args.device, retry_failed=args.retry_failed,
                           out_format=args.out_format, shard_size=args.shard_size, join=args.join)


# ------------------------------------------------------------------------------------------- edit


def add_edit_args(p: argparse.ArgumentParser) -> None:
    p.description = ("One edit from files (the official test script's job), guide included, on a photo of any "
                     "size: writes OUT/<id>/sample_<k>.png (the photo's size; pixels beyond infer.blend_band of the "
                     "mask unchanged) and a preview.")
    _common(p, edits_required=False)
    p.add_argument("--input", required=True, help="RGB photo of any size and aspect; the output has its size")
    p.add_argument("--seg", required=True, help="8-bit label map in the model's convention (the photo's size or "
                                                "aspect; nearest-resized)")
    p.add_argument("--mask", required=True, help="grayscale mask, white = regenerate (the photo's size or aspect)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--class", dest="class_name", help="class painted into the mask (name, id, or None)")
    g.add_argument("--new-seg", help="edited label map instead of --class")
    p.add_argument("--id", default=None, help="edit id: [A-Za-z0-9_-] (default: the input file name, made safe)")
    p.add_argument("--out", required=True, type=path_arg, help="output folder")


def edit_main(args) -> int:
    from asset_dist.data.shardwriter import safe_key
    from asset_dist.infer.classes import table_for_config
    from asset_dist.infer.edits import MemoryEdits, make_record
    from asset_dist.infer.runner import read_record, run_batch_edits
    from asset_dist.distenv import DistEnv

    cfg = _cfg(args)
    table = table_for_config(cfg)
    eid = check_id(args.id, "--id") if args.id is not None else safe_key(Path(args.input).stem)
    try:
        files = {k: Path(getattr(args, k)).read_bytes() for k in ("input", "seg", "mask")}
        new_seg = Path(args.new_seg).read_bytes() if args.new_seg else None
        cid = -1 if args.new_seg else table.lookup(args.class_name)
        rec = make_record(eid, files["input"], files["seg"], files["mask"], class_id=cid, class_name=table.name(cid),
                          num_classes=table.num_classes, label_shift=table.label_shift, new_seg=new_seg,
                          source={"image": args.input, "seg": args.seg, "mask": args.mask, "new_seg": args.new_seg})
    except (OSError, ValueError) as e:
        print(f"error: edit {eid!r}: {e}", file=sys.stderr)
        return 1
    rc = run_batch_edits(cfg, "", args.out, samples=args.samples, device=args.device, redo=True,
                         env=DistEnv(), edit_set=MemoryEdits([rec]))
    done = read_record(Path(args.out), eid)
    if done is None or done["status"] != "ok":
        print(f"error: {done['error'] if done else 'no result'}", file=sys.stderr)
        return 1
    for name in done["outputs"]:
        print(Path(args.out) / eid / name)
    return rc


def add_gallery_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Write gallery.html and contact_sheet.png for an edit-batch output: per edit the input, "
                     "the label map before and after, the mask and the samples.")
    add_config_args(p)
    p.add_argument("--edits", default=None, type=path_arg,
                   help="the edit set given to edit-batch (default infer.edits)")
    p.add_argument("--results", required=True, type=path_arg, help="the edit-batch --out folder")
    p.add_argument("--out", default=None, type=path_arg, help="where to write the gallery (default: --results)")
    p.add_argument("--size", type=int_arg(8, 2048), default=192, help="tile side in pixels, 8-2048 (default 192)")

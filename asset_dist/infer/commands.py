"""`asset-dist precompute-guides | edit-batch | edit`: argument parsing only; the work is in runner.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asset_dist.config import add_config_args, load_config


def _common(p: argparse.ArgumentParser, edits_required: bool = True) -> None:
    add_config_args(p)
    if edits_required:
        p.add_argument("--edits", default=None,
                       help="edit shards (folder with manifest.json, a manifest, or tar paths/brace patterns) made "
                            "by data_tools/make_edits.py; default infer.edits")
    p.add_argument("--samples", type=int, default=None, help="samples per edit (default infer.samples)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the local rank's GPU when CUDA is available, else CPU")


def _cfg(args):
    return load_config(args.config, args.overrides)


def _edits(args, cfg) -> str:
    spec = args.edits or cfg.infer.edits
    if not spec:
        raise SystemExit("error: no edits: pass --edits or set infer.edits")
    return spec


# ------------------------------------------------------------------------------------------- precompute-guides


def add_precompute_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Run the guide at 256 px on every edit (its own sampled completion per sample, then a "
                     "teacher-forced pass for the attention maps) and store the SGA block picks as "
                     "OUT/<edit_id>/guide_<k>.npz. Distributed over ranks (torchrun/srun); resumable: "
                     "valid files are kept.")
    _common(p)
    p.add_argument("--out", required=True, help="folder for the block picks (pass it to edit-batch --guides)")


def precompute_main(args) -> int:
    from asset_dist.infer.runner import run_precompute

    cfg = _cfg(args)
    return run_precompute(cfg, _edits(args, cfg), args.out, samples=args.samples, device=args.device)


# ------------------------------------------------------------------------------------------- edit-batch


def add_batch_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Edit every record of an edit set: one process per GPU (torchrun or srun via "
                     "slurm/edit_batch.sh), each edit done once. Writes OUT/<edit_id>/sample_<k>.png, a preview and "
                     "OUT/manifest.jsonl. Restart the same command to finish a killed run.")
    _common(p)
    p.add_argument("--guides", default=None, help="precomputed block picks (precompute-guides --out); missing or "
                                                  "stale ones are computed on the fly. Default infer.guides")
    p.add_argument("--out", default=None, help="output folder (default paths.run_dir)")
    p.add_argument("--retry-failed", action="store_true", help="redo edits recorded as failed")


def batch_main(args) -> int:
    from asset_dist.infer.runner import run_batch_edits

    cfg = _cfg(args)
    out = args.out or cfg.paths.run_dir
    return run_batch_edits(cfg, _edits(args, cfg), out, guides_dir=args.guides or cfg.infer.guides or None,
                           samples=args.samples, device=args.device, retry_failed=args.retry_failed)


# ------------------------------------------------------------------------------------------- edit


def add_edit_args(p: argparse.ArgumentParser) -> None:
    p.description = ("One edit from files (the official test script's job), guide included: writes "
                     "OUT/<id>/sample_<k>.png and a preview.")
    _common(p, edits_required=False)
    p.add_argument("--input", required=True, help="square RGB image (side a multiple of 256, e.g. 512 or 1024)")
    p.add_argument("--seg", required=True, help="8-bit label map in the model's convention (square, any size)")
    p.add_argument("--mask", required=True, help="grayscale mask, white = regenerate (square)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--class", dest="class_name", help="class painted into the mask (name, id, or None)")
    g.add_argument("--new-seg", help="edited label map instead of --class")
    p.add_argument("--id", default=None, help="edit id (default: the input file name)")
    p.add_argument("--out", required=True, help="output folder")


def edit_main(args) -> int:
    from asset_dist.data.shardwriter import safe_key
    from asset_dist.infer.classes import table_for_config
    from asset_dist.infer.edits import MemoryEdits, make_record
    from asset_dist.infer.runner import read_record, run_batch_edits
    from asset_dist.distenv import DistEnv

    cfg = _cfg(args)
    table = table_for_config(cfg)
    eid = safe_key(args.id or Path(args.input).stem)
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

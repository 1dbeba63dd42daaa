#!/usr/bin/env python
"""Build an edit set (webdataset shards + manifest.json) for `asset-dist edit-batch` / `precompute-guides`.

An edit = input image + label map + mask (white = regenerate) + a target class painted into the mask, or an
edited label map. Sources:

  files     the user's own files: --list edits.csv|edits.jsonl (columns image, seg, mask, class or new_seg,
            optional id; paths relative to the list), or folders --images/--segs/--masks paired by relative
            path without extension, with one --class (or --new-segs DIR)
  dataset   a labelled dataset (training shards, or --images/--labels folders): square centre crops, masks
            drawn with the training mask sampler, target classes drawn from --classes
  official  the official ASSET test cases in sample_data/edits (--which landscape: waterother into a
            1024 photo with a 512 label map; --which coco: pizza, 512); --resolution resizes them, and a model
            of the other label convention (--config/--convention) gets the labels converted

Examples:
  python data_tools/make_edits.py official --which landscape --out data/edits/official_landscape
  python data_tools/make_edits.py files --list my_edits.csv --convention landscape --out data/edits/mine
  python data_tools/make_edits.py dataset --images sample_data/sflckr/images \\
      --labels sample_data/sflckr/segmentations --classes waterother,snow,tree --resolution 512 \\
      --per-image 2 --out data/edits/sflckr

Label conventions (docs/ASSET_NOTES.md §8): landscape = 182 COCO-Stuff labels, 0-based; coco = 183 labels,
1-based with 0 = unlabeled (raw COCO-Stuff maps + 1, so 255 -> 0). --config takes the classes and shift from
a model config (model.seg.in_channels, data.label_shift) and its infer.class_names / infer.classes table.
Label maps given to `files` are taken as already in the model's convention (like the official ones); pass
--label-shift 1 for raw COCO-Stuff maps. `dataset` sources are raw: the convention's shift is applied.

Photos of any size and aspect are kept as they are (the editor places each edit on the model's token grid:
asset_dist/infer/canvas.py). Bad edits (images under 16 px, label maps or masks of another aspect ratio, empty
or full masks, unknown class names, label ids outside the model's classes, unreadable files) are reported with
the edit's id and listed under "failed" in the manifest; the others are written. --strict: any bad edit fails
the run (exit 1).
Ids given in a list must already be safe ([A-Za-z0-9_-], no '.' or '/'); ids made from file names are made safe.
Exit codes: 0 written, 1 the run failed (nothing valid, --strict, an edit set already in --out), 2 bad arguments,
config or input (the message names it; another make_edits writing into --out is one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from asset_dist.config import MaskConfig, float_arg, int_arg, load_config, path_arg  # noqa: E402
from asset_dist.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED  # noqa: E402
from asset_dist.infer.build import (CONVENTIONS, OFFICIAL, BuildError, Builder, from_dataset, from_folders,
                                    from_list, official, write)  # noqa: E402
from asset_dist.infer.classes import class_table  # noqa: E402
from asset_dist.runlock import LockHeld, RunLock  # noqa: E402
from asset_dist.utils import InputError, writable_dir  # noqa: E402

SAMPLE_EDITS = Path(__file__).resolve().parents[1] / "sample_data" / "edits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, type=path_arg, help="output folder for edits-*.tar and manifest.json")
        sp.add_argument("--config", type=path_arg,
                        help="model config: classes, label shift and class table come from it")
        sp.add_argument("--convention", choices=sorted(CONVENTIONS), default=None,
                        help="label convention without --config (default landscape; official: from --which)")
        sp.add_argument("--class-names", default="", help="class table file (one name per line, 0-based; or "
                                                          "JSON {name: id}); default: the COCO-Stuff table")
        sp.add_argument("--samples-per-shard", type=int_arg(1), default=100, help="edits per tar (default 100)")
        sp.add_argument("--strict", action="store_true", help="fail (exit 1, nothing written) on any bad edit")
        sp.add_argument("--overwrite", action="store_true", help="replace an edit set already in --out")

    f = sub.add_parser("files", help="the user's own files (CSV/JSONL list or folders)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(f)
    f.add_argument("--list", help="CSV (with header) or JSONL: image, seg, mask, class | new_seg [, id]")
    f.add_argument("--images", help="folder of input images")
    f.add_argument("--segs", help="folder of label maps (same relative paths, .png)")
    f.add_argument("--masks", help="folder of masks (same relative paths)")
    f.add_argument("--new-segs", help="folder of edited label maps (instead of --class)")
    f.add_argument("--class", dest="class_name", help="class painted into every mask (folders mode)")
    f.add_argument("--label-shift", type=int_arg(0, 255), default=0,
                   help="add to every label value in uint8 (raw COCO: 1)")

    d = sub.add_parser("dataset", help="crops of a labelled dataset with sampled masks and classes")
    common(d)
    d.add_argument("--shards", help="training shards (folder with manifest.json, manifest or tar pattern)")
    d.add_argument("--split", default="train", help="shard split (default train)")
    d.add_argument("--images", help="image folder (instead of --shards)")
    d.add_argument("--labels", help="label-map folder paired with --images")
    d.add_argument("--classes", required=True, help="comma-separated target class names drawn per edit")
    d.add_argument("--resolution", type=int_arg(16), default=512,
                   help="square crop side in px (default 512; any size: the editor places it on the model's grid)")
    d.add_argument("--per-image", type=int_arg(1), default=1, help="edits per source image (default 1)")
    d.add_argument("--limit", type=int_arg(0), default=0, help="use at most this many source images (0 = all)")
    d.add_argument("--seed", type=int, default=0, help="masks and classes are a function of (seed, key)")
    d.add_argument("--mask-kind", choices=("landscape", "coco"), default=None,
                   help="mask sampler (default: the config's data.mask.kind, else landscape)")
    d.add_argument("--max-ratio", type=float_arg(0.0, 1.0, lo_open=True), default=None,
                   help="mask area cap in (0, 1] (default config / 0.6)")

    o = sub.add_parser("official", help="the official test cases in sample_data/edits")
    common(o)
    o.add_argument("--which", choices=sorted(OFFICIAL), required=True, help="landscape or coco")
    o.add_argument("--root", default=str(SAMPLE_EDITS), type=path_arg,
                   help=f"folder of the official files (default {SAMPLE_EDITS})")
    o.add_argument("--resolution", type=int_arg(0), default=0,
                   help="resize the case to this side (e.g. 512 for a model trained at 512; default: native, "
                        "landscape 1024 / COCO 512)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        cfg = load_config(a.config) if a.config else None
        conv = a.convention or (a.which if a.source == "official" else "landscape")
        if cfg is not None:
            n, shift = cfg.model.seg.in_channels, cfg.data.label_shift
            names, extra = a.class_names or cfg.infer.class_names, cfg.infer.classes
            hole_rule = cfg.model.token_hole
        else:
            (n, shift), names, extra, hole_rule = CONVENTIONS[conv], a.class_names, {}, "any"
        b = Builder(class_table(n, shift, names, extra), hole_rule, log)
        out = writable_dir(a.out, "--out")
        with RunLock(out, "make_edits"):  # before anything is read: a second writer into --out fails at once
            _collect(a, b, cfg)
            m = write(b.result(), out, samples_per_shard=a.samples_per_shard, strict=a.strict,
                      overwrite=a.overwrite, args={k: v for k, v in vars(a).items()})
    except (InputError, LockHeld, OSError) as e:  # config values, unsafe names, unreadable or unwritable paths
        print(f"error: {_text(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    log(f"wrote {m['total_samples']} edit(s), {m['failed_count']} failed -> {Path(a.out) / 'manifest.json'}")
    return 0


def _collect(a: argparse.Namespace, b: Builder, cfg) -> None:
    """Every edit of the chosen source into the builder (bad ones listed as failed)."""
    if a.source == "files":
        if a.list:
            from_list(b, Path(a.list), a.label_shift)
        elif a.images and a.segs and a.masks:
            if not (a.class_name or a.new_segs):
                raise BuildError("folders mode needs --class NAME or --new-segs DIR")
            from_folders(b, Path(a.images), Path(a.segs), Path(a.masks), a.class_name,
                         Path(a.new_segs) if a.new_segs else None, a.label_shift)
        else:
            raise BuildError("files: give --list FILE, or --images, --segs and --masks")
    elif a.source == "dataset":
        if not a.shards and not (a.images and a.labels):
            raise BuildError("dataset: give --shards SPEC, or --images and --labels")
        mk = cfg.data.mask if cfg is not None else MaskConfig()
        mask_cfg = MaskConfig(kind=a.mask_kind or mk.kind, max_ratio=a.max_ratio or mk.max_ratio,
                              sample_resolution=mk.sample_resolution)
        from_dataset(b, [c.strip() for c in a.classes.split(",") if c.strip()], shards=a.shards,
                     split=a.split, images=Path(a.images) if a.images else None,
                     labels=Path(a.labels) if a.labels else None, resolution=a.resolution,
                     per_image=a.per_image, limit=a.limit, seed=a.seed, mask_cfg=mask_cfg)
    else:
        official(b, Path(a.root), a.which, a.resolution)


def _text(e: BaseException) -> str:
    from asset_dist.cli import error_text

    return error_text(e)


if __name__ == "__main__":
    sys.exit(main())

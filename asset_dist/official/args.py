"""`asset-dist import-official` arguments. Light on purpose (no torch): `--help` answers at once."""
from __future__ import annotations

import argparse

from asset_dist.config import path_arg


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Import official ASSET checkpoints (DifanLiu/ASSET release, Lightning .ckpt) as asset_dist "
                     "exports (vqgan.pt, seg.pt, guide.pt, sga.pt) plus config.yaml with the official compatibility "
                     "modes on. Each model comes from the first file that holds it: VQGAN --vqgan/--sga/--guide, "
                     "seg --seg/--sga/--guide, guide --guide/--sga (guiding_transformer.*), SGA --sga.")
    p.add_argument("--vqgan", metavar="CKPT", help="image VQGAN: standalone (main.py) or any file with first_stage_model.*")
    p.add_argument("--seg", metavar="CKPT", help="seg VQ: standalone (landscape_VQ_seg_model.ckpt) or cond_stage_model.*")
    p.add_argument("--guide", metavar="CKPT", help="guiding-transformer checkpoint (e.g. landscape_guiding.ckpt)")
    p.add_argument("--sga", metavar="CKPT", help="SGA checkpoint (e.g. landscape_1024.ckpt, coco_512.ckpt)")
    p.add_argument("--out", required=True, metavar="DIR", type=path_arg,
                   help="output folder for the exports and config.yaml")
    p.add_argument("--official-config", metavar="FILE",
                   help="official model config (YAML of the release, e.g. landscape_1024.yaml, or JSON): head count, "
                        "block grid, resolutions; without it they are the paper's (64-dim heads, 16x4 blocks)")
    p.add_argument("--base", metavar="CONFIG",
                   help="asset_dist config whose data/train/... sections the written config keeps (default: the "
                        "built-in landscape/COCO preset, picked by the label count)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the written config, e.g. --set data.resolution=512 (repeatable)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (runs code stored in the file; trusted files only)")
    p.add_argument("--force", action="store_true", help="replace existing exports / config.yaml in --out")

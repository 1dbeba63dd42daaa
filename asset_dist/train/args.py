"""`asset-dist train` arguments. Light on purpose (no torch): `asset-dist train --help` answers at once."""
from __future__ import annotations

import argparse

from asset_dist.config import add_config_args, path_arg


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", default="auto", type=path_arg,
                   help="'auto': continue from RUN/checkpoints/latest if it exists (default); 'none': start "
                        "fresh; or a run folder to continue from. Checkpoints are read weights-only; only "
                        "settings listed in asset_dist/train/resume.py may differ from the checkpoint's")

#!/usr/bin/env python
"""Frozen-tokenizer benchmark: ms per sample of `Tokenizers.forward` (image VQGAN with the hole mask + seg
tokenizer), the work every guide / SGA training step and every edit does before the transformer runs.

Three variants side by side in one process, same random weights and inputs:
  gather      the seg tokenizer's first conv as kh*kw embedding lookups, NCHW convs (before this change)
  dense       the first conv as the plain conv of the one-hot map, NCHW
  bag         the first conv as one embedding_bag (onehot_conv2d's default), NCHW
  bag+cl      and channels-last convs (the default Tokenizers)
Also the transformer's forward + backward on the same batch, for scale.

    python bench/tokenizer_speed.py --config configs/longrange_guide.yaml --batch 2 4 8 [--threads 1] [--set KEY=VALUE]
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_dist.config import load_config  # noqa: E402
from asset_dist.models import vqgan as V  # noqa: E402
from asset_dist.models.tokens import Tokenizers  # noqa: E402
from asset_dist.models.transformer import AssetTransformer  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/longrange_guide.yaml")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--resolution", type=int, default=0, help="0: the config's data.resolution")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config(a.config, a.set)
    res = a.resolution or cfg.data.resolution
    tok = Tokenizers(cfg, load=False)
    default = V.onehot_conv2d
    print(f"{a.config}: {res} px, {cfg.data.num_classes} classes, {a.threads} thread(s)\n")
    print("| batch | gather ms/sample | dense | bag | bag+cl | speed-up | transformer fwd+bwd ms/sample |")
    print("|---|---|---|---|---|---|---|")
    for B in a.batch:
        image = torch.rand(B, 3, res, res) * 2 - 1
        seg = torch.randint(0, cfg.data.num_classes, (B, res, res))
        mask = torch.zeros(B, 1, res, res)
        mask[..., res // 2:, :] = 1
        ms = {}
        for name, fmt, impl in (("gather", torch.contiguous_format, "gather"),
                                ("dense", torch.contiguous_format, "dense"),
                                ("bag", torch.contiguous_format, "bag"), ("bag+cl", torch.channels_last, "bag")):
            tok.to(memory_format=fmt)
            V.onehot_conv2d = functools.partial(default, impl=impl)
            try:
                x = image.contiguous(memory_format=fmt)
                ms[name] = timed(lambda: tok.vqgan.encode_to_indices(x, mask) + 0 * tok.seg.encode_to_indices(seg),
                                 a.reps) * 1000 / B
            finally:
                V.onehot_conv2d = default
        tok.to(memory_format=torch.channels_last)
        ids, cond, hole = tok(image, seg, mask)
        model = AssetTransformer(cfg.model.transformer)

        def step():
            model.loss(model(ids, cond, hole), ids, hole).backward()
        tf = timed(step, a.reps) * 1000 / B
        print(f"| {B} | {ms['gather']:.1f} | {ms['dense']:.1f} | {ms['bag']:.1f} | {ms['bag+cl']:.1f} | "
              f"{ms['gather'] / ms['bag+cl']:.2f}x | {tf:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tiny VQGAN's recipe trains: held-out reconstruction improves steadily over 200 steps on simple scenes
(flat shapes drawn by data_tools/make_longrange.py; the curve is bench/vqgan_recipe.py --scenes).

The regression test of the tokenizer recipe (BENCHMARKS.md "Tokenizer recipe"): with the paper's uniform
+-1/n_embed codebook and the discriminator from step 5 (the old tiny configs) the same loop loses about 1 dB as it
trains; with configs/tiny_base.yaml's recipe (codebook seeded from the first latents, no GAN within CPU budgets)
it gains. One process, the trainer's losses (VQGANLoss), no DeepSpeed: about 45 s on one core."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from asset_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from vqgan_recipe import STEPS, train_curve  # noqa: E402

torch.set_num_threads(1)


def test_tiny_vqgan_reconstruction_improves_steadily():
    disc_start = load_config(REPO / "configs" / "tiny_vqgan.yaml").train.loss.disc_start
    curve = train_curve([])
    # measured (24 held-out scenes, every 25 steps, one thread): 8.95 dB at step 0, then 9.55 9.54 9.92 10.71 10.28
    # 10.16 10.25 10.41; the old recipe (uniform codebook, GAN from step 5) falls: 9.05 8.80 8.17 8.48 7.88 7.81 7.42
    # 8.37 7.70. Batch 4 is noisy (with two threads one run dipped 0.6 dB below its start at step 75), so: never
    # clearly below the start, and the last three evaluations well above it
    assert min(curve) > curve[0] - 0.75, curve
    assert np.mean(curve[-3:]) > curve[0] + 0.7, curve
    assert disc_start > STEPS  # the tiny recipe keeps the GAN out of CPU-scale budgets (see tiny_base.yaml)

#!/usr/bin/env python
"""Why does a tokenizer recipe help or hurt? Train the image VQGAN in one process (the trainer's losses) and
print the held-out reconstruction every few steps.

    python bench/vqgan_recipe.py --config configs/tiny_vqgan.yaml --scenes [--set train.loss.disc_start=5 ...]
    python bench/vqgan_recipe.py --config configs/tiny_vqgan.yaml --set data.train_shards=SHARDS \\
        --steps 300 --eval-every 25 --eval-resolution 512 [--set train.loss.disc_start=100 ...]

--scenes: the curve of tests/test_tokenizer_recipe.py (64 px crops of flat-shape scenes drawn in memory by
data_tools/make_longrange.py, held-out PSNR on 24 scenes every 25 steps over 200) for the config and overrides. Otherwise the real loader on SHARDS:

The generator and discriminator steps are those of `asset-dist train` (VQGANLoss: L1 + LPIPS + codebook +
adaptive GAN term; hinge discriminator), with two Adam optimizers and no DeepSpeed, so a recipe can be
compared in seconds. Evaluation: PSNR (dB) and L1 of the full reconstruction (no hole) of the first
--eval-images val images at --eval-resolution (short side resized, centre crop: the loader's val view), plus
codebook usage on them. Prints one line per evaluation and a JSON summary (--json FILE).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_dist.config import add_config_args, load_config  # noqa: E402
from asset_dist.data import build_loader, finalize_batch  # noqa: E402
from asset_dist.eval.metrics import psnr  # noqa: E402
from asset_dist.models.losses import PatchDiscriminator, VQGANLoss  # noqa: E402
from asset_dist.models.vqgan import VQModel  # noqa: E402
from asset_dist.train.stages.tokenizer import prepare_codebook  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data_tools"))
import make_longrange as LR  # noqa: E402

# the --scenes curve (tests/test_tokenizer_recipe.py): 200 steps, held-out PSNR every 25 on 24 scenes
STEPS, EVERY, BATCH, SIZE, HELD = 200, 25, 4, 64, 24


def scenes(n: int, seed: int) -> torch.Tensor:
    imgs = [LR.make_scene(LR.RULES[i % 3], 128, seed + i, shapes=2)[0] for i in range(n)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x


def train_curve(overrides: list[str], config: str | Path = REPO / "configs" / "tiny_vqgan.yaml",
                steps: int = STEPS, every: int = EVERY, held_out: int = HELD) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same curve whatever the caller's threads: a chaotic loop amplifies float order
    try:
        return _curve(load_config(config, overrides), steps, every, held_out)
    finally:
        torch.set_num_threads(threads)


def _curve(cfg, steps: int, every: int, held_out: int) -> list[float]:
    torch.manual_seed(0)
    model = VQModel(cfg.model.vqgan)
    crit = VQGANLoss(cfg.train.loss, cfg.model.disc)
    t = cfg.train
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    opt_d = torch.optim.Adam(crit.discriminator.parameters(), lr=t.lr, betas=tuple(t.betas))
    g = torch.Generator().manual_seed(1)
    train, held = scenes(48, 0), scenes(held_out, 10_000)
    held = held[:, :, 32:96, 32:96]  # centre crops at the training scale

    def crops(k: int) -> torch.Tensor:
        i = torch.randint(len(train), (k,), generator=g)
        y, x = torch.randint(0, 128 - SIZE + 1, (2,), generator=g).tolist()
        return train[i, :, y:y + SIZE, x:x + SIZE]

    if cfg.train.loss.codebook_init == "data":  # what the trainer's build() does, on the first crops
        with torch.no_grad():
            z = model.encode_pre_quant(crops(8 * BATCH)).permute(0, 2, 3, 1).reshape(-1, model.quantize.embed_dim)
        model.quantize.init_from_latents(z, torch.Generator().manual_seed(t.seed))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            rec, _, _ = model(held)
        model.train()
        return float(psnr(rec.clamp(-1, 1), held).mean())

    curve = [evaluate()]
    for step in range(steps):
        x = crops(BATCH)
        rec, qloss, _ = model(x)
        loss, _ = crit.generator_loss(x, rec, qloss, step, last_layer=model.last_layer())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss, _ = crit.discriminator_loss(x, rec, step)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if (step + 1) % every == 0:
            curve.append(evaluate())
    return curve




def val_images(cfg, resolution: int, n: int) -> torch.Tensor:
    data = cfg.data
    view = type(data)(**{**data.__dict__, "resolution": resolution, "guide_resolution": min(resolution, 256),
                         "resize_short_side": 0, "batch_size": 1, "num_workers": 0})
    out = []
    for batch in build_loader(view, "val", 0, 1):
        out.append(batch["image"])
        if len(out) >= n:
            break
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: VQModel, x: torch.Tensor) -> dict:
    model.eval()
    rec, _, idx = model(x, None)
    model.train()
    counts = torch.bincount(idx.flatten(), minlength=model.quantize.n_embed)
    return {"psnr": float(psnr(rec.clamp(-1, 1), x).mean()), "l1": float((rec - x).abs().mean()),
            "codes": int((counts > 0).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--scenes", action="store_true", help="the in-memory flat-shape curve (the test's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-resolution", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=8)
    p.add_argument("--json", default=None, help="write the curve here")
    a = p.parse_args(argv)
    if a.scenes:
        t0 = time.time()
        curve = train_curve(a.overrides, a.config)
        print(json.dumps({"overrides": a.overrides, "psnr": [round(c, 2) for c in curve], "every": EVERY,
                          "s": round(time.time() - t0)}), flush=True)
        return 0
    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(cfg.train.seed)
    model = VQModel(cfg.model.vqgan)
    prepare_codebook(model, cfg, lambda b: (b["image"], b["mask"]))
    crit = VQGANLoss(cfg.train.loss, cfg.model.disc)
    disc = crit.discriminator if isinstance(crit.discriminator, PatchDiscriminator) else None
    t = cfg.train
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=tuple(t.betas))

    def lr_at(step: int) -> float:
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else t.lr

    xval = val_images(cfg, a.eval_resolution, a.eval_images)
    loader = build_loader(cfg.data, "train", 0, 1, convert=False)
    curve = []
    step, t0 = 0, time.time()
    logs: dict = {}

    def report() -> None:
        r = {"step": step, **evaluate(model, xval), "train_l1": float(logs.get("l1", float("nan"))),
             "s": round(time.time() - t0, 1)}
        curve.append(r)
        print(json.dumps(r), flush=True)

    report()
    while step < a.steps:
        for raw in loader:
            b = finalize_batch(raw)
            x, mask = b["image"], b["mask"]
            for g in (*opt_g.param_groups, *opt_d.param_groups):
                g["lr"] = lr_at(step)
            rec, qloss, _ = model(x, mask)
            loss, logs = crit.generator_loss(x, rec, qloss, step, last_layer=model.last_layer())
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            d_loss, _ = crit.discriminator_loss(x, rec.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            step += 1
            if step % a.eval_every == 0 or step == a.steps:
                report()
            if step >= a.steps:
                break
        loader.set_epoch(loader.epoch + 1)
    if a.json:
        Path(a.json).write_text(json.dumps({"config": a.config, "overrides": a.overrides, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

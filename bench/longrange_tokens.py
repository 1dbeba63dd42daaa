#!/usr/bin/env python
"""Can the tiny transformer learn to copy from far away at all? The long-range benchmark without tokenizers.

bench/longrange.sh's question with perfect tokens: a 16 x 16 token grid (the guide's 256 px view; 16 x 4 blocks
of 1 x 4 tokens) whose bottom half repeats the top half under a rule (copy_v, mirror_v, rot180: the generator's
rules at token level), every token an independent random code among --colours, so a hole token is predictable
only from its counterpart 8 rows away (32 blocks). Optional --labels K: the cond (seg) tokens are a random
mosaic of K labels under the same rule, independent of the codes (they help find the counterpart, not predict
it). The hole: --hole half (the whole bottom half, as the mask sampler's half-image holes) or rect (a random
rectangle in either half).

Trains the dense guide (--guide-steps, batch 8, AdamW), then SGA from the guide's weights with the guide's picks
(--sga-steps), in one process, and prints the hole-token NLL (nats) and top-1 of the SGA model with guided,
window and random picks and dense attention on 64 held-out grids. Chance is ln(colours). Loss curves do not
depend on machine load (seeded), so they may be measured on a busy machine.

    python bench/longrange_tokens.py --guide-steps 1500 --sga-steps 0 --rules 1 --colours 4 --hole half
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asset_dist.config import load_config  # noqa: E402
from asset_dist.eval.transformer import guided_picks, hole_sums_per_row, random_picks, window_picks  # noqa: E402
from asset_dist.models.transformer import AssetTransformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 16  # tokens per side (256 px)


def apply(rule: int, top: torch.Tensor) -> torch.Tensor:
    """Bottom half from the top half [8, 16]: 0 copy_v, 1 mirror_v, 2 rot180."""
    return top if rule == 0 else top.flip(0) if rule == 1 else top.flip(0).flip(1)


def grids(g: torch.Generator, batch: int, rules: int, colours: int, labels: int, hole_kind: str = "half"):
    """(ids, cond, hole), each [batch, 256] raster."""
    rule = torch.randint(0, rules, (batch,), generator=g).tolist()
    top = torch.randint(0, colours, (batch, N // 2, N), generator=g)
    ctop = torch.randint(0, labels, (batch, N // 2, N), generator=g)
    ids = torch.stack([torch.cat([t, apply(r, t)]) for t, r in zip(top, rule)])
    cond = torch.stack([torch.cat([t, apply(r, t)]) for t, r in zip(ctop, rule)])
    hole = torch.zeros(batch, N, N, dtype=torch.bool)
    if hole_kind == "half":
        hole[:, N // 2:] = True
    for i in range(batch if hole_kind == "rect" else 0):
        h, w = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(4, 13, (1,), generator=g))
        y = int(torch.randint(0, 2, (1,), generator=g)) * (N // 2) + int(torch.randint(0, N // 2 - h + 1, (1,), generator=g))
        x = int(torch.randint(0, N - w + 1, (1,), generator=g))
        hole[i, y:y + h, x:x + w] = True
    return ids.view(batch, -1), cond.view(batch, -1), hole.view(batch, -1)


def run(guide_steps: int = 1500, sga_steps: int = 0, lr: float = 1e-3, rules: int = 1, colours: int = 4,
        labels: int = 1, hole: str = "half", seed: int = 0, config: str | Path = REPO / "configs" / "tiny_guide.yaml",
        every: int = 0, eval_batches: int = 4) -> dict:
    """Train the guide (dense), then SGA from it with its picks; score on held-out grids. Returns the report."""
    torch.set_num_threads(1)
    cfg = load_config(config)
    t = cfg.model.transformer
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    curve: list = []

    def train(model, steps, guides_of, name):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        for s in range(steps):
            ids, cond, h = grids(g, 8, rules, colours, labels, hole)
            loss = model.loss(model(ids, cond, h, guides=guides_of(ids, cond, h)), ids, h)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if every and (s % every == 0 or s == steps - 1):
                curve.append({"stage": name, "step": s, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)})
                print(json.dumps(curve[-1]), flush=True)

    guide = AssetTransformer(t)
    train(guide, guide_steps, lambda *_: None, "guide")
    guide.eval().requires_grad_(False)
    sga = AssetTransformer(t)
    sga.load_state_dict(guide.state_dict())

    def picks(ids, cond, h):
        with torch.no_grad():
            return guided_picks(guide, cfg, ids, cond, h)[0]

    train(sga, sga_steps, picks, "sga")
    sga.eval()
    ge = torch.Generator().manual_seed(10_000 + seed)
    tot = {k: [0.0, 0, 0] for k in ("guided", "window", "random", "dense")}
    with torch.no_grad():
        for j in range(eval_batches):
            ids, cond, h = grids(ge, 16, rules, colours, labels, hole)
            settings = {"guided": picks(ids, cond, h), "window": window_picks(sga, t.guide_k),
                        "random": random_picks(sga, [f"{j}_{i}" for i in range(16)], t.guide_k, 0), "dense": None}
            for k, gd in settings.items():
                nll, hit, n = hole_sums_per_row(sga, sga(ids, cond, h, guides=gd), ids, h)
                tot[k] = [tot[k][0] + float(nll.sum()), tot[k][1] + int(hit.sum()), tot[k][2] + int(n.sum())]
    return {"chance_nll": round(math.log(colours), 3), "s": round(time.time() - t0, 1),
            **{k: {"nll": round(v[0] / v[2], 3), "top1": round(v[1] / v[2], 3)} for k, v in tot.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny_guide.yaml"), help="transformer config")
    p.add_argument("--guide-steps", type=int, default=1500)
    p.add_argument("--sga-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rules", type=int, default=1, help="1: copy_v only; 3: copy_v, mirror_v, rot180")
    p.add_argument("--colours", type=int, default=4)
    p.add_argument("--labels", type=int, default=1)
    p.add_argument("--hole", choices=("half", "rect"), default="half")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100, help="print the training loss every this many steps")
    a = p.parse_args(argv)
    rep = run(a.guide_steps, a.sga_steps, a.lr, a.rules, a.colours, a.labels, a.hole, a.seed, a.config, a.every)
    print(json.dumps({"args": vars(a), **rep}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`evaluate ablation`: does the guide matter? The paper's attention ablation with error bars, on any shards.

One trained SGA model, teacher-forced on held-out crops, scored on the hole tokens under three block-pick rules
that differ only in which key blocks each query block adds to its window (eval/transformer.py):
guided (the frozen guide's picks, as in training), random (uniform non-window blocks) and window (no picks).
Per sample: summed NLL, top-1 hits and hole-token count; the table pools them over samples (NLL per hole
token) with bootstrap 95 % intervals over samples, and the same for the paired differences between rules
(one resample draws the same samples for every rule, so the interval is the paired one).

With a sources file (data_tools/make_longrange.py's sources.json: per sample key, where each pixel's
counterpart is) it also reports how often picks land on the counterpart: for each query block holding hole
tokens, S = the blocks holding those tokens' sources; a pick hits when it is in S. Rows whose S lies entirely
in the window (or, causal, not before b-2) cannot be hit by any pick and are left out. Random picks give the
chance level. Results are broken down by the sources' rule.

The figure (--figure N): for N samples, input | hole | tokenizer reconstruction | samples with guided, window
and random picks (the hole tokens sampled with the production sampler, decoded, pasted into the input on the
token-aligned hole).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from asset_dist import attention as A
from asset_dist.config import Config
from asset_dist.eval.common import EvalError, fmt, markdown_table, rank_share, start
from asset_dist.eval.transformer import (_layers, _load, guided_picks, hole_sums_per_row, random_picks,
                                         transformer_weights, window_picks)
from asset_dist.models.tokens import FACTOR, Tokenizers, aligned_pixel_mask

RULES = ("guided", "window", "random")
PAIRS = (("guided", "window"), ("guided", "random"), ("random", "window"))
SOURCES_FORMAT = "asset_dist.longrange.v1"


# ----------------------------------------------------------------------------------------------------------
# Sources: where each hole token's content is


def read_sources(path: str | Path) -> dict[str, dict]:
    """sources.json -> {sample key: {"rule", "width", "height", "maps"}}; named errors for a bad file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise EvalError(f"--sources {p}: file not found") from None
    except (OSError, ValueError) as e:
        raise EvalError(f"--sources {p}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SOURCES_FORMAT or not isinstance(doc.get("samples"), dict):
        raise EvalError(f"--sources {p}: not a {SOURCES_FORMAT} file (data_tools/make_longrange.py writes one)")
    for key, s in doc["samples"].items():
        ok = isinstance(s, dict) and isinstance(s.get("maps"), list) and all(
            isinstance(m, dict) and len(m.get("region", ())) == 4 and len(m.get("map", ())) == 4 for m in s["maps"])
        if not ok:
            raise EvalError(f"--sources {p}: sample {key!r}: needs 'maps', a list of {{region: [x0, y0, x1, y1], "
                            f"map: [ax, bx, ay, by]}}")
    return doc["samples"]


def crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The val view's square centre crop (after the short side is resized) in normalised image coordinates."""
    if width >= height:
        f = height / width
        return (1 - f) / 2, 0.0, (1 + f) / 2, 1.0
    f = width / height
    return 0.0, (1 - f) / 2, 1.0, (1 + f) / 2


def source_tokens(src: dict, h: int, w: int) -> torch.Tensor:
    """Long [h*w] raster: the token holding each token centre's source (-1: no rule covers it, or the source
    falls outside the crop)."""
    x0, y0, x1, y1 = crop_box(int(src.get("width", 1)), int(src.get("height", 1)))
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    x = x0 + (jj + 0.5) / w * (x1 - x0)  # token centres in image coordinates
    y = y0 + (ii + 0.5) / h * (y1 - y0)
    out = torch.full((h, w), -1, dtype=torch.long)
    done = torch.zeros(h, w, dtype=torch.bool)
    for m in src["maps"]:
        rx0, ry0, rx1, ry1 = (float(v) for v in m["region"])
        ax, bx, ay, by = (float(v) for v in m["map"])
        inside = (x >= rx0) & (x < rx1) & (y >= ry0) & (y < ry1) & ~done
        sx, sy = ax * x + bx, ay * y + by
        ti = torch.floor((sy - y0) / (y1 - y0) * h).long()
        tj = torch.floor((sx - x0) / (x1 - x0) * w).long()
        valid = inside & (ti >= 0) & (ti < h) & (tj >= 0) & (tj < w)
        out = torch.where(valid, ti * w + tj, out)
        done |= inside
    return out.view(-1)


def source_block_sets(src_tok: torch.Tensor, hole: torch.Tensor, h: int, w: int, grid: Sequence[int]
                      ) -> torch.Tensor:
    """Bool [n_blocks, n_blocks]: [b, c] true when a hole token of query block b has its source in block c."""
    blocks = A.block_ids(h, w, grid)
    nb = A.n_blocks_of(grid)
    sel = hole.bool().cpu() & (src_tok >= 0)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    out[blocks[sel], blocks[src_tok[sel]]] = True
    return out


def pick_hits(picks: torch.Tensor, sets: torch.Tensor, causal: bool) -> tuple[int, int, int, int]:
    """picks long [layers, heads, nb, k] of one sample, sets bool [nb, nb] -> (hit picks, picks, rows hit,
    rows) over the rows (layer, head, query block) whose source set has a block a pick could reach."""
    nb = sets.shape[0]
    eligible = sets & ~A.forbidden_blocks(nb, causal)
    rows = eligible.any(-1)  # [nb]
    if not rows.any():
        return 0, 0, 0, 0
    p = picks[:, :, rows]  # [layers, heads, r, k]
    valid = p >= 0
    hit = eligible[rows].unsqueeze(0).unsqueeze(0).expand(*p.shape[:2], -1, -1).gather(-1, p.clamp(min=0)) & valid
    return int(hit.sum()), int(valid.sum()), int(hit.any(-1).sum()), int(hit.shape[0] * hit.shape[1] * hit.shape[2])


# ----------------------------------------------------------------------------------------------------------
# Statistics


def bootstrap_draws(per_sample: dict[str, np.ndarray], counts: np.ndarray, n_boot: int, seed: int
                    ) -> dict[str, np.ndarray]:
    """Bootstrap over samples of pooled ratios sum(x) / sum(count), for each named x: [n_boot] draws each. One
    set of resampled samples serves every x, so differences of draws give paired intervals."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    c = counts[idx].sum(1)
    c = np.where(c > 0, c, np.nan)
    return {k: v[idx].sum(1) / c for k, v in per_sample.items()}


def interval(v: np.ndarray) -> tuple[float, float]:
    """95 % percentile interval of bootstrap draws (NaN draws, from all-empty resamples, are dropped)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


def summarize(rows: list[dict], n_boot: int, seed: int) -> dict:
    """Pooled NLL / top-1 per rule with intervals, and paired differences, over the sample rows given."""
    counts = np.array([r["count"] for r in rows], dtype=np.float64)
    per = {f"{s}/{q}": np.array([r[s][q] for r in rows], dtype=np.float64) for s in RULES for q in ("nll", "correct")}
    total = counts.sum()
    draws = bootstrap_draws(per, counts, n_boot, seed) if total > 0 else {}
    nan2 = (math.nan, math.nan)
    out: dict = {"samples": len(rows), "hole_tokens": int(total), "rules": {}, "differences": {}}
    for s in RULES:
        nll = per[f"{s}/nll"].sum() / total if total else float("nan")
        top1 = per[f"{s}/correct"].sum() / total if total else float("nan")
        out["rules"][s] = {"nll": float(nll), "nll_ci": list(interval(draws[f"{s}/nll"]) if draws else nan2),
                           "top1": float(top1), "top1_ci": list(interval(draws[f"{s}/correct"]) if draws else nan2)}
    for a, b in PAIRS:
        d = out["rules"][a]["nll"] - out["rules"][b]["nll"]
        ci = interval(draws[f"{a}/nll"] - draws[f"{b}/nll"]) if draws else nan2
        dt = out["rules"][a]["top1"] - out["rules"][b]["top1"]
        cit = interval(draws[f"{a}/correct"] - draws[f"{b}/correct"]) if draws else nan2
        out["differences"][f"{a}-{b}"] = {"nll": float(d), "nll_ci": list(ci), "excludes_0": bool(ci[0] > 0 or ci[1] < 0),
                                          "top1": float(dt), "top1_ci": list(cit)}
    hits: dict = {}
    for s in ("guided", "random"):
        for key in ("e_self", "d_cross", "d_causal", "all"):
            tot = [sum(r.get("hits", {}).get(s, {}).get(key, (0, 0, 0, 0))[i] for r in rows) for i in range(4)]
            if tot[1] or tot[3]:
                hits.setdefault(s, {})[key] = {"pick_hit_rate": tot[0] / tot[1] if tot[1] else float("nan"),
                                               "row_hit_rate": tot[2] / tot[3] if tot[3] else float("nan"),
                                               "picks": tot[1], "rows": tot[3]}
    out["pick_hits"] = hits
    return out


# ----------------------------------------------------------------------------------------------------------
# The evaluation


def _gather(rows: list[dict]) -> list[dict]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p]


@torch.no_grad()
def evaluate_ablation(cfg: Config, weights: Optional[str] = None, max_samples: int = 0, seed: int = 0,
                      sources: Optional[str] = None, n_boot: int = 2000, figure: int = 0,
                      figure_path: Optional[str | Path] = None, device: str = "auto") -> dict:
    """The report (same on every rank); rank 0 writes the figure when figure > 0."""
    from asset_dist.data import build_loader

    paths = transformer_weights(cfg, weights)
    src_map = read_sources(sources) if sources else {}
    env, dev = start(device)
    try:
        tok = Tokenizers(cfg, paths["vqgan"], paths["seg"]).to(dev)
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(str(e)) from None
    model, model_stage = _load(cfg, paths["sga"], ("sga", "guide"), dev)
    guide = _load(cfg, paths["guide"], "guide", dev)[0]
    t = cfg.model.transformer
    k = t.guide_k
    try:
        loader = build_loader(cfg.data, "val", env.rank, env.world_size)
    except ValueError as e:
        raise EvalError(f"val split: {e}") from None
    budget = rank_share(max_samples, env)
    rows: list[dict] = []
    shown: list[dict] = []
    for batch in loader:
        n = len(batch["key"]) if budget is None else min(len(batch["key"]), budget - len(rows))
        if n <= 0:
            break
        b = {key: (v[:n].to(dev) if isinstance(v, torch.Tensor) else v[:n]) for key, v in batch.items()}
        ids, cond, hole = tok(b["image"], b["seg"], b["mask"])
        lr = tok(b["image_lr"], b["seg_lr"], b["mask_lr"])
        picks = {"guided": guided_picks(guide, cfg, *lr)[0], "window": window_picks(model, k),
                 "random": random_picks(model, b["key"], k, seed)}
        picks = {s: {key: v.to(dev) for key, v in g.items()} for s, g in picks.items()}
        res = {s: hole_sums_per_row(model, model(ids, cond, hole, guides=picks[s]), ids, hole) for s in RULES}
        h, w = (x // FACTOR for x in b["image"].shape[-2:])
        for i, key in enumerate(b["key"]):
            row = {"key": key, "count": int(res["guided"][2][i]),
                   **{s: {"nll": float(res[s][0][i]), "correct": int(res[s][1][i])} for s in RULES}}
            src = src_map.get(key)
            if src is not None:
                row["rule"] = str(src.get("rule", "?"))
                sets = source_block_sets(source_tokens(src, h, w), hole[i], h, w, t.block_grid)
                row["hits"] = {s: _sample_hits(model, picks[s], i, sets) for s in ("guided", "random")}
            rows.append(row)
        if figure > 0 and env.is_main and len(shown) < figure:
            shown += _figure_rows(model, tok, cfg, b, ids, cond, hole, picks, figure - len(shown))
        if budget is not None and len(rows) >= budget:
            break
    rows = _gather(rows)
    if not rows:
        raise EvalError("the val split gave no samples (check data.val_shards or the manifest's val split)")
    report = {"kind": "ablation", "split": "val", "resolution": cfg.data.resolution,
              "guide_resolution": cfg.data.guide_resolution, "block_grid": list(t.block_grid), "guide_k": k,
              "seed": seed, "bootstrap": n_boot, "weights": paths, "model_stage": model_stage,
              "sources": str(sources) if sources else None, "world_size": env.world_size,
              "all": summarize(rows, n_boot, seed)}
    by_rule = sorted({r["rule"] for r in rows if "rule" in r})
    if len(by_rule) > 1:
        report["by_rule"] = {rule: summarize([r for r in rows if r.get("rule") == rule], n_boot, seed)
                             for rule in by_rule}
    report["per_sample"] = rows
    if figure > 0 and env.is_main and shown and figure_path:
        write_figure(shown, figure_path)
        report["figure"] = str(figure_path)
    return report


def _sample_hits(model, picks: dict[str, torch.Tensor], i: int, sets: torch.Tensor) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    tot = [0, 0, 0, 0]
    for key, (_, causal) in _layers(model).items():
        g = picks[key]
        g = g[:, i if g.shape[1] > 1 else 0].cpu()  # [layers, heads, nb, k]
        out[key] = pick_hits(g, sets, causal)
        tot = [a + b for a, b in zip(tot, out[key])]
    out["all"] = tuple(tot)
    return out


# ----------------------------------------------------------------------------------------------------------
# The figure


def _figure_rows(model, tok: Tokenizers, cfg: Config, b: dict, ids, cond, hole, picks, n: int) -> list[dict]:
    from asset_dist.infer.sampler import row_generator, sample_cached

    n = min(n, ids.shape[0])
    H, W = b["image"].shape[-2:]
    pix = aligned_pixel_mask(hole[:n], H, W).cpu()
    x = b["image"][:n].float().cpu()
    out = [{"input": x[i], "hole": pix[i]} for i in range(n)]
    rec = tok.decode(ids[:n], H, W).cpu()
    for i in range(n):
        out[i]["reconstruction"] = rec[i]
    for s in RULES:
        g = {key: v[:, :n] if v.shape[1] > 1 else v for key, v in picks[s].items()}
        gens = [row_generator(cfg.infer.seed, b["key"][i], 0, "ablation") for i in range(n)]
        toks, _ = sample_cached(model, ids[:n], cond[:n], hole[:n], gens, guides=g, top_k=cfg.infer.top_k,
                                temperature=cfg.infer.temperature)
        img = tok.decode(toks, H, W).cpu()
        for i in range(n):
            out[i][s] = torch.where(pix[i] > 0, img[i], x[i])
    return out


FIGURE_COLUMNS = ("input", "hole", "reconstruction", "guided", "window", "random")


def write_figure(rows: list[dict], path: str | Path, tile: int = 192) -> None:
    """A PNG grid: one row per sample, FIGURE_COLUMNS left to right, a header line naming them."""
    from PIL import Image, ImageDraw

    from asset_dist.utils import atomic_write

    head = 18
    sheet = Image.new("RGB", (tile * len(FIGURE_COLUMNS), head + tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(FIGURE_COLUMNS):
        draw.text((j * tile + 4, 3), name, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        for j, name in enumerate(FIGURE_COLUMNS):
            if name == "hole":
                im = r["input"] * (1 - r["hole"]) + r["hole"] * torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1)
            else:
                im = r[name]
            arr = ((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(arr).resize((tile, tile), Image.BILINEAR), (j * tile, head + i * tile))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _ci(v: Sequence[float]) -> str:
    return f"[{fmt(v[0], 3)}, {fmt(v[1], 3)}]"


def _table(s: dict) -> str:
    rows = [[r, f"{s['rules'][r]['nll']:.3f} {_ci(s['rules'][r]['nll_ci'])}",
             f"{s['rules'][r]['top1']:.3f} {_ci(s['rules'][r]['top1_ci'])}"] for r in RULES]
    out = markdown_table(["picks", "hole NLL (nats/token) [95 % CI]", "hole top-1 [95 % CI]"], rows)
    diffs = [[k, f"{d['nll']:+.3f} {_ci(d['nll_ci'])}", "yes" if d["excludes_0"] else "no",
              f"{d['top1']:+.3f} {_ci(d['top1_ci'])}"] for k, d in s["differences"].items()]
    out += "\n" + markdown_table(["difference", "NLL [95 % CI]", "CI excludes 0", "top-1 [95 % CI]"], diffs)
    if s.get("pick_hits"):
        hr = [[src, key, f"{v['pick_hit_rate']:.3f}", f"{v['row_hit_rate']:.3f}", v["picks"]]
              for src, d in s["pick_hits"].items() for key, v in d.items()]
        out += "\n" + markdown_table(["picks", "attention", "pick hit rate", "rows with a hit", "picks counted"], hr)
    return out


def ablation_markdown(rep: dict) -> str:
    a = rep["all"]
    lines = ["# Attention ablation: guided vs window vs random picks\n",
             f"{a['samples']} val samples, {a['hole_tokens']} hole tokens; SGA model ({rep['model_stage']} export "
             f"{rep['weights']['sga']}) at {rep['resolution']} px, guide at {rep['guide_resolution']} px, "
             f"block grid {rep['block_grid']}, k = {rep['guide_k']}; {rep['bootstrap']} bootstrap resamples over "
             f"samples (paired for differences).\n", _table(a)]
    for rule, s in (rep.get("by_rule") or {}).items():
        lines += [f"\n## {rule} ({s['samples']} samples, {s['hole_tokens']} hole tokens)\n", _table(s)]
    if rep.get("pick_hits") is None and rep.get("sources") is None:
        lines.append("\nPick hit rates need --sources (where each hole's content is; make_longrange.py writes it).\n")
    if rep.get("figure"):
        lines.append(f"\nFigure: {rep['figure']} (input | hole | tokenizer reconstruction | guided | window | "
                     "random samples).\n")
    return "\n".join(lines)

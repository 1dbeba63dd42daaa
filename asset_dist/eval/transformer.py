"""`evaluate transformer`: the paper's attention comparison made measurable.

One trained SGA model, teacher-forced on held-out (val) crops at data.resolution, scored on the hole tokens
(negative log-likelihood in nats and top-1 accuracy, pooled over every hole token) under several attention
settings that differ only in the block picks each query block adds to its local window:

    guided    picks from the frozen guide's dense attention on the 256 view (the paper; what training used)
    window    no picks (every pick -1): the local window alone
    random    k uniform random blocks outside the window per layer / head / query block (causal rows: only
              blocks < b-2, as the guided "fixed" rule), seeded per sample key
    dense     (opt-in) the same weights with full attention: the upper bound SGA approximates
    guide256  the dense guide on the 256 view, on its own hole tokens: the low-resolution reference

Same tokens, same weights, same hole in every high-resolution row, so the differences are the attention's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist import attention as A
from asset_dist.config import Config
from asset_dist.eval import metrics as M
from asset_dist.eval.common import EvalError, Sums, markdown_table, rank_share, start
from asset_dist.models.tokens import Tokenizers, load_weights
from asset_dist.models.transformer import AssetTransformer, Guides, guides_from_maps

SETTINGS = ("guided", "window", "random", "dense", "guide256")
DEFAULT_SETTINGS = ("guided", "window", "random", "guide256")


def _layers(model: AssetTransformer) -> dict[str, tuple[int, bool]]:
    """guide key -> (number of layers, causal)."""
    return {"e_self": (len(model.encoder), False), "d_causal": (len(model.decoder), True),
            "d_cross": (len(model.decoder), False)}


def window_picks(model: AssetTransformer, k: int) -> Guides:
    """Every pick -1: each query block sees its window only. Batch dim 1 (broadcasts)."""
    return {key: torch.full((n, 1, model.n_heads, model.n_blocks, k), -1, dtype=torch.long)
            for key, (n, _) in _layers(model).items()}


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, sample key): random picks never depend on batch size, rank or read order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def random_picks(model: AssetTransformer, keys: Sequence[str], k: int, seed: int) -> Guides:
    """Uniform random picks per (layer, sample, head, query block): k distinct blocks outside the window (causal:
    before b-2), -1 padded where fewer qualify. The top-k of i.i.d. uniform scores over the eligible blocks is a
    uniform random k-subset, so `pick_blocks`' "fixed" rule gives exactly the eligible set and the padding."""
    out: dict[str, list[torch.Tensor]] = {key: [] for key in _layers(model)}
    nb = model.n_blocks
    for name in keys:
        g = torch.Generator().manual_seed(sample_seed(seed, name))
        for key, (n, causal) in _layers(model).items():
            scores = torch.rand(n, 1, model.n_heads, nb, nb, generator=g)
            out[key].append(A.pick_blocks(scores, k, causal=causal, mode="fixed"))
    return {key: torch.cat(v, 1) for key, v in out.items()}


def guided_picks(guide: AssetTransformer, cfg: Config, ids, cond, hole) -> tuple[Guides, torch.Tensor]:
    """The SGA stage's rule: dense guide pass on the 256 view -> picks; also returns the guide's logits."""
    t = cfg.model.transformer
    logits, maps = guide(ids, cond, hole, return_attn=True)
    picks = guides_from_maps({key: v.float() for key, v in maps.items()}, t.block_grid, k=t.guide_k,
                             causal_mode=t.causal_picks)
    return picks, logits


def hole_sums_per_row(model: AssetTransformer, logits: torch.Tensor, ids: torch.Tensor, hole: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (summed cross-entropy float64 [B], correct top-1 int64 [B], hole tokens int64 [B]) over the
    hole tokens; logits: forward's strip order."""
    lay = model.layout(ids.shape[1], device=ids.device)
    target, sel = ids[:, lay.perm], hole[:, lay.perm].bool()
    lg = logits.float()
    nll = F.cross_entropy(lg.transpose(1, 2), target, reduction="none")  # [B, L]
    hit = lg.argmax(-1) == target
    zero = torch.zeros((), device=nll.device)
    return (torch.where(sel, nll, zero).double().sum(1).cpu(), (hit & sel).sum(1).cpu(), sel.sum(1).cpu())


def hole_sums(model: AssetTransformer, logits: torch.Tensor, ids: torch.Tensor, hole: torch.Tensor
              ) -> tuple[float, int, int]:
    """(summed cross-entropy, correct top-1, count) over the hole tokens; logits: forward's strip order."""
    nll, correct, count = hole_sums_per_row(model, logits, ids, hole)
    return float(nll.sum()), int(correct.sum()), int(count.sum())


def transformer_weights(cfg: Config, weights: Optional[str]) -> dict[str, str]:
    """Parents from train.*_weights (or infer.*); the evaluated model from --weights, infer.sga_weights, or the
    run folder's own export (paths.run_dir/export/sga.pt)."""
    t, i = cfg.train, cfg.infer
    own = Path(cfg.paths.run_dir) / "export" / "sga.pt"
    paths = {"vqgan": t.vqgan_weights or i.vqgan_weights, "seg": t.seg_weights or i.seg_weights,
             "guide": t.guide_weights or i.guide_weights,
             "sga": weights or i.sga_weights or (str(own) if own.is_file() else "")}
    for key, what in (("vqgan", "train.vqgan_weights"), ("seg", "train.seg_weights"),
                      ("guide", "train.guide_weights"), ("sga", f"--weights (an SGA export; {own} does not exist)")):
        if not paths[key]:
            raise EvalError(f"no {key} weights: set {what}")
    return paths


def _load(cfg: Config, path: str, stage: str | tuple[str, ...], device: torch.device
          ) -> tuple[AssetTransformer, str]:
    model = AssetTransformer(cfg.model.transformer)
    try:
        rec = load_weights(model, path, stage)
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(str(e)) from None
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False), rec["stage"]


@torch.no_grad()
def evaluate_transformer(cfg: Config, weights: Optional[str] = None, max_samples: int = 0,
                         settings: Sequence[str] = DEFAULT_SETTINGS, seed: int = 0, device: str = "auto") -> dict:
    """The report (same on every rank). Everything runs in fp32: the picks are a ranking of guide
    attention, so they are taken at full precision here, whatever the training precision was."""
    from asset_dist.data import build_loader

    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise EvalError(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")
    paths = transformer_weights(cfg, weights)
    env, dev = start(device, cfg.dist.timeout_s)
    try:
        tok = Tokenizers(cfg, paths["vqgan"], paths["seg"]).to(dev)
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(str(e)) from None
    # a guide export is accepted too: the guide's weights under SGA are where SGA training starts
    model, model_stage = _load(cfg, paths["sga"], ("sga", "guide"), dev)
    need_guide = "guided" in settings or "guide256" in settings
    guide = _load(cfg, paths["guide"], "guide", dev)[0] if need_guide else None
    k = cfg.model.transformer.guide_k
    try:
        loader = build_loader(cfg.data, "val", env.rank, env.world_size)
    except ValueError as e:
        raise EvalError(f"val split: {e}") from None
    sums = Sums()
    for name in ("samples", *(f"{s}/{q}" for s in settings for q in ("nll", "correct", "count"))):
        sums.add(name, 0.0)
    budget = rank_share(max_samples, env)
    seen = 0
    for batch in loader:
        n = len(batch["key"]) if budget is None else min(len(batch["key"]), budget - seen)
        if n <= 0:
            break
        seen += n
        sums.add("samples", n)
        b = {key: (v[:n].to(dev) if isinstance(v, torch.Tensor) else v[:n]) for key, v in batch.items()}
        ids, cond, hole = tok(b["image"], b["seg"], b["mask"])
        picks: dict[str, Optional[Guides]] = {"dense": None}
        if need_guide:
            lr = tok(b["image_lr"], b["seg_lr"], b["mask_lr"])
            picks["guided"], glogits = guided_picks(guide, cfg, *lr)
            if "guide256" in settings:
                _add(sums, "guide256", hole_sums(guide, glogits, lr[0], lr[2]))
            del glogits
        if "window" in settings:
            picks["window"] = window_picks(model, k)
        if "random" in settings:
            picks["random"] = random_picks(model, b["key"], k, seed)
        for s in settings:
            if s == "guide256":
                continue
            g = picks[s]
            g = None if g is None else {key: v.to(dev) for key, v in g.items()}
            _add(sums, s, hole_sums(model, model(ids, cond, hole, guides=g), ids, hole))
        if budget is not None and seen >= budget:
            break
    sums.reduce(dev)
    total = int(sums.get("samples"))
    if total == 0:
        raise EvalError("the val split gave no samples (check data.val_shards or the manifest's val split)")
    res = {"guide256": cfg.data.guide_resolution}
    rows = {}
    for s in settings:
        rows[s] = {**M.token_scores(sums.get(f"{s}/nll"), sums.get(f"{s}/correct"), sums.get(f"{s}/count")),
                   "resolution": res.get(s, cfg.data.resolution), "attention": describe(s, k, seed)}
    t = cfg.model.transformer
    return {"kind": "transformer", "split": "val", "samples": total, "resolution": cfg.data.resolution,
            "guide_resolution": cfg.data.guide_resolution, "block_grid": list(t.block_grid), "guide_k": k,
            "causal_picks": t.causal_picks, "token_hole": cfg.model.token_hole, "seed": seed,
            "world_size": env.world_size, "weights": paths, "model_stage": model_stage, "settings": rows}


def _add(sums: Sums, setting: str, vals: tuple[float, int, int]) -> None:
    for q, v in zip(("nll", "correct", "count"), vals):
        sums.add(f"{setting}/{q}", float(v))


def describe(setting: str, k: int, seed: int) -> str:
    return {"guided": f"window + guide picks (top-{k}, frozen guide's attention on the 256 view)",
            "window": "window only (picks dropped)",
            "random": f"window + {k} uniform random non-window blocks (causal: < b-2), seed {seed}",
            "dense": "full attention, same weights",
            "guide256": "the guide, dense, on the 256 view (its own hole tokens)"}[setting]


def transformer_markdown(report: dict) -> str:
    head = (f"# Transformer evaluation: attention settings\n\n{report['samples']} val samples; SGA model "
            f"({report['model_stage']} export {report['weights']['sga']}) at {report['resolution']} px, "
            f"block grid {report['block_grid']}, k = {report['guide_k']} "
            f"(causal picks: {report['causal_picks']}, token hole: {report['token_hole']}); "
            f"{report['world_size']} rank(s).\n\n")
    rows = [[s, r["resolution"], r["nll"], r["top1"], r["perplexity"], r["tokens"], r["attention"]]
            for s, r in report["settings"].items()]
    table = markdown_table(["setting", "px", "hole NLL (nats)", "hole top-1", "perplexity", "hole tokens",
                            "attention"], rows)
    notes = ("\nTeacher-forced; NLL and top-1 pooled over all hole tokens. The high-resolution rows share tokens, "
             "weights and holes: only the block picks differ. guide256 scores other tokens (the 256 view).\n")
    return head + table + notes

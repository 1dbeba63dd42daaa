"""`evaluate tokenizer`: reconstruction quality and codebook usage of the image VQGAN and the seg tokenizer on
the held-out (val) split, at data.resolution.

VQGAN: PSNR of the plain reconstruction (encoder sees every pixel), and PSNR over the known pixels when the
encoder sees the val hole (what the transformer's known tokens carry). Seg tokenizer: pixel accuracy and mean
IoU of the argmax label map. Both: fraction of codes used and perplexity of the code histogram (plain
encoding), pooled over all evaluated samples.
"""
from __future__ import annotations

from typing import Optional

import torch

from asset_dist.config import Config
from asset_dist.eval import metrics as M
from asset_dist.eval.common import EvalError, Sums, markdown_table, rank_share, start
from asset_dist.models.seg_vq import SegVQModel
from asset_dist.models.tokens import load_weights
from asset_dist.models.vqgan import VQModel

STAGES = ("vqgan", "seg")


def tokenizer_weights(cfg: Config, weights: Optional[str]) -> dict[str, str]:
    """stage -> export path: --weights alone (its stage decides), else train.*_weights (or infer.*_weights)."""
    if weights:
        from asset_dist.artifacts import read_export

        try:
            stage = read_export(weights)["stage"]
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise EvalError(str(e)) from None
        if stage not in STAGES:
            raise EvalError(f"{weights}: exported by stage '{stage}'; evaluate tokenizer takes a vqgan or seg export "
                            "(use `evaluate transformer` for guide/sga exports)")
        return {stage: weights}
    paths = {s: getattr(cfg.train, f"{s}_weights") or getattr(cfg.infer, f"{s}_weights") for s in STAGES}
    paths = {s: p for s, p in paths.items() if p}
    if not paths:
        raise EvalError("no tokenizer weights: pass --weights EXPORT or set train.vqgan_weights / "
                        "train.seg_weights")
    return paths


def _build(cfg: Config, stage: str, path: str, device: torch.device) -> VQModel:
    model = VQModel(cfg.model.vqgan) if stage == "vqgan" else SegVQModel(cfg.model.seg)
    try:
        load_weights(model, path, stage)
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(str(e)) from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def evaluate_tokenizer(cfg: Config, weights: Optional[str] = None, max_samples: int = 0,
                       device: str = "auto") -> dict:
    """The report (same on every rank). max_samples: global budget (0 = the whole val split)."""
    from asset_dist.data import build_loader

    paths = tokenizer_weights(cfg, weights)
    env, dev = start(device)
    models = {s: _build(cfg, s, p, dev) for s, p in paths.items()}
    try:
        loader = build_loader(cfg.data, "val", env.rank, env.world_size)
    except ValueError as e:
        raise EvalError(f"val split: {e}") from None
    n_cls = cfg.model.seg.in_channels
    sums = Sums()
    sums.add("samples", 0)
    for s, m in models.items():  # every name exists on every rank before the reduce
        sums.add(f"{s}/codes", torch.zeros(m.quantize.n_embed, dtype=torch.int64))
    if "vqgan" in models:
        for k in ("psnr", "psnr_known", "known_images"):
            sums.add(f"vqgan/{k}", 0.0)
    if "seg" in models:
        sums.add("seg/confusion", torch.zeros(n_cls, n_cls, dtype=torch.int64))
    budget = rank_share(max_samples, env)
    seen = 0
    for batch in loader:
        n = len(batch["key"]) if budget is None else min(len(batch["key"]), budget - seen)
        if n <= 0:
            break
        seen += n
        sums.add("samples", n)
        if "vqgan" in models:
            vq = models["vqgan"]
            x, hole = batch["image"][:n].to(dev), batch["mask"][:n].to(dev)
            rec, _, idx = vq(x)
            sums.add("vqgan/psnr", M.psnr(rec.clamp(-1, 1), x).sum())
            sums.add("vqgan/codes", M.code_histogram(idx, vq.quantize.n_embed))
            known = 1.0 - hole
            ok = known.flatten(1).sum(1) > 0
            if ok.any():
                rec_m, _, _ = vq(x[ok], hole[ok])
                sums.add("vqgan/psnr_known", M.psnr(rec_m.clamp(-1, 1), x[ok], known[ok]).sum())
                sums.add("vqgan/known_images", int(ok.sum()))
        if "seg" in models:
            sm = models["seg"]
            seg = batch["seg"][:n].to(dev)
            logits, _, idx = sm(seg)
            sums.add("seg/confusion", M.confusion(logits.argmax(1), seg, n_cls))
            sums.add("seg/codes", M.code_histogram(idx, sm.quantize.n_embed))
        if budget is not None and seen >= budget:
            break
    sums.reduce(dev)
    total = int(sums.get("samples"))
    if total == 0:
        raise EvalError("the val split gave no samples (check data.val_shards or the manifest's val split)")
    out: dict[str, dict] = {}
    if "vqgan" in models:
        ki = sums.get("vqgan/known_images")
        out["vqgan"] = {"weights": paths["vqgan"], "psnr": sums.get("vqgan/psnr") / total,
                        "psnr_known_masked": sums.get("vqgan/psnr_known") / ki if ki else float("nan"),
                        **M.codebook_usage(sums["vqgan/codes"])}
    if "seg" in models:
        out["seg"] = {"weights": paths["seg"], **M.segmentation_scores(sums["seg/confusion"]),
                      **M.codebook_usage(sums["seg/codes"])}
    return {"kind": "tokenizer", "split": "val", "samples": total, "resolution": cfg.data.resolution,
            "world_size": env.world_size, "models": out}


def tokenizer_markdown(report: dict) -> str:
    m = report["models"]
    head = (f"# Tokenizer evaluation\n\n{report['samples']} val samples at {report['resolution']} px "
            f"({report['world_size']} rank(s)).\n\n")
    rows = []
    if "vqgan" in m:
        v = m["vqgan"]
        rows.append(["vqgan", v["psnr"], v["psnr_known_masked"], "-", "-", v["usage"], v["codes_used"], v["perplexity"],
                     v["weights"]])
    if "seg" in m:
        s = m["seg"]
        rows.append(["seg", "-", "-", s["pixel_accuracy"], s["miou"], s["usage"], s["codes_used"], s["perplexity"],
                     s["weights"]])
    table = markdown_table(["model", "PSNR (dB)", "PSNR known px, masked encoder (dB)", "pixel acc.", "mIoU",
                            "codebook usage", "codes used", "code perplexity", "weights"], rows)
    notes = ("\nPSNR: per image on [-1, 1] images (range 2), capped at 100 dB, averaged. Usage: fraction of codes "
             "used at least once over all samples; perplexity: exp(entropy) of the code histogram.\n")
    return head + table + notes

"""Metric functions of `asset-dist evaluate`, pure and small so tests can check them against hand values.

Conventions: images are float tensors in [-1, 1] (the loader's) or uint8 arrays; every function returns plain
numbers or tensors and never touches files.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

PSNR_CAP = 100.0  # dB: identical images would give +inf; a cap keeps means finite


def psnr(a: torch.Tensor, b: torch.Tensor, weight: Optional[torch.Tensor] = None,
         data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR [B] in dB of images [B, C, H, W] (default range [-1, 1]: data_range 2).

    weight [B, 1, H, W] (1 = pixel counts) restricts the mean squared error to those pixels; images with no
    counted pixel give NaN (callers skip them)."""
    d = (a.double() - b.double()).square()
    if weight is None:
        mse = d.flatten(1).mean(1)
    else:
        w = weight.double().expand_as(d)
        mse = (d * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP)


def code_histogram(indices: torch.Tensor, n_embed: int) -> torch.Tensor:
    """int64 [n_embed] counts of code indices (any shape)."""
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=n_embed)


def codebook_usage(counts: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Usage of a codebook from its code histogram: fraction of codes used at least once, and the perplexity
    exp(H) of the empirical code distribution (1 = one code, n_embed = all codes equally often)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    total = float(c.sum())
    if total <= 0:
        return {"usage": 0.0, "codes_used": 0, "perplexity": 0.0, "n_embed": int(c.numel())}
    p = c[c > 0] / total
    return {"usage": float((c > 0).double().mean()), "codes_used": int((c > 0).sum()),
            "perplexity": float(torch.exp(-(p * p.log()).sum())), "n_embed": int(c.numel())}


def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n, n] confusion counts: [true class, predicted class]."""
    idx = target.reshape(-1).long().cpu() * n + pred.reshape(-1).long().cpu()
    return torch.bincount(idx, minlength=n * n).view(n, n)


def segmentation_scores(conf: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy and mean IoU over the classes that occur (in the labels or the predictions)."""
    c = conf.double()
    total = float(c.sum())
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    return {"pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "miou": float((tp[present] / union[present]).mean()) if present.any() else float("nan"),
            "classes": int(present.sum())}


def token_scores(nll_sum: float, correct: float, count: float) -> dict[str, float]:
    """Mean hole-token negative log-likelihood (nats), top-1 accuracy and perplexity from pooled sums."""
    if count <= 0:
        return {"nll": float("nan"), "top1": float("nan"), "perplexity": float("nan"), "tokens": 0}
    nll = nll_sum / count
    return {"nll": nll, "top1": correct / count, "perplexity": math.exp(min(nll, 700.0)), "tokens": int(count)}


# ----------------------------------------------------------------------------------------------------------
# Edits


def unchanged_outside(sample: np.ndarray, original: np.ndarray, keep: np.ndarray) -> tuple[int, int]:
    """(pixels outside `keep` whose RGB bytes equal the input's, pixels outside `keep`). keep [H, W] bool is the
    mask dilated by the blend band: the only place an edit may change pixels."""
    outside = ~keep
    same = (sample == original).all(-1) & outside
    return int(same.sum()), int(outside.sum())


def pairwise_l1(samples: Sequence[np.ndarray], mask: np.ndarray) -> list[float]:
    """Mean absolute difference inside `mask` (values / 255, channel mean) for every pair of samples."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return []
    vals = [s.astype(np.float64)[m] / 255.0 for s in samples]
    return [float(np.abs(vals[i] - vals[j]).mean()) for i in range(len(vals)) for j in range(i + 1, len(vals))]


def mask_box(mask: np.ndarray, margin: int = 0, min_side: int = 32) -> tuple[slice, slice]:
    """Bounding box of the mask grown by `margin` and to at least min_side per axis (clipped to the image)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape

    def span(lo: int, hi: int, n: int) -> slice:
        lo, hi = max(0, lo - margin), min(n, hi + 1 + margin)
        side = max(hi - lo, min(min_side, n))
        lo = max(0, min(lo - (side - (hi - lo)) // 2, n - side))  # grow around the centre, stay inside
        return slice(lo, lo + side)

    return span(int(ys.min()), int(ys.max()), h), span(int(xs.min()), int(xs.max()), w)


def summarize(values: Iterable[float]) -> dict[str, float]:
    """count, mean, median, p90, min, max and total of a list of numbers (timings)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max()), "total": float(v.sum())}


# ----------------------------------------------------------------------------------------------------------
# FID


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D] (float64)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the FID formula. A singular product (fewer samples than
    feature dimensions) gets eps on the diagonals; the tiny imaginary part sqrtm leaves is dropped."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID: mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))

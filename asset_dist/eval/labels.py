"""Does an edit follow its labels? Per-class colour statistics of the training shards, and the score.

Class statistics: for every label of the training split, a coarse RGB histogram (BINS per channel) of its
pixels, from every STRIDE-th pixel of each image (labels in the model's convention: data.label_shift applied).

Score of one edit sample: the pixels that the edit relabels (inside the mask, new label != old label; when
fewer than MIN_CHANGED of the mask's pixels change, every mask pixel) are grouped by their new class c. For
each group, the generated pixels' histogram g is compared (Hellinger distance) with the training histogram
of c and with the histogram of the input's pixels at the same places. The sample follows its labels when
the pixel-weighted distance to the new classes is smaller than to the input. Classes without training
statistics are left out; a sample with none left is not scored. An edit follows its labels when most of its
samples do (ties: not).

The score is only meaningful where the labels change: an edit that repaints an area already of the new class
(the official COCO edit repaints pizza as pizza) compares the new class with itself. `changed_fraction`
says how much of the mask changes class; edits below MIN_CHANGED are reported but kept out of the fraction.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

BINS = 8  # per channel: 512 colour cells
STRIDE = 4  # pixel subsampling of the training images (both axes)
MIN_CHANGED = 0.25  # edits whose relabelled share of the mask is smaller do not count in the fraction
STATS_FORMAT = "asset_dist.class_colours.v1"


def colour_cells(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> int64 [...] colour cell index in [0, BINS**3)."""
    q = pixels.astype(np.int64) * BINS // 256
    return (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]


def histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised colour histogram float64 [BINS**3] of uint8 pixels [N, 3] (zeros for N = 0)."""
    h = np.bincount(colour_cells(pixels.reshape(-1, 3)), minlength=BINS ** 3).astype(np.float64)
    s = h.sum()
    return h / s if s > 0 else h


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two normalised histograms: 0 identical, 1 disjoint."""
    return float(np.sqrt(max(0.0, 1.0 - np.sqrt(p * q).sum())))


# ----------------------------------------------------------------------------------------------------------
# Training statistics


def _samples(url: str):
    """(key, {extension: bytes}) of a webdataset tar, in order."""
    cur, members = None, {}
    with tarfile.open(url) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if key != cur and cur is not None:
                yield cur, members
                members = {}
            cur = key
            f = tf.extractfile(m)
            members[ext] = f.read() if f else b""
    if cur is not None:
        yield cur, members


def class_colour_stats(shards: str, label_shift: int = 0, num_classes: int = 256, max_samples: int = 0) -> dict:
    """Per-class colour histograms of the train split of `shards` (a folder, manifest or brace pattern)."""
    from asset_dist.data.loader import CorruptSample, decode_sample
    from asset_dist.data.shards import resolve_shards

    counts = np.zeros((num_classes, BINS ** 3), dtype=np.int64)
    n = 0
    for shard in resolve_shards(shards, "train"):
        for key, members in _samples(shard.url):
            try:
                _, image, seg = decode_sample({"__key__": key, **members}, label_shift, num_classes)
            except CorruptSample:
                continue
            img = np.asarray(image)[::STRIDE, ::STRIDE]
            lab = seg[::STRIDE, ::STRIDE]
            if img.shape[:2] != lab.shape:
                continue
            np.add.at(counts, (lab.reshape(-1).astype(np.int64), colour_cells(img.reshape(-1, 3))), 1)
            n += 1
            if max_samples and n >= max_samples:
                break
        if max_samples and n >= max_samples:
            break
    classes = {str(c): counts[c].tolist() for c in np.flatnonzero(counts.sum(1))}
    return {"format": STATS_FORMAT, "shards": str(shards), "label_shift": label_shift, "bins": BINS,
            "stride": STRIDE, "images": n, "classes": classes}


def load_or_compute_stats(spec: str, label_shift: int, num_classes: int, cache: Optional[Path] = None) -> dict:
    """`spec` is a stats JSON (this module's format) or training shards; computed stats are cached in `cache`."""
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--class-stats {p}: not readable JSON ({e})") from None
        if isinstance(doc, dict) and doc.get("format") == STATS_FORMAT:
            return doc
    if cache is not None and cache.is_file():
        try:
            doc = json.loads(cache.read_text())
            if doc.get("format") == STATS_FORMAT and doc.get("shards") == str(spec) \
                    and doc.get("label_shift") == label_shift:
                return doc
        except (OSError, ValueError, AttributeError):
            pass
    doc = class_colour_stats(spec, label_shift, num_classes)
    if not doc["classes"]:
        raise ValueError(f"--class-stats {spec}: no labelled pixels in its train split")
    if cache is not None:
        from asset_dist.utils import atomic_write_json

        atomic_write_json(cache, doc)
    return doc


def class_histograms(stats: dict) -> dict[int, np.ndarray]:
    out = {}
    for c, h in stats["classes"].items():
        a = np.asarray(h, dtype=np.float64)
        if a.sum() > 0:
            out[int(c)] = a / a.sum()
    return out


# ----------------------------------------------------------------------------------------------------------
# The score


def relabelled(mask: np.ndarray, old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
    """(pixels to score bool [H, W], share of the mask whose label changes)."""
    m = mask.astype(bool)
    changed = m & (old != new)
    frac = float(changed.sum()) / max(int(m.sum()), 1)
    return (changed if frac >= MIN_CHANGED else m), frac


def follows_labels(sample: np.ndarray, image: np.ndarray, new: np.ndarray, where: np.ndarray,
                   hists: dict[int, np.ndarray]) -> Optional[dict]:
    """One sample's distances: {"to_class", "to_input", "follows", "classes"}; None when no scored class has
    training statistics."""
    d_cls = d_in = 0.0
    weight = 0
    classes = []
    for c in np.unique(new[where]):
        c = int(c)
        if c not in hists:
            continue
        sel = where & (new == c)
        n = int(sel.sum())
        g = histogram(sample[sel])
        d_cls += n * hellinger(g, hists[c])
        d_in += n * hellinger(g, histogram(image[sel]))
        weight += n
        classes.append(c)
    if weight == 0:
        return None
    d_cls, d_in = d_cls / weight, d_in / weight
    return {"to_class": d_cls, "to_input": d_in, "follows": bool(d_cls < d_in), "classes": classes}


def edit_label_score(samples: list[np.ndarray], image: np.ndarray, mask: np.ndarray, old: np.ndarray,
                     new: np.ndarray, hists: dict[int, np.ndarray]) -> dict:
    """Per edit: changed_fraction, per-sample distances, follows (majority of scored samples; None if none)."""
    where, frac = relabelled(mask, old, new)
    per = [follows_labels(s, image, new, where, hists) for s in samples]
    scored = [p for p in per if p is not None]
    follows = None if not scored else sum(p["follows"] for p in scored) * 2 > len(scored)
    # the input's own distance to the new classes: small when the area already looks like them
    base = follows_labels(image, image, new, where, hists)
    return {"changed_fraction": frac, "labels_change": frac >= MIN_CHANGED, "follows": follows,
            "samples": per, "input_to_class": None if base is None else base["to_class"],
            "classes": sorted({c for p in scored for c in p["classes"]})}


def label_summary(per_edit: dict[str, dict]) -> dict:
    """Fraction of scored edits (whose labels change) that follow their labels."""
    counted = [e for e in per_edit.values() if e["labels_change"] and e["follows"] is not None]
    n = len(counted)
    return {"fraction": (sum(e["follows"] for e in counted) / n) if n else None, "edits_scored": n,
            "edits_following": sum(bool(e["follows"]) for e in counted),
            "edits_labels_barely_change": sorted(k for k, e in per_edit.items() if not e["labels_change"]),
            "edits_not_scored": sorted(k for k, e in per_edit.items() if e["follows"] is None)}

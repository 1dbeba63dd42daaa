"""`evaluate edits` and `evaluate fid`: checks and scores of an edit-batch output folder.

Reads OUT/manifest.jsonl (one record per edit, written by edit-batch when every edit is done), the samples
OUT/<edit_id>/sample_<k>.png and the edit inputs (the edit shards). Reports
- preservation: the share of pixels farther than the blend band from the mask that are byte-identical to the
  input (the runner guarantees 100 %; anything less is a bug or a tampered file, and the command fails);
- diversity: mean pixel L1 distance (values / 255) between the samples of one edit inside its mask, and
  LPIPS on the mask's bounding box when LPIPS weights are available locally;
- timings per phase from the records (prepare, guide, sample, decode_blend, write);
- FID between the inputs and the samples when a feature extractor file is given.
No network access: weights come only from paths the user gives (or LPIPS files already in the torch cache).
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import yaml
from PIL import Image

from asset_dist.data.views import image_to_unit
from asset_dist.eval import metrics as M
from asset_dist.eval.common import EvalError, fmt, markdown_table
from asset_dist.infer.results import open_results

MANIFEST = "manifest.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED = 20  # offending edits listed by name in the report
FID_NOTE = ("FID not computed: pass --fid-extractor FILE, a TorchScript Inception-v3 feature extractor called as "
            "model(x, return_features=True) on float [N,3,H,W] images in 0..255 (e.g. the "
            "inception-2015-12-05.pt file that clean-fid and StyleGAN2-ADA use), or compare precomputed features "
            "with `asset-dist evaluate fid --real A.npy --fake B.npy`")
LABELS_NOTE = ("label-following score not computed: pass --class-stats TRAIN_SHARDS (per-class colour statistics of "
               "the training data; default: data.train_shards of EDIT_OUT/config.yaml when it exists)")
LPIPS_NOTE = ("LPIPS not computed: pass --lpips-weights FILE[,FILE] (VGG16 features + LPIPS heads, see "
              "train.loss.perceptual_weights_path) or put vgg16-397923af.pth and vgg_lpips.pth in the torch hub "
              "checkpoints folder")


# ----------------------------------------------------------------------------------------------------------
# Inputs


def read_manifest_jsonl(edit_out: Path) -> list[dict]:
    path = edit_out / MANIFEST
    if not path.is_file():
        raise EvalError(f"{path} not found: {edit_out} is not a finished edit-batch output (the manifest is "
                        "written once every edit has a record; rerun edit-batch to finish)")
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path} line {n}: not JSON ({e})") from None
        if not isinstance(rec, dict) or "edit" not in rec or "status" not in rec:
            raise EvalError(f"{path} line {n}: not an edit record (needs 'edit' and 'status')")
        recs.append(rec)
    return recs


def run_settings(edit_out: Path) -> tuple[dict, dict]:
    """(run.json, config.yaml as a dict) of an edit-batch output; {} where absent or unreadable."""
    out = []
    for name, load in (("run.json", json.loads), ("config.yaml", yaml.safe_load)):
        try:
            d = load((edit_out / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            d = None
        out.append(d if isinstance(d, dict) else {})
    return out[0], out[1]


def load_png(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: unreadable image ({e})") from None
    return load_png_bytes(data, str(path))


def load_png_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise EvalError(f"{name}: unreadable image ({e})") from None


class EditInputs:
    """The edits' input image and mask, decoded exactly as the runner decodes them."""

    def __init__(self, spec: str):
        from asset_dist.infer.edits import EditSet

        try:
            self.eset = EditSet(spec)
        except ValueError as e:
            raise EvalError(f"edit inputs {spec!r}: {e}") from None

    def get(self, edit_id: str):
        """(the decoded edit, its label map before the edit) at the image's size."""
        from asset_dist.infer.edits import decode_edit, meta_int, read_labels

        if edit_id not in self.eset.refs:
            raise EvalError(f"edit {edit_id!r} is in the manifest but not in the edit inputs (wrong --edits?)")
        files = self.eset.load(edit_id)
        n = meta_int(edit_id, files.meta, "num_classes", 256)
        edit = decode_edit(files, n)
        return edit, read_labels(edit_id, "label map", files.seg, edit.height, edit.width, n)


# ----------------------------------------------------------------------------------------------------------
# Network metrics (optional)


def load_lpips(weights: str = "", device: torch.device = torch.device("cpu")):
    """LPIPS from local files; None (with the reason) when no weights are available."""
    from asset_dist.models.losses import LPIPS, _default_lpips_files

    if not weights and not _default_lpips_files():
        return None, LPIPS_NOTE
    try:
        return LPIPS(weights).to(device), None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise EvalError(f"LPIPS weights: {e}") from None


def load_extractor(path: str, device: torch.device, trust: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TorchScript (or torch.export .pt2) feature extractor file -> fn(images float [N,3,H,W] in 0..255) ->
    features [N, D]. Tried as model(x, return_features=True) first (the Inception-v3 TorchScript files), then
    model(x). Either file is a program (a .pt2 is even unpickled): refused unless trust=True (--trust-extractor)."""
    p = Path(path)
    if not trust:
        raise EvalError(f"feature extractor {p}: loading it runs code stored in the file; pass --trust-extractor "
                        "(trust=True) only for files you trust")
    if not p.is_file():
        raise EvalError(f"feature extractor {p} not found")
    try:
        if p.suffix == ".pt2":  # a torch.export program
            model = torch.export.load(str(p)).module().to(device)
        else:
            with warnings.catch_warnings():  # TorchScript is deprecated, but the standard FID file is one
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any loader error: not a TorchScript / export file
        raise EvalError(f"{p}: cannot load as a TorchScript module or torch.export program ({type(e).__name__}: "
                        f"{e}); FID needs such a feature extractor (e.g. inception-2015-12-05.pt)") from None
    mode: list[bool] = []

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if not mode:
            try:
                out = model(x, return_features=True)
                mode.append(True)
            except (RuntimeError, TypeError):
                out = model(x)
                mode.append(False)
        else:
            out = model(x, return_features=True) if mode[0] else model(x)
        return out.reshape(out.shape[0], -1).double().cpu()

    return fn


def image_features(fn: Callable[[torch.Tensor], torch.Tensor], images: Iterable[np.ndarray], batch: int = 16
                   ) -> np.ndarray:
    """Features [N, D] of uint8 HWC images (batched by equal size)."""
    feats, buf = [], []

    def flush() -> None:
        if buf:
            x = torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).float()
            feats.append(fn(x).numpy())
            buf.clear()

    for im in images:
        if buf and (im.shape != buf[0].shape or len(buf) == batch):
            flush()
        buf.append(im)
    flush()
    if not feats:
        raise EvalError("FID: no images")
    return np.concatenate(feats)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    if real.shape[1] != fake.shape[1]:
        raise EvalError(f"FID: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")
    return M.frechet_distance(*M.feature_stats(real), *M.feature_stats(fake))


def features_of(spec: str, fn: Optional[Callable]) -> np.ndarray:
    """A .npy [N, D] feature file, or a folder of images (needs the extractor)."""
    p = Path(spec)
    if p.is_file() and p.suffix == ".npy":
        try:
            f = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EvalError(f"{p}: cannot read as .npy ({e})") from None
        if f.ndim != 2:
            raise EvalError(f"{p}: features must be [N, D], got shape {f.shape}")
        return f.astype(np.float64)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EvalError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)})")
        if fn is None:
            raise EvalError(f"{p} is an image folder: FID needs --extractor FILE (a TorchScript feature extractor, "
                            "e.g. inception-2015-12-05.pt), or pass precomputed features as .npy")
        return image_features(fn, (load_png(f) for f in files))
    raise EvalError(f"{p}: not a .npy feature file or an image folder")


def evaluate_fid(real: str, fake: str, extractor: Optional[str] = None, device: str = "cpu",
                 trust_extractor: bool = False) -> dict:
    fn = load_extractor(extractor, torch.device(device), trust_extractor) if extractor else None
    fr, ff = features_of(real, fn), features_of(fake, fn)
    return {"kind": "fid", "fid": fid_from_features(fr, ff), "real": real, "fake": fake, "n_real": len(fr),
            "n_fake": len(ff), "feature_dim": int(fr.shape[1]), "extractor": extractor}


# ----------------------------------------------------------------------------------------------------------
# The edit evaluation


PHASES = ("prepare", "guide", "sample", "decode_blend", "write")  # the runner's order


def _phase_order(ph: str) -> tuple[int, str]:
    return (PHASES.index(ph) if ph in PHASES else len(PHASES), ph)


def _lpips_pairs(lpips, samples: list[np.ndarray], mask: np.ndarray, band: int) -> list[float]:
    ys, xs = M.mask_box(mask, margin=band)
    dev = next(lpips.parameters()).device
    t = [image_to_unit(torch.from_numpy(s[ys, xs]).permute(2, 0, 1)[None]).to(dev) for s in samples]
    with torch.no_grad():
        return [float(lpips(t[i], t[j])) for i in range(len(t)) for j in range(i + 1, len(t))]


def evaluate_edits(edit_out: str | Path, edits: Optional[str] = None, band: Optional[int] = None, lpips=None,
                   extractor: Optional[Callable] = None, lpips_note: Optional[str] = LPIPS_NOTE,
                   class_stats: Optional[dict] = None) -> dict:
    """The report. lpips: an LPIPS module or None; extractor: `load_extractor`'s function or None;
    class_stats: eval/labels.py's per-class colour statistics (the label-following score), or None."""
    from asset_dist.eval import labels as LB

    from asset_dist.infer.blend import dilate
    from asset_dist.infer.edits import EditError

    out = Path(edit_out)
    recs = read_manifest_jsonl(out)
    run, cfg = run_settings(out)
    edits = edits or (cfg.get("infer") or {}).get("edits") or ""
    if not edits:
        raise EvalError(f"the edit inputs are needed (the preservation check compares with them): pass --edits "
                        f"(the edit set given to edit-batch); {out / 'config.yaml'} does not name one")
    if band is None:
        band = run.get("blend_band", (cfg.get("infer") or {}).get("blend_band"))
        if band is None:
            raise EvalError(f"no blend band: {out / 'run.json'} lacks blend_band; pass --band PIXELS")
    band = int(band)
    inputs = EditInputs(edits)
    store = open_results(out)
    ok = [r for r in recs if r["status"] == "ok"]
    failed = [r for r in recs if r["status"] != "ok"]
    same = outside = 0
    changed: list[dict] = []
    problems: list[str] = []
    l1_edit, lp_edit = [], []
    real, fake = [], []
    hists = LB.class_histograms(class_stats) if class_stats else None
    follow: dict[str, dict] = {}
    for r in ok:
        eid = r["edit"]
        try:
            edit, old_seg = inputs.get(eid)
        except (EvalError, EditError) as e:  # an input that no longer decodes: the edit cannot be checked
            problems.append(f"{eid}: input: {e}")
            continue
        keep = dilate(edit.mask, band)
        samples = []
        n = r.get("samples")
        n = n if n is not None else sum(1 for o in r.get("outputs") or [] if str(o).startswith("sample_"))
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            problems.append(f"{eid}: the record's sample count {n!r} is not a count")
            continue
        if n == 0:
            problems.append(f"{eid}: the record lists no samples")
        for k in range(n):
            path = out / eid / f"sample_{k}.png"  # per-file layout; shards: the tar member <eid>.sample_<k>.png
            try:
                s = load_png_bytes(store.read_file(eid, path.name), f"{eid}.{path.name}")
            except (OSError, FileNotFoundError):
                problems.append(f"{eid}: {path.name} missing")
                continue
            except EvalError as e:
                problems.append(str(e))
                continue
            if s.shape != edit.image.shape:
                problems.append(f"{eid}: {path.name} is {s.shape[1]}x{s.shape[0]}, the input "
                                f"{edit.image.shape[1]}x{edit.image.shape[0]}")
                continue
            a, b = M.unchanged_outside(s, edit.image, keep)
            same, outside = same + a, outside + b
            if a != b:
                changed.append({"edit": eid, "sample": k, "changed_pixels": b - a})
            samples.append(s)
        if hists is not None and samples:
            follow[eid] = LB.edit_label_score(samples, edit.image, edit.mask, old_seg, edit.seg, hists)
        pairs = M.pairwise_l1(samples, edit.mask)
        if pairs:
            l1_edit.append(float(np.mean(pairs)))
            if lpips is not None:
                lp_edit.append(float(np.mean(_lpips_pairs(lpips, samples, edit.mask, band))))
        if extractor is not None:
            real.append(edit.image)
            fake.extend(samples)
    phases: dict[str, list[float]] = {}
    for r in ok:
        for ph, v in (r.get("timings_s") or {}).items():
            phases.setdefault(ph, []).append(float(v))
    per_edit = [sum(float(v) for v in (r.get("timings_s") or {}).values()) for r in ok]
    fid: dict = {"fid": None, "note": FID_NOTE}
    if extractor is not None:
        if len(real) < 2 or len(fake) < 2:
            fid = {"fid": None, "note": "FID needs at least 2 inputs and 2 samples"}
        else:
            fid = {"fid": fid_from_features(image_features(extractor, real), image_features(extractor, fake)),
                   "n_real": len(real), "n_fake": len(fake), "note": "inputs (real) vs samples (fake)"}
    frac = same / outside if outside else float("nan")
    return {
        "kind": "edits", "edit_out": str(out), "edits": edits, "band": band,
        "records": len(recs), "ok": len(ok), "failed": len(failed),
        "failed_errors": [{"edit": r["edit"], "error": r.get("error")} for r in failed[:MAX_LISTED]],
        "preservation": {"unchanged_fraction": frac, "pixels_checked": outside, "pixels_changed": outside - same,
                         "samples_changed": len(changed), "changed": changed[:MAX_LISTED],
                         "passed": same == outside and not problems},
        "problems": problems[:MAX_LISTED], "problem_count": len(problems),
        "diversity": {"pixel_l1_in_mask": float(np.mean(l1_edit)) if l1_edit else None,
                      "edits_with_pairs": len(l1_edit),
                      "lpips_mask_box": float(np.mean(lp_edit)) if lp_edit else None,
                      "lpips_note": None if lpips is not None else lpips_note},
        "timings_s": {ph: M.summarize(phases[ph]) for ph in sorted(phases, key=_phase_order)}
        | {"per_edit": M.summarize(per_edit)},
        "fid": fid,
        "labels": ({**LB.label_summary(follow), "per_edit": follow, "stats": class_stats.get("shards"),
                    "min_changed": LB.MIN_CHANGED} if hists is not None else
                   {"fraction": None, "note": LABELS_NOTE}),
    }


def edits_markdown(rep: dict) -> str:
    p, d = rep["preservation"], rep["diversity"]
    verdict = "PASS" if p["passed"] else "FAIL"
    lines = [f"# Edit evaluation: {rep['edit_out']}\n",
             f"{rep['records']} edits ({rep['ok']} ok, {rep['failed']} failed); blend band {rep['band']} px.\n",
             f"**Preservation ({verdict})**: {fmt(100 * p['unchanged_fraction'], 4)} % of {p['pixels_checked']} "
             f"pixels outside the band are byte-identical to the input ({p['pixels_changed']} changed, in "
             f"{p['samples_changed']} sample(s)); {rep['problem_count']} missing or mis-sized sample(s).\n",
             f"**Diversity**: pixel L1 inside the mask (0-1) = {fmt(d['pixel_l1_in_mask'])} over "
             f"{d['edits_with_pairs']} edit(s); LPIPS (mask box) = {fmt(d['lpips_mask_box'])}"
             + (f" ({d['lpips_note']})" if d["lpips_note"] else "") + ".\n",
             f"**FID**: {fmt(rep['fid']['fid'])} ({rep['fid'].get('note')}).\n", _labels_markdown(rep["labels"]),
             "## Timings (s per edit)\n"]
    rows = [[ph, s.get("count", 0), s.get("mean", float("nan")), s.get("median", float("nan")),
             s.get("p90", float("nan")), s.get("total", float("nan"))] for ph, s in rep["timings_s"].items()]
    lines.append(markdown_table(["phase", "edits", "mean", "median", "p90", "total"], rows))
    return "\n".join(lines)


def _labels_markdown(lab: dict) -> str:
    if lab.get("fraction") is None and "per_edit" not in lab:
        return f"**Label following**: - ({lab.get('note')}).\n"
    head = (f"**Label following**: {lab['edits_following']} of {lab['edits_scored']} edit(s) whose labels change "
            f"follow them (fraction {fmt(lab['fraction'], 2)}): their generated pixels are closer (Hellinger "
            f"distance of colour histograms) to the new classes' training statistics than to the input's pixels "
            f"there.\n\n")
    rows = []
    for eid, e in lab["per_edit"].items():
        d = [p for p in e["samples"] if p is not None]
        to_c = sum(p["to_class"] for p in d) / len(d) if d else None
        to_i = sum(p["to_input"] for p in d) / len(d) if d else None
        verdict = "-" if e["follows"] is None else ("yes" if e["follows"] else "no")
        note = "" if e["labels_change"] else f"labels barely change ({100 * e['changed_fraction']:.0f} % of the mask)"
        rows.append([eid, f"{100 * e['changed_fraction']:.0f} %", fmt(to_c, 3), fmt(to_i, 3),
                     fmt(e["input_to_class"], 3), verdict, note])
    return head + markdown_table(["edit", "mask relabelled", "to new class", "to input", "input to new class",
                                  "follows", "note"], rows)

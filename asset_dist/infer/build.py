"""Building edit sets (the logic behind data_tools/make_edits.py).

Three sources, one output (edits.write_edit_shards):
- `from_list` / `from_folders`: the user's own files (image, label map, mask, class or edited label map);
- `from_dataset`: a labelled dataset (training shards or image/label folders): square crops with masks drawn
  by the training mask sampler and target classes drawn from a list;
- `official`: the two official ASSET test cases (the repository bundles them in sample_data/edits).

Every record is checked like the runner checks it (`edits.decode_edit`); a bad one is listed as failed with
the reason and the build goes on (or stops, with strict=True, before writing anything).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from asset_dist.config import MaskConfig
from asset_dist.data.loader import CorruptSample, decode_sample
from asset_dist.data.shards import resolve_shards
from asset_dist.data.shardwriter import pair_files, safe_key
from asset_dist.data.views import crop_views, sample_rng
from asset_dist.infer.classes import ClassTable
from asset_dist.infer.edits import EditError, EditFiles, decode_edit, make_record, png_bytes, write_edit_shards

CONVENTIONS = {"landscape": (182, 0), "coco": (183, 1)}  # (classes, label shift), docs/ASSET_NOTES.md §8
OFFICIAL = {  # the official test cases and the README's classes
    "landscape": ("landscape_input.jpg", "landscape_seg.png", "landscape_mask.png", "waterother"),
    "coco": ("coco_input.png", "coco_seg.png", "coco_mask.png", "pizza"),
}


class BuildError(RuntimeError):
    """A run-level problem (bad arguments, nothing valid, --strict failure)."""


@dataclass
class Result:
    records: list[EditFiles]
    failed: list[dict]


def _read(eid: str, what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise EditError(f"edit {eid!r}: cannot read the {what} {path} ({e.strerror or e})") from None


class Builder:
    """Collects checked records; `add` never raises for a bad edit, it lists it as failed."""

    def __init__(self, table: ClassTable, side_multiple: int = 256, token_hole: str = "any",
                 log: Callable[[str], None] = print):
        self.table, self.side_multiple, self.token_hole, self.log = table, side_multiple, token_hole, log
        self.records: list[EditFiles] = []
        self.failed: list[dict] = []
        self._ids: set[str] = set()

    def add(self, eid: str, make: Callable[[], EditFiles]) -> None:
        try:
            if eid in self._ids:
                raise EditError(f"edit {eid!r}: duplicate edit id")
            rec = make()
            decode_edit(rec, self.table.num_classes, self.side_multiple, self.token_hole, self.table.label_shift)
        except (EditError, ValueError) as e:
            msg = str(e) if str(e).startswith("edit ") else f"edit {eid!r}: {e}"
            self.failed.append({"edit": eid, "error": msg})
            self.log(f"failed: {msg}")
            return
        self._ids.add(eid)
        self.records.append(rec)

    def from_files(self, eid: str, image: Path, seg: Path, mask: Path, cls: Optional[str] = None,
                   new_seg: Optional[Path] = None, seg_shift: int = 0) -> None:
        def make() -> EditFiles:
            if (cls is None) == (new_seg is None):
                raise EditError(f"edit {eid!r}: give either a class or an edited label map (not both, not neither)")
            cid = -1 if new_seg is not None else self.table.lookup(cls)
            return make_record(eid, _read(eid, "image", image), _read(eid, "label map", seg),
                               _read(eid, "mask", mask), class_id=cid, class_name=self.table.name(cid),
                               num_classes=self.table.num_classes, label_shift=self.table.label_shift,
                               new_seg=None if new_seg is None else _read(eid, "edited label map", new_seg),
                               seg_shift=seg_shift,
                               source={"image": str(image), "seg": str(seg), "mask": str(mask),
                                       **({"new_seg": str(new_seg)} if new_seg else {})})
        self.add(eid, make)

    def result(self) -> Result:
        return Result(self.records, self.failed)


# ----------------------------------------------------------------------------------------------------------
# (a) user files


def read_list(path: Path) -> list[dict]:
    """CSV (header row) or JSONL rows with image, seg, mask and class or new_seg (optional id); relative paths
    are relative to the list file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise BuildError(f"{path}: cannot read the edit list ({e})") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise BuildError(f"{path}:{n}: not valid JSON ({e})") from None
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not all(r.get(k) for k in ("image", "seg", "mask")):
            raise BuildError(f"{path}: row {n} needs image, seg and mask (and class or new_seg): {r}")
    return rows


def from_list(b: Builder, path: Path, seg_shift: int = 0) -> None:
    base = path.parent
    p = lambda v: None if not v else (Path(v) if Path(v).is_absolute() else base / v)  # noqa: E731
    for r in read_list(path):
        eid = safe_key(str(r.get("id") or Path(r["image"]).stem))
        cls = r.get("class")
        b.from_files(eid, p(r["image"]), p(r["seg"]), p(r["mask"]), None if cls in (None, "") else str(cls),
                     p(r.get("new_seg")), seg_shift)


def from_folders(b: Builder, images: Path, segs: Path, masks: Path, cls: Optional[str],
                 new_segs: Optional[Path] = None, seg_shift: int = 0) -> None:
    """Pair images/a/b.jpg with segs/a/b.png, masks/a/b.png (and new_segs/a/b.png) by relative stem."""
    pairs, skipped = pair_files(images, segs)
    for s in skipped:
        b.failed.append({"edit": safe_key(Path(s.path).stem), "error": f"{s.path}: {s.reason}"})
        b.log(f"failed: {s.path}: {s.reason}")
    for pr in pairs:
        mask = next((q for q in (masks / (pr["stem"] + e) for e in (".png", ".jpg", ".bmp")) if q.is_file()),
                    masks / (pr["stem"] + ".png"))
        ns = None if new_segs is None else new_segs / (pr["stem"] + ".png")
        b.from_files(pr["key"], Path(pr["image"]), Path(pr["label"]), mask, None if ns else cls, ns, seg_shift)


def official(b: Builder, root: Path, which: str, resolution: int = 0) -> None:
    """The official test case `which`, in the builder's label convention, optionally resized to `resolution`.

    The native files are 1024 (landscape, with a 512 label map) and 512 (COCO). A model of the other convention
    gets the labels converted (COCO id c >= 1 -> landscape c - 1; COCO's unlabeled 0, which the 182-way
    landscape one-hot cannot hold, takes the nearest labelled pixel's class); the class is looked up by name.
    resolution > 0: image area-downsampled (or bicubic up), mask and labels nearest, as the official test
    script builds its inputs."""
    img, seg, mask, cls = OFFICIAL[which]
    eid = f"official_{which}"
    src_shift = CONVENTIONS[which][1]
    if not resolution and src_shift == b.table.label_shift:
        b.from_files(eid, root / img, root / seg, root / mask, cls)
        return

    def make() -> EditFiles:
        from PIL import Image

        def load(name: str, what: str) -> Image.Image:
            im = Image.open(io.BytesIO(_read(eid, what, root / name)))
            im.load()
            return im

        image, labels, m = load(img, "image"), load(seg, "label map"), load(mask, "mask")
        lab = np.asarray(labels.convert("L") if labels.mode == "P" else labels, dtype=np.uint8)
        lab = convert_labels(lab, src_shift, b.table.label_shift)
        if resolution:
            side = resolution
            filt = Image.BOX if image.width >= side else Image.BICUBIC
            image = image.convert("RGB").resize((side, side), filt)
            m = m.convert("L").resize((side, side), Image.NEAREST)
            lab = np.asarray(Image.fromarray(lab).resize((side, side), Image.NEAREST))
        return make_record(eid, png_bytes(np.asarray(image.convert("RGB"))), png_bytes(lab),
                           png_bytes(np.asarray(m.convert("L"))), class_id=b.table.lookup(cls), class_name=cls,
                           num_classes=b.table.num_classes, label_shift=b.table.label_shift,
                           source={"official": which, "root": str(root), "resolution": resolution,
                                   "converted_from_shift": src_shift})
    b.add(eid, make)


def convert_labels(lab: np.ndarray, src_shift: int, dst_shift: int) -> np.ndarray:
    """Label ids between the landscape (shift 0, no unlabeled) and COCO (shift 1, 0 = unlabeled) conventions."""
    if src_shift == dst_shift:
        return lab
    if src_shift == 0:  # landscape -> COCO: every class moves up by one
        return (lab.astype(np.int64) + 1).astype(np.uint8)
    from scipy import ndimage

    unl = lab == 0
    if unl.all():
        raise EditError("the label map is all unlabeled: nothing to convert")
    if unl.any():  # nearest labelled pixel's class
        idx = ndimage.distance_transform_edt(unl, return_distances=False, return_indices=True)
        lab = lab[idx[0], idx[1]]
    return (lab.astype(np.int64) - 1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# (b) a labelled dataset


def _dataset_samples(shards: Optional[str], split: str, images: Optional[Path], labels: Optional[Path]
                     ) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) from training shards or image/label folders, in a fixed order."""
    import tarfile

    if shards:
        for s in sorted(resolve_shards(shards, split), key=lambda s: s.url):
            groups: dict[str, dict] = {}
            with tarfile.open(s.url, "r") as tar:
                for ti in tar:
                    if ti.isfile():
                        key, _, ext = ti.name.partition(".")
                        groups.setdefault(key, {})[ext] = tar.extractfile(ti).read()
            yield from groups.items()
    else:
        pairs, _ = pair_files(images, labels)
        for pr in pairs:
            ext = Path(pr["image"]).suffix.lower().lstrip(".")
            yield pr["key"], {ext: Path(pr["image"]).read_bytes(), "seg.png": Path(pr["label"]).read_bytes()}


def from_dataset(b: Builder, classes: list[str], *, shards: Optional[str] = None, split: str = "train",
                 images: Optional[Path] = None, labels: Optional[Path] = None, resolution: int = 512,
                 per_image: int = 1, limit: int = 0, seed: int = 0, mask_cfg: Optional[MaskConfig] = None) -> None:
    """Square centre crops of `resolution` with training-sampler masks and classes drawn from `classes`.
    Dataset label maps are raw: the class table's label shift is applied, as the training loader does."""
    if not classes:
        raise BuildError("--classes: give at least one target class")
    ids = [b.table.lookup(c) for c in classes]  # unknown names are a run-level error here
    mask_cfg = mask_cfg or MaskConfig()
    for n, (key, sample) in enumerate(_dataset_samples(shards, split, images, labels)):
        if limit and n >= limit:
            break
        try:
            _, image, seg = decode_sample({**sample, "__key__": key}, b.table.label_shift, b.table.num_classes)
        except CorruptSample as e:
            for j in range(per_image):
                b.failed.append({"edit": f"{safe_key(key)}_e{j}", "error": f"edit {safe_key(key)}_e{j!s}: "
                                                                            f"source {key}: {e}"})
            b.log(f"failed: source {key}: {e}")
            continue
        for j in range(per_image):
            eid = f"{safe_key(key)}_e{j}"
            rng = sample_rng(seed, 0, f"{key}/{j}")
            v = crop_views(image, seg, resolution, resolution, mask_cfg, rng, False, short_side=resolution)
            cid = ids[int(rng.integers(len(ids)))]

            def make(v=v, cid=cid, eid=eid) -> EditFiles:
                return make_record(eid, png_bytes(v["image"]), png_bytes(v["seg"]),
                                   png_bytes((v["mask"] * 255).astype(np.uint8)), class_id=cid,
                                   class_name=b.table.name(cid), num_classes=b.table.num_classes,
                                   label_shift=b.table.label_shift,
                                   source={"dataset": shards or str(images), "key": key, "crop": resolution,
                                           "mask_kind": mask_cfg.kind, "seed": seed})
            b.add(eid, make)


def write(result: Result, out: Path, *, samples_per_shard: int = 100, strict: bool = False,
          overwrite: bool = False, args: Optional[dict] = None) -> dict:
    out = Path(out)
    existing = [p.name for p in out.glob("*") if p.name == "manifest.json" or p.suffix == ".tar"] \
        if out.is_dir() else []
    if existing and not overwrite:
        raise BuildError(f"{out} already holds an edit set ({', '.join(sorted(existing)[:3])}); pass --overwrite "
                         "or choose an empty folder")
    if strict and result.failed:
        raise BuildError(f"--strict: {len(result.failed)} bad edit(s), nothing written (see the messages above)")
    if not result.records:
        raise BuildError(f"no valid edits ({len(result.failed)} failed)")
    for p in out.glob("edits-*.tar") if overwrite else ():
        p.unlink()
    return write_edit_shards(out, result.records, samples_per_shard=samples_per_shard, failed=result.failed,
                             args=args)

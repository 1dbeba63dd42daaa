"""Edit records: what one edit is, how it is stored in shards, and how it is checked and decoded.

An edit = input image + label map + mask (white = regenerate) + either a target class painted into the mask
or an edited label map. Stored like the training data: webdataset tars plus a manifest.json (made by
data_tools/make_edits.py), one sample per edit:

    <id>.jpg|png   the input image (original bytes), any size and aspect
    <id>.seg.png   8-bit label map in the model's convention (any size of the image's aspect; nearest-resized)
    <id>.mask.png  8-bit mask, {0, 255} (any size of the image's aspect; nearest-resized)
    <id>.newseg.png  optional edited label map (replaces "class")
    <id>.json      {"edit_id", "class_name", "class_id" (-1 = none), "num_classes", "label_shift", "source"}

The manifest has the training-shard format with one split named "edits" (so `data.shards.resolve_shards`
reads it), plus "kind": "edits", the edit ids and the edits that failed to build.

Every check raises `EditError` whose message starts with the edit id, so a batch run can record it and go on.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image

from asset_dist.data.masks import resize_nearest
from asset_dist.data.shards import resolve_shards, verify_shard
from asset_dist.data.shardwriter import FORMAT, MANIFEST, check_key, write_tar
from asset_dist.utils import InputError, atomic_write_json, check_id

SPLIT = "edits"
KIND = "edits"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TOKEN = 16  # pixels per token (both tokenizers)
MIN_SIDE = 16  # smaller images are refused


class EditError(ValueError):
    """A bad edit; the message names it."""


@dataclass
class EditFiles:
    """One edit as stored: encoded members plus metadata."""

    edit_id: str
    image: bytes
    image_ext: str
    seg: bytes
    mask: bytes
    meta: dict[str, Any]
    new_seg: Optional[bytes] = None

    def members(self) -> dict[str, bytes]:
        out = {self.image_ext: self.image, "seg.png": self.seg, "mask.png": self.mask}
        if self.new_seg is not None:
            out["newseg.png"] = self.new_seg
        out["json"] = json.dumps({**self.meta, "edit_id": self.edit_id}, sort_keys=True).encode()
        return out

    def digest(self) -> str:
        """Content hash: stored picks made for other content are recomputed."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.members().items()):
            h.update(k.encode() + b"\0" + len(v).to_bytes(8, "little") + v)
        return h.hexdigest()


@dataclass
class Edit:
    """A decoded, checked edit, everything at the image's size."""

    edit_id: str
    image: np.ndarray  # [H, W, 3] uint8, any size
    mask: np.ndarray  # [H, W] uint8 {0, 1}, 1 = regenerate
    seg: np.ndarray  # [H, W] uint8 edited label map (what the model is conditioned on)
    class_id: int
    class_name: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Decoding and checks


def _open(edit_id: str, what: str, data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
        raise EditError(f"edit {edit_id!r}: {what} is unreadable ({type(e).__name__}: {e})") from None


def _check_aspect(edit_id: str, what: str, w: int, h: int, W: int, H: int) -> None:
    """A map of another size than the image must have its aspect (1 % tolerance) to be nearest-resized onto it."""
    if (w, h) != (W, H) and abs(w * H - h * W) > 0.01 * w * H:
        raise EditError(f"edit {edit_id!r}: {what} is {w}x{h}; it cannot be aligned with the {W}x{H} image (it "
                        "must have the image's size or aspect ratio)")


def read_labels(edit_id: str, what: str, data: bytes, height: int, width: int, num_classes: int) -> np.ndarray:
    """An 8-bit label PNG, checked against the model's classes, nearest-resized to the image's height x width."""
    im = _open(edit_id, what, data)
    if im.mode not in ("L", "P"):
        raise EditError(f"edit {edit_id!r}: {what} must be a single-channel 8-bit PNG of label ids (mode {im.mode})")
    a = np.asarray(im, dtype=np.uint8)
    _check_aspect(edit_id, what, a.shape[1], a.shape[0], width, height)
    top = int(a.max())
    if top >= num_classes:
        bad = sorted(int(v) for v in np.unique(a) if v >= num_classes)
        hint = " (raw COCO-Stuff maps use 255 = unlabeled: build COCO edits with a label shift of 1)" \
            if 255 in bad else ""
        raise EditError(f"edit {edit_id!r}: {what} holds label ids {bad[:8]} outside the model's {num_classes} "
                        f"classes (0..{num_classes - 1}){hint}")
    return resize_nearest(a, height, width)


def meta_int(eid: str, meta: dict, key: str, default: int) -> int:
    """An integer field of an edit's metadata; anything else is that edit's EditError (never a crash)."""
    v = meta.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise EditError(f"edit {eid!r}: metadata field {key!r} must be an integer (got {v!r})")
    return v


def decode_edit(files: EditFiles, num_classes: int, token_hole: str = "any", label_shift: Optional[int] = None
                ) -> Edit:
    """Decode and check one edit (any image size and aspect: `canvas.py` places it on the model's token grid).
    Raises EditError naming the edit and the problem.

    token_hole: the token-hole rule; a mask that yields no hole token under it is rejected.
    label_shift: when given, an edit built for another label convention is rejected."""
    eid = files.edit_id
    meta = files.meta
    if "num_classes" in meta and meta_int(eid, meta, "num_classes", num_classes) != num_classes:
        raise EditError(f"edit {eid!r}: built for {meta['num_classes']}-class label maps, but the model's seg "
                        f"tokenizer has {num_classes} classes (landscape = 182, COCO = 183)")
    if label_shift is not None and "label_shift" in meta and \
            meta_int(eid, meta, "label_shift", label_shift) != label_shift:
        raise EditError(f"edit {eid!r}: built with label shift {meta['label_shift']}, the config uses "
                        f"data.label_shift={label_shift}")
    cid = meta_int(eid, meta, "class_id", -1)
    im = _open(eid, "image", files.image)
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise EditError(f"edit {eid!r}: the image is {w}x{h} px: too small to edit (at least {MIN_SIDE} px per "
                        "side)")
    image = np.array(im.convert("RGB"))
    m = _open(eid, "mask", files.mask)
    if m.mode not in ("1", "L", "P", "LA", "RGB", "RGBA", "I", "I;16"):
        raise EditError(f"edit {eid!r}: mask has unsupported mode {m.mode}")
    _check_aspect(eid, "mask", m.size[0], m.size[1], w, h)
    mask = (resize_nearest(np.asarray(m.convert("L")), h, w) >= 128).astype(np.uint8)
    if not mask.any():
        raise EditError(f"edit {eid!r}: the mask is empty (no white pixel): nothing to edit")
    if mask.all():
        raise EditError(f"edit {eid!r}: the mask covers the whole image: nothing to keep or blend into")
    if token_hole == "nearest" and not mask[::TOKEN, ::TOKEN].any():
        raise EditError(f"edit {eid!r}: the mask yields no hole token under the 'nearest' token-hole rule "
                        "(it misses every token's top-left pixel); enlarge it or use model.token_hole=any")
    seg = read_labels(eid, "label map", files.seg, h, w, num_classes)
    if not -1 <= cid < num_classes:
        raise EditError(f"edit {eid!r}: class id {cid} is outside the model's {num_classes} classes")
    if files.new_seg is not None:
        edited = read_labels(eid, "edited label map", files.new_seg, h, w, num_classes)
    elif cid >= 0:
        edited = np.where(mask.astype(bool), np.uint8(cid), seg)
    else:
        edited = seg
    return Edit(eid, image, mask, np.ascontiguousarray(edited), cid, str(meta.get("class_name", "")), dict(meta))


# ----------------------------------------------------------------------------------------------------------
# Building records


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def image_member(edit_id: str, data: bytes) -> tuple[bytes, str]:
    """Keep JPEG/PNG bytes as they are (no re-encoding loss); other formats become PNG."""
    im = _open(edit_id, "image", data)
    if im.format in ("JPEG", "MPO"):
        return data, "jpg"
    if im.format == "PNG":
        return data, "png"
    return png_bytes(np.array(im.convert("RGB"))), "png"


def labels_member(edit_id: str, what: str, data: bytes, shift: int = 0) -> bytes:
    """Any 8-bit single-channel label image -> L PNG, optionally shifted (uint8 wrap: raw COCO 255 -> 0)."""
    im = _open(edit_id, what, data)
    if im.mode not in ("L", "P"):
        raise EditError(f"edit {edit_id!r}: {what} must be a single-channel 8-bit image of label ids "
                        f"(mode {im.mode})")
    a = np.asarray(im, dtype=np.uint8)
    if shift:
        a = a + np.uint8(shift % 256)
    return png_bytes(a)


def mask_member(edit_id: str, data: bytes) -> bytes:
    """Grayscale mask -> {0, 255} L PNG (white = regenerate; threshold 0.5)."""
    im = _open(edit_id, "mask", data)
    return png_bytes(np.where(np.asarray(im.convert("L")) >= 128, 255, 0).astype(np.uint8))


def make_record(edit_id: str, image: bytes, seg: bytes, mask: bytes, *, class_id: int, class_name: str,
                num_classes: int, label_shift: int, new_seg: Optional[bytes] = None, seg_shift: int = 0,
                source: Optional[dict] = None) -> EditFiles:
    """Encoded members for one edit (labels shifted by seg_shift first, e.g. raw COCO-Stuff maps)."""
    check_key(edit_id)
    img, ext = image_member(edit_id, image)
    return EditFiles(
        edit_id, img, ext, labels_member(edit_id, "label map", seg, seg_shift), mask_member(edit_id, mask),
        {"class_id": int(class_id), "class_name": class_name, "num_classes": int(num_classes),
         "label_shift": int(label_shift), "source": source or {}},
        None if new_seg is None else labels_member(edit_id, "edited label map", new_seg, seg_shift))


def shard_name(i: int) -> str:
    return f"{SPLIT}-{i:06d}.tar"


def write_edit_shards(out: str | Path, records: Iterable[EditFiles], *, samples_per_shard: int = 100,
                      failed: Optional[list[dict]] = None, args: Optional[dict] = None) -> dict:
    """Write the records as edits-NNNNNN.tar (atomic, in the given order) and manifest.json (last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, ids, cur = [], [], []

    def flush() -> None:
        path = out / shard_name(len(shards))
        nbytes, sha = write_tar(path, ((r.edit_id, r.members()) for r in cur))
        shards.append({"name": path.name, "samples": len(cur), "bytes": nbytes, "sha256": sha})
        cur.clear()

    for r in records:
        if r.edit_id in ids:
            raise EditError(f"edit {r.edit_id!r}: duplicate edit id")
        ids.append(r.edit_id)
        cur.append(r)
        if len(cur) >= samples_per_shard:
            flush()
    if cur:
        flush()
    manifest = {"format": FORMAT, "kind": KIND, "tool": "data_tools/make_edits.py (asset_dist.infer.edits)",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": args or {},
                "total_samples": len(ids), "splits": {SPLIT: {"samples": len(ids), "shards": shards}} if ids else {},
                "edit_ids": ids, "failed_count": len(failed or []), "failed": failed or []}
    atomic_write_json(out / MANIFEST, manifest)  # with the umask's permissions: data for other users and jobs
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class EditRef:
    edit_id: str
    shard: str
    members: tuple[tuple[str, int, int], ...]  # (extension, data offset, size) inside the tar


class EditSet:
    """Every edit of a shard set, by id, read lazily. `spec`: a folder with manifest.json, a manifest, or
    shard paths / brace patterns (as `resolve_shards`). Edit ids come from tar member names: each must be a
    safe id (utils.check_id) and unique in the set, else the set is refused naming the shard. Shards listed in a
    manifest are checked against it (size; sha256 too with verify=True, the config's data.verify)."""

    def __init__(self, spec: str, verify: bool = True):
        try:
            shards = resolve_shards(spec, SPLIT)
        except ValueError as e:
            raise InputError(f"{e} (edit sets are made by data_tools/make_edits.py)") from None
        self.refs: dict[str, EditRef] = {}
        for s in shards:
            verify_shard(s, sha256=verify)
            for ref in _index(s.url):
                if ref.edit_id in self.refs:
                    raise InputError(f"edit id {ref.edit_id!r} appears in {self.refs[ref.edit_id].shard} and "
                                     f"{ref.shard}: edit ids must be unique")
                self.refs[ref.edit_id] = ref

    @property
    def ids(self) -> list[str]:
        return sorted(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, edit_id: str) -> EditFiles:
        ref = self.refs[edit_id]
        parts: dict[str, bytes] = {}
        try:
            with open(ref.shard, "rb") as f:
                for ext, off, size in ref.members:
                    f.seek(off)
                    parts[ext] = f.read(size)
                    if len(parts[ext]) != size:
                        raise EditError(f"edit {edit_id!r}: {ref.shard} is truncated (member .{ext} is cut short)")
        except OSError as e:
            raise EditError(f"edit {edit_id!r}: cannot read {ref.shard} ({e})") from None
        return files_from_members(edit_id, parts)


def _index(path: str) -> list[EditRef]:
    """Members of one edit tar grouped by edit id (a sample's members are consecutive, as webdataset writes
    them); an unsafe or repeated id, or a tar cut short, is an InputError naming the shard."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    last = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r") as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                key, _, ext = ti.name.partition(".")
                try:
                    check_id(key)
                except InputError as e:
                    raise InputError(f"{path}: member {ti.name!r}: {e}") from None
                if (key != last and key in groups) or ext in {m[0] for m in groups.get(key, ())}:
                    raise InputError(f"{path}: edit id {key!r} appears twice in the shard (member {ti.name!r}): "
                                     "edit ids must be unique")
                if ti.offset_data + ti.size > size:
                    raise InputError(f"{path}: truncated: member {ti.name!r} ends at byte {ti.offset_data + ti.size}"
                                     f" of a {size}-byte file")
                groups.setdefault(key, []).append((ext, ti.offset_data, ti.size))
                last = key
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"{path}: cannot read the edit shard ({e})") from None
    return [EditRef(k, path, tuple(v)) for k, v in groups.items()]


def files_from_members(edit_id: str, parts: dict[str, bytes]) -> EditFiles:
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    missing = [m for m in ("seg.png", "mask.png", "json") if m not in parts] + ([] if ext else ["image"])
    if missing:
        raise EditError(f"edit {edit_id!r}: shard lacks member(s) {', '.join(missing)} "
                        f"(has {', '.join(sorted(parts))})")
    try:
        meta = json.loads(parts["json"])
    except ValueError as e:
        raise EditError(f"edit {edit_id!r}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise EditError(f"edit {edit_id!r}: metadata must be a JSON object")
    meta.pop("edit_id", None)
    return EditFiles(edit_id, parts[ext], ext, parts["seg.png"], parts["mask.png"], meta, parts.get("newseg.png"))


def split_for_rank(ids: list[str], rank: int, world: int) -> list[str]:
    """Edits of one rank: every world-th id of the sorted list, so each edit is done exactly once."""
    return sorted(ids)[rank::world]


class MemoryEdits:
    """EditSet's interface over records held in memory (the single-edit command)."""

    def __init__(self, records: Iterable[EditFiles]):
        self.records = {r.edit_id: r for r in records}

    @property
    def ids(self) -> list[str]:
        return sorted(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, edit_id: str) -> EditFiles:
        return self.records[edit_id]

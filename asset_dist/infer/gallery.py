"""`asset-dist gallery`: one page and one PNG contact sheet for an edit-batch output.

For every edit of the set, side by side: the input, the label map before and after the edit (fixed palette),
the mask and the samples, plus the class, status and timings from the run's record. Failed or missing edits get
a row with the reason, so a gallery never hides a problem. Reads only; writes OUT/gallery.html,
OUT/contact_sheet.png and the thumbnails under OUT/gallery/ (atomic writes, safe to re-run).
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from asset_dist.infer.edits import EditError, EditSet, read_labels, decode_edit, png_bytes
from asset_dist.infer.results import open_results
from asset_dist.infer.runner import PALETTE
from asset_dist.runlock import RunLock
from asset_dist.utils import (InputError, atomic_write_bytes, atomic_write_text, check_file_name, check_id, inside,
                              writable_dir)

FIXED = ("input", "labels before", "labels after", "mask")


@dataclass
class Row:
    edit_id: str
    tiles: dict[str, np.ndarray] = field(default_factory=dict)  # column name -> thumbnail [s, s, 3]
    info: str = ""
    error: Optional[str] = None
    labels: str = ""  # the label-following verdict of `evaluate edits`, when its report is there


def thumb(a: np.ndarray, size: int) -> np.ndarray:
    """size x size thumbnail, the image's aspect kept (centred on white): area filter when shrinking, nearest
    when growing (label maps stay crisp)."""
    im = Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    f = size / max(im.width, im.height)
    w, h = max(1, round(im.width * f)), max(1, round(im.height * f))
    small = im.resize((w, h), Image.BOX if f <= 1 else Image.NEAREST)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(small, ((size - w) // 2, (size - h) // 2))
    return np.asarray(out)


def build_row(edits: EditSet, eid: str, results, num_classes: int, size: int) -> Row:
    """results: the edit-batch output's store (`results.open_results`: per-file folders or shards)."""
    row = Row(eid)
    rec = results.read_record(eid)
    try:
        files = edits.load(eid)
        e = decode_edit(files, num_classes)
        before = read_labels(eid, "label map", files.seg, e.height, e.width, num_classes)
    except (EditError, ValueError, OSError) as err:
        row.error = (rec or {}).get("error") or str(err)
        return row
    row.tiles = {"input": thumb(e.image, size), "labels before": thumb(PALETTE[before], size),
                 "labels after": thumb(PALETTE[e.seg], size), "mask": thumb(e.mask * np.uint8(255), size)}
    target = (rec or {}).get("class_name") or e.class_name or ("edited label map" if e.class_id < 0 else
                                                                  str(e.class_id))
    if rec is None:
        row.error, row.info = "not edited yet (run edit-batch on this set)", f"class: {target}"
        return row
    if rec["status"] != "ok":
        row.error, row.info = rec.get("error") or "failed", f"class: {target}"
        return row
    problems = []
    for name in rec.get("outputs") or []:
        if str(name).startswith("sample_"):
            try:  # names come from the record (data): plain file names of the edit only (store.read_file checks)
                data = results.read_file(eid, check_file_name(name, "output"))
                tile = thumb(np.asarray(Image.open(io.BytesIO(data))), size)
            except (ValueError, OSError) as err:
                problems.append(str(err))
                continue
            row.tiles[Path(name).stem.replace("_", " ")] = tile
    row.error = "; ".join(problems) or None
    t = rec.get("timings_s") if isinstance(rec.get("timings_s"), dict) else {}
    shown = f"{rec['width']}x{rec['height']}" if "width" in rec else f"{rec.get('size')}"
    row.info = (f"class: {target}; {shown} px, {rec.get('hole_tokens')} hole tokens, "
                f"{rec.get('samples')} samples; "
                + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if isinstance(v, (int, float))))
    return row


def label_notes(results: Path) -> dict[str, str]:
    """Per edit, one line from RESULTS/eval_edits.json's label-following score ({} without the report)."""
    import json

    try:
        lab = json.loads((results / "eval_edits.json").read_text()).get("labels") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for eid, e in (lab.get("per_edit") or {}).items():
        d = [p for p in e.get("samples") or [] if p]
        dist = (f" (colour distance to the new class {sum(p['to_class'] for p in d) / len(d):.2f}, to the input "
                f"{sum(p['to_input'] for p in d) / len(d):.2f})") if d else ""
        pct = 100 * float(e.get("changed_fraction", 0))
        if not e.get("labels_change"):
            out[eid] = (f"labels barely change: only {pct:.0f} % of the mask gets a new class (the area already "
                        f"has it), so following the labels means keeping its look; not scored{dist}")
        elif e.get("follows") is None:
            out[eid] = "label following: not scored (no training statistics for the new class)"
        else:
            out[eid] = f"follows its labels: {'yes' if e['follows'] else 'no'}{dist}"
    return out


def contact_sheet(rows: list[Row], columns: list[str], size: int) -> np.ndarray:
    """Rows of tiles under a header; a failed edit's row shows its error text."""
    pad, head, label_w = 4, 18, 160
    W = label_w + len(columns) * (size + pad) + pad
    H = head + len(rows) * (size + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(columns):
        draw.text((label_w + pad + j * (size + pad), 3), c, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = head + pad + i * (size + pad)
        draw.text((pad, y + 2), r.edit_id[:24], fill=(0, 0, 0))
        if r.labels:
            tag = "labels barely change" if r.labels.startswith("labels barely") else r.labels.split(" (")[0]
            draw.text((pad, y + 30), tag[:26], fill=(0, 0, 0))
        if r.error:
            draw.text((pad, y + 16), "FAILED" if r.tiles == {} else "no samples", fill=(200, 0, 0))
        for j, c in enumerate(columns):
            if c in r.tiles:
                sheet.paste(Image.fromarray(r.tiles[c]), (label_w + pad + j * (size + pad), y))
    return np.asarray(sheet)


def write_gallery(edits_spec: str, results: Path, out: Path, num_classes: int, size: int = 192,
                  title: str = "asset_dist edits", verify: bool = True) -> dict:
    """Build the page and the sheet; returns {"rows", "ok", "failed", "html", "sheet"}. verify: check the edit
    shards' sha256 against their manifest (data.verify). results: an edit-batch output in either layout."""
    if size < 1:
        raise InputError(f"tile size must be >= 1 (got {size})")
    edits = EditSet(edits_spec, verify=verify)
    store = open_results(results)
    rows = [build_row(edits, eid, store, num_classes, size) for eid in edits.ids]
    notes = label_notes(results)
    for r in rows:
        r.labels = notes.get(r.edit_id, "")
    n_samples = max([sum(k.startswith("sample") for k in r.tiles) for r in rows] + [0])
    columns = list(FIXED) + [f"sample {k}" for k in range(n_samples)]
    tiles_dir = out / "gallery"
    lines = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}td{text-align:center;font-size:12px;vertical-align:top}"
             ".err{color:#b00}</style>", f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(rows)} edits from <code>{html.escape(edits_spec)}</code>, results in "
             f"<code>{html.escape(str(results))}</code>. Contact sheet: <a href=contact_sheet.png>"
             "contact_sheet.png</a>.</p><table><tr><th>edit</th>"
             + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for r in rows:
        cells = []
        for c in columns:
            if c in r.tiles:
                name = f"{r.edit_id}/{c.replace(' ', '_')}.png"
                atomic_write_bytes(inside(tiles_dir, check_id(r.edit_id), name.split("/")[1]), png_bytes(r.tiles[c]))
                cells.append(f"<td><img src='gallery/{html.escape(name)}' width={size} height={size}></td>")
            else:
                cells.append("<td></td>")
        note = f"<br><span class=err>{html.escape(r.error)}</span>" if r.error else ""
        if r.labels:
            note += f"<br><i>{html.escape(r.labels)}</i>"
        lines.append(f"<tr><td><b>{html.escape(r.edit_id)}</b><br>{html.escape(r.info)}{note}</td>"
                     + "".join(cells) + "</tr>")
    lines.append("</table>")
    atomic_write_bytes(out / "contact_sheet.png", png_bytes(contact_sheet(rows, columns, size)))
    atomic_write_text(out / "gallery.html", "\n".join(lines) + "\n")
    failed = [r.edit_id for r in rows if r.error]
    return {"rows": len(rows), "ok": len(rows) - len(failed), "failed": failed,
            "html": str(out / "gallery.html"), "sheet": str(out / "contact_sheet.png")}


# ----------------------------------------------------------------------------------------------------------
# Command


def main(args) -> int:
    from asset_dist.config import load_config
    from asset_dist.infer.classes import table_for_config

    cfg = load_config(args.config, args.overrides)
    spec = args.edits or cfg.infer.edits
    if not spec:
        raise InputError("no edits: pass --edits or set infer.edits")
    results = Path(args.results)
    if not results.is_dir():
        raise InputError(f"{results}: no such folder (the edit-batch --out)")
    out = writable_dir(args.out or results, "gallery --out")
    # its own lock below OUT: two galleries never interleave, and an edit-batch still writing OUT is no obstacle
    with RunLock(out / "gallery", "gallery"):
        res = write_gallery(spec, results, out, table_for_config(cfg).num_classes, args.size, verify=cfg.data.verify)
    print(f"gallery: {res['html']} ({res['ok']} of {res['rows']} edits with samples); sheet: {res['sheet']}")
    if res["failed"]:
        print(f"without samples: {', '.join(res['failed'])}")
    return 0

"""`asset-dist gallery`: one page and one PNG contact sheet for an edit-batch output.

For every edit of the set, side by side: the input, the label map before and after the edit (fixed palette),
the mask and the samples, plus the class, status and timings from the run's record. Failed or missing edits get
a row with the reason, so a gallery never hides a problem. Reads only; writes OUT/gallery.html,
OUT/contact_sheet.png and the thumbnails under OUT/gallery/ (atomic writes, safe to re-run).
"""
from __future__ import annotations

import argparse
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from asset_dist.infer.edits import EditError, EditSet, read_labels, decode_edit, png_bytes
from asset_dist.infer.runner import PALETTE, read_record
from asset_dist.utils import atomic_write_bytes, atomic_write_text

FIXED = ("input", "labels before", "labels after", "mask")


@dataclass
class Row:
    edit_id: str
    tiles: dict[str, np.ndarray] = field(default_factory=dict)  # column name -> thumbnail [s, s, 3]
    info: str = ""
    error: Optional[str] = None
    labels: str = ""  # the label-following verdict of `evaluate edits`, when its report is there


def thumb(a: np.ndarray, size: int) -> np.ndarray:
    """Square thumbnail: area filter when shrinking, nearest when growing (label maps stay crisp)."""
    im = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(im.convert("RGB").resize((size, size), Image.BOX if im.width >= size else Image.NEAREST))


def build_row(edits: EditSet, eid: str, results: Path, num_classes: int, size: int) -> Row:
    row = Row(eid)
    rec = read_record(results, eid)
    try:
        files = edits.load(eid)
        e = decode_edit(files, num_classes)
        before = read_labels(eid, "label map", files.seg, e.side, num_classes)
    except (EditError, ValueError, OSError) as err:
        row.error = (rec or {}).get("error") or str(err)
        return row
    row.tiles = {"input": thumb(e.image, size), "labels before": thumb(PALETTE[before], size),
                 "labels after": thumb(PALETTE[e.seg], size), "mask": thumb(e.mask * np.uint8(255), size)}
    target = e.class_name or ("edited label map" if e.class_id < 0 else str(e.class_id))
    if rec is None:
        row.error, row.info = "not edited yet (run edit-batch on this set)", f"class: {target}"
        return row
    if rec["status"] != "ok":
        row.error, row.info = rec.get("error") or "failed", f"class: {target}"
        return row
    for name in rec["outputs"]:
        if name.startswith("sample_"):
            row.tiles[Path(name).stem.replace("_", " ")] = thumb(np.asarray(Image.open(results / eid / name)), size)
    t = rec.get("timings_s", {})
    row.info = (f"class: {target}; {rec['size']} px, {rec['hole_tokens']} hole tokens, {rec['samples']} samples; "
                + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
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
                  title: str = "asset_dist edits") -> dict:
    """Build the page and the sheet; returns {"rows", "ok", "failed", "html", "sheet"}."""
    edits = EditSet(edits_spec)
    rows = [build_row(edits, eid, results, num_classes, size) for eid in edits.ids]
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
                atomic_write_bytes(tiles_dir / name, png_bytes(r.tiles[c]))
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


def add_args(p: argparse.ArgumentParser) -> None:
    from asset_dist.config import add_config_args

    p.description = ("Write gallery.html and contact_sheet.png for an edit-batch output: per edit the input, "
                     "the label map before and after, the mask and the samples.")
    add_config_args(p)
    p.add_argument("--edits", default=None, help="the edit set given to edit-batch (default infer.edits)")
    p.add_argument("--results", required=True, help="the edit-batch --out folder")
    p.add_argument("--out", default=None, help="where to write the gallery (default: --results)")
    p.add_argument("--size", type=int, default=192, help="tile side in pixels (default 192)")


def main(args) -> int:
    from asset_dist.config import load_config
    from asset_dist.infer.classes import table_for_config

    cfg = load_config(args.config, args.overrides)
    spec = args.edits or cfg.infer.edits
    if not spec:
        raise SystemExit("error: no edits: pass --edits or set infer.edits")
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"error: {results}: no such folder (the edit-batch --out)")
    res = write_gallery(spec, results, Path(args.out or results), table_for_config(cfg).num_classes, args.size)
    print(f"gallery: {res['html']} ({res['ok']} of {res['rows']} edits with samples); sheet: {res['sheet']}")
    if res["failed"]:
        print(f"without samples: {', '.join(res['failed'])}")
    return 0

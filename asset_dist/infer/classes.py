"""Class names -> label ids in the model's convention (docs/ASSET_NOTES.md §8).

The built-in table is COCO-Stuff's 182 labels in the landscape convention (0-based: labels.txt id - 1, so
0 = person, 91 = banner, 177 = water-other). A model with `data.label_shift = 1` (COCO, 183 labels) uses
the 1-based ids: the table index + 1, with 0 = "unlabeled" (pizza = 59). "None" (id -1) leaves the label
map unchanged, which turns an edit into plain resampling of the masked region.

Names match after lower-casing and dropping everything but letters and digits, so "water-other",
"Water Other" and the official test dictionary's "waterother" are one name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional

NONE_ID = -1

# COCO-Stuff labels.txt ids 1..182 in order (index 0 here = id 1). The 11 thing ids COCO never annotates
# (street sign, hat, shoe, ...) keep their slots so that ids line up with the official maps.
COCO_STUFF = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff (0-based 91..181)
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCO_STUFF) == 182


def norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class ClassTable:
    """Name <-> id for one label convention. `num_classes` is the seg tokenizer's class count."""

    def __init__(self, num_classes: int, label_shift: int = 0, names: Optional[list[str]] = None,
                 extra: Optional[Mapping[str, int]] = None, source: str = "COCO-Stuff (built in)"):
        self.num_classes, self.label_shift, self.source = num_classes, label_shift, source
        names = list(COCO_STUFF if names is None else names)
        self.ids: dict[str, int] = {"none": NONE_ID}
        if label_shift:
            self.ids["unlabeled"] = 0
        for i, n in enumerate(names):
            if n:
                self.ids.setdefault(norm(n), i + label_shift)
        for n, i in (extra or {}).items():
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"class table: id of {n!r} must be an integer, got {i!r}")
            self.ids[norm(n)] = i
        self.names = {i: n for n, i in sorted(self.ids.items(), key=lambda kv: kv[1], reverse=True)}
        for i, n in enumerate(names):  # keep the readable spelling for display
            if n and self.ids.get(norm(n)) == i + label_shift:
                self.names[i + label_shift] = n

    def lookup(self, name: str | int) -> int:
        """A class name (or an integer id, as int or digit string) -> id; ValueError names the problem."""
        if isinstance(name, int) or (isinstance(name, str) and re.fullmatch(r"-?\d+", name.strip())):
            cid = int(name)
        else:
            key = norm(str(name))
            if key not in self.ids:
                close = sorted(n for n in self.ids if key and (key in n or n in key))[:5]
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown class name {name!r} (table: {self.source}){hint}")
            cid = self.ids[key]
        if not NONE_ID <= cid < self.num_classes:
            raise ValueError(f"class id {cid} is outside the model's {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}, or -1 = no change)")
        return cid

    def name(self, cid: int) -> str:
        return "None" if cid == NONE_ID else self.names.get(cid, str(cid))


def read_names(path: str | Path) -> tuple[Optional[list[str]], dict[str, int]]:
    """A class-name file: JSON {name: id} (ids in the model convention) or plain text, one name per line in
    0-based label order (the landscape convention; blank lines keep their slot)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"class-name file {p}: cannot read ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"class-name file {p}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"class-name file {p}: expected a JSON object {{name: id}}")
        return None, data
    return [line.strip() for line in text.splitlines()], {}


def class_table(num_classes: int, label_shift: int = 0, names_file: str = "",
                extra: Optional[Mapping[str, int]] = None) -> ClassTable:
    names, more = (None, {}) if not names_file else read_names(names_file)
    return ClassTable(num_classes, label_shift, names, {**more, **dict(extra or {})},
                      source=names_file or "COCO-Stuff (built in)")


def table_for_config(cfg) -> ClassTable:
    """The class table of a Config: the seg tokenizer's classes, data.label_shift, infer.class_names/classes."""
    return class_table(cfg.model.seg.in_channels, cfg.data.label_shift, cfg.infer.class_names, cfg.infer.classes)

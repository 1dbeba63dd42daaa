"""Which settings may change when a run resumes from a checkpoint, and the check that refuses the rest.

A resumed run continues the saved model, optimizer and schedule, so a changed learning rate, loss weight,
model size, data set or backend would silently not apply (the optimizer state wins) while config.yaml and
the export claimed it. Such changes are refused with the list of differences; these may change:

- `train.max_steps` (continue a finished run for longer; not with `train.schedule: cosine`, whose decay
  already applied depends on it),
- `train.ckpt_every`, `train.keep_last`, `train.sync_every`: when to save and check,
- `data.num_workers`: the loader reshards its position like a change of world size (data/loader.py),
- `logging.*`, `infer.*`, `paths.*`, `name`, `data.val_shards`: what is logged and where, nothing trained.

The number of processes is not a setting: a resume on another world size reshards (train/backends/).
"""
from __future__ import annotations

from typing import Any

MAY_CHANGE = ("train.max_steps", "train.ckpt_every", "train.keep_last", "train.sync_every", "data.num_workers",
              "logging.", "infer.", "paths.", "name", "data.val_shards")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def refused_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every difference between the saved and the new resolved config that
    resuming cannot honour."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old == new:
            continue
        if key == "train.max_steps" and b.get("train.schedule") == "cosine":
            out.append(f"{key}: {old!r} -> {new!r} (the cosine schedule depends on it)")
        elif not _may_change(key):
            out.append(f"{key}: {old!r} -> {new!r}")
    return out

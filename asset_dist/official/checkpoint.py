"""Reading official ASSET / taming checkpoints: safe loading and the key layout of each file.

Official files are PyTorch-Lightning checkpoints, {'state_dict': ..., 'epoch', 'global_step', 'optimizer_states',
'callbacks', 'hyper_parameters', ...}, or bare state dicts. Weights live under these prefixes:

  first_stage_model.    image VQGAN          (guide / SGA checkpoints)
  cond_stage_model.     semantic-map VQ      (guide / SGA checkpoints)
  transformer.          the trained transformer (guide checkpoint: the guide; SGA checkpoint: the SGA model)
  guiding_transformer.  the frozen guide inside an SGA checkpoint
  (none)                standalone VQGAN (main.py, plus loss.*) or standalone seg VQ (taming, plus colorize)

Everything outside 'state_dict' (optimizer and LR-scheduler states, callbacks, hyper-parameters, counters) is
training state this package does not import; it is listed in the import report, never read as weights.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

PREFIXES = ("first_stage_model.", "cond_stage_model.", "transformer.", "guiding_transformer.")


class CheckpointError(ValueError):
    """An official checkpoint that cannot be imported; the message names the file and the problem."""


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:  # mmap: multi-GB checkpoints are read lazily, tensor by tensor
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # pre-zip (legacy) format


def load_official_checkpoint(path: "str | os.PathLike", trust_pickle: bool = False,
                             warn: Callable[[str], None] = lambda m: warnings.warn(m, stacklevel=3)) -> dict:
    """torch.load with weights_only=True. A file that needs full unpickling (Lightning checkpoints may hold an
    argparse.Namespace or callback objects) is refused unless trust_pickle=True, which loads it with
    weights_only=False after a warning: unpickling can run code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"GLOBAL (\S+)", str(e))))
        what = f" (it references {', '.join(found)})" if found else ""
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: holds Python objects beyond tensors and plain containers{what}, so it can only be loaded "
                "by full unpickling, which can run code stored in the file. Only if you trust where the file comes "
                "from, pass --trust-pickle (Python: trust_pickle=True).") from None
        warn(f"{path}: loading with full unpickling (--trust-pickle){what}; this runs any code stored in the file")
        try:
            obj = _torch_load(path, weights_only=False)
        except (ModuleNotFoundError, AttributeError) as e2:  # e.g. PL 1.x keys callback states by their class
            raise CheckpointError(
                f"{path}: full unpickling needs a class this environment lacks ({e2}); install the package that "
                "defines it (official checkpoints: pytorch-lightning), or, where it is installed, keep only the "
                "weights: torch.save({'state_dict': torch.load(F, weights_only=False)['state_dict']}, OUT)") from None
    except Exception as e:  # noqa: BLE001 - name the file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return dict(obj)


@dataclass
class OfficialFile:
    """One loaded official checkpoint: its weights split by prefix."""

    path: Path
    state: dict[str, torch.Tensor]  # the whole state dict
    extra: list[str]  # checkpoint entries besides the weights (training state, never imported)
    step: int = 0  # Lightning global_step, 0 if absent
    groups: dict[str, list[str]] = field(default_factory=dict)  # prefix ("" = standalone) -> keys

    def has(self, prefix: str) -> bool:
        return bool(self.groups.get(prefix))

    def label(self, prefix: str = "") -> str:
        return f"{self.path} [{prefix}*]" if prefix else str(self.path)


def read_official_file(path: "str | os.PathLike", trust_pickle: bool = False,
                       warn: Optional[Callable[[str], None]] = None) -> OfficialFile:
    """Load a checkpoint and sort its keys by prefix. A file with prefixed weights must hold nothing else
    (an unknown top-level name is an error that names it); a file without any is a standalone VQ model."""
    kw = {"warn": warn} if warn is not None else {}
    ckpt = load_official_checkpoint(path, trust_pickle, **kw)
    path = Path(path)
    if isinstance(ckpt.get("state_dict"), Mapping):
        sd, extra = dict(ckpt["state_dict"]), sorted(k for k in ckpt if k != "state_dict")
    else:
        sd, extra = ckpt, []
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    groups: dict[str, list[str]] = {p: [] for p in PREFIXES}
    rest = []
    for k in sd:
        p = next((p for p in PREFIXES if k.startswith(p)), None)
        (groups[p] if p else rest).append(k)
    if any(groups.values()) and rest:
        tops = sorted({k.split(".", 1)[0] for k in rest})
        raise CheckpointError(f"{path}: unknown tensors outside {', '.join(PREFIXES)}: {', '.join(rest[:12])}"
                              f"{' ...' if len(rest) > 12 else ''} (top-level names: {', '.join(tops)})")
    groups[""] = rest
    step = ckpt.get("global_step", 0)
    return OfficialFile(path, sd, extra, step if isinstance(step, int) else 0, groups)


def under(f: OfficialFile, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `f` under `prefix`, with the prefix removed ("" = the standalone keys)."""
    return {k[len(prefix):]: f.state[k] for k in f.groups.get(prefix, [])}

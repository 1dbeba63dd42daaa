"""SGA semantics: how a query block's window and picked blocks combine, as a registry of kernel sets.

One rule has three forms, and a model needs all three to train and to sample: the whole-sequence kernel
(`sga.sga_attention`'s signature), the kernel for decoding runs of a block or more
(`decode.block_attention`'s), and the slot table of key blocks that token steps read (`layout.block_table`'s,
repeats kept: `decode.step_table` turns them into softmax weights). This package's rule, `union`, is
registered here. Other rules register themselves from the layer above: `asset_dist.official.attention`
registers `official` (the released weights' concatenation rule) when imported, so models/ and attention/
never import the compatibility package. A model looks its rule up by `transformer.sga_semantics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .decode import block_attention
from .layout import block_table
from .sga import sga_attention


@dataclass(frozen=True)
class Semantics:
    name: str
    attend: Callable[..., torch.Tensor]  # (q, k, v, guide, grid, causal, prefix_k, prefix_v, impl, validate)
    attend_run: Callable[..., torch.Tensor]  # (q, qtok, k, v, guide, nt, causal, prefix): decoding runs
    table: Callable[[torch.Tensor, int, bool], torch.Tensor]  # picks [.., nb, K] -> key-block slots [.., nb, S]


_REGISTRY: dict[str, Semantics] = {}


def register_semantics(s: Semantics) -> Semantics:
    """Make `s` available as `transformer.sga_semantics: <s.name>`; registering a name twice is an error
    unless it is the same object (a module imported twice)."""
    old = _REGISTRY.get(s.name)
    if old is not None and old is not s:
        raise ValueError(f"SGA semantics {s.name!r} is already registered")
    _REGISTRY[s.name] = s
    return s


def get_semantics(name: str) -> Semantics:
    if name not in _REGISTRY:
        hint = (" (registered by importing asset_dist.official.attention, as `asset-dist train`, `edit`, "
                "`edit-batch` and `evaluate` do)" if name == "official" else "")
        raise ValueError(f"transformer.sga_semantics: {name!r} is not registered{hint}; "
                         f"registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


UNION = register_semantics(Semantics("union", sga_attention, block_attention, block_table))

"""Sparsified Guided Attention: strip-order layout, block-sparse kernels, guide -> block picks, the SGA rules."""
from .guide import (
    forbidden_blocks,
    guide_blocks,
    official_mask,
    pick_blocks,
    pool_blocks,
)
from .layout import (
    block_ids,
    block_shape,
    block_table,
    inverse_strip_order,
    n_blocks_of,
    strip_order,
    visible_key_blocks,
    visible_key_positions,
    window_table,
)
from .semantics import Semantics, get_semantics, register_semantics
from .sga import IMPLS, dense_attention, resolve_impl, sga_attention, sga_mask

__all__ = [
    "IMPLS", "Semantics", "block_ids", "block_shape", "block_table", "dense_attention", "forbidden_blocks",
    "get_semantics", "guide_blocks", "inverse_strip_order", "n_blocks_of", "official_mask", "pick_blocks",
    "pool_blocks", "register_semantics", "resolve_impl", "sga_attention", "sga_mask",
    "strip_order", "visible_key_blocks", "visible_key_positions", "window_table",
]

"""Sparsified Guided Attention: strip-order layout, block-sparse kernels, guide -> block picks."""
from .guide import (
    causal_rows_from_official,
    causal_rows_to_official,
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
from .sga import IMPLS, dense_attention, resolve_impl, sga_attention, sga_mask

__all__ = [
    "IMPLS", "block_ids", "block_shape", "block_table", "causal_rows_from_official", "causal_rows_to_official",
    "dense_attention", "forbidden_blocks", "guide_blocks", "inverse_strip_order", "n_blocks_of",
    "official_mask", "pick_blocks", "pool_blocks", "resolve_impl", "sga_attention", "sga_mask",
    "strip_order", "visible_key_blocks", "visible_key_positions", "window_table",
]

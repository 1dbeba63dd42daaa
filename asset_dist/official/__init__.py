"""Compatibility with the official ASSET code and release (DifanLiu/ASSET), all of it (docs/OFFICIAL_COMPAT.md).

Built on the model layer's public pieces, which never import this package:
  attention.py   the official SGA rule, sparse; importing it registers `transformer.sga_semantics: official`
  dense.py       its dense O(L^2) reference (tests)
  guides.py      official block picks <-> the model's guide rows
  transformer.py official transformer state dicts / configs <-> AssetTransformer
  vq.py          official VQGAN / seg-VQ state dicts / configs <-> VQModel / SegVQModel
  checkpoint.py, sizes.py, importer.py, args.py   `asset-dist import-official`

Names resolve lazily, so `asset-dist import-official --help` (official/args.py) imports no torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_official_checkpoint": "checkpoint", "read_official_file": "checkpoint",
    "ImportResult": "importer", "build_config": "importer", "import_official": "importer",
    "infer_transformer_config": "sizes", "infer_vq_config": "sizes", "read_official_config": "sizes",
    "OFFICIAL": "attention", "official_sga_attention": "attention", "official_block_attention": "attention",
    "official_guides": "guides", "causal_rows_from_official": "guides", "causal_rows_to_official": "guides",
    "config_from_official": "transformer", "load_official_transformer": "transformer",
    "convert_official_state_dict": "transformer", "to_official_state_dict": "transformer",
    "load_official_vq": "vq", "official_vq_state_dict": "vq", "vq_config_from_official": "vq",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"asset_dist.official.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'asset_dist.official' has no attribute {name!r}")

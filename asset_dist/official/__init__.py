"""Importing the official ASSET release (DifanLiu/ASSET Lightning checkpoints) as asset_dist exports + config."""
from asset_dist.official.checkpoint import CheckpointError, load_official_checkpoint, read_official_file
from asset_dist.official.importer import ImportResult, build_config, import_official
from asset_dist.official.sizes import infer_transformer_config, infer_vq_config, read_official_config

__all__ = [
    "CheckpointError", "ImportResult", "build_config", "import_official", "infer_transformer_config",
    "infer_vq_config", "load_official_checkpoint", "read_official_config", "read_official_file",
]

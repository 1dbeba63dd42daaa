"""Models: the image VQGAN (masked encoder), the seg tokenizer, their losses (official weights: asset_dist.official)."""
from asset_dist.models.losses import LPIPS, PatchDiscriminator, SegLoss, VQGANLoss
from asset_dist.models.quantize import VectorQuantizer
from asset_dist.models.seg_vq import SegVQModel, seg_config
from asset_dist.models.vqgan import VQModel, count_parameters

__all__ = [
    "VQModel", "SegVQModel", "seg_config", "VectorQuantizer", "VQGANLoss", "SegLoss", "LPIPS",
    "PatchDiscriminator", "count_parameters",
]

"""Models: the image VQGAN (masked encoder), the seg tokenizer, their losses, official-weight mapping."""
from asset_dist.models.losses import LPIPS, PatchDiscriminator, SegLoss, VQGANLoss
from asset_dist.models.official import load_official_vq, official_vq_state_dict, vq_config_from_official
from asset_dist.models.quantize import VectorQuantizer
from asset_dist.models.seg_vq import SegVQModel, seg_config
from asset_dist.models.vqgan import VQModel, count_parameters

__all__ = [
    "VQModel", "SegVQModel", "seg_config", "VectorQuantizer", "VQGANLoss", "SegLoss", "LPIPS",
    "PatchDiscriminator", "official_vq_state_dict", "load_official_vq", "vq_config_from_official",
    "count_parameters",
]

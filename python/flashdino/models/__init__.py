from .vision_transformer import DinoV2, DinoV3, DinoVisionTransformer, build_model, interpolate_pos_embed
from .aggregator import Aggregator

__all__ = ["Aggregator", "DinoV2", "DinoV3", "DinoVisionTransformer", "build_model", "interpolate_pos_embed"]

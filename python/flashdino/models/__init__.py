from .vision_transformer import DinoV2, DinoV3, DinoVisionTransformer, build_model, interpolate_pos_embed

__all__ = ["DinoV2", "DinoV3", "DinoVisionTransformer", "build_model", "interpolate_pos_embed"]

"""Integration helpers for downstream projects: teacher bridges, model selection, feature fusion,
multi-scale features, a backbone + aggregator model and YAML configs.

    from flashdino.integrations import (DinoV3Config, DinoV3Teacher, Config, get_dinov3_model,
        FeatureFusionAdapter, DINOv2FeatureFusionAdapter, patch_tokens_to_map, multiscale_feature_maps,
        IntegratedModel, load_config, build_from_config)
"""

from .config import SCHEMA, ConfigError, build_from_config, load_config, validate_config
from .fusion import (FUSION_MODES, DINOv2FeatureFusionAdapter, FeatureFusionAdapter, multiscale_feature_maps,
                     patch_tokens_to_map)
from .integrated import IntegratedModel
from .selection import (DINOV3_CONFIGS, SIZES, Config, get_dinov3_model, load_pretrained_weights, resolve_model_name,
                        select_variant, unify_output)
from .teacher import DinoV3Config, DinoV3Teacher

__all__ = [
    "DinoV3Config", "DinoV3Teacher",
    "Config", "DINOV3_CONFIGS", "SIZES", "get_dinov3_model", "load_pretrained_weights", "resolve_model_name",
    "select_variant", "unify_output",
    "FeatureFusionAdapter", "DINOv2FeatureFusionAdapter", "FUSION_MODES", "patch_tokens_to_map",
    "multiscale_feature_maps",
    "IntegratedModel",
    "SCHEMA", "ConfigError", "load_config", "validate_config", "build_from_config",
]

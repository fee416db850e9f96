"""flashdino: a faster drop-in for the DINOv2 / DINOv3 Vision Transformers and the VGGT aggregator."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .factory import ENTRY_POINTS, create_model
from .models import Aggregator, DinoV2, DinoV3, DinoVisionTransformer
from .variants import ALIASES, VARIANTS, VitConfig, get_config, resolve_name
from .loading import CheckpointError, WeightsUnavailableError, convert, from_pretrained, load_weights
from .extract.reader import FeatureSet, read_features  # noqa: F401 - flashdino.read_features(DIR)

globals().update(ENTRY_POINTS)  # flashdino.dinov3_vitl16(...), flashdino.dinov2_vitb14_reg(...), ...


def list_models() -> list[str]:
    return sorted(VARIANTS)


__all__ = ["__version__", "ops", "create_model", "list_models", "Aggregator", "DinoV2", "DinoV3", "DinoVisionTransformer",
           "VitConfig", "VARIANTS", "ALIASES", "get_config", "resolve_name",
           "CheckpointError", "WeightsUnavailableError", "convert", "from_pretrained", "load_weights", *sorted(ENTRY_POINTS)]

"""flashdino: a faster drop-in for the DINOv2 / DINOv3 Vision Transformers and the VGGT aggregator."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .factory import ENTRY_POINTS, create_model
from .models import Aggregator, DinoV2, DinoV3, DinoVisionTransformer
from .variants import ALIASES, VARIANTS, VitConfig, get_config, resolve_name
from .loading import CheckpointError, WeightsUnavailableError, convert, from_pretrained, load_weights

globals().update(ENTRY_POINTS)  # flashdino.dinov3_vitl16(...), flashdino.dinov2_vitb14_reg(...), ...


def __getattr__(name):
    # Deployment helpers load on first use (they register an export op and read optional packages).
    if name in ("export_onnx", "optimize"):
        from . import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'flashdino' has no attribute {name!r}")


def list_models() -> list[str]:
    return sorted(VARIANTS)


__all__ = ["__version__", "ops", "create_model", "list_models", "Aggregator", "DinoV2", "DinoV3", "DinoVisionTransformer",
           "VitConfig", "VARIANTS", "ALIASES", "get_config", "resolve_name",
           "CheckpointError", "WeightsUnavailableError", "convert", "from_pretrained", "load_weights", "export_onnx",
           "optimize", *sorted(ENTRY_POINTS)]

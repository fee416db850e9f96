"""flashdino: a faster drop-in for the DINOv2 / DINOv3 Vision Transformers and the VGGT aggregator."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The variant table is plain Python (no torch): it names the entry points without building anything.
from .variants import ALIASES, VARIANTS, VitConfig, get_config, resolve_name

# Everything else is imported on first use (PEP 562), so that `import flashdino` and the command
# line's `--help` do not pay for importing torch (seconds). `flashdino.create_model`,
# `flashdino.dinov3_vitl16`, `flashdino.ops`, ... work as if they were imported here. A new public
# name goes into _LAZY and __all__, not into an import here: one eager import of a module that
# imports torch undoes this (tests/test_cli_newcomer.py checks that `import flashdino` stays light).
_LAZY = {
    "create_model": ("factory", "create_model"),
    "ENTRY_POINTS": ("factory", "ENTRY_POINTS"),
    "Aggregator": ("models", "Aggregator"),
    "DinoV2": ("models", "DinoV2"),
    "DinoV3": ("models", "DinoV3"),
    "DinoVisionTransformer": ("models", "DinoVisionTransformer"),
    "CheckpointError": ("loading", "CheckpointError"),
    "WeightsUnavailableError": ("loading", "WeightsUnavailableError"),
    "convert": ("loading", "convert"),
    "from_pretrained": ("factory", "from_pretrained"),
    "RandomWeightsWarning": ("factory", "RandomWeightsWarning"),
    "read_features": ("extract.reader", "read_features"),
    "FeatureSet": ("extract.reader", "FeatureSet"),
    "load_weights": ("loading", "load_weights"),
    "export_onnx": ("deploy", "export_onnx"),
    "optimize": ("deploy", "optimize"),
    "patch": ("patching", "patch"),
    "unpatch": ("patching", "unpatch"),
}
# Submodules reachable as attributes without an explicit `import flashdino.<name>` (as before).
_SUBMODULES = ("ops", "models", "layers", "loading", "factory", "dispatch", "integrations", "bench",
               "extract", "deploy", "check", "preprocess", "outputs", "info", "cli", "cuda_graphs", "triton_support",
               "patching")


def list_models() -> list[str]:
    return sorted(VARIANTS)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in VARIANTS:  # flashdino.dinov3_vitl16(...), flashdino.dinov2_vitb14_reg(...), ...
        value = importlib.import_module(".factory", __name__).ENTRY_POINTS[name]
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'flashdino' has no attribute {name!r}")
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


__all__ = ["__version__", "ops", "create_model", "list_models", "Aggregator", "DinoV2", "DinoV3", "DinoVisionTransformer",
           "VitConfig", "VARIANTS", "ALIASES", "get_config", "resolve_name",
           "CheckpointError", "WeightsUnavailableError", "RandomWeightsWarning", "read_features", "FeatureSet", "convert", "from_pretrained", "load_weights", "export_onnx", "optimize",
           "patch", "unpatch",
           *sorted(VARIANTS)]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES) | set(VARIANTS))

"""Model construction: ``create_model`` and one entry point per variant, all from ``variants.VARIANTS``."""

from __future__ import annotations

import os
from typing import Optional, Union

from .models import DinoVisionTransformer, build_model
from .variants import VARIANTS, get_config, resolve_name

WeightsArg = Union[str, os.PathLike, dict, None]


def create_model(name: str, pretrained: bool = False, weights: WeightsArg = None, *,
                 device=None, dtype=None, strict: bool = True, **overrides) -> DinoVisionTransformer:
    """Build a backbone by name or alias (``"dinov3_vitl16"``, ``"large"``, ``"dinov2_vitb14_reg"``).

    ``weights`` may be an official .pth, a safetensors file, a timm checkpoint, a Hugging Face
    model folder, a Hugging Face hub id (``"facebook/dinov3-vitl16-pretrain-lvd1689m"``), a
    weights tag of the variant (``"lvd1689m"``, ``"sat493m"``) or an already loaded state dict.
    ``pretrained=True`` without ``weights`` downloads the variant's default weights. Keyword
    overrides change the architecture (``depth=2``, ``drop_path_rate=0.1``, ``img_size=224``);
    the checkpoint must fit the result. ``name`` may also be a Hugging Face model folder or hub id
    (or a flashdino safetensors file): the architecture is then read from it (``from_pretrained``).
    """
    if isinstance(name, (str, os.PathLike)) and os.fspath(name) not in VARIANTS:
        from .loading.sources import looks_like_pretrained_source

        if looks_like_pretrained_source(name) and weights is None:
            # A Hugging Face folder / hub id or a flashdino file: the architecture comes from it.
            from .loading import from_pretrained

            return from_pretrained(name, strict=strict, device=device, dtype=dtype, **overrides)
    cfg = get_config(name, **overrides)
    model = build_model(cfg)
    if weights is None and not pretrained:
        model.init_weights()
    else:
        from .loading import load_weights

        load_weights(model, weights if weights is not None else next(iter(cfg.weights.values()), None),
                     strict=strict)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _entry_point(variant: str):
    def build(pretrained: bool = False, weights: WeightsArg = None, **kwargs) -> DinoVisionTransformer:
        return create_model(variant, pretrained=pretrained, weights=weights, **kwargs)

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = f"The {variant} backbone (see ``flashdino.create_model`` for the arguments)."
    return build


ENTRY_POINTS = {name: _entry_point(name) for name in VARIANTS}

__all__ = ["create_model", "resolve_name", "ENTRY_POINTS"]

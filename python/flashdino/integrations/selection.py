"""Model selection in the style of downstream projects (tree-segmentation tools, distillation code).

    cfg = Config(model_name="large", prefer_plus=True, weights="dinov3_vitl16plus.pth")
    model = get_dinov3_model(cfg)

Sizes ("small", "base", "large", "giant", "mega") and names such as "dinov2_large" /
"dinov3_large" / "dinov3_vitl16" are resolved through :mod:`flashdino.variants` (the one variant
table); the prefix chooses the family. ``prefer_plus`` picks the SwiGLU "plus" variant of a size when
the table has one (vits16plus, vitl16plus, vith16plus) and falls back to the standard one when it
has none or when the given weights do not fit it. ``satellite=True`` picks the SAT-493M variant
(its own normalisation). Without weights the model is randomly initialised; the warning about
that is the factory's (one warning, not one per layer of wrappers).

Names that downstream documents use but that were never released (``dinov3_vitg16``,
``dinov3_vitl14``) get a "did you mean" error that also says how to build the architecture
anyway, with random weights, through overrides.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from ..variants import ALIASES, VARIANTS, VitConfig, resolve_name

logger = logging.getLogger("flashdino.integrations")

SIZES = ("small", "base", "large", "giant", "mega")


def _plus_of(name: str) -> Optional[str]:
    cfg = VARIANTS[name]
    if cfg.family != "dinov3" or name.endswith("plus") or "_sat" in name:
        return None
    cand = name + "plus"
    return cand if cand in VARIANTS else None


def _sat_of(name: str) -> Optional[str]:
    if name.endswith("_sat493m"):
        return name
    cand = name + "_sat493m"
    return cand if cand in VARIANTS else None


def _describe(cfg: VitConfig) -> dict:
    return {
        "name": cfg.name, "family": cfg.family, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "patch_size": cfg.patch_size, "ffn": cfg.ffn,
        "n_storage_tokens": cfg.n_storage_tokens, "image_mean": cfg.image_mean, "image_std": cfg.image_std,
        "weights": dict(cfg.weights), "plus": _plus_of(cfg.name), "satellite": _sat_of(cfg.name),
    }


def _build_configs() -> dict:
    """DINOv3 entries keyed by size name and by canonical name, all read from VARIANTS."""
    out = {}
    for size in SIZES:
        out[size] = _describe(VARIANTS[ALIASES[size]])
    for name, cfg in VARIANTS.items():
        if cfg.family == "dinov3":
            out[name] = _describe(cfg)
    return out


# Derived, never edited by hand: change flashdino/variants.py instead.
DINOV3_CONFIGS: dict = _build_configs()


@dataclass
class Config:
    """What :func:`get_dinov3_model` builds.

    model_name: a size ("small", "base", "large", "giant", "mega"), an alias ("dinov2_large",
      "dinov3_base") or a variant name ("dinov3_vitl16", "dinov2_vitb14_reg").
    weights: a checkpoint file, HF folder, hub id, weights tag or state dict; None = random init
      (unless ``pretrained``). pretrained: download the variant's default weights when no weights
      are given (falls back to random initialisation, loudly, when they cannot be had).
    overrides: architecture overrides (``{"depth": 2}``).
    """

    model_name: str = "base"
    prefer_plus: bool = False
    weights: Any = None
    satellite: bool = False
    pretrained: bool = False
    device: Optional[str] = None
    dtype: Optional[Union[str, torch.dtype]] = None
    freeze: bool = False
    allow_random: bool = True
    overrides: dict = field(default_factory=dict)


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16}
    key = str(value).replace("torch.", "").lower()
    if key not in table:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(table)}")
    return table[key]


def resolve_model_name(name: str) -> str:
    """:func:`flashdino.variants.resolve_name`, with a recipe for names that were never released."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    return resolve_name(name)  # names that were never released get their recipe there


def select_variant(model_name: str, prefer_plus: bool = False, satellite: bool = False) -> list[str]:
    """Candidate variant names, best first (the plus variant before the standard one when asked)."""
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    name = resolve_model_name(model_name)
    if satellite:
        sat = _sat_of(name)
        if sat is None:
            having = sorted(n[: -len("_sat493m")] for n in VARIANTS if n.endswith("_sat493m"))
            raise ValueError(
                f"{model_name!r} ({name}) has no SAT-493M satellite weights; satellite weights exist for {having}"
            )
        return [sat]
    candidates = []
    if prefer_plus:
        plus = _plus_of(name)
        if plus is not None:
            candidates.append(plus)
        elif not name.endswith("plus"):
            logger.info("no plus variant of %s; using the standard one", name)
    candidates.append(name)
    return candidates


def get_dinov3_model(config: Union[Config, Mapping, str, None] = None, **kwargs):
    """Builds the backbone a :class:`Config` (or a dict / model name plus keywords) describes."""
    from ..factory import create_model

    if config is None:
        config = Config(**kwargs)
    elif isinstance(config, str):
        config = Config(model_name=config, **kwargs)
    elif isinstance(config, Mapping):
        config = Config(**{**config, **kwargs})
    elif kwargs:
        raise TypeError("pass either a Config or keyword arguments, not both")
    candidates = select_variant(config.model_name, config.prefer_plus, config.satellite)
    overrides = dict(config.overrides or {})
    model = None
    errors = []
    for i, name in enumerate(candidates):
        last = i == len(candidates) - 1
        if config.weights is not None:
            try:
                model = create_model(name, weights=config.weights, **overrides)
            except Exception as exc:  # weights do not fit this (plus) variant: try the next
                if last:
                    raise
                errors.append(f"{name}: {exc}")
                warnings.warn(f"flashdino: weights do not fit {name} ({exc}); falling back to {candidates[i + 1]}",
                              stacklevel=2)
                continue
        elif config.pretrained:
            try:
                model = create_model(name, pretrained=True, **overrides)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
                if not last:
                    warnings.warn(f"flashdino: no weights available for {name} ({exc}); trying {candidates[i + 1]}",
                                  stacklevel=2)
                    continue
                if not config.allow_random:
                    raise
                # why there are no weights; that the model is random is the factory's warning
                warnings.warn(f"flashdino: pretrained weights unavailable ({'; '.join(errors)}); building {name} "
                              "without them. Pass weights=<checkpoint, HF folder or hub id>.", stacklevel=2)
                model = create_model(name, **overrides)
        else:
            if not config.allow_random:
                raise ValueError(f"no weights given for {name} and allow_random=False")
            model = create_model(name, **overrides)
        break
    assert model is not None
    if config.device is not None or config.dtype is not None:
        model = model.to(device=config.device, dtype=_dtype(config.dtype))
    if config.freeze:
        model.eval().requires_grad_(False)
    return model


def load_pretrained_weights(model, path_or_id, strict: bool = True):
    """Loads a checkpoint file, HF folder, hub id, weights tag or state dict into ``model``."""
    if path_or_id is None:
        raise ValueError("load_pretrained_weights: no checkpoint given (path_or_id is None)")
    if isinstance(path_or_id, (str, os.PathLike)) and not isinstance(path_or_id, str):
        path_or_id = os.fspath(path_or_id)
    from .. import loading

    if not hasattr(loading, "load_weights"):  # pragma: no cover - until the loaders land
        raise NotImplementedError("flashdino.loading.load_weights is not available in this build")
    result = loading.load_weights(model, path_or_id, strict=strict)
    return model if result is None else result


# -- reading the output dict of either family -----------------------------------------------------------
_EXTRA_KEYS = ("x_storage_tokens", "x_norm_regtokens")


def unify_output(out: Mapping[str, Tensor]) -> dict:
    """The output dict of a DINOv2 or DINOv3 ``forward_features`` read through the same keys.

    Adds ``x_norm_extratokens`` (= DINOv3 ``x_storage_tokens`` = DINOv2 ``x_norm_regtokens``), and
    short names ``cls_token``, ``patch_tokens``, ``register_tokens``, ``prenorm``; keeps the originals.
    A list of dicts (list input) gives a list.
    """
    if isinstance(out, (list, tuple)):
        return [unify_output(o) for o in out]
    if not isinstance(out, Mapping):
        raise TypeError(f"expected the dict of forward_features, got {type(out).__name__}")
    missing = [k for k in ("x_norm_clstoken", "x_norm_patchtokens") if k not in out]
    if missing:
        raise KeyError(f"not a DINOv2/DINOv3 output dict: missing {missing} (keys: {sorted(out)})")
    extra = next((out[k] for k in _EXTRA_KEYS if k in out), None)
    if extra is None:
        cls = out["x_norm_clstoken"]
        extra = cls.new_zeros(cls.shape[0], 0, cls.shape[-1])
    res = dict(out)
    res.update({
        "x_norm_extratokens": extra, "x_storage_tokens": extra, "x_norm_regtokens": extra,
        "cls_token": out["x_norm_clstoken"], "patch_tokens": out["x_norm_patchtokens"],
        "register_tokens": extra, "prenorm": out.get("x_prenorm"),
    })
    return res


__all__ = ["Config", "DINOV3_CONFIGS", "SIZES", "get_dinov3_model", "load_pretrained_weights", "resolve_model_name",
           "select_variant", "unify_output"]

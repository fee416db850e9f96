"""YAML configuration files for :class:`IntegratedModel` (``load_config`` / ``build_from_config``).

Schema (every key optional except ``backbone.name``; see configs/*.yaml for examples)::

    description: free text
    backbone:
      name: dinov3_vitb16        # variant name or alias ("base", "dinov2_large", ...)
      weights: null              # checkpoint file, HF folder, hub id or weights tag; null = random init
      pretrained: false          # download the variant's default weights when weights is null
      prefer_plus: false         # use the SwiGLU "plus" variant of the size when there is one
      satellite: false           # SAT-493M variant (own normalisation)
      overrides: {depth: 2}      # architecture overrides (VitConfig fields)
      dtype: float32             # float32 | bfloat16 | float16
      device: cpu                # cpu | cuda | cuda:1 ...
    aggregator:
      enabled: false             # build flashdino.Aggregator on top of the backbone
      aa_order: [frame, global]
      depth: 24
      num_heads: 16              # default: the backbone's
      aa_block_size: 1
      mlp_ratio: 4.0
      qk_norm: true
      rope_freq: 100
      init_values: 0.01
      intermediate_layer_idx: [4, 11, 17, 23]   # null = keep every layer
      patch_embed_chunk_size: null
      weights: null              # VGGT checkpoint for the aggregator
    preprocessing:
      size: null                 # int, [h, w] or null (keep size, crop to a patch multiple)
      resample: bilinear         # bilinear | bicubic | nearest
      antialias: true
      mean: [0.485, 0.456, 0.406]   # default: the variant's
      std: [0.229, 0.224, 0.225]

The layout of Spatial-MLLM-style DINOv3 projects is read too: everything under a top-level
``model:``, ``backbone.dinov3_model`` for ``backbone.name``, and architecture fields
(``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``n_storage_tokens``, any
VitConfig field) directly under ``backbone`` as well as under ``backbone.overrides``::

    model:
      backbone:
        dinov3_model: dinov3_vitl16
        patch_size: 16
        n_storage_tokens: 4
      aggregator:
        enabled: true
        aa_order: [frame, global]
        rope_freq: 100

Errors name the file and the key (``configs/x.yaml: backbone.nmae: unknown key; did you mean
'name'?``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Union

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))


def _int_list(v):
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _num_triple(v):
    return isinstance(v, list) and len(v) == 3 and all(isinstance(i, _NUM) and not isinstance(i, bool) for i in v)


def _size(v):
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (
        isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v))


# key -> (type check (tuple of types or predicate), human description, default)
SCHEMA: dict = {
    "description": ((str,), "a string", ""),
    "backbone": {
        "name": ((str,), "a model name", None),
        "weights": (_OPT_STR, "a path / hub id or null", None),
        "pretrained": ((bool,), "true or false", False),
        "prefer_plus": ((bool,), "true or false", False),
        "satellite": ((bool,), "true or false", False),
        "overrides": ((dict,), "a mapping of architecture fields", {}),
        "dtype": (lambda v: v is None or v in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                  "one of float32, bfloat16, float16", None),
        "device": (_OPT_STR, "a device string such as cpu or cuda", None),
    },
    "aggregator": {
        "enabled": ((bool,), "true or false", False),
        "aa_order": (lambda v: isinstance(v, list) and sorted(v) == ["frame", "global"],
                     "a list holding 'frame' and 'global' once each", ["frame", "global"]),
        "depth": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int", 24),
        "num_heads": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int", None),
        "aa_block_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int", 1),
        "mlp_ratio": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and v > 0, "a positive number", 4.0),
        "qk_norm": ((bool,), "true or false", True),
        "rope_freq": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool), "a number", 100),
        "init_values": (lambda v: v is None or (isinstance(v, _NUM) and not isinstance(v, bool)), "a number or null", 0.01),
        "intermediate_layer_idx": (lambda v: v is None or _int_list(v), "a list of ints or null", None),
        "patch_embed_chunk_size": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                                   "a positive int or null", None),
        "weights": (_OPT_STR, "a path or null", None),
    },
    "preprocessing": {
        "size": (_size, "a positive int, [height, width] or null", None),
        "resample": (lambda v: v in ("bilinear", "bicubic", "nearest"), "one of bilinear, bicubic, nearest", "bilinear"),
        "antialias": ((bool,), "true or false", True),
        "mean": (_num_triple, "a list of 3 numbers", None),
        "std": (lambda v: _num_triple(v) and all(i > 0 for i in v), "a list of 3 positive numbers", None),
    },
}
_REQUIRED = {("backbone", "name")}


class ConfigError(ValueError):
    """A YAML config file is missing, malformed or has a bad key / value; the message names them."""


def _unknown(origin: str, where: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{origin}: {where}{key}: unknown key{hint} (valid keys: {', '.join(sorted(known))})")


def _check(origin: str, key: str, value, rule) -> None:
    check, what, _ = rule
    ok = isinstance(value, check) and not (isinstance(value, bool) and bool not in check) if isinstance(check, tuple) \
        else bool(check(value))
    if not ok:
        raise ConfigError(f"{origin}: {key} must be {what}, got {value!r} ({type(value).__name__})")


def _arch_fields() -> set:
    import dataclasses

    from ..variants import VitConfig

    return {f.name for f in dataclasses.fields(VitConfig)} - {"name", "family", "weights"}


def _from_document_layout(data: dict, origin: str) -> dict:
    """The Spatial-MLLM-style spellings (see the module docstring) -> this schema's; same meaning."""
    if "model" in data:
        model = data["model"]
        if not isinstance(model, dict):
            raise ConfigError(f"{origin}: model must be a mapping, got {model!r} ({type(model).__name__})")
        both = sorted(set(model) & (set(data) - {"model"}))
        if both:
            raise ConfigError(f"{origin}: {', '.join(both)} given both at the top level and under model:; keep one")
        data = {**{k: v for k, v in data.items() if k != "model"}, **model}
    backbone = data.get("backbone")
    if not isinstance(backbone, dict):
        return data
    backbone = dict(backbone)
    if "dinov3_model" in backbone:
        alias = backbone.pop("dinov3_model")
        if "name" in backbone and backbone["name"] != alias:
            raise ConfigError(f"{origin}: backbone.name ({backbone['name']!r}) and backbone.dinov3_model ({alias!r}) "
                              "name the same thing; keep one")
        backbone["name"] = alias
    arch = {k: backbone.pop(k) for k in list(backbone) if k in _arch_fields() and k not in SCHEMA["backbone"]}
    if arch:
        overrides = backbone.get("overrides")
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{origin}: backbone.overrides must be a mapping of architecture fields, got "
                              f"{overrides!r} ({type(overrides).__name__})")
        overrides = dict(overrides or {})
        for k, v in arch.items():
            if k in overrides and overrides[k] != v:
                raise ConfigError(f"{origin}: backbone.{k} ({v!r}) and backbone.overrides.{k} ({overrides[k]!r}) "
                                  "disagree; keep one")
            overrides[k] = v
        backbone["overrides"] = overrides
    return {**data, "backbone": backbone}


def validate_config(data: Any, origin: str = "<config>") -> dict:
    """Checks a parsed config dict against :data:`SCHEMA`; returns it with defaults filled in."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    data = _from_document_layout(data, origin)
    out: dict = {}
    for key, value in data.items():
        if key not in SCHEMA:
            raise _unknown(origin, "", key, SCHEMA)
        rule = SCHEMA[key]
        if isinstance(rule, dict):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {key} must be a mapping, got {value!r} ({type(value).__name__})")
            for sub, subval in value.items():
                if sub not in rule:
                    raise _unknown(origin, f"{key}.", sub, set(rule) | (_arch_fields() if key == "backbone" else set()))
                _check(origin, f"{key}.{sub}", subval, rule[sub])
        else:
            _check(origin, key, value, rule)
    for section, rule in SCHEMA.items():
        if isinstance(rule, dict):
            given = data.get(section) or {}
            out[section] = {k: given.get(k, r[2]) for k, r in rule.items()}
        else:
            out[section] = data.get(section, rule[2])
    for section, key in _REQUIRED:
        if out[section].get(key) is None:
            raise ConfigError(f"{origin}: {section}.{key} is required (e.g. {section}:\\n  {key}: dinov3_vitb16)")
    # values that need the variant table
    from .selection import resolve_model_name

    try:
        resolve_model_name(out["backbone"]["name"])
    except ValueError as exc:
        raise ConfigError(f"{origin}: backbone.name: {exc}") from None
    fields = _arch_fields()
    for k in out["backbone"]["overrides"]:
        if k not in fields:
            raise _unknown(origin, "backbone.overrides.", k, fields)
    return out


def load_config(path: Union[str, os.PathLike]) -> dict:
    """Reads and validates a YAML config; errors name the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc})") from exc
    cfg = validate_config(data, str(path))
    cfg["_source"] = str(path)
    return cfg


def build_from_config(path_or_dict: Union[str, os.PathLike, dict]):
    """An :class:`IntegratedModel` (on the configured device / dtype, eval mode) from a YAML file or dict."""
    from .integrated import IntegratedModel
    from .selection import _dtype

    if isinstance(path_or_dict, dict):
        cfg = validate_config(path_or_dict, path_or_dict.get("_source", "<config>")) \
            if "_source" not in path_or_dict else path_or_dict
    else:
        cfg = load_config(path_or_dict)
    origin = cfg.get("_source", "<config>")
    bb, agg, pre = cfg["backbone"], cfg["aggregator"], cfg["preprocessing"]
    preprocessing = {k: v for k, v in (("size", pre["size"]), ("resample", pre["resample"]),
                                       ("antialias", pre["antialias"])) if v is not None}
    if isinstance(preprocessing.get("size"), list):
        preprocessing["size"] = tuple(preprocessing["size"])
    if pre["mean"] is not None:
        preprocessing["image_mean"] = tuple(pre["mean"])
    if pre["std"] is not None:
        preprocessing["image_std"] = tuple(pre["std"])
    agg_kwargs = {k: v for k, v in agg.items() if k not in ("enabled", "aa_order", "weights") and v is not None}
    if agg["intermediate_layer_idx"] is None:
        agg_kwargs.pop("intermediate_layer_idx", None)
    try:
        model = IntegratedModel(
            bb["name"], use_aggregator=agg["enabled"], aa_order=agg["aa_order"], weights=bb["weights"],
            aggregator_kwargs=agg_kwargs if agg["enabled"] else None,
            aggregator_weights=agg["weights"] if agg["enabled"] else None,
            preprocessing=preprocessing, prefer_plus=bb["prefer_plus"], satellite=bb["satellite"],
            pretrained=bb["pretrained"], **bb["overrides"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    if bb["device"] is not None or bb["dtype"] is not None:
        model = model.to(device=bb["device"], dtype=_dtype(bb["dtype"]))
    return model.eval()


__all__ = ["SCHEMA", "ConfigError", "load_config", "validate_config", "build_from_config"]

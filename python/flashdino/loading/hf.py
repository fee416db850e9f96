"""Hugging Face model folders: config.json -> VitConfig, model.safetensors -> canonical state dict.

A folder written by transformers' ``save_pretrained`` (or a hub snapshot) holds ``config.json``,
``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or a legacy
``pytorch_model.bin``) and usually ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..variants import LIMITS, SAT_MEAN, VARIANTS, VitConfig
from .errors import CheckpointError
from .files import read_state_dict

HF_MODEL_TYPES = ("dinov3_vit", "dinov2", "dinov2_with_registers")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc}); the file is corrupt") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _get(config: dict, key: str, kind, where: str, default=None, required: bool = True):
    if key not in config or config[key] is None:
        if required and default is None:
            raise CheckpointError(f"{where}: missing key {key!r}")
        return default
    value = config[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise CheckpointError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _square(value, key: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1] or not all(isinstance(v, int) for v in value):
            raise CheckpointError(f"{where}: {key!r} = {value!r}; flashdino supports square sizes only")
        return int(value[0])
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _swiglu_ratio(dim: int, hidden: int, align: int) -> Optional[float]:
    """An ffn_ratio for which VitConfig's SwiGLU rounding gives exactly ``hidden``."""
    base = int(hidden * 3 / 2)
    for h0 in [base] + [base + d for d in range(-8, 9) if d]:
        if h0 > 0 and -(-int(h0 * 2 / 3) // align) * align == hidden:
            ratio = h0 / dim
            if int(dim * ratio) == h0:
                return ratio
    return None


def config_from_hf(config: dict, preprocessor: Optional[dict] = None, hint: str = "",
                   where: str = CONFIG_NAME) -> VitConfig:
    """A VitConfig from a transformers config dict; the named variant when the dimensions agree."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not a DINOv2/DINOv3 ViT (expected one of {', '.join(HF_MODEL_TYPES)})"
        )
    D = _get(config, "hidden_size", int, where)
    depth = _get(config, "num_hidden_layers", int, where)
    heads = _get(config, "num_attention_heads", int, where)
    for key, value, low in (("hidden_size", D, 1), ("num_hidden_layers", depth, 0), ("num_attention_heads", heads, 1)):
        if value < low:
            raise CheckpointError(f"{where}: {key} = {value} must be at least {low}")
    if D % heads:
        raise CheckpointError(f"{where}: hidden_size {D} must be a multiple of num_attention_heads {heads}")
    patch = _square(config.get("patch_size", 16 if model_type == "dinov3_vit" else 14), "patch_size", where)
    img = _square(config.get("image_size", 224 if model_type == "dinov3_vit" else 518), "image_size", where)
    in_chans = _get(config, "num_channels", int, where, default=3)
    eps = _get(config, "layer_norm_eps", float, where, default=1e-5 if model_type == "dinov3_vit" else 1e-6)
    ls = _get(config, "layerscale_value", float, where, default=1.0)
    act = _get(config, "hidden_act", str, where, default="gelu")
    fields: dict = dict(embed_dim=D, depth=depth, num_heads=heads, patch_size=patch, img_size=img, in_chans=in_chans,
                        layer_norm_eps=eps, layerscale_init=ls, drop_path_rate=0.0)
    if model_type == "dinov3_vit":
        gated = _get(config, "use_gated_mlp", bool, where, default=False)
        hidden = _get(config, "intermediate_size", int, where)
        expected_act = "silu" if gated else "gelu"
        if act != expected_act:
            raise CheckpointError(f"{where}: hidden_act {act!r} with use_gated_mlp={gated} is not supported "
                                  f"(DINOv3 uses {expected_act!r})")
        qb = _get(config, "query_bias", bool, where, default=True)
        vb = _get(config, "value_bias", bool, where, default=True)
        if qb != vb:
            raise CheckpointError(f"{where}: query_bias={qb} but value_bias={vb}; flashdino needs both or neither")
        fields.update(family="dinov3", ffn="swiglu" if gated else "mlp",
                      n_storage_tokens=_get(config, "num_register_tokens", int, where, default=0),
                      rope_base=_get(config, "rope_theta", float, where, default=100.0),
                      qkv_bias=qb or _get(config, "key_bias", bool, where, default=False),
                      proj_bias=_get(config, "proj_bias", bool, where, default=True),
                      ffn_bias=_get(config, "mlp_bias", bool, where, default=True))
        if gated:
            for align in ((64, 8, 1) if D >= 4096 else (8, 1)):
                ratio = _swiglu_ratio(D, hidden, align)
                if ratio is not None:
                    break
            else:
                raise CheckpointError(f"{where}: intermediate_size {hidden} cannot be represented for hidden_size {D}")
            fields.update(ffn_ratio=ratio, swiglu_align=align)
        else:
            fields.update(ffn_ratio=hidden / D)
    else:
        reg = model_type == "dinov2_with_registers"
        swiglu = _get(config, "use_swiglu_ffn", bool, where, default=False)
        if act != "gelu" and not swiglu:  # transformers' DINOv2 SwiGLU always uses SiLU
            raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (DINOv2 uses 'gelu')")
        fields.update(family="dinov2", ffn="swiglu_fused" if swiglu else "mlp",
                      ffn_ratio=_get(config, "mlp_ratio", float, where, default=4.0),
                      n_storage_tokens=_get(config, "num_register_tokens", int, where, default=4) if reg else 0,
                      qkv_bias=_get(config, "qkv_bias", bool, where, default=True),
                      interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg)
    for key, value in fields.items():
        if key in LIMITS and isinstance(value, (int, float)) and not LIMITS[key][0] <= value <= LIMITS[key][1]:
            low, high = LIMITS[key]
            raise CheckpointError(f"{where}: {HF_KEYS.get(key, key)} = {value!r} is outside the supported range "
                                  f"[{low}, {high}]; the file is damaged or not a DINOv2/DINOv3 config")
    if preprocessor:
        for key, target in (("image_mean", "image_mean"), ("image_std", "image_std")):
            values = preprocessor.get(key)
            if isinstance(values, (list, tuple)) and len(values) == in_chans:
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise CheckpointError(f"{PREPROCESSOR_NAME}: {key} must be a list of numbers, got {values!r}")
                fields[target] = tuple(float(v) for v in values)
    name = match_variant(fields, hint)
    if name:
        base = VARIANTS[name]
        # HF checkpoints carry no local_cls_norm (training only): build without it.
        keep = {k: v for k, v in fields.items() if k not in ("ffn_ratio", "swiglu_align")}
        cfg = base.replace(**keep, local_cls_norm=False)
    else:
        name = f"{fields['family']}_hf_custom"
        cfg = VitConfig(name=name, **fields)
    try:
        return cfg.validate()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def match_variant(fields: dict, hint: str = "") -> Optional[str]:
    """Name of the table variant with these dimensions (SAT weights chosen by name or mean)."""
    probe = VitConfig(name="probe", **{k: v for k, v in fields.items()})
    found = []
    for name, v in VARIANTS.items():
        if (v.family, v.embed_dim, v.depth, v.num_heads, v.ffn, v.patch_size, v.n_storage_tokens, v.qkv_bias) != \
                (probe.family, probe.embed_dim, probe.depth, probe.num_heads, probe.ffn, probe.patch_size,
                 probe.n_storage_tokens, probe.qkv_bias):
            continue
        if v.ffn_hidden != probe.ffn_hidden:
            continue
        found.append(name)
    if len(found) > 1:
        sat = "sat493m" in hint.lower() or tuple(round(m, 3) for m in probe.image_mean) == SAT_MEAN
        pick = [n for n in found if n.endswith("_sat493m") == sat]
        found = pick or found
    return found[0] if found else None


def shard_names(index: Path) -> list:
    """The shard files a ``model.safetensors.index.json`` lists: plain file names in its own folder.

    A name with a folder part (``../x``, ``/abs/x``, ``sub/x``) could read files outside the model
    folder, so it is refused, as is anything that is not a string.
    """
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: missing key 'weight_map' (a JSON object mapping tensor names to shard files)")
    names = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a file name (a string), got {shard!r}")
        plain = shard and shard not in (".", "..") and "\x00" not in shard and \
            os.path.basename(shard) == shard and "/" not in shard and "\\" not in shard
        if not plain:
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {shard!r} is not a plain file name; shards must "
                                  "lie in the model folder itself (no folder part, no '..', no absolute path)")
        names.add(shard)
    return sorted(names)


def _read_weights(folder: Path) -> dict:
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return read_state_dict(single)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        sd: dict = {}
        for shard in shard_names(index):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index} lists shard {shard}, which is missing from {folder}")
            sd.update(read_state_dict(shard_path))
        return sd
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        return read_state_dict(legacy)
    raise CheckpointError(
        f"{folder} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME} / {LEGACY_WEIGHTS_NAME}): "
        "not a complete Hugging Face model folder"
    )


def read_hf_folder_raw(path: Union[str, os.PathLike]) -> tuple:
    """(config dict, raw HF state dict, preprocessor dict or None) of a model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}: not a Hugging Face model folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    config = _read_json(cfg_path)
    pre_path = folder / PREPROCESSOR_NAME
    pre = _read_json(pre_path) if pre_path.is_file() else None
    sd = _read_weights(folder)
    return config, sd, pre


# VitConfig field -> the config.json key that sets it (for messages in the file's own terms).
HF_KEYS = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
           "ffn_hidden": "intermediate_size", "ffn": "use_gated_mlp / use_swiglu_ffn", "qkv_bias": "query_bias",
           "proj_bias": "proj_bias", "ffn_bias": "mlp_bias", "patch_size": "patch_size", "img_size": "image_size",
           "n_storage_tokens": "num_register_tokens", "in_chans": "num_channels", "layer_norm_eps": "layer_norm_eps",
           "rope_base": "rope_theta", "family": "model_type", "ffn_ratio": "intermediate_size / mlp_ratio",
           "layerscale_init": "layerscale_value"}


def check_config_against(config: dict, cfg: VitConfig, where: str, preprocessor: Optional[dict] = None) -> list:
    """Every architecture field of an HF config that differs from the model ``cfg`` (one line each).

    Raises :class:`CheckpointError` when the config is not a supported DINOv2 / DINOv3 config at all.
    """
    described = config_from_hf(config, preprocessor, where=where)
    problems = []
    for name, theirs, mine in described.architecture_differences(cfg):
        key = HF_KEYS.get(name, name)
        problems.append(f"{key} = {_hf_value(config, key, theirs)} but {cfg.name} has {name} = {mine!r}")
    return [f"{where}: {p}" for p in problems]


def _hf_value(config: dict, key: str, fallback):
    return repr(config[key]) if key in config else repr(fallback)
def tensor_dims(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}

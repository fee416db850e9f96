"""Reading a checkpoint for a configuration, strict matching with a readable report, and loading
into an existing model.

Nothing here builds a model: :func:`read_checkpoint` returns the configuration, the canonical state
dict and the preprocessing config, checked against each other; ``flashdino.factory`` builds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..variants import VARIANTS, VitConfig, get_config
from .errors import CheckpointError, Fix
from .files import check_floating, warn_non_finite
from .formats import Canonical, canonicalize, describe_arch, guess_variants
from .hf import CONFIG_NAME, check_config_against, config_from_hf, read_hf_folder_raw
from .layout import canonical_shapes
from .sources import Source, download_hub, is_hub_id, resolve

_SHOW = 5
FLASHDINO_FORMAT = "flashdino"


@dataclass
class LoadReport:
    """What happened while matching a checkpoint to a model."""

    origin: str
    format: str
    model: str
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    notes: list = field(default_factory=list)
    hints: list = field(default_factory=list)
    fix: Optional[Fix] = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = []
        lines.extend(self.hints)
        if self.mismatched:
            shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:_SHOW])
            more = f" (+{len(self.mismatched) - _SHOW} more)" if len(self.mismatched) > _SHOW else ""
            lines.append(f"{len(self.mismatched)} keys with a different shape: {shown}{more}")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                lines.append(f"{len(keys)} {label} keys: {', '.join(keys[:_SHOW])}{more}")
        return "\n  ".join(lines)

    def __str__(self) -> str:
        head = f"{self.origin} ({self.format}) -> {self.model}: " + ("ok" if self.ok else "problems")
        body = self.summary()
        return head + (":\n  " + body if body else "")


def expected_shapes(cfg_or_model) -> dict:
    """{key: shape} of a model's state dict (from the layout table when given a config)."""
    if isinstance(cfg_or_model, nn.Module):
        return {k: tuple(v.shape) for k, v in cfg_or_model.state_dict().items()}
    return canonical_shapes(cfg_or_model)


_ARCH_KEYS = ("embed_dim", "depth", "ffn", "family", "n_storage_tokens", "patch_size")


def _variant_hint(canon: Canonical, cfg: VitConfig, config_origin: Optional[str]) -> tuple:
    """(hint lines, Fix) explaining a mismatch between the checkpoint's tensors and ``cfg``."""
    arch = canon.arch
    model_arch = {k: getattr(cfg, k) for k in _ARCH_KEYS}
    if all(arch.get(k, model_arch[k]) == model_arch[k] for k in _ARCH_KEYS):
        grid = arch.get("pos_grid")
        if grid and cfg.family == "dinov2" and grid != cfg.img_size // cfg.patch_size:
            return ([f"the checkpoint's position table is for a {grid}x{grid} patch grid (img_size "
                     f"{grid * cfg.patch_size}) but the model has img_size {cfg.img_size}"],
                    Fix(model=cfg.name if cfg.name in VARIANTS else None, overrides={"img_size": grid * cfg.patch_size}))
        return [], None
    ckpt, mine = describe_arch(arch), describe_arch(model_arch)
    if config_origin is not None:
        # The configuration came with the weights: they contradict each other, no name can fix that.
        return [f"{config_origin} describes {mine} but the weights are {ckpt}: the configuration and the "
                "weights do not belong together (a damaged or mixed-up download)"], None
    names = guess_variants(arch)
    if names:
        return [f"checkpoint looks like {names[0]} ({ckpt}) but the model is {cfg.name} ({mine})"], Fix(model=names[0])
    overrides = {}
    for k in ("embed_dim", "depth", "num_heads", "ffn", "n_storage_tokens"):
        v = arch.get(k)
        if v is not None and v != getattr(cfg, k):
            overrides[k] = v
    heads = " (set num_heads too)" if "embed_dim" in overrides and "num_heads" not in overrides else ""
    base = cfg.name if cfg.name in VARIANTS else None
    return [f"checkpoint ({ckpt}) matches no named variant and not the model {cfg.name} ({mine}){heads}"], \
        Fix(model=base, overrides=overrides)


def match_state_dict(canon: Canonical, cfg: VitConfig, expected: dict, origin: str,
                     config_origin: Optional[str] = None) -> LoadReport:
    report = LoadReport(origin=origin, format=canon.format, model=cfg.name, notes=list(canon.notes))
    sd = canon.state_dict
    report.missing = [k for k in expected if k not in sd]
    report.unexpected = [k for k in sd if k not in expected]
    report.mismatched = [(k, tuple(sd[k].shape), expected[k]) for k in expected
                         if k in sd and tuple(sd[k].shape) != expected[k]]
    if not report.ok:
        report.hints, report.fix = _variant_hint(canon, cfg, config_origin)
    return report


def raise_for_report(report: LoadReport, strict: bool) -> None:
    fatal = report.mismatched or (strict and (report.missing or report.unexpected))
    if fatal:
        fix = report.fix or (None if report.mismatched else Fix(not_strict=True))
        raise CheckpointError(f"cannot load {report.origin} ({report.format}) into {report.model}:\n  "
                              f"{report.summary()}", fix)


def _config_fits(src: Source, cfg: VitConfig) -> None:
    """A configuration shipped with the weights must describe the model they are loaded into."""
    if src.hf_config is not None:
        problems = check_config_against(src.hf_config, cfg, os.path.join(src.origin, CONFIG_NAME), src.preprocessor)
    elif src.metadata.get("format") == FLASHDINO_FORMAT and "config" in src.metadata:
        stored = config_from_json(src.metadata["config"], src.origin)
        problems = [f"{src.origin}: its stored configuration has {name} = {theirs!r} but {cfg.name} has {mine!r}"
                    for name, theirs, mine in stored.architecture_differences(cfg)]
    else:
        return
    if problems:
        raise CheckpointError(f"{src.origin} does not fit {cfg.name}: " + "; ".join(problems), Fix(from_config=True))


def load_weights(model: nn.Module, source, strict: bool = True) -> LoadReport:
    """Loads weights from any supported source into a flashdino backbone; returns a :class:`LoadReport`.

    ``source``: an official .pth (DINOv2 / DINOv3, ``bias_mask`` folded, periods kept), a flashdino
    safetensors file, a timm or transformers state dict file, a Hugging Face model folder or hub id,
    a weights tag of the variant (``"lvd1689m"``), a URL, or an in-memory state dict.
    Shape mismatches always raise :class:`CheckpointError`; missing / unexpected keys raise when
    ``strict`` (the message lists them and guesses the checkpoint's variant).
    """
    cfg: VitConfig = model.cfg
    return load_source(model, resolve(source, cfg.weights, cfg.name), strict)


def load_source(model: nn.Module, src: Source, strict: bool = True) -> LoadReport:
    """Loads already-read tensors (:func:`sources.resolve`) into ``model``."""
    cfg: VitConfig = model.cfg
    canon, report = _canonical_for(src, cfg, expected_shapes(model), strict, check_config=True)
    return apply_state_dict(model, canon, report, src)


def apply_state_dict(model: nn.Module, canon: Canonical, report: LoadReport, src: Source) -> LoadReport:
    wanted = {k: v for k, v in canon.state_dict.items() if k not in report.unexpected}
    with torch.no_grad():
        model.load_state_dict(wanted, strict=False)
    if hasattr(model, "_pos_cache"):
        model._pos_cache.clear()
    model.weights_source = src.origin
    model.preprocessor_config = src.preprocessor
    return report


def _canonical_for(src: Source, cfg: VitConfig, expected: dict, strict: bool, *, check_config: bool,
                   config_origin: Optional[str] = None) -> tuple:
    if check_config:  # cfg did not come from the source: the source's own config must agree with it
        _config_fits(src, cfg)
    check_floating(src.state_dict, src.origin)
    warn_non_finite(src.state_dict, src.origin)
    canon = canonicalize(src.state_dict, cfg)
    report = match_state_dict(canon, cfg, expected, src.origin, config_origin)
    if src.metadata.get("format") == FLASHDINO_FORMAT:
        report.format = FLASHDINO_FORMAT  # its keys are the official ones, but the file is flashdino's
    raise_for_report(report, strict)
    return canon, report


# ---------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read for a configuration: everything needed to build and fill a model."""

    cfg: VitConfig
    canonical: Canonical
    report: LoadReport
    source: Source

    @property
    def state_dict(self) -> dict:
        return self.canonical.state_dict

    @property
    def preprocessor(self) -> Optional[dict]:
        return self.source.preprocessor


def read_checkpoint(source, cfg: Optional[VitConfig] = None, *, strict: bool = True, hint: str = "",
                    **overrides) -> Checkpoint:
    """Reads ``source`` and checks it against ``cfg`` (or against the configuration it carries).

    With ``cfg`` (a named variant), a configuration shipped with the weights (HF ``config.json``,
    flashdino metadata) must agree with it field by field. Without, the configuration comes from the
    source (plus ``overrides``). Either way the tensors are checked against the configuration's
    layout before anything is allocated.
    """
    if isinstance(source, Source):
        src = source
    elif cfg is not None:
        src = resolve(source, cfg.weights, cfg.name)
    else:
        src = resolve(source)
    config_origin, named = None, cfg is not None
    if cfg is None:
        cfg = config_for_source(src, hint=hint or str(source))
        if overrides:
            cfg = cfg.replace(**overrides).validate()
        if overrides:
            pass  # a mismatch may come from the overrides: the usual report, with its advice
        elif src.hf_config is not None:
            config_origin = os.path.join(src.origin, CONFIG_NAME)
        elif src.metadata.get("format") == FLASHDINO_FORMAT and "config" in src.metadata:
            config_origin = f"the configuration stored in {src.origin}"
    canon, report = _canonical_for(src, cfg, canonical_shapes(cfg), strict, check_config=named,
                                   config_origin=config_origin)
    return Checkpoint(cfg, canon, report, src)


def read_hf_folder(path: Union[str, os.PathLike]) -> tuple:
    """``(VitConfig, canonical state dict, preprocessor dict or None)`` of a Hugging Face model folder
    (or hub id, downloaded through the huggingface_hub cache).

    The state dict is in flashdino's canonical layout (``model.load_state_dict`` accepts it) and
    holds the official bf16-rounded RoPE periods for DINOv3 (HF recomputes them in fp32).
    Raises :class:`CheckpointError` naming the file and key for missing or malformed files.
    """
    folder = Path(path)
    if not folder.exists() and is_hub_id(str(path)):
        folder = download_hub(str(path))
    config, raw, pre = read_hf_folder_raw(folder)
    ckpt = read_checkpoint(Source(raw, str(folder), hf_config=config, preprocessor=pre), hint=str(path))
    return ckpt.cfg, ckpt.state_dict, pre


# ---------------------------------------------------------------------------------------------------


def config_to_json(cfg: VitConfig) -> str:
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "weights"}
    return json.dumps(data, sort_keys=True)


def config_from_json(text: str, origin: str) -> VitConfig:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: malformed flashdino config metadata ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{origin}: malformed flashdino config metadata (not a JSON object)")
    known = {f.name for f in dataclasses.fields(VitConfig)}
    data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known and k != "weights"}
    try:
        cfg = VitConfig(**data)
        if cfg.name in VARIANTS:
            cfg = cfg.replace(weights=VARIANTS[cfg.name].weights)
        return cfg.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{origin}: invalid flashdino config metadata ({exc})") from exc


def config_for_source(src: Source, hint: str = "") -> VitConfig:
    """The architecture a checkpoint describes: its HF config, its flashdino metadata, or its keys."""
    if src.hf_config is not None:
        return config_from_hf(src.hf_config, src.preprocessor, hint=hint or src.origin,
                              where=os.path.join(src.origin, CONFIG_NAME))
    if src.metadata.get("format") == FLASHDINO_FORMAT and "config" in src.metadata:
        return config_from_json(src.metadata["config"], src.origin)
    if src.metadata.get("variant") in VARIANTS:
        return get_config(src.metadata["variant"])
    check_floating(src.state_dict, src.origin)
    probe = canonicalize(src.state_dict, get_config("dinov3_vits16"))
    names = guess_variants(probe.arch)
    has_local = "local_cls_norm.weight" in probe.state_dict and probe.format.startswith("official")
    names = [n for n in names if VARIANTS[n].local_cls_norm == has_local] or names
    if "sat493m" in (hint or src.origin).lower():
        names = [n for n in names if n.endswith("_sat493m")] or names
    else:
        names = [n for n in names if not n.endswith("_sat493m")] or names
    if len(names) >= 1 and (len(names) == 1 or len({n.replace("_sat493m", "") for n in names}) == 1):
        cfg = get_config(names[0])
        grid = probe.arch.get("pos_grid")
        if grid and cfg.family == "dinov2" and grid * cfg.patch_size != cfg.img_size:
            cfg = cfg.replace(img_size=grid * cfg.patch_size)
        return cfg
    raise CheckpointError(
        f"cannot tell which model {src.origin} is ({describe_arch(probe.arch)}; candidates: {names or 'none'})",
        _nearest_variant(probe.arch) if not names else Fix(name_needed=True))


def _nearest_variant(arch: dict) -> Fix:
    """A variant that the checkpoint fits with a different depth (a truncated or test model)."""
    keys = ("family", "embed_dim", "ffn", "patch_size", "n_storage_tokens")
    for cfg in VARIANTS.values():
        if all(arch.get(k, getattr(cfg, k)) == getattr(cfg, k) for k in keys) and "embed_dim" in arch:
            return Fix(model=cfg.name, overrides={"depth": arch.get("depth", cfg.depth)})
    return Fix(name_needed=True)

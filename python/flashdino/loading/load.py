"""Strict loading with a readable report, and ``from_pretrained``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..variants import VitConfig
from .errors import CheckpointError
from .formats import Canonical, canonicalize, describe_arch, guess_variants
from .sources import Source, resolve

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
    """{key: shape} of a model's state dict (built on the meta device when given a config)."""
    if isinstance(cfg_or_model, nn.Module):
        return {k: tuple(v.shape) for k, v in cfg_or_model.state_dict().items()}
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(cfg_or_model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _variant_hint(canon: Canonical, cfg: VitConfig) -> list:
    arch = canon.arch
    model_arch = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "ffn": cfg.ffn, "family": cfg.family,
                  "n_storage_tokens": cfg.n_storage_tokens, "patch_size": cfg.patch_size}
    keys = ("embed_dim", "depth", "ffn", "family", "n_storage_tokens", "patch_size")
    if all(arch.get(k, model_arch[k]) == model_arch[k] for k in keys):
        grid = arch.get("pos_grid")
        if grid and cfg.family == "dinov2" and grid != cfg.img_size // cfg.patch_size:
            return [f"the checkpoint's position table is for a {grid}x{grid} patch grid (img_size "
                    f"{grid * cfg.patch_size}) but the model has img_size {cfg.img_size}; build it with "
                    f"img_size={grid * cfg.patch_size}"]
        return []
    ckpt = describe_arch(arch)
    mine = describe_arch(model_arch)
    names = guess_variants(arch)
    if names:
        return [f"checkpoint looks like {names[0]} ({ckpt}) but the model is {cfg.name} ({mine}); use "
                f"flashdino.create_model({names[0]!r}, weights=...)"]
    overrides = []
    for k, v in (("embed_dim", arch.get("embed_dim")), ("depth", arch.get("depth")),
                 ("num_heads", arch.get("num_heads")), ("ffn", arch.get("ffn")),
                 ("n_storage_tokens", arch.get("n_storage_tokens"))):
        if v is not None and v != getattr(cfg, k):
            overrides.append(f"{k}={v!r}")
    return [f"checkpoint ({ckpt}) matches no named variant and not the model {cfg.name} ({mine}); build a "
            f"matching model, e.g. flashdino.create_model({cfg.name!r}, {', '.join(overrides)}, weights=...)"
            + (" (set num_heads too)" if "num_heads" not in " ".join(overrides) else "")]


def match_state_dict(canon: Canonical, cfg: VitConfig, expected: dict, origin: str) -> LoadReport:
    report = LoadReport(origin=origin, format=canon.format, model=cfg.name, notes=list(canon.notes))
    sd = canon.state_dict
    report.missing = [k for k in expected if k not in sd]
    report.unexpected = [k for k in sd if k not in expected]
    report.mismatched = [(k, tuple(sd[k].shape), expected[k]) for k in expected
                         if k in sd and tuple(sd[k].shape) != expected[k]]
    if not report.ok:
        report.hints = _variant_hint(canon, cfg)
    return report


def _raise(report: LoadReport, strict: bool) -> None:
    fatal = report.mismatched or (strict and (report.missing or report.unexpected))
    if fatal:
        tail = "" if report.mismatched else "\n  (pass strict=False to load the matching keys only)"
        raise CheckpointError(f"cannot load {report.origin} ({report.format}) into {report.model}:\n  "
                              f"{report.summary()}{tail}")


def _check_hf_config(src: Source, cfg: VitConfig, strict: bool) -> None:
    if src.hf_config is None:
        return
    from .hf import check_config_against

    problems = check_config_against(src.hf_config, cfg, f"{src.origin}/config.json")
    if problems and strict:
        raise CheckpointError(f"{src.origin} does not fit {cfg.name}: " + "; ".join(problems) +
                              " (use flashdino.from_pretrained(folder) to build the model from its config)")


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
    _check_hf_config(src, cfg, strict)
    canon = canonicalize(src.state_dict, cfg)
    report = match_state_dict(canon, cfg, expected_shapes(model), src.origin)
    _raise(report, strict)
    wanted = {k: v for k, v in canon.state_dict.items() if k not in report.unexpected}
    with torch.no_grad():
        model.load_state_dict(wanted, strict=False)
    if hasattr(model, "_pos_cache"):
        model._pos_cache.clear()
    model.weights_source = src.origin
    if src.preprocessor is not None:
        model.preprocessor_config = src.preprocessor
    return report


# ---------------------------------------------------------------------------------------------------


def config_to_json(cfg: VitConfig) -> str:
    import dataclasses

    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "weights"}
    return json.dumps(data, sort_keys=True)


def config_from_json(text: str, origin: str) -> VitConfig:
    import dataclasses

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{origin}: malformed flashdino config metadata ({exc})") from exc
    known = {f.name for f in dataclasses.fields(VitConfig)}
    data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    try:
        cfg = VitConfig(**data)
    except TypeError as exc:
        raise CheckpointError(f"{origin}: incomplete flashdino config metadata ({exc})") from exc
    from ..variants import VARIANTS

    if cfg.name in VARIANTS:
        cfg = cfg.replace(weights=VARIANTS[cfg.name].weights)
    return cfg.validate()


def config_for_source(src: Source, hint: str = "") -> VitConfig:
    """The architecture a checkpoint describes: its HF config, its flashdino metadata, or its keys."""
    from ..variants import get_config

    if src.hf_config is not None:
        from .hf import config_from_hf

        return config_from_hf(src.hf_config, src.preprocessor, hint=hint or src.origin,
                              where=os.path.join(src.origin, "config.json"))
    if src.metadata.get("format") == FLASHDINO_FORMAT and "config" in src.metadata:
        return config_from_json(src.metadata["config"], src.origin)
    if src.metadata.get("variant"):
        return get_config(src.metadata["variant"])
    probe = canonicalize(src.state_dict, get_config("dinov3_vits16"))
    names = guess_variants(probe.arch)
    from ..variants import VARIANTS

    has_local = "local_cls_norm.weight" in probe.state_dict and probe.format.startswith("official")
    names = [n for n in names if VARIANTS[n].local_cls_norm == has_local] or names
    if "sat493m" in (hint or src.origin).lower():
        names = [n for n in names if n.endswith("_sat493m")] or names
    else:
        names = [n for n in names if not n.endswith("_sat493m")] or names
    if len(names) >= 1 and (len(names) == 1 or len({n.replace("_sat493m", "") for n in names}) == 1):
        name = names[0]
        cfg = get_config(name)
        grid = probe.arch.get("pos_grid")
        if grid and cfg.family == "dinov2" and grid * cfg.patch_size != cfg.img_size:
            cfg = cfg.replace(img_size=grid * cfg.patch_size)
        return cfg
    raise CheckpointError(
        f"cannot tell which model {src.origin} is ({describe_arch(probe.arch)}; candidates: {names or 'none'}); "
        "pass a model name, e.g. flashdino.create_model(NAME, weights=...)"
    )


def from_pretrained(source, *, strict: bool = True, device=None, dtype=None, **overrides):
    """Builds a backbone from a Hugging Face folder / hub id (its config.json) or a flashdino file, and
    loads its weights. ``overrides`` change configuration fields (e.g. ``drop_path_rate=0.1``).
    A variant name (``"dinov3_vitl16"``) means ``create_model(name, pretrained=True)``.

    The model gets ``preprocessor_config`` (the folder's preprocessor_config.json, when present).
    """
    from ..models import build_model
    from ..variants import VARIANTS

    from .sources import looks_like_pretrained_source

    if isinstance(source, str) and not looks_like_pretrained_source(source):
        from ..variants import ALIASES

        if source in VARIANTS or source.lower() in ALIASES:  # a model name: its default weights
            from ..factory import create_model

            return create_model(source, pretrained=True, strict=strict, device=device, dtype=dtype, **overrides)
    src = resolve(source)
    cfg = config_for_source(src, hint=str(source))
    if overrides:
        cfg = cfg.replace(**overrides).validate()
    model = build_model(cfg)
    load_source(model, src, strict=strict)
    model.preprocessor_config = src.preprocessor
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model

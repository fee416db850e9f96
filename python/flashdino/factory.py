"""Model construction: ``create_model``, ``from_pretrained`` and one entry point per variant.

The one place that builds models. Weights are read and checked by :mod:`flashdino.loading` first
(which returns the configuration, the canonical state dict and the preprocessing config), so a
missing file, a mismatched config or an absurd size is reported before any model memory exists.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Union

import torch
from torch.overrides import TorchFunctionMode

from .loading import Checkpoint, read_checkpoint
from .loading.load import apply_state_dict
from .loading.sources import looks_like_pretrained_source
from .models import DinoVisionTransformer, build_model
from .variants import ALIASES, VARIANTS, VitConfig, get_config, resolve_name

WeightsArg = Union[str, os.PathLike, dict, None]


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights (no ``weights=`` and ``pretrained=False``).

    Shown once per call site and variant (Python's default warning filter); silence it with
    ``warnings.filterwarnings("ignore", category=flashdino.RandomWeightsWarning)``.
    """


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside flashdino."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("flashdino", "hubconf"):
        frame, level = frame.f_back, level + 1
    return level


def _warn_random(cfg: VitConfig) -> None:
    warnings.warn(f"{cfg.name} has RANDOM weights (no weights= and pretrained=False), so its outputs are "
                  "meaningless; pass weights=PATH | HUB_ID | TAG or pretrained=True for real features",
                  RandomWeightsWarning, stacklevel=_user_stacklevel())


def _finish(model: DinoVisionTransformer, device, dtype) -> DinoVisionTransformer:
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


class _SkipRandomInit(TorchFunctionMode):
    """Module constructors leave their parameters uninitialised (the random draws are skipped).

    For a checkpoint that provides every tensor: drawing random values only to overwrite them takes
    ~1 s for a ViT-L on 2 cores. A mode rather than a patch of ``torch.nn.init``: it is thread-local,
    so a model built meanwhile in another thread is initialised as usual."""

    _DRAWS = {torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_, torch.nn.init.normal_,
              torch.nn.init.trunc_normal_, torch.Tensor.uniform_, torch.Tensor.normal_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._DRAWS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _build_for(cfg: VitConfig, provided) -> DinoVisionTransformer:
    """The model to load a checkpoint providing the tensors named ``provided`` into."""
    with _SkipRandomInit():
        model = build_model(cfg)
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    if all(name in provided for name in names):
        return model
    return build_model(cfg)  # some tensor keeps its initial value: drawn as usual


def build_from_checkpoint(ckpt: Checkpoint, *, device=None, dtype=None) -> DinoVisionTransformer:
    """A model of ``ckpt.cfg`` holding the checkpoint's (already checked) tensors."""
    provided = set(ckpt.canonical.state_dict) - set(ckpt.report.unexpected)
    model = _build_for(ckpt.cfg, provided)
    apply_state_dict(model, ckpt.canonical, ckpt.report, ckpt.source)
    return _finish(model, device, dtype)


def create_model(name: str, pretrained: bool = False, weights: WeightsArg = None, *,
                 device=None, dtype=None, strict: bool = True, **overrides) -> DinoVisionTransformer:
    """Build a backbone by name or alias (``"dinov3_vitl16"``, ``"large"``, ``"dinov2_vitb14_reg"``).

    ``weights`` may be an official .pth, a safetensors file, a timm checkpoint, a Hugging Face
    model folder, a Hugging Face hub id (``"facebook/dinov3-vitl16-pretrain-lvd1689m"``), a URL, a
    weights tag of the variant (``"lvd1689m"``, ``"sat493m"``) or an already loaded state dict.
    ``pretrained=True`` without ``weights`` downloads the variant's default weights. Keyword
    overrides change the architecture (``depth=2``, ``drop_path_rate=0.1``, ``img_size=224``);
    the checkpoint, and any configuration shipped with it, must fit the result. ``name`` may also be
    a Hugging Face model folder or hub id (or a flashdino safetensors file): the architecture is
    then read from it (``from_pretrained``). Without weights the model is randomly initialised and
    a :class:`RandomWeightsWarning` says so.
    """
    if isinstance(name, (str, os.PathLike)) and os.fspath(name) not in VARIANTS \
            and looks_like_pretrained_source(name) and weights is None:
        # A Hugging Face folder / hub id or a flashdino file: the architecture comes from it.
        return from_pretrained(name, strict=strict, device=device, dtype=dtype, **overrides)
    cfg = get_config(name, **overrides)
    if weights is None and not pretrained:
        model = build_model(cfg).init_weights()
        _warn_random(cfg)
        return _finish(model, device, dtype)
    source = weights if weights is not None else next(iter(cfg.weights.values()), None)
    return build_from_checkpoint(read_checkpoint(source, cfg, strict=strict), device=device, dtype=dtype)


def from_pretrained(source, *, strict: bool = True, device=None, dtype=None, **overrides) -> DinoVisionTransformer:
    """Builds a backbone from a Hugging Face folder / hub id (its config.json) or a flashdino file, and
    loads its weights. ``overrides`` change configuration fields (e.g. ``drop_path_rate=0.1``).
    A variant name (``"dinov3_vitl16"``) means ``create_model(name, pretrained=True)``.

    The model gets ``preprocessor_config`` (the folder's preprocessor_config.json, when present).
    """
    if isinstance(source, str) and not looks_like_pretrained_source(source) and \
            (source in VARIANTS or source.strip().lower() in ALIASES):
        return create_model(source, pretrained=True, strict=strict, device=device, dtype=dtype, **overrides)
    return build_from_checkpoint(read_checkpoint(source, None, strict=strict, **overrides), device=device, dtype=dtype)


def _entry_point(variant: str):
    def build(pretrained: bool = False, weights: WeightsArg = None, **kwargs) -> DinoVisionTransformer:
        return create_model(variant, pretrained=pretrained, weights=weights, **kwargs)

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = f"The {variant} backbone (see ``flashdino.create_model`` for the arguments)."
    return build


ENTRY_POINTS = {name: _entry_point(name) for name in VARIANTS}

__all__ = ["create_model", "from_pretrained", "build_from_checkpoint", "resolve_name", "ENTRY_POINTS",
           "RandomWeightsWarning"]

"""Keep your Hugging Face / timm DINO model, gain flashdino's kernels: ``flashdino.patch(model)``.

    model = transformers.AutoModel.from_pretrained("facebook/dinov3-vitb16-pretrain-lvd1689m")
    flashdino.patch(model)        # in place; returns the same model
    flashdino.unpatch(model)      # the library's own forwards again

``patch`` replaces, on this model's instances only, the forwards of its transformer layers /
blocks, attentions, final norm and (DINOv3) RoPE module, so that attention with RoPE, the
residual + LayerScale + LayerNorm and the final norm run through ``flashdino.ops`` (Triton / CUDA
kernels on a GPU, chosen per call by ``flashdino.dispatch``; the PyTorch reference on a CPU).
Weights are shared, never copied: parameter names, ``state_dict()`` and saved files stay
exactly as they were. Calls that flashdino has no op for (attention weights requested,
attention masks, attention dropout or RoPE augmentation while training) run the library's own
code for that call. One module per library: ``hf.py`` (transformers), ``timm_models.py`` (timm);
the shared mechanics in ``_common.py``.
"""

from __future__ import annotations

import importlib

from torch import nn

from ._common import PatchError, is_replaced, restore, replace

# Named here without importing either library (the error for an unknown model lists them).
SUPPORTED = {
    "transformers": ("DINOv3ViTModel", "DINOv3ViTBackbone", "Dinov2Model", "Dinov2Backbone",
                     "Dinov2WithRegistersModel", "Dinov2WithRegistersBackbone"),
    "timm": ("Eva (DINOv3: vit_*_patch16_dinov3*)", "VisionTransformer (DINOv2: vit_*_patch14[_reg4]_dinov2)"),
}
_PATCHERS = {"transformers": "hf", "timm": "timm_models"}
_METHODS = ("forward", "get_embed")  # the methods a patch may replace


def _supported_text() -> str:
    return "; ".join(f"{library}: {', '.join(names)}" for library, names in SUPPORTED.items())


def _patcher(module: nn.Module):
    """The patch module of the library ``module``'s class comes from, if that class is one it patches."""
    library = type(module).__module__.split(".")[0]
    if library not in _PATCHERS:
        return None
    patcher = importlib.import_module(f".{_PATCHERS[library]}", __name__)
    known = patcher.family_of(module) is not None if library == "transformers" else patcher.is_supported_class(module)
    return patcher if known else None


def _targets(model: nn.Module) -> list:
    """The outermost supported models in ``model`` (the model itself, or e.g. the backbone inside a
    classification model or a PEFT wrapper)."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        patcher = _patcher(module)
        if patcher is not None:
            found.append((module, patcher))
            inside.append(name)
            if name == "":
                break
    return found


def patch(model: nn.Module) -> nn.Module:
    """Routes ``model``'s attention, residual + LayerNorm and final norm through flashdino's ops, in
    place; returns ``model``. ``model`` is a supported Hugging Face or timm DINO model, or a module
    holding some (a classification model, a PEFT model). Everything is checked before anything is
    changed: an unsupported class, configuration or library version raises :class:`PatchError`
    and leaves the model as it was. Patching a patched model changes nothing."""
    if not isinstance(model, nn.Module):
        raise PatchError(f"flashdino.patch takes a torch.nn.Module, got {type(model).__name__}")
    targets = _targets(model)
    if not targets:
        raise PatchError(f"flashdino.patch: {type(model).__name__} is not a model flashdino can patch and holds none "
                         f"(supported: {_supported_text()}); flashdino's own models need no patch")
    steps = [step for module, patcher in targets for step in patcher.plan(module)]  # raises before any change
    for module, name, fn, state in steps:
        replace(module, name, fn, **state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Puts back the forwards :func:`patch` replaced (in place; returns ``model``). A model that was
    never patched is returned unchanged."""
    for module in model.modules():
        restore(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a flashdino replacement."""
    return any(is_replaced(m, name) for m in model.modules() for name in _METHODS)


__all__ = ["patch", "unpatch", "is_patched", "PatchError", "SUPPORTED"]

"""``patch_embed_tokens``: pixels -> the token buffer [B, N, D] the first block reads.

One op covers the patch conv, the mask-token replacement, CLS / storage / register tokens and
(DINOv2) the position table, plus optional input handling: uint8 pixels (the 1/255 rescale),
channels-last (NHWC) images and mean/std normalisation, which the Triton backend folds into the
conv weights (``w' = w / std``, ``b' = b - sum(w * mean / std)``).

Files: ``reference.py`` (conv2d -> flatten -> where -> cat -> add), ``triton.py`` (an
implicit-im2col GEMM over K = C*P*P whose epilogue adds the bias, applies the mask token and the
position table and writes straight into the token buffer after the prefix tokens; inference
only). Dispatch on CUDA tensors: "triton" (when no gradient is needed), then "torch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ... import dispatch
from . import reference

OP = "patch_embed"


@dataclass(frozen=True)
class PatchEmbedCall:
    """What the backends' ``supports`` rules look at for one call."""

    dtype: torch.dtype  # pixels
    weight_dtype: torch.dtype
    patch_size: int
    needs_grad: bool


def _typical(device: torch.device) -> PatchEmbedCall:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return PatchEmbedCall(dtype=dtype, weight_dtype=dtype, patch_size=16, needs_grad=False)


dispatch.define(OP, PatchEmbedCall, preference=("triton", "torch"), typical=_typical)
dispatch.register(OP, "torch", reference.patch_embed_tokens)


def _load_triton() -> None:
    from . import triton as kernels
    dispatch.register(OP, "triton", kernels.patch_embed_tokens, kernels.supports)


dispatch.register_lazy(OP, "triton", _load_triton)  # imports Triton only when a call can use it


def patch_grid(x: Tensor, patch_size: int, channels_last: bool = False) -> tuple[int, int]:
    """(H, W) patches of an image batch; a bottom/right remainder is dropped."""
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    return h // patch_size, w // patch_size


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check(x, weight, bias, cls_token, extra_tokens, masks, mask_token, pos_embed, channels_last, mean, std,
           strict) -> tuple[int, int]:
    name = "patch_embed_tokens"
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"{name}: weight must be a conv kernel [D, C, P, P], got {_shape(weight)}")
    D, C, P, _ = weight.shape
    if not isinstance(x, Tensor) or x.dim() != 4:
        hint = " (add a batch dimension with x[None])" if isinstance(x, Tensor) and x.dim() == 3 else ""
        layout = "[B, H, W, C]" if channels_last else "[B, C, H, W]"
        raise ValueError(f"{name}: expected a 4-D image batch {layout}, got {_shape(x)}{hint}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"{name}: pixels must be floating point or uint8, got {x.dtype}")
    channels = x.shape[3] if channels_last else x.shape[1]
    if channels != C:
        other = x.shape[1] if channels_last else x.shape[3]
        hint = ""
        if other == C:
            hint = " (NCHW input? pass channels_last=False)" if channels_last else \
                " (channels-last input? pass channels_last=True)"
        raise ValueError(f"{name}: expected {C} input channels, got {channels} (shape {tuple(x.shape)}){hint}")
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    if h < P or w < P:
        raise ValueError(f"{name}: image {h}x{w} is smaller than one {P}x{P} patch")
    if strict and (h % P or w % P):
        raise ValueError(
            f"{name}: image {h}x{w} is not a multiple of the patch size {P} (the DINOv2 reference raises here); "
            f"resize or crop to e.g. {h // P * P}x{w // P * P}"
        )
    for tname, t in (("weight", weight), ("bias", bias), ("cls_token", cls_token), ("extra_tokens", extra_tokens),
                     ("masks", masks), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {tname} on {t.device}, x on {x.device}")
    if x.is_floating_point() and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: input is {x.dtype} but the weights are {weight.dtype}; cast the input or use autocast")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"{name}: bias must be [{D}], got {_shape(bias)}")
    if cls_token is not None and cls_token.shape != (1, 1, D):
        raise ValueError(f"{name}: cls_token must be [1, 1, {D}], got {_shape(cls_token)}")
    if extra_tokens is not None and (extra_tokens.dim() != 3 or extra_tokens.shape[0] != 1 or extra_tokens.shape[2] != D):
        raise ValueError(f"{name}: extra_tokens must be [1, R, {D}], got {_shape(extra_tokens)}")
    Hp, Wp = h // P, w // P
    B = x.shape[0]
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != (B, Hp * Wp):
            got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"{name}: masks must be a bool tensor [B, H*W] = [{B}, {Hp * Wp}], got {got}")
        if mask_token is None or mask_token.numel() != D:
            raise ValueError(f"{name}: masks need a mask_token of {D} values, got {_shape(mask_token)}")
    if pos_embed is not None:
        n_cls = 0 if cls_token is None else 1
        if pos_embed.dim() != 3 or tuple(pos_embed.shape) != (1, n_cls + Hp * Wp, D):
            raise ValueError(f"{name}: pos_embed must be [1, {n_cls + Hp * Wp}, {D}] (CLS + {Hp}x{Wp} patches, "
                             f"already interpolated), got {_shape(pos_embed)}")
    if (mean is None) != (std is None):
        raise ValueError(f"{name}: pass both mean and std, or neither")
    if mean is not None:
        if len(mean) != C or len(std) != C:
            raise ValueError(f"{name}: mean/std need {C} values (one per channel), got {len(mean)} and {len(std)}")
        if any(float(s) == 0 for s in std):
            raise ValueError(f"{name}: std must be non-zero, got {tuple(std)}")
    return Hp, Wp


def _as_floats(v) -> Optional[tuple]:
    if v is None:
        return None
    if isinstance(v, Tensor):
        v = v.detach().flatten().tolist()
    return tuple(float(e) for e in v)


def patch_embed_tokens(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor], *,
    extra_tokens: Optional[Tensor] = None, masks: Optional[Tensor] = None, mask_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None, channels_last: bool = False,
    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, strict: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Token buffer [B, n_cls + R + H*W, D] = [CLS, extra x R, patches].

    ``x``: [B, C, H, W] (or [B, H, W, C] with ``channels_last``), float or uint8 (uint8 is
    rescaled by 1/255). ``mean``/``std``: per-channel normalisation applied to the [0, 1] pixels.
    ``weight``/``bias``: the patch conv (kernel = stride = P). ``masks`` [B, H*W] bool replaces
    patches by ``mask_token``. ``pos_embed`` [1, n_cls + H*W, D] (already interpolated) is added
    to CLS and patches only, DINOv2 style; ``extra_tokens`` (storage / register) [1, R, D] follow
    CLS and get no position. ``strict`` raises for images that are not a multiple of P (DINOv2);
    otherwise the remainder is dropped (DINOv3).
    """
    mean, std = _as_floats(mean), _as_floats(std)
    _check(x, weight, bias, cls_token, extra_tokens, masks, mask_token, pos_embed, channels_last, mean, std, strict)
    needs_grad = False
    if torch.is_grad_enabled():
        for t in (x, weight, bias, cls_token, extra_tokens, mask_token if masks is not None else None, pos_embed):
            needs_grad = needs_grad or (t is not None and t.requires_grad)
    call = PatchEmbedCall(dtype=x.dtype, weight_dtype=weight.dtype, patch_size=weight.shape[-1], needs_grad=needs_grad)
    fn, _, _ = dispatch.select(OP, call, x.device, backend)
    return fn(x, weight, bias, cls_token, extra_tokens, masks, mask_token, pos_embed, channels_last, mean, std)

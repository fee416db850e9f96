"""``final_norm``: the last LayerNorm of a ViT, split into prefix tokens and patches in one launch.

Files: ``reference.py`` (``F.layer_norm`` + slicing), ``triton.py`` (one kernel reads the block
output once and writes the normalised prefix tokens and the patch tokens, optionally straight
into a [B, D, H, W] feature map; backward through ``residual_layernorm``'s LayerNorm backward).
Dispatch on CUDA tensors: "triton", then "torch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ... import dispatch
from . import reference
from .._validate import check_vector

OP = "final_norm"


@dataclass(frozen=True)
class FinalNormCall:
    """What the backends' ``supports`` rules look at for one call."""

    dtype: torch.dtype
    dim: int
    mixed_affine: bool  # untied prefix norm and patch norm differ in having a weight / bias


def _typical(device: torch.device) -> FinalNormCall:
    return FinalNormCall(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, dim=1024,
                         mixed_affine=False)


dispatch.define(OP, FinalNormCall, preference=("triton", "torch"), typical=_typical)
dispatch.register(OP, "torch", reference.final_norm)


def _load_triton() -> None:
    from . import triton as kernels
    dispatch.register(OP, "triton", kernels.final_norm, kernels.supports)


dispatch.register_lazy(OP, "triton", _load_triton)  # imports Triton only when a call can use it


def final_norm(x: Tensor, n_prefix: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, *,
               prefix_norm: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
               patch_grid: Optional[tuple[int, int]] = None,
               backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Final LayerNorm of ``x`` = [B, N, D] tokens ([prefix x n_prefix, patches]).

    Returns ``(prefix [B, n_prefix, D], patches)``: CLS is ``prefix[:, 0]``, the storage /
    register tokens ``prefix[:, 1:]``. ``prefix_norm=(weight, bias)`` normalises the prefix with
    its own parameters (untied ``cls_norm``; same eps). ``patch_grid=(H, W)`` returns the patches
    as a contiguous feature map [B, D, H, W] instead of tokens [B, H*W, D].
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"final_norm: x must be [B, N, D] tokens, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"final_norm: x must be floating point, got {x.dtype}")
    B, N, D = x.shape
    n_prefix = int(n_prefix)
    if not 0 <= n_prefix <= N:
        raise ValueError(f"final_norm: n_prefix {n_prefix} is outside [0, N={N}]")
    check_vector(OP, "weight", weight, D, x)
    check_vector(OP, "bias", bias, D, x)
    if prefix_norm is not None:
        if len(prefix_norm) != 2:
            raise ValueError("final_norm: prefix_norm must be a (weight, bias) pair")
        check_vector(OP, "prefix_norm weight", prefix_norm[0], D, x)
        check_vector(OP, "prefix_norm bias", prefix_norm[1], D, x)
    if patch_grid is not None:
        H, W = (int(v) for v in patch_grid)
        if H <= 0 or W <= 0 or H * W != N - n_prefix:
            raise ValueError(
                f"final_norm: patch grid {H}x{W} does not match the {N - n_prefix} patch tokens "
                f"(N={N}, n_prefix={n_prefix})"
            )
        patch_grid = (H, W)
    mixed_affine = prefix_norm is not None and ((weight is None) != (prefix_norm[0] is None)
                                                or (bias is None) != (prefix_norm[1] is None))
    fn, _, _ = dispatch.select(OP, FinalNormCall(dtype=x.dtype, dim=D, mixed_affine=mixed_affine), x.device, backend)
    return fn(x, n_prefix, weight, bias, eps, prefix_norm, patch_grid)

"""``residual_layernorm``: ``x + gamma * branch`` followed by LayerNorm, in one op.

Files: ``reference.py`` (two elementwise ops + ``F.layer_norm``), ``triton.py`` (fused forward
and backward, fp32 statistics; its LayerNorm backward also serves ``final_norm``).
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

OP = "residual_layernorm"


@dataclass(frozen=True)
class ResidualLayerNormCall:
    """What the backends' ``supports`` rules look at for one call."""

    dtype: torch.dtype
    branch_dtype: torch.dtype
    dim: int


def _typical(device: torch.device) -> ResidualLayerNormCall:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return ResidualLayerNormCall(dtype=dtype, branch_dtype=dtype, dim=1024)


dispatch.define(OP, ResidualLayerNormCall, preference=("triton", "torch"), typical=_typical)
dispatch.register(OP, "torch", reference.residual_layernorm)


def _load_triton() -> None:
    from . import triton as kernels
    dispatch.register(OP, "triton", kernels.residual_layernorm, kernels.supports)


dispatch.register_lazy(OP, "triton", _load_triton)  # imports Triton only when a call can use it


def residual_layernorm(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Returns ``(x + gamma * branch, layer_norm(x + gamma * branch))`` (LayerNorm over the last dim).

    ``gamma`` (LayerScale), ``weight`` and ``bias`` are optional [D] vectors. Under autocast the
    normalised output is fp32, like ``F.layer_norm``.
    """
    if not isinstance(x, Tensor) or not isinstance(branch, Tensor):
        raise TypeError("residual_layernorm: x and branch must be tensors")
    if x.shape != branch.shape:
        raise ValueError(f"residual_layernorm: x {tuple(x.shape)} and branch {tuple(branch.shape)} differ")
    if x.dim() == 0:
        raise ValueError("residual_layernorm: x must have at least one dimension")
    if not (x.is_floating_point() and branch.is_floating_point()):
        raise TypeError(f"residual_layernorm: x and branch must be floating point, got {x.dtype} and {branch.dtype}")
    if branch.device != x.device:
        raise ValueError(f"residual_layernorm: branch on {branch.device}, x on {x.device}")
    D = x.shape[-1]
    for name, t in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        check_vector(OP, name, t, D, x)
    call = ResidualLayerNormCall(dtype=x.dtype, branch_dtype=branch.dtype, dim=D)
    fn, _, _ = dispatch.select(OP, call, x.device, backend)
    return fn(x, branch, gamma, weight, bias, eps)

"""``residual_layernorm``: ``x + gamma * branch`` followed by LayerNorm, in one op."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import dispatch

dispatch.set_preference("residual_layernorm", ("triton", "torch"))


def residual_layernorm(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Returns ``(x + gamma * branch, layer_norm(x + gamma * branch))``."""
    if x.shape != branch.shape:
        raise ValueError(f"residual_layernorm: x {tuple(x.shape)} and branch {tuple(branch.shape)} differ")
    fn, _, _ = dispatch.select("residual_layernorm", x.device, backend, dtype=x.dtype, dim=x.shape[-1])
    return fn(x, branch, gamma, weight, bias, eps)

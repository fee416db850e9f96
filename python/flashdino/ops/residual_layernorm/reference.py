"""Reference residual / LayerScale / LayerNorm steps that the fused norm kernels replace."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def residual_layernorm(
    x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """``x + gamma * branch`` and its LayerNorm, the step between two sub-blocks."""
    x = x + (branch * gamma if gamma is not None else branch)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

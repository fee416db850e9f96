"""Reference residual + LayerScale + LayerNorm (pure PyTorch): the CPU path and the semantics of
every backend. Under autocast the normalised output is fp32, like ``F.layer_norm``."""

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

"""LayerNorm with the two fused forwards the transformer trunk uses.

:class:`LayerNorm` is an ``nn.LayerNorm`` (same parameters, same checkpoint keys, same plain
``forward``) that also knows how to run as the second half of a residual step
(:meth:`LayerNorm.add_and_norm`, ``ops.residual_layernorm``) and as a ViT's final norm
(:meth:`LayerNorm.split_norm`, ``ops.final_norm``), so blocks and models call modules, not ops.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    def add_and_norm(self, x: Tensor, branch: Tensor, gamma: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(x + gamma * branch, self(x + gamma * branch))`` in one fused op; ``gamma`` is the
        LayerScale vector or None."""
        return ops.residual_layernorm(x, branch, gamma, self.weight, self.bias, self.eps)

    def split_norm(self, x: Tensor, n_prefix: int, prefix_norm: Optional[nn.LayerNorm] = None,
                   patch_grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """Normalises tokens ``x`` = [B, n_prefix + H*W, D] into (prefix [B, n_prefix, D], patches).

        ``prefix_norm`` (an untied CLS norm, same eps) normalises the prefix tokens instead of
        this norm. Patches come back as tokens [B, H*W, D], or with ``patch_grid=(H, W)`` as a
        contiguous feature map [B, D, H, W].
        """
        if prefix_norm is not None and prefix_norm.eps != self.eps:
            raise ValueError(f"split_norm: prefix norm eps {prefix_norm.eps} differs from this norm's {self.eps}")
        prefix = (prefix_norm.weight, prefix_norm.bias) if prefix_norm is not None else None
        return ops.final_norm(x, n_prefix, self.weight, self.bias, self.eps, prefix_norm=prefix, patch_grid=patch_grid)

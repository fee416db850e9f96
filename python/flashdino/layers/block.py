from __future__ import annotations

from typing import Optional

from torch import nn

from ..ops import RopeGrid
from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import build_ffn
from .norm import LayerNorm


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, ffn: str = "mlp", ffn_hidden: Optional[int] = None,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, eps: float = 1e-5,
                 layerscale_init: Optional[float] = 1e-5, drop_path: float = 0.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm=qk_norm, norm_eps=eps)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = build_ffn(ffn, dim, ffn_hidden or 4 * dim, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, rope: Optional[RopeGrid] = None):
        branch = self.drop_path(self.attn(self.norm1(x), rope))
        gamma1 = self.ls1.gamma if isinstance(self.ls1, LayerScale) else None
        x, h = self.norm2.add_and_norm(x, branch, gamma1)  # x += ls1 * branch, then norm2, fused
        return x + self.drop_path(self.ls2(self.mlp(h)))

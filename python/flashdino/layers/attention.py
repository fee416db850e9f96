from __future__ import annotations

from typing import Optional

from torch import nn

from .. import ops
from ..ops import RopeGrid


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention; RoPE and qk-norm run inside ``ops.rope_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.norm_eps = norm_eps
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope: Optional[RopeGrid] = None):
        qkv = self.qkv(x)
        q_norm = (self.q_norm.weight, self.q_norm.bias) if self.q_norm is not None else None
        k_norm = (self.k_norm.weight, self.k_norm.bias) if self.k_norm is not None else None
        out = ops.rope_attention(qkv, self.num_heads, rope, q_norm=q_norm, k_norm=k_norm, norm_eps=self.norm_eps)
        return self.proj(out)

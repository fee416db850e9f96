"""Reference attention over a fused qkv projection, with optional qk-norm and 2D RoPE.

Input ``qkv`` is the output of the fused qkv Linear, ``[B, N, 3 * heads * d]`` laid out as
``[q heads | k heads | v heads]``; the output is ``[B, N, heads * d]``, ready for the output
projection. This is the semantics every fast backend is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import RopeGrid, apply_rope


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def rope_attention(
    qkv: Tensor,
    num_heads: int,
    rope: Optional[RopeGrid] = None,
    q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    norm_eps: float = 1e-5,
    scale: Optional[float] = None,
) -> Tensor:
    q, k, v = split_qkv(qkv, num_heads)
    head_dim = q.shape[-1]
    if q_norm is not None:
        q = F.layer_norm(q, (head_dim,), q_norm[0], q_norm[1], norm_eps)
    if k_norm is not None:
        k = F.layer_norm(k, (head_dim,), k_norm[0], k_norm[1], norm_eps)
    if rope is not None:
        q, k = apply_rope(q, k, rope)
    # Under autocast the norms return fp32 while v stays in the autocast dtype.
    if q.dtype != v.dtype and not torch.is_autocast_enabled(q.device.type):
        v = v.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, _, N, _ = out.shape
    return out.transpose(1, 2).reshape(B, N, num_heads * head_dim)

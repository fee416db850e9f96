"""Reference attention over a fused qkv projection, with optional qk-norm and 2D RoPE (pure PyTorch).

Input ``qkv`` is the output of the fused qkv Linear, ``[B, N, 3 * heads * d]`` laid out as
``[q heads | k heads | v heads]``; the output is ``[B, N, heads * d]``, ready for the output
projection. This is the semantics every fast backend is tested against, and the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attend import attend
from .grid import RopeGrid


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _swap_halves(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def _signed_sin(grid: RopeGrid, sin: Tensor) -> Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin exactly
    (a sign flip is exact), which saves one elementwise pass per tensor."""
    key = ("signed", sin.shape, sin.device)
    if key not in grid._cache:
        half = sin.shape[-1] // 2
        grid._cache[key] = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return grid._cache[key]


def _rotate_half_per_half(x: Tensor) -> Tensor:
    y_part, x_part = x.chunk(2, dim=-1)
    return torch.cat([_rotate_half(y_part), _rotate_half(x_part)], dim=-1)


def _frame_tables(grid: RopeGrid, n_tokens: int, head_dim: int, dtype, device):
    cos, sin = grid.tables(head_dim, dtype, device)
    # not divmod(): it is undefined on the symbolic sizes of an ONNX (dynamo) export
    frames, rem = n_tokens // grid.tokens_per_frame, n_tokens % grid.tokens_per_frame
    if rem or frames == 0:
        raise ValueError(
            f"RoPE grid {grid.height}x{grid.width} with {grid.n_prefix} prefix tokens "
            f"({grid.tokens_per_frame} tokens per frame) does not match a sequence of {n_tokens} tokens"
        )
    if frames > 1:
        cos, sin = cos.repeat(frames, 1), sin.repeat(frames, 1)
    return cos, sin


def apply_rope(q: Tensor, k: Tensor, grid: RopeGrid) -> tuple[Tensor, Tensor]:
    """Rotate q and k of shape [B, heads, N, d]; returns tensors of the input dtypes."""
    n_tokens, head_dim = q.shape[-2], q.shape[-1]
    if grid.mode == "dinov3":
        cos, sin = _frame_tables(grid, n_tokens, head_dim, torch.float32, q.device)
        sin = _signed_sin(grid, sin)
        qf, kf = q.float(), k.float()
        q_out = qf * cos + _swap_halves(qf) * sin
        k_out = kf * cos + _swap_halves(kf) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)
    # q.dtype is what rotation_dtype() predicts by construction: the token dtype, or fp32 after an
    # autocast LayerNorm.
    cos, sin = _frame_tables(grid, n_tokens, head_dim, q.dtype, q.device)
    q_out = q * cos + _rotate_half_per_half(q) * sin
    k_out = k * cos.to(k.dtype) + _rotate_half_per_half(k) * sin.to(k.dtype)
    return q_out, k_out


def rope_attention(
    qkv: Tensor,
    num_heads: int,
    rope: Optional[RopeGrid] = None,
    q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    norm_eps: float = 1e-5,
    scale: Optional[float] = None,
    attention: Optional[str] = None,
) -> Tensor:
    """``attention`` names the kernel of the attention product (:func:`attend.attend`); None lets
    SDPA choose."""
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
    return attend(q, k, v, scale, attention)

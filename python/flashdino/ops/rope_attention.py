"""``rope_attention``: attention over a fused qkv projection with in-place 2D RoPE.

Dispatch rules on CUDA: Triton first (``flashdino::rope_attention_triton``: one fused
flash-attention kernel, forward and backward, reading q/k/v through the strides of the qkv output,
qk-norm + 2D RoPE inside, output [B, N, h*d]), then the other backends, then the reference
(PyTorch RoPE + SDPA). Triton covers head dims 16, 32, 64 and 128 (64/128 are the product
targets), fp16/bf16/fp32, RoPE "dinov3" / "vggt" / none, optional qk-norm, several frames per
sequence and any N; its ``supports`` names the reason otherwise. The ordering is provisional: the
GPU measurements (benchmarks/test_bench_rope_attention.py -> benchmarks/results/) are still to be
run, including the K-rotation study (FLASHDINO_ROPE_ATTN_K_ROTATION=prepass|inline|table,
default prepass). On CPU tensors the reference runs, unless TRITON_INTERPRET=1 and
``backend="triton"`` (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..backends.default.rope import RopeGrid

# "cuda" (flashdino._C: fused qkv split + qk-norm + RoPE, then SDPA) is placed second: the measured
# ordering of triton vs cuda is still pending GPU runs.
dispatch.set_preference("rope_attention", ("triton", "cuda", "torch"))


def _check(qkv: Tensor, num_heads: int, rope: Optional[RopeGrid], q_norm, k_norm) -> int:
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"rope_attention: qkv must be [B, N, 3 * heads * head_dim], got {shape}")
    if not qkv.is_floating_point():
        raise TypeError(f"rope_attention: qkv must be floating point, got {qkv.dtype}")
    width = qkv.shape[-1]
    if num_heads <= 0 or width % (3 * num_heads):
        raise ValueError(f"rope_attention: last dim {width} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = width // (3 * num_heads)
    n_tokens = qkv.shape[1]
    if rope is not None:
        if rope.n_prefix < 0 or rope.n_prefix > n_tokens:
            raise ValueError(f"rope_attention: n_prefix {rope.n_prefix} is outside [0, N={n_tokens}]")
        if n_tokens % rope.tokens_per_frame:
            raise ValueError(
                f"rope_attention: N={n_tokens} tokens do not fit a grid of {rope.height}x{rope.width} patches "
                f"plus {rope.n_prefix} prefix tokens per frame ({rope.tokens_per_frame} tokens)"
            )
        if rope.mode == "dinov3":
            if rope.periods is None or rope.periods.numel() != head_dim // 4:
                got = None if rope.periods is None else rope.periods.numel()
                raise ValueError(f"rope_attention: dinov3 RoPE needs head_dim/4 = {head_dim // 4} periods, got {got}")
            if rope.periods.device != qkv.device:
                raise ValueError(f"rope_attention: periods on {rope.periods.device}, qkv on {qkv.device}")
        if head_dim % 4:
            raise ValueError(f"rope_attention: 2D RoPE needs head_dim divisible by 4, got {head_dim}")
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is not None:
            weight = norm[0]
            if weight.shape != (head_dim,):
                raise ValueError(f"rope_attention: {name} weight must be [{head_dim}], got {tuple(weight.shape)}")
            if weight.device != qkv.device:
                raise ValueError(f"rope_attention: {name} on {weight.device}, qkv on {qkv.device}")
            bias = norm[1] if len(norm) > 1 else None
            if bias is not None:
                if bias.shape != (head_dim,):
                    raise ValueError(f"rope_attention: {name} bias must be [{head_dim}], got {tuple(bias.shape)}")
                if bias.device != qkv.device:
                    raise ValueError(f"rope_attention: {name} bias on {bias.device}, qkv on {qkv.device}")
    return head_dim


def rope_attention(
    qkv: Tensor,
    num_heads: int,
    rope: Optional[RopeGrid] = None,
    *,
    q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    norm_eps: float = 1e-5,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-head attention of ``qkv`` = [B, N, 3*h*d] (``[q | k | v]``), returns [B, N, h*d].

    ``rope`` describes the patch grid: the first ``rope.n_prefix`` tokens of every frame are
    left unrotated, the others are rotated by their (y, x) position. ``q_norm``/``k_norm`` are
    optional per-head LayerNorm (weight, bias) pairs applied before the rotation (VGGT qk_norm).
    """
    head_dim = _check(qkv, num_heads, rope, q_norm, k_norm)
    fn, _, _ = dispatch.select(
        "rope_attention", qkv.device, backend,
        dtype=qkv.dtype, head_dim=head_dim, n_tokens=qkv.shape[1], rope=rope, token_stride=qkv.stride(1),
        qk_norm=q_norm is not None or k_norm is not None,
    )
    return fn(qkv, num_heads, rope, q_norm, k_norm, norm_eps, scale)

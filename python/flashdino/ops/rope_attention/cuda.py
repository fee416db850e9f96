"""CUDA backend of ``rope_attention``: fused qkv split + qk-norm + 2D RoPE, then SDPA.

``flashdino::rope_attention_qkv_split`` (a ``torch.library`` custom op around ``flashdino._C``) reads the
fused qkv projection ``[B, N, 3*h*d]`` once (any strides on B and N, last dim contiguous),
applies the optional per-head LayerNorm of q and k (VGGT ``qk_norm``) and the 2D RoPE
("dinov3" or "vggt", prefix tokens of every frame unrotated), and writes q, k, v as contiguous
``[B, h, N, d]`` tensors, the layout SDPA wants.

Backward: ``flashdino::rope_attention_qkv_split_backward`` runs the same CUDA kernel with the backward flag
(dq, dk rotated by -angle, dv copied) into a contiguous ``[B, N, 3*h*d]`` gradient. With qk-norm,
the LayerNorm part of the backward is NOT fused: it is the analytic LayerNorm gradient (the same
as autograd of ``F.layer_norm`` in the reference) computed with PyTorch ops in fp32 from the saved
qkv input; the weight/bias gradients come from the same formulas.

Numerics follow ``reference.py`` / ``grid.py``: rotation in fp32 with one rounding to the output
dtype. "vggt" rounds the angles and cos/sin to the token dtype like the reference does, except
under autocast with qk-norm, where the reference's norm output (and so its RoPE) is fp32: the
kernel then keeps every intermediate in fp32 as well (``round_mid=False``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._native import require_native
from .attend import attend
from .grid import RopeGrid, rotation_dtype

_C = require_native()

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_NONE, MODE_DINOV3, MODE_VGGT = 0, 1, 2
_MODES = {"dinov3": MODE_DINOV3, "vggt": MODE_VGGT}
MAX_HEAD_DIM = 256


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _fp32_param(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().to(torch.float32).contiguous()


def _launch_args(device: torch.device) -> dict:
    return dict(device=device.index if device.index is not None else torch.cuda.current_device(),
                stream=torch.cuda.current_stream(device).cuda_stream)


def _check_inputs(qkv: Tensor, num_heads: int, mode: int) -> int:
    if qkv.device.type != "cuda":
        raise ValueError(f"flashdino::rope_attention_qkv_split needs a CUDA tensor, got {qkv.device}")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"flashdino::rope_attention_qkv_split: dtype {qkv.dtype} is not supported")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"flashdino::rope_attention_qkv_split: qkv must be [B, N, 3*{num_heads}*d], got {tuple(qkv.shape)}")
    if mode not in (MODE_NONE, MODE_DINOV3, MODE_VGGT):
        raise ValueError(f"flashdino::rope_attention_qkv_split: unknown mode {mode}")
    return qkv.shape[-1] // (3 * num_heads)


# ------------------------------------------------------------------------------------------------
# forward op

@torch.library.custom_op("flashdino::rope_attention_qkv_split", mutates_args=())
def rope_attention_qkv_split(
    qkv: Tensor,
    num_heads: int,
    mode: int,
    height: int,
    width: int,
    n_prefix: int,
    freqs: Optional[Tensor],
    denom_h: float,
    denom_w: float,
    q_weight: Optional[Tensor],
    q_bias: Optional[Tensor],
    k_weight: Optional[Tensor],
    k_bias: Optional[Tensor],
    eps: float,
    round_mid: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [B, N, 3*h*d] -> q, k, v [B, h, N, d] (contiguous), with qk-norm and 2D RoPE.

    mode: 0 no RoPE, 1 "dinov3" (freqs = periods [d/4], coord = 2*(i+0.5)/denom - 1),
    2 "vggt" (freqs = inverse frequencies [d/4], positions i + 1). round_mid: round the LayerNorm
    output and the vggt angles / cos / sin to the token dtype (the reference without autocast).
    """
    head_dim = _check_inputs(qkv, num_heads, mode)
    if qkv.shape[-1] and qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    B, N, _ = qkv.shape
    q, k, v = (torch.empty((B, num_heads, N, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if freqs is not None:
        freqs = freqs.detach().to(device=qkv.device, dtype=torch.float32).contiguous()
    q_weight, q_bias, k_weight, k_bias = (_fp32_param(t) for t in (q_weight, q_bias, k_weight, k_bias))
    _C.rope_attention_qkv_forward(
        qkv=qkv.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), dtype=_DTYPES[qkv.dtype],
        batch=B, tokens=N, stride_b=qkv.stride(0), stride_n=qkv.stride(1), heads=num_heads, head_dim=head_dim,
        mode=mode, height=height, width=width, n_prefix=n_prefix, freqs=_ptr(freqs), denom_h=denom_h,
        denom_w=denom_w, q_weight=_ptr(q_weight), q_bias=_ptr(q_bias), k_weight=_ptr(k_weight),
        k_bias=_ptr(k_bias), eps=eps, round_mid=round_mid, **_launch_args(qkv.device),
    )
    return q, k, v


@rope_attention_qkv_split.register_fake
def _(qkv, num_heads, mode, height, width, n_prefix, freqs, denom_h, denom_w, q_weight, q_bias, k_weight, k_bias,
      eps, round_mid):
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    return tuple(qkv.new_empty((B, num_heads, N, head_dim)) for _ in range(3))


# ------------------------------------------------------------------------------------------------
# backward op (rotation transpose only; no norm)

@torch.library.custom_op("flashdino::rope_attention_qkv_split_backward", mutates_args=())
def rope_attention_qkv_split_backward(
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    mode: int,
    height: int,
    width: int,
    n_prefix: int,
    freqs: Optional[Tensor],
    denom_h: float,
    denom_w: float,
    round_mid: bool,
) -> Tensor:
    """dq, dk, dv [B, h, N, d] -> d(qkv) [B, N, 3*h*d] with dq, dk rotated back (no norm part)."""
    B, h, N, d = dq.shape
    dtype = dq.dtype
    dq, dk, dv = (g.to(dtype).contiguous() for g in (dq, dk, dv))
    dqkv = torch.empty((B, N, 3 * h * d), dtype=dtype, device=dq.device)
    _check_inputs(dqkv, h, mode)
    if freqs is not None:
        freqs = freqs.detach().to(device=dq.device, dtype=torch.float32).contiguous()
    _C.rope_attention_qkv_backward(
        dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(), dqkv=dqkv.data_ptr(), dtype=_DTYPES[dtype],
        batch=B, tokens=N, stride_b=dqkv.stride(0), stride_n=dqkv.stride(1), heads=h, head_dim=d, mode=mode,
        height=height, width=width, n_prefix=n_prefix, freqs=_ptr(freqs), denom_h=denom_h, denom_w=denom_w,
        round_mid=round_mid, **_launch_args(dq.device),
    )
    return dqkv


@rope_attention_qkv_split_backward.register_fake
def _(dq, dk, dv, mode, height, width, n_prefix, freqs, denom_h, denom_w, round_mid):
    B, h, N, d = dq.shape
    return dq.new_empty((B, N, 3 * h * d))


def _layer_norm_backward(x: Tensor, grad: Tensor, weight: Tensor, eps: float):
    """Analytic LayerNorm gradient over the last dim (fp32): dx, dweight, dbias."""
    x = x.float()
    grad = grad.float()
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    xhat = centred * rstd
    dims = tuple(range(x.dim() - 1))
    dweight = (grad * xhat).sum(dims)
    dbias = grad.sum(dims)
    g = grad * weight.float()
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dweight, dbias


def _setup_context(ctx, inputs, output):
    (qkv, num_heads, mode, height, width, n_prefix, freqs, denom_h, denom_w, q_weight, q_bias, k_weight, k_bias,
     eps, round_mid) = inputs
    ctx.num_heads = num_heads
    ctx.rope = (mode, height, width, n_prefix, denom_h, denom_w, round_mid)
    ctx.eps = eps
    ctx.has_bias = (q_bias is not None, k_bias is not None)
    ctx.has_weight = (q_weight is not None, k_weight is not None)
    norm = q_weight is not None or k_weight is not None
    ctx.save_for_backward(qkv if norm else None, freqs, q_weight, k_weight)


def _backward(ctx, dq, dk, dv):
    qkv, freqs, q_weight, k_weight = ctx.saved_tensors
    mode, height, width, n_prefix, denom_h, denom_w, round_mid = ctx.rope
    ref = dq if dq is not None else (dk if dk is not None else dv)
    dq, dk, dv = (torch.zeros_like(ref) if g is None else g for g in (dq, dk, dv))
    dqkv = rope_attention_qkv_split_backward(dq, dk, dv, mode, height, width, n_prefix, freqs, denom_h, denom_w, round_mid)
    grads_norm = [None, None, None, None]  # dq_weight, dq_bias, dk_weight, dk_bias
    if qkv is not None:
        B, N, C3 = dqkv.shape
        h = ctx.num_heads
        d = C3 // (3 * h)
        parts = list(dqkv.view(B, N, 3, h, d).unbind(2))
        x_parts = qkv.reshape(B, N, 3, h, d).unbind(2)
        for i, weight in enumerate((q_weight, k_weight)):
            if weight is None:
                continue
            dx, dw, db = _layer_norm_backward(x_parts[i], parts[i], weight, ctx.eps)
            parts[i] = dx.to(dqkv.dtype)
            grads_norm[2 * i] = dw.to(weight.dtype)
            grads_norm[2 * i + 1] = db.to(weight.dtype) if ctx.has_bias[i] else None
        dqkv = torch.stack(parts, dim=2).reshape(B, N, C3)
    dqkv = dqkv.to(qkv.dtype) if qkv is not None else dqkv
    return (dqkv, None, None, None, None, None, None, None, None,
            grads_norm[0], grads_norm[1], grads_norm[2], grads_norm[3], None, None)


rope_attention_qkv_split.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Python entry points

def rope_args(rope: Optional[RopeGrid], head_dim: int, device: torch.device) -> tuple:
    """(mode, height, width, n_prefix, freqs, denom_h, denom_w) for the op, from the grid."""
    if rope is None:
        return MODE_NONE, 0, 0, 0, None, 1.0, 1.0
    if rope.mode not in _MODES:
        raise ValueError(f"unknown RoPE mode {rope.mode!r} (expected one of {tuple(_MODES)})")
    denom_h, denom_w = rope.denominators()
    return (_MODES[rope.mode], rope.height, rope.width, rope.n_prefix, rope.frequencies(head_dim, device),
            denom_h, denom_w)


def rope_attention_qkv(
    qkv: Tensor,
    num_heads: int,
    rope: Optional[RopeGrid] = None,
    q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    norm_eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, h, N, d] from the fused qkv projection, as the reference computes them."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    mode, H, W, n_prefix, freqs, dh, dw = rope_args(rope, head_dim, qkv.device)
    # Under autocast the reference's LayerNorm returns fp32, so its RoPE runs on fp32 tokens.
    normed = q_norm is not None or k_norm is not None
    round_mid = rotation_dtype(qkv.dtype, normed, qkv.device) == qkv.dtype
    qw, qb = q_norm if q_norm is not None else (None, None)
    kw, kb = k_norm if k_norm is not None else (None, None)
    return rope_attention_qkv_split(qkv, num_heads, mode, H, W, n_prefix, freqs, dh, dw, qw, qb, kw, kb, float(norm_eps),
                          round_mid)


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
    """Same contract as ``reference.rope_attention`` (``attention``: the kernel of the product)."""
    q, k, v = rope_attention_qkv(qkv, num_heads, rope, q_norm, k_norm, norm_eps)
    return attend(q, k, v, scale, attention)


def supports(call) -> Optional[str]:
    """None when the CUDA kernel handles ``call`` (a ``RopeAttentionCall``), else the reason not."""
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} not supported (float32, float16, bfloat16)"
    if call.head_dim % 8 or call.head_dim > MAX_HEAD_DIM or call.head_dim <= 0:
        return f"head_dim {call.head_dim} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]"
    rope = call.rope
    if rope is not None:
        if rope.mode not in _MODES:
            return f"RoPE mode {rope.mode!r} not supported"
        if rope.mode == "dinov3" and rope.normalize not in ("separate", "min", "max"):
            return f"RoPE coordinate normalisation {rope.normalize!r} not supported"
    return None

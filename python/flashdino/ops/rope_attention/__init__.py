"""``rope_attention``: attention over a fused qkv projection with in-place 2D RoPE.

Files: ``reference.py`` (PyTorch: split, qk-norm, RoPE, SDPA; the CPU path and the oracle),
``grid.py`` (:class:`RopeGrid`: RoPE geometry for every backend), ``triton.py`` +
``triton_kernels.py`` (one fused flash-attention kernel, forward and backward, qk-norm + RoPE
inside), ``cuda.py`` (``flashdino._C``: fused qkv split + qk-norm + RoPE into SDPA's layout).

Dispatch on CUDA tensors: the fastest candidate measured on the device for the call's shape bucket
(``flashdino.check.tune``: each audited Triton launch configuration, the CUDA path and the PyTorch
path with each attention kernel, see ``attend.py``), or with ``FLASHDINO_TUNE=0`` "triton", then
"cuda", then "torch". Each backend's ``supports`` names why it declines a call (head dim, dtype,
RoPE mode, int32 offsets, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ... import dispatch
from . import attend, reference
from .._validate import check_vector
from .grid import MODES, NORMALIZATIONS, RopeGrid

OP = "rope_attention"


@dataclass(frozen=True)
class RopeAttentionCall:
    """What the backends' ``supports`` rules look at for one call."""

    dtype: torch.dtype
    head_dim: int
    n_tokens: int
    token_stride: int  # elements between consecutive tokens of qkv
    rope: Optional[RopeGrid]
    qk_norm: bool
    # The shape beyond the rules above: the self-check probes the kernel specialisation of these
    # sizes, and on-device tuning buckets calls by tokens and batch x heads.
    batch: int = 2
    num_heads: int = 2


def _typical(device: torch.device) -> RopeAttentionCall:
    # ViT-L/16 at 512 px (CLS + 4 storage tokens + 32x32 patches), bf16 on GPUs.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = RopeGrid("dinov3", 32, 32, 5, periods=torch.ones(16))
    return RopeAttentionCall(dtype=dtype, head_dim=64, n_tokens=1029, token_stride=3 * 1024, rope=grid, qk_norm=False,
                             batch=64, num_heads=16)


dispatch.define(OP, RopeAttentionCall, preference=("triton", "cuda", "torch"), typical=_typical)
dispatch.register(OP, "torch", reference.rope_attention)


def _register_attention_variants(backend: str) -> None:
    """Each attention kernel after ``backend``'s RoPE as a variant on-device tuning
    (``flashdino.check.tune``) may time: SDPA's flash / efficient / cudnn kernels, xformers where
    installed. SDPA's math kernel is left out: never the fastest on a GPU, it is the default
    path's own fallback."""
    fn = dispatch.implementation(OP, backend)
    for kernel in attend.kernels():
        if kernel != "math":
            dispatch.register_variant(OP, backend, f"sdpa-{kernel}" if kernel != "xformers" else kernel,
                                      functools.partial(fn, attention=kernel))


def _load_triton() -> None:
    """The Triton backend, and each audited forward configuration as a tuning variant."""
    from . import triton as kernels
    dispatch.register(OP, "triton", kernels.rope_attention, kernels.supports)
    for cfg in sorted({c for configs in kernels.FWD_CANDIDATES.values() for c in configs}):
        def applies(call, cfg=cfg) -> Optional[str]:  # the default configuration is the variant ""
            return None if cfg in kernels.fwd_candidates(call)[1:] else "not a tuning candidate for this call"
        dispatch.register_variant(OP, "triton", kernels.config_name(cfg),
                                  functools.partial(kernels.rope_attention, fwd_config=cfg), applies)


def _load_cuda() -> None:
    from . import cuda
    dispatch.register(OP, "cuda", cuda.rope_attention, cuda.supports)
    _register_attention_variants("cuda")


_register_attention_variants("torch")
# Imported only when a call can use them: a CPU-only process never loads Triton or flashdino._C.
dispatch.register_lazy(OP, "triton", _load_triton)
dispatch.register_lazy(OP, "cuda", _load_cuda)


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
        if rope.mode not in MODES:
            raise ValueError(f"rope_attention: unknown RoPE mode {rope.mode!r} (expected one of {MODES})")
        if rope.mode == "dinov3" and rope.normalize not in NORMALIZATIONS:
            raise ValueError(f"rope_attention: unknown RoPE coordinate normalisation {rope.normalize!r} "
                             f"(expected one of {NORMALIZATIONS})")
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
            check_vector(OP, f"{name} weight", norm[0], head_dim, qkv, "qkv")
            check_vector(OP, f"{name} bias", norm[1] if len(norm) > 1 else None, head_dim, qkv, "qkv")
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
    ``scale`` defaults to ``head_dim ** -0.5``. ``backend`` forces one backend ("torch",
    "triton", "cuda"); ``ValueError`` if it cannot run the call.
    """
    head_dim = _check(qkv, num_heads, rope, q_norm, k_norm)
    # The token stride the kernels will index with: a qkv without a unit channel stride is made
    # contiguous first (so its int32 offset guard must look at the contiguous stride).
    token_stride = qkv.stride(1) if qkv.stride(-1) == 1 else qkv.shape[-1]
    call = RopeAttentionCall(dtype=qkv.dtype, head_dim=head_dim, n_tokens=qkv.shape[1], token_stride=token_stride,
                             rope=rope, qk_norm=q_norm is not None or k_norm is not None, batch=qkv.shape[0],
                             num_heads=num_heads)
    fn, _, _ = dispatch.select(OP, call, qkv.device, backend)
    return fn(qkv, num_heads, rope, q_norm, k_norm, norm_eps, scale)

__all__ = ["RopeGrid", "RopeAttentionCall", "rope_attention"]

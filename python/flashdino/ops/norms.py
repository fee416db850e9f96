"""``residual_layernorm``: ``x + gamma * branch`` followed by LayerNorm, in one op.

Dispatch on CUDA: Triton first (fused forward and backward, fp32 statistics, fp32/fp16/bf16,
rows of width up to 8192), then the reference (two elementwise kernels + ``F.layer_norm``).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import dispatch

dispatch.set_preference("residual_layernorm", ("triton", "torch"))


def _check_vector(name: str, t: Optional[Tensor], D: int, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.shape != (D,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"residual_layernorm: {name} must be a [{D}] tensor, got {shape}")
    if t.device != x.device:
        raise ValueError(f"residual_layernorm: {name} on {t.device}, x on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"residual_layernorm: {name} must be floating point, got {t.dtype}")


def residual_layernorm(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Returns ``(x + gamma * branch, layer_norm(x + gamma * branch))`` (LayerNorm over the last dim).

    ``gamma`` (LayerScale), ``weight`` and ``bias`` are optional [D] vectors. Under autocast the
    normalised output is fp32, like ``F.layer_norm``.
    """
    if not isinstance(x, Tensor) or not isinstance(branch, Tensor):
        raise TypeError("residual_layernorm: x and branch must be tensors")
    if x.shape != branch.shape:
        raise ValueError(f"residual_layernorm: x {tuple(x.shape)} and branch {tuple(branch.shape)} differ")
    if x.dim() == 0:
        raise ValueError("residual_layernorm: x must have at least one dimension")
    if not (x.is_floating_point() and branch.is_floating_point()):
        raise TypeError(f"residual_layernorm: x and branch must be floating point, got {x.dtype} and {branch.dtype}")
    if branch.device != x.device:
        raise ValueError(f"residual_layernorm: branch on {branch.device}, x on {x.device}")
    D = x.shape[-1]
    for name, t in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        _check_vector(name, t, D, x)
    fn, _, _ = dispatch.select("residual_layernorm", x.device, backend, dtype=x.dtype, dim=D,
                               branch_dtype=branch.dtype)
    return fn(x, branch, gamma, weight, bias, eps)

"""The attention product over rotated q, k, v ``[B, h, N, d]``, shared by the reference and the
CUDA backend, with the kernel that computes it named:

* ``None``: PyTorch's ``scaled_dot_product_attention`` picks its kernel (the default path);
* ``"flash"``, ``"efficient"``, ``"cudnn"``, ``"math"``: that SDPA kernel only (``sdpa_kernel``,
  which ``torch.compile`` traces); a kernel that cannot run the call raises;
* ``"xformers"``: xformers' ``memory_efficient_attention``, where xformers is installed.

On-device tuning (``flashdino.check.tune``) times the first four paths as variants of the "torch"
and "cuda" backends. Returns ``[B, N, h*d]``, the layout the output projection reads.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def kernels() -> tuple[str, ...]:
    """The attention kernels this install can name (the tuning variants besides the default)."""
    return SDPA_KERNELS + (("xformers",) if xformers_available() else ())


def _sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kernel: Optional[str] = None) -> Tensor:
    B, h, N, d = q.shape
    if kernel == "xformers":
        import xformers.ops as xops

        if q.dtype != v.dtype:  # under autocast the qk-norm returns fp32: attend in the autocast dtype
            dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # xformers reads [B, N, h, d]: the transposes are views, its output is already token-major.
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.reshape(B, N, h * d)
    if kernel is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        from torch.nn.attention import sdpa_kernel

        if kernel not in SDPA_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r} (expected one of {SDPA_KERNELS + ('xformers',)})")
        with sdpa_kernel(_sdpa_backend(kernel)):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, h * d)

"""The device's own rates, measured in the same process as the models: every utilisation figure
(MFU, bandwidth fraction) in flashdino's benchmarks is relative to these, not to a data sheet."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .timing import median_time, short_error

__all__ = ["measure_gemm_rate", "measure_copy_bandwidth", "device_rates", "DTYPE_NAMES"]

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_gemm_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None,
                      repeats: Optional[int] = None) -> dict:
    """Dense n x n x n GEMM rate (FLOP/s): 8192 on a GPU, 1024 (fp32) / 512 (bf16) on a CPU by default.

    Measured with ``F.linear(a, w)`` (``a @ w.T``, the layout of every ``nn.Linear`` in the models):
    on CPUs without native bf16 the plain ``a @ b`` bf16 matmul takes a much slower path.
    """
    cuda = device.type == "cuda"
    if n is None:
        n = 8192 if cuda else (1024 if dtype == torch.float32 else 512)
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    secs = median_time(lambda: F.linear(a, b), device, warmup=3 if cuda else 1, repeats=repeats or (20 if cuda else 3))
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), op="F.linear", median_s=secs,
                flops_per_s=2.0 * n**3 / secs)


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x size)."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if cuda else 64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    secs = median_time(lambda: dst.copy_(src), device, warmup=1, repeats=repeats or (20 if cuda else 5))
    return dict(bytes=nbytes, median_s=secs, bytes_per_s=2.0 * nbytes / secs)


def device_rates(device: torch.device, dtypes: Sequence[str] = ("bf16", "fp32"), gemm_size: Optional[int] = None,
                 copy: bool = True) -> dict:
    """GEMM rate per dtype name and the copy bandwidth; a failed probe is recorded, never raised."""
    out: dict = {}
    for name in dtypes:
        try:
            out[name] = measure_gemm_rate(device, DTYPE_NAMES[name], n=gemm_size)
        except Exception as exc:
            out[name] = dict(error=short_error(exc))
    if copy:
        try:
            out["copy"] = measure_copy_bandwidth(device)
        except Exception as exc:
            out["copy"] = dict(error=short_error(exc))
    try:
        out["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        out["loadavg"] = None
    return out

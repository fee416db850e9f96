"""What the pytest-benchmark suites need from flashdino's harness (:mod:`flashdino.bench`), under
the names they import: FLOP counts, the CUDA-event median, the GEMM rate and ``extra_info``."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from flashdino.bench.flops import attention_flops
from flashdino.bench.probes import measure_gemm_rate
from flashdino.bench.timing import median_time

__all__ = ["attention_flops", "cuda_median_ms", "synced", "record", "gemm_tflops"]

_CUDA = torch.device("cuda")


def cuda_median_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn()``, one CUDA event pair per call."""
    return median_time(fn, _CUDA, warmup=warmup, repeats=iters) * 1e3


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, for pytest-benchmark's host timer."""
    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def record(benchmark, fn: Callable[[], object], flops: Optional[float] = None, rounds: int = 10, *,
           nbytes: Optional[float] = None, warmup: int = 3, iters: int = 10, **info) -> None:
    """Time ``fn`` with CUDA events (always) and pytest-benchmark (when enabled).

    ``benchmark.extra_info`` gets ``median_ms``, ``tflops`` (given ``flops``), ``gbps`` (given
    ``nbytes``) and everything in ``info``, so ``--benchmark-json`` carries the rate of every case.
    """
    ms = cuda_median_ms(fn, warmup=warmup, iters=iters)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(median_ms=ms, device=torch.cuda.get_device_name())
    if flops is not None:
        benchmark.extra_info.update(flops=flops, tflops=flops / (ms * 1e-3) / 1e12)
    if nbytes is not None:
        benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9)
    benchmark.pedantic(synced(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if flops is not None and stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tflops_pytest_median"] = flops / stats.stats.median / 1e12


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Achieved dense GEMM TFLOP/s on this GPU (the utilisation reference)."""
    return measure_gemm_rate(_CUDA, dtype, n=n)["flops_per_s"] / 1e12

"""Shared helpers for the pytest-benchmark benchmarks (FLOP counts, CUDA timing, extra_info)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, backward: bool = False) -> float:
    """Matmul FLOPs of softmax attention: 4*B*h*Nq*Nk*d forward; the backward counts 2.5x that."""
    fwd = 4.0 * batch * heads * n_q * n_k * head_dim
    return fwd * (1.0 + 2.5) if backward else fwd


def cuda_median_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events (one event pair per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def record(benchmark, fn: Callable[[], object], flops: float, rounds: int = 10, **info) -> None:
    """Time ``fn`` with CUDA events (always) and pytest-benchmark (when enabled); store TFLOP/s.

    ``benchmark.extra_info`` gets ``tflops`` (from the CUDA-event median), ``median_ms`` and
    everything in ``info``, so ``--benchmark-json`` carries the throughput of every case.
    """
    ms = cuda_median_ms(fn)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(median_ms=ms, flops=flops, tflops=flops / (ms * 1e-3) / 1e12,
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(synced(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tflops_pytest_median"] = flops / stats.stats.median / 1e12


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Achieved dense GEMM TFLOP/s on this GPU (the utilisation reference)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_median_ms(lambda: a @ b)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12

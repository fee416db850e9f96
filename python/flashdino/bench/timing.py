"""Timing primitives shared by every flashdino benchmark.

One rule for all of them: warm up first, time each call separately, report the median with its
spread (quartiles), never a mean (one preempted call would move it). On CUDA a call is timed with
a pair of events around it, so the host issuing the next call does not count; on a CPU with
``time.perf_counter``. When several candidates are compared on a shared CPU they take turns call
by call (:func:`interleaved`), so load from other processes hits all of them alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["sync", "time_calls", "summarize", "median_time", "interleaved", "peak_memory_mib", "is_oom",
           "short_error"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, repeats: int,
               *, start: int = 0, sync_each: bool = False) -> dict:
    """Times ``repeats`` calls of ``fn`` cycling through ``inputs``; seconds per call.

    CUDA: one event pair per call, calls issued back to back (``event_s``), and the host wall time
    of the whole block per call (``wall_block_s``); with ``sync_each`` every call is bracketed by
    synchronisations and its host wall time is recorded too (``wall_s``, the latency a caller sees).
    CPU: ``time.perf_counter`` around each call (``wall_s``).
    """
    k = len(inputs)
    out: dict = {}
    walls = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        sync(device)
        t_block = time.perf_counter()
        for i in range(repeats):
            x = inputs[(start + i) % k]
            if sync_each:
                sync(device)
                t0 = time.perf_counter()
            starts[i].record()
            fn(x)
            ends[i].record()
            if sync_each:
                sync(device)
                walls.append(time.perf_counter() - t0)
        sync(device)
        out["wall_block_s"] = (time.perf_counter() - t_block) / max(repeats, 1)
        out["event_s"] = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        if sync_each:
            out["wall_s"] = walls
        return out
    for i in range(repeats):
        x = inputs[(start + i) % k]
        t0 = time.perf_counter()
        fn(x)
        walls.append(time.perf_counter() - t0)
    out["wall_s"] = walls
    return out


def summarize(samples: Sequence[float]) -> dict:
    """Median, quartiles, inter-quartile range, min and max of per-call seconds."""
    s = sorted(samples)
    if not s:
        raise ValueError("no samples")
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0]))
    return dict(time_s=statistics.median(s), q1_s=q1, q3_s=q3, iqr_s=q3 - q1, min_s=s[0], max_s=s[-1],
                samples=len(s))


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time_calls(lambda _: fn(), [None], device, repeats)
    return statistics.median(t["event_s"] if "event_s" in t else t["wall_s"])


def interleaved(calls: dict[str, Callable[[int], Any]], rounds: int,
                before_round: Optional[Callable[[int], None]] = None) -> tuple[dict, dict]:
    """Host wall time of ``calls[name](round)``, taking turns call by call, the order rotated every round.

    A candidate that raises is dropped from the later rounds; returns (seconds per name, the
    exception per failed name).
    """
    names = list(calls)
    samples: dict[str, list] = {n: [] for n in names}
    errors: dict[str, BaseException] = {}
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        live = [n for n in names if n not in errors]
        if not live:
            break
        shift = r % len(live)
        for name in live[shift:] + live[:shift]:
            try:
                t0 = time.perf_counter()
                calls[name](r)
                samples[name].append(time.perf_counter() - t0)
            except Exception as exc:
                errors[name] = exc
    return samples, errors


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """The most one call of ``fn`` allocates above what is already resident (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

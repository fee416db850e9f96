"""Final LayerNorm split into prefix tokens and patches (Triton, one launch) vs the eager PyTorch
sequence it replaces and vs torch.compile of it.

Run on a CUDA machine (everything is skipped without one)::

    pytest benchmarks/bench_final_norm.py --benchmark-enable \
        --benchmark-json=benchmarks/results/final_norm_<gpu>.json

Cases, bf16, ~64K rows of N = 261 tokens (5 prefix + 16x16 patches), D in {384, 768, 1024, 1536,
4096}, patches as tokens and as a [B, D, H, W] feature map (eager: layer_norm, slicing, permute +
contiguous). ``extra_info`` holds the CUDA-event median and the achieved GB/s counting the
minimal HBM traffic (block output read once, outputs written once).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the final-norm benchmarks need a CUDA GPU", allow_module_level=True)

from _util import cuda_median_ms, synced  # noqa: E402

from flashdino import dispatch, ops  # noqa: E402
from flashdino.ops.final_norm.reference import final_norm as final_norm_ref  # noqa: E402

DIMS = [384, 768, 1024, 1536, 4096]
N_TOK = 261
ROWS = 2 ** 16
IMPLS = ["triton", "eager", "compiled"]
_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["tokens", "nchw"])
@pytest.mark.parametrize("D", DIMS)
def test_final_norm(benchmark, D, layout, impl):
    B, p, H, W = max(1, ROWS // N_TOK), 5, 16, 16
    x = torch.randn(B, p + H * W, D, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(D, device="cuda", dtype=torch.bfloat16), torch.randn(D, device="cuda", dtype=torch.bfloat16)
    grid = (H, W) if layout == "nchw" else None
    if impl == "triton":
        fn = lambda: ops.final_norm(x, p, w, b, 1e-6, patch_grid=grid)  # noqa: E731
    elif impl == "eager":
        fn = lambda: final_norm_ref(x, p, w, b, 1e-6, None, grid)  # noqa: E731
    else:
        key = f"final_{layout}"
        if key not in _compiled:
            _compiled[key] = torch.compile(lambda x, w, b: final_norm_ref(x, p, w, b, 1e-6, None, grid), dynamic=False)
        cf = _compiled[key]
        fn = lambda: cf(x, w, b)  # noqa: E731
    nbytes = 2 * x.numel() * x.element_size()
    steer = dispatch.use("triton", "final_norm") if impl == "triton" else contextlib.nullcontext()
    with torch.no_grad(), steer:
        ms = cuda_median_ms(fn, warmup=5, iters=20)
        benchmark.extra_info.update(op="final_norm", layout=layout, impl=impl, D=D, rows=B * (p + H * W),
                                    median_ms=ms, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                                    device=torch.cuda.get_device_name())
        benchmark.pedantic(synced(fn), rounds=20, warmup_rounds=2, iterations=1)
    if impl == "triton":
        assert dispatch.last_backend("final_norm") == "triton"

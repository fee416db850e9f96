"""Fused residual + LayerScale + LayerNorm (Triton) vs the eager PyTorch sequence it replaces and
vs torch.compile of it.

Run on a CUDA machine (everything is skipped without one)::

    pytest benchmarks/bench_residual_layernorm.py --benchmark-enable \
        --benchmark-json=benchmarks/results/residual_layernorm_<gpu>.json

Cases, bf16, rows = B * N with N = 261 (DINOv2/v3 at 224 px with 4 extra tokens) and B chosen so
that there are ~64K rows (the GPU is full), D in {384, 768, 1024, 1536, 4096}: forward
(``x + gamma * branch`` and ``layer_norm``; eager: 3 kernels) and forward + backward (eager:
autograd of the same).

``extra_info`` holds the CUDA-event median and the achieved GB/s counting the minimal HBM traffic
of the fused op (each tensor read or written once), so eager and fused numbers are comparable
("effective bandwidth").
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the norm benchmarks need a CUDA GPU", allow_module_level=True)

from _util import cuda_median_ms, synced  # noqa: E402

from flashdino import dispatch, ops  # noqa: E402
from flashdino.ops.residual_layernorm.reference import residual_layernorm as residual_ref  # noqa: E402

DIMS = [384, 768, 1024, 1536, 4096]
N_TOK = 261
ROWS = 2 ** 16
IMPLS = ["triton", "eager", "compiled"]
_compiled = {}


def _record(benchmark, fn, nbytes: float, **info):
    if info["impl"] == "triton":
        with dispatch.use("triton", "residual_layernorm"):
            _measure(benchmark, fn, nbytes, **info)
        assert dispatch.last_backend("residual_layernorm") == "triton"
    else:
        _measure(benchmark, fn, nbytes, **info)


def _measure(benchmark, fn, nbytes: float, **info):
    ms = cuda_median_ms(fn, warmup=5, iters=20)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(median_ms=ms, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(synced(fn), rounds=20, warmup_rounds=2, iterations=1)


def _compile(key, fn):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


def _res_inputs(D, grad=False, dtype=torch.bfloat16):
    B = max(1, ROWS // N_TOK)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(B, N_TOK, D), mk(B, N_TOK, D), mk(D), mk(D), mk(D)


def _res_fn(impl):
    if impl == "triton":
        return lambda *a: ops.residual_layernorm(*a, 1e-6)
    if impl == "eager":
        return lambda *a: residual_ref(*a, 1e-6)
    return _compile("residual", lambda *a: residual_ref(*a, 1e-6))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", DIMS)
def test_residual_layernorm_forward(benchmark, D, impl):
    args = _res_inputs(D)
    fn = _res_fn(impl)
    x = args[0]
    nbytes = 4 * x.numel() * x.element_size()  # read x, branch; write x_new, normed
    with torch.no_grad():
        _record(benchmark, lambda: fn(*args), nbytes, op="residual_layernorm", pass_="forward", impl=impl, D=D,
                rows=x.shape[0] * x.shape[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", DIMS)
def test_residual_layernorm_forward_backward(benchmark, D, impl):
    args = _res_inputs(D, grad=True)
    fn = _res_fn(impl)
    x = args[0]
    g1, g2 = torch.randn_like(x), torch.randn_like(x)

    def step():
        a, b = fn(*args)
        torch.autograd.backward((a, b), (g1, g2))

    # forward 4 tensors; backward reads dy, dx_new, x_new, branch and writes dx, dbranch
    nbytes = 10 * x.numel() * x.element_size()
    _record(benchmark, step, nbytes, op="residual_layernorm", pass_="forward+backward", impl=impl, D=D,
            rows=x.shape[0] * x.shape[1])

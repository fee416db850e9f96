"""Fused RoPE attention (Triton) vs PyTorch RoPE + SDPA (flash / efficient / cuDNN) and xformers.

Run on a CUDA machine (everything is skipped without one)::

    pytest benchmarks/bench_rope_attention.py --benchmark-enable \
        --benchmark-json=benchmarks/results/rope_attention_<gpu>.json
    pytest benchmarks/bench_rope_attention.py --benchmark-enable -k k_rotation   # the K-rotation study

Cases (head dim 64, bf16): DINOv3 ViT sequences N = 201 (224 px), 1029 (512 px), 4101 (1024 px)
with RoPE, DINOv2 sequences N = 261 (224 px, registers) and 1370 (518 px) without RoPE, a VGGT
frame block (N = 1374, qk_norm, VGGT RoPE) and VGGT global blocks over S = 10 and 50 frames
(N = S * (5 + 37*37)). The batch is chosen so that B * h * N is about 2^20 query rows (the GPU is
full). Each case records TFLOP/s (4*N^2*d*B*h forward, 3.5x that for forward + backward) in
``extra_info`` of the JSON, from a CUDA-event median; ``gemm_reference`` records the bf16 GEMM rate
of the same GPU in the same run.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the rope_attention benchmarks need a CUDA GPU", allow_module_level=True)

from _util import attention_flops, gemm_tflops, record  # noqa: E402

from flashdino import dispatch, ops  # noqa: E402
from flashdino.ops.rope_attention.grid import RopeGrid  # noqa: E402
from flashdino.ops.rope_attention.reference import apply_rope  # noqa: E402
from flashdino.ops.rope_attention.reference import rope_attention as torch_reference  # noqa: E402
from flashdino.ops.rope_attention.reference import split_qkv  # noqa: E402

tra = pytest.importorskip("flashdino.ops.rope_attention.triton")

try:
    import xformers.ops as xops
except Exception:  # not installed / not built for this GPU
    xops = None

D = 64
TARGET_ROWS = 2 ** 20  # B * h * N

# name: (mode, H, W, n_prefix, frames, heads, qk_norm)
CASES = {
    "dinov3-N201": ("dinov3", 14, 14, 5, 1, 6, False),
    "dinov2-N261": ("none", 16, 16, 5, 1, 6, False),
    "dinov3-N1029": ("dinov3", 32, 32, 5, 1, 12, False),
    "dinov2-N1370": ("none", 37, 37, 1, 1, 12, False),
    "dinov3-N4101": ("dinov3", 64, 64, 5, 1, 12, False),
    "vggt-frame-N1374": ("vggt", 37, 37, 5, 1, 16, True),
    "vggt-global-S10": ("vggt", 37, 37, 5, 10, 16, True),
    "vggt-global-S50": ("vggt", 37, 37, 5, 50, 16, True),
}


def _setup(case: str, dtype=torch.bfloat16, requires_grad=False):
    mode, H, W, n_prefix, frames, heads, qk_norm = CASES[case]
    n = frames * (n_prefix + H * W)
    batch = max(1, round(TARGET_ROWS / (heads * n)))
    qkv = torch.randn(batch, n, 3 * heads * D, device="cuda", dtype=dtype, requires_grad=requires_grad)
    if mode == "none":
        rope = None
    else:
        periods = (100.0 ** (2 * torch.arange(D // 4, device="cuda") / (D // 2))).to(torch.bfloat16).float()
        rope = RopeGrid(mode, H, W, n_prefix, periods=periods if mode == "dinov3" else None)
    norms = (None, None)
    if qk_norm:
        norms = tuple((torch.ones(D, device="cuda", dtype=dtype, requires_grad=requires_grad),
                       torch.zeros(D, device="cuda", dtype=dtype, requires_grad=requires_grad)) for _ in range(2))
    return qkv, heads, rope, norms, batch, n


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        pytest.skip(f"SDPBackend.{backend_name} is not in this torch")

    def run(qkv, heads, rope, q_norm, k_norm):
        with sdpa_kernel(backend):
            return torch_reference(qkv, heads, rope, q_norm, k_norm)
    return run


def _xformers(qkv, heads, rope, q_norm, k_norm):
    q, k, v = split_qkv(qkv, heads)  # [B, h, N, d]
    d = q.shape[-1]
    if q_norm is not None:
        q = torch.nn.functional.layer_norm(q, (d,), *q_norm, 1e-5)
        k = torch.nn.functional.layer_norm(k, (d,), *k_norm, 1e-5)
    if rope is not None:
        q, k = apply_rope(q, k, rope)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    B, N = out.shape[:2]
    return out.reshape(B, N, heads * d)


def _impl(name: str):
    if name.startswith("flashdino"):
        k_rotation = name.split("-", 1)[1]
        if k_rotation == tra.K_ROTATION:  # the shipped path, through the public op
            return lambda qkv, heads, rope, qn, kn: ops.rope_attention(qkv, heads, rope, q_norm=qn, k_norm=kn)
        # the other K-rotation variants exist only as a kernel option
        return lambda qkv, heads, rope, qn, kn: tra.rope_attention(qkv, heads, rope, qn, kn, 1e-5, None,
                                                                   k_rotation=k_rotation)
    if name == "xformers":
        if xops is None:
            pytest.skip("xformers is not installed")
        return _xformers
    return _sdpa(name.split("-", 1)[1])


IMPLS = ["flashdino-prepass", "sdpa-FLASH_ATTENTION", "sdpa-EFFICIENT_ATTENTION", "sdpa-CUDNN_ATTENTION", "xformers"]


def _run(benchmark, case, impl_name, backward):
    qkv, heads, rope, (q_norm, k_norm), batch, n = _setup(case, requires_grad=backward)
    impl = _impl(impl_name)
    params = [qkv] + [t for nrm in (q_norm, k_norm) if nrm is not None for t in nrm]
    if backward:
        grad_out = torch.randn(batch, n, heads * D, device="cuda", dtype=qkv.dtype)

        def fn():
            out = impl(qkv, heads, rope, q_norm, k_norm)
            return torch.autograd.grad(out, params, grad_out)
    else:
        def fn():
            with torch.no_grad():
                return impl(qkv, heads, rope, q_norm, k_norm)
    ours = impl_name.startswith("flashdino")
    mode, H, W, n_prefix, frames, _, qk_norm = CASES[case]
    with dispatch.use("triton", "rope_attention") if ours else contextlib.nullcontext():
        try:
            fn()
        except RuntimeError as exc:  # an SDPA backend that cannot run this case, or OOM
            torch.cuda.empty_cache()
            pytest.skip(f"{impl_name} cannot run {case}: {str(exc).splitlines()[0][:200]}")
        record(benchmark, fn, attention_flops(batch, heads, n, n, D, backward=backward),
               case=case, impl=impl_name, pass_="fwd+bwd" if backward else "fwd", batch=batch, heads=heads,
               n_tokens=n, head_dim=D, dtype="bfloat16", rope=mode, frames=frames, qk_norm=qk_norm)


@pytest.mark.gpu
@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case, impl_name):
    benchmark.group = f"rope_attention fwd {case}"
    _run(benchmark, case, impl_name, backward=False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(benchmark, case, impl_name):
    benchmark.group = f"rope_attention fwd+bwd {case}"
    _run(benchmark, case, impl_name, backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("k_rotation", tra.K_ROTATIONS)
@pytest.mark.parametrize("case", ["dinov3-N201", "dinov3-N1029", "dinov3-N4101", "vggt-frame-N1374",
                                  "vggt-global-S10"])
def test_k_rotation(benchmark, case, k_rotation):
    """The issue's K-rotation study: prepass (default) vs per-tile inline vs cached cos/sin table."""
    benchmark.group = f"rope_attention k_rotation {case}"
    _run(benchmark, case, f"flashdino-{k_rotation}", backward=False)


@pytest.mark.gpu
def test_gemm_reference(benchmark):
    """bf16 GEMM rate of this GPU, the utilisation reference for the TFLOP/s figures above."""
    rate = gemm_tflops()
    benchmark.extra_info.update(tflops=rate, device=torch.cuda.get_device_name(), what="bf16 8192^3 GEMM")
    benchmark.pedantic(lambda: None, rounds=1)
    assert math.isfinite(rate)

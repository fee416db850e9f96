"""Patch embedding into the token buffer (Triton implicit-im2col GEMM) vs the eager sequence it
replaces (conv2d -> flatten -> transpose -> where -> cat [-> + pos -> cat]) and vs torch.compile
of that sequence.

Run on a CUDA machine (everything is skipped without one)::

    pytest benchmarks/bench_patch_embed.py --benchmark-enable \
        --benchmark-json=benchmarks/results/patch_embed_<gpu>.json

Cases (bf16 weights): DINOv3 ViT-L/16 at 224 px (B=64) and 512 px (B=16), DINOv2 ViT-L/14-reg at
518 px (B=16, position table + registers), and a uint8 NHWC batch with ImageNet normalisation
(the eager baseline first converts, permutes and normalises). ``extra_info``: CUDA-event median,
TFLOP/s of the GEMM (2 * B*HW * D * C*P*P) and GB/s of the minimal traffic (pixels read once,
weights, token buffer written once).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the patch-embed benchmarks need a CUDA GPU", allow_module_level=True)

from _util import cuda_median_ms, synced  # noqa: E402

from flashdino import dispatch, ops  # noqa: E402
from flashdino.ops.patch_embed.reference import patch_embed_tokens as reference  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name: (B, size, P, D, R, pos, uint8_nhwc)
CASES = {
    "dinov3-L16-224": (64, 224, 16, 1024, 4, False, False),
    "dinov3-L16-512": (16, 512, 16, 1024, 4, False, False),
    "dinov2-L14reg-518": (16, 518, 14, 1024, 4, True, False),
    "dinov3-L16-224-uint8-nhwc": (64, 224, 16, 1024, 4, False, True),
}
IMPLS = ["triton", "eager", "compiled"]
_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_patch_embed_tokens(benchmark, case, impl):
    B, size, P, D, R, with_pos, u8 = CASES[case]
    dt = torch.bfloat16
    w = torch.randn(D, 3, P, P, device="cuda", dtype=dt) * 0.02
    b = torch.randn(D, device="cuda", dtype=dt)
    cls = torch.randn(1, 1, D, device="cuda", dtype=dt)
    extra = torch.randn(1, R, D, device="cuda", dtype=dt)
    HW = (size // P) ** 2
    pos = torch.randn(1, 1 + HW, D, device="cuda", dtype=dt) if with_pos else None
    if u8:
        x = torch.randint(0, 256, (B, size, size, 3), device="cuda", dtype=torch.uint8)
        kw = dict(channels_last=True, mean=MEAN, std=STD)
    else:
        x = torch.randn(B, 3, size, size, device="cuda", dtype=dt)
        kw = dict(channels_last=False, mean=None, std=None)
    args = (x, w, b, cls, extra, None, None, pos, kw["channels_last"], kw["mean"], kw["std"])
    if impl == "triton":
        fn = lambda: ops.patch_embed_tokens(x, w, b, cls, extra_tokens=extra, pos_embed=pos, **kw)  # noqa: E731
    elif impl == "eager":
        fn = lambda: reference(*args)  # noqa: E731
    else:
        if case not in _compiled:
            _compiled[case] = torch.compile(reference, dynamic=False)
        cf = _compiled[case]
        fn = lambda: cf(*args)  # noqa: E731
    K = 3 * P * P
    flops = 2.0 * B * HW * D * K
    nbytes = x.numel() * x.element_size() + w.numel() * 2 + B * (1 + R + HW) * D * 2 + (pos.numel() * 2 if with_pos else 0)
    steer = dispatch.use("triton", "patch_embed") if impl == "triton" else contextlib.nullcontext()
    with torch.no_grad(), steer:
        ms = cuda_median_ms(fn, warmup=5, iters=20)
        benchmark.extra_info.update(case=case, impl=impl, median_ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                                    gbps=nbytes / (ms * 1e-3) / 1e9, device=torch.cuda.get_device_name())
        benchmark.pedantic(synced(fn), rounds=20, warmup_rounds=2, iterations=1)
    if impl == "triton":
        assert dispatch.last_backend("patch_embed") == "triton"

"""The optional compiled extension flashdino._C: its API, and that it does not link libtorch."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flashdino import _native

module, why = _native.native_status()
needs_native = pytest.mark.skipif(module is None, reason=f"flashdino._C is not available: {why}")

FORBIDDEN = re.compile(r"^(libtorch|libc10|libcudart|libtorch_python|libcuda\.so)")


def test_status_is_a_reason():
    assert isinstance(why, str) and why
    if module is None:
        assert "not built" in why or "not importable" in why
        with pytest.raises(ImportError):
            _native.require_native()
        assert _native.cuda_architectures() == []


@needs_native
def test_api_types():
    assert isinstance(module.version(), str)
    import flashdino

    assert module.version() == flashdino.__version__
    assert isinstance(module.has_cuda(), bool)
    archs = module.cuda_architectures()
    assert isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    assert _native.cuda_architectures() == archs
    if module.has_cuda():
        assert archs, "a CUDA build must report its architectures"
        assert all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs), archs
        assert isinstance(module.cuda_version(), str)
        assert isinstance(module.cuda_driver_version(), int)
        assert hasattr(module, "rope_attention_qkv_forward") and hasattr(module, "rope_attention_qkv_backward")
        assert "sm_" + archs[0] in why
    else:
        assert archs == []
        assert module.cuda_version() is None
        assert "without CUDA" in why


@needs_native
def test_bad_arguments_raise_before_any_launch():
    if not module.has_cuda():
        pytest.skip("built without CUDA")
    common = dict(dtype=0, batch=1, tokens=4, stride_b=0, stride_n=0, heads=1, mode=0, height=0, width=0,
                  n_prefix=0, freqs=0, denom_h=1.0, denom_w=1.0, q_weight=0, q_bias=0, k_weight=0, k_bias=0,
                  eps=1e-5, round_mid=True, device=0, stream=0)
    with pytest.raises(ValueError, match="head_dim"):
        module.rope_attention_qkv_forward(qkv=1, q=1, k=1, v=1, head_dim=12, **common)
    with pytest.raises(ValueError, match="null data pointer"):
        module.rope_attention_qkv_forward(qkv=0, q=0, k=0, v=0, head_dim=16, **common)
    with pytest.raises(ValueError, match="multiple of n_prefix"):
        module.rope_attention_qkv_forward(qkv=1, q=1, k=1, v=1, head_dim=16,
                                **{**common, "mode": 1, "height": 1, "width": 3, "freqs": 1})


@needs_native
def test_no_libtorch_or_cudart_dependency():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    so = Path(module.__file__)
    assert so.exists(), so
    out = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, out  # the C++ runtime at least
    bad = [lib for lib in needed if FORBIDDEN.match(lib)]
    assert not bad, f"{so.name} links {bad}"


@needs_native
def test_cuda_errors_become_runtime_errors():
    import torch

    if not module.has_cuda():
        pytest.skip("built without CUDA")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a usable GPU (the launch must fail in the CUDA runtime)")
    args = dict(qkv=16, q=16, k=16, v=16, dtype=0, batch=1, tokens=4, stride_b=0, stride_n=0, heads=1,
                head_dim=16, mode=0, height=0, width=0, n_prefix=0, freqs=0, denom_h=1.0, denom_w=1.0, q_weight=0,
                q_bias=0, k_weight=0, k_bias=0, eps=1e-5, round_mid=True, device=0, stream=0)
    with pytest.raises(RuntimeError, match=r"CUDA error cuda\w+: \w"):
        module.rope_attention_qkv_forward(**args)

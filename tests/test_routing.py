"""Routing decisions on CUDA devices, checked on CPU: ``dispatch.select`` with a CUDA device and
the facts of each case (dtype, autocast, TF32 setting, compute capability, the architectures
``flashdino._C`` was built for). The capability query is mocked through the one function the
routing uses, ``flashdino.check.device.capability``; the first-use self-check and on-device
tuning are off (they would need a GPU to run their probes and timings)."""

from __future__ import annotations

import pytest
import torch

import flashdino.ops  # noqa: F401  (registers the backends)
from flashdino import dispatch
from flashdino.check import device as fd_device
from flashdino.ops.final_norm import FinalNormCall
from flashdino.ops.patch_embed import PatchEmbedCall
from flashdino.ops.residual_layernorm import ResidualLayerNormCall
from flashdino.ops.rope_attention import RopeAttentionCall, RopeGrid

CUDA = torch.device("cuda", 0)
HAS_TRITON = "triton" in dispatch.backends("rope_attention")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not importable here")


@pytest.fixture(autouse=True)
def _routing_env(monkeypatch):
    for name in ("FLASHDINO_BACKEND", "FLASHDINO_BACKEND_ROPE_ATTENTION", "FLASHDINO_BACKEND_RESIDUAL_LAYERNORM",
                 "FLASHDINO_BACKEND_FINAL_NORM", "FLASHDINO_BACKEND_PATCH_EMBED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "0")
    monkeypatch.setenv("FLASHDINO_TUNE", "0")  # the fixed rules (tests/test_tune.py covers the tuner)
    # The rules under test are the GPU's: the interpreter (which the other tests use on CPU
    # tensors) lifts the fp32 rule, so take it out of the environment for the routing decisions.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set and restore
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _gpu(monkeypatch, cc):
    monkeypatch.setattr(fd_device, "capability", lambda device: cc)


def _rope(dtype=torch.bfloat16, head_dim=64, n_tokens=1029, token_stride=None, rope="dinov3", qk_norm=False):
    grid = None
    if rope == "dinov3":
        grid = RopeGrid("dinov3", 32, 32, 5, periods=torch.ones(head_dim // 4))
    elif rope == "vggt":
        grid = RopeGrid("vggt", 32, 32, 5)
    return RopeAttentionCall(dtype=dtype, head_dim=head_dim, n_tokens=n_tokens,
                             token_stride=3 * 16 * head_dim if token_stride is None else token_stride, rope=grid,
                             qk_norm=qk_norm)


def _select(op, call):
    _, name, reason = dispatch.select(op, call, CUDA)
    return name, reason


# ------------------------------------------------------------------------------------------------
# dtype and precision
# ------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope,qk_norm", [(None, False), ("dinov3", False), ("vggt", True)])
def test_half_precision_attention_runs_triton_on_sm90(monkeypatch, dtype, rope, qk_norm):
    _gpu(monkeypatch, (9, 0))
    assert _select("rope_attention", _rope(dtype, rope=rope, qk_norm=qk_norm))[0] == "triton"


@needs_triton
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp32_attention_avoids_triton_without_tf32(monkeypatch, head_dim):
    _gpu(monkeypatch, (9, 0))
    name, reason = _select("rope_attention", _rope(torch.float32, head_dim))
    assert name != "triton"
    assert "fp32" in reason and "allow_tf32" in reason  # the reason names the setting that would change it
    # and the Triton backend itself names why
    assert "TF32" in dispatch._REGISTRY["rope_attention"]["triton"].supports(_rope(torch.float32, head_dim))


@needs_triton
def test_fp32_attention_runs_tf32_kernel_when_allowed(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _select("rope_attention", _rope(torch.float32))[0] == "triton"
    from flashdino.ops.rope_attention import triton as tra
    assert tra._dot_prec(torch.float32) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert tra._dot_prec(torch.float32) == "ieee"  # a direct call without TF32 stays exact


@needs_triton
def test_autocast(monkeypatch):
    """Under CUDA autocast the qkv Linear returns bf16: Triton. fp32 qkv reaching the op under
    autocast (the reference would attend in bf16) goes to the reference."""
    _gpu(monkeypatch, (9, 0))
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda device_type=None: device_type == "cuda" or (device_type is not None and real(device_type)))
    assert _select("rope_attention", _rope(torch.bfloat16, rope="vggt", qk_norm=True))[0] == "triton"
    name, reason = _select("rope_attention", _rope(torch.float32))
    assert name == "torch" and "autocast" in reason
    # the residual stream stays fp32 under autocast: the fp32 LayerNorm kernels (no dots) serve it
    assert _select("residual_layernorm", ResidualLayerNormCall(torch.float32, torch.bfloat16, 1024))[0] == "triton"


# ------------------------------------------------------------------------------------------------
# compute capability
# ------------------------------------------------------------------------------------------------

ALL_CALLS = [
    ("rope_attention", _rope()),
    ("residual_layernorm", ResidualLayerNormCall(torch.bfloat16, torch.bfloat16, 1024)),
    ("final_norm", FinalNormCall(torch.bfloat16, 1024, False)),
    ("patch_embed", PatchEmbedCall(torch.bfloat16, torch.bfloat16, 16, False)),
]


@needs_triton
@pytest.mark.parametrize("op,call", ALL_CALLS, ids=[c[0] for c in ALL_CALLS])
@pytest.mark.parametrize("cc", [(7, 0), (7, 5)])
def test_pre_ampere_gpus_get_the_reference(monkeypatch, op, call, cc):
    _gpu(monkeypatch, cc)
    name, reason = _select(op, call)
    assert name == "torch"
    assert f"compute capability {cc[0]}.{cc[1]}" in reason and "sm_80" in reason


@needs_triton
@pytest.mark.parametrize("op,call", ALL_CALLS, ids=[c[0] for c in ALL_CALLS])
@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
def test_ampere_and_newer_get_triton(monkeypatch, op, call, cc):
    _gpu(monkeypatch, cc)
    assert _select(op, call)[0] == "triton"


def test_explain_reports_the_capability_reason(monkeypatch):
    """``flashdino info`` shows why a GPU gets the reference."""
    _gpu(monkeypatch, (7, 5))
    explained = dispatch.explain(CUDA)
    assert explained["rope_attention"][0] == "torch"
    if HAS_TRITON:
        assert "compute capability 7.5" in explained["rope_attention"][1]


# ------------------------------------------------------------------------------------------------
# flashdino._C architectures
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_native(monkeypatch):
    """A registered "cuda" backend of rope_attention (as if ``_C`` were built) with build archs."""
    calls = []
    impls = dict(dispatch._REGISTRY["rope_attention"])
    impls["cuda"] = dispatch.Impl(lambda *a: calls.append(a), lambda call: None)
    monkeypatch.setitem(dispatch._REGISTRY, "rope_attention", impls)
    monkeypatch.setattr(fd_device, "built_architectures", lambda: ["80", "86", "89", "90a"])
    return calls


@pytest.mark.parametrize("cc,runs", [((8, 0), True), ((8, 6), True), ((8, 7), True), ((8, 9), True),
                                     ((9, 0), True), ((10, 0), False), ((12, 0), False), ((7, 5), False)])
def test_native_runs_only_on_built_architectures(monkeypatch, fake_native, cc, runs):
    _gpu(monkeypatch, cc)
    why = dispatch._why_not("rope_attention", "cuda", CUDA, _rope(torch.float32))
    if runs:
        assert why is None
    else:
        assert f"sm_{cc[0]}{cc[1]}" in why and "sm_90a" in why and "FLASHDINO_CUDA_ARCHITECTURES" in why


def test_native_without_the_device_arch_falls_back_to_torch(monkeypatch, fake_native):
    # fp32 without TF32: Triton declines, so the choice is between _C and the reference.
    _gpu(monkeypatch, (12, 0))
    name, reason = _select("rope_attention", _rope(torch.float32))
    assert name == "torch" and "cuda: flashdino._C has kernels for" in reason
    _gpu(monkeypatch, (9, 0))
    assert _select("rope_attention", _rope(torch.float32))[0] == "cuda"


def test_runs_on_rules():
    assert fd_device.runs_on(["90a"], (9, 0)) and not fd_device.runs_on(["90a"], (10, 0))
    assert fd_device.runs_on(["80"], (8, 6)) and fd_device.runs_on(["86"], (8, 9))
    assert not fd_device.runs_on(["86"], (8, 0))  # SASS runs forward within a major version only
    assert fd_device.runs_on(["100", "120"], (10, 3)) and fd_device.runs_on(["120"], (12, 1))
    assert not fd_device.runs_on(["80", "86", "89", "90a"], (7, 5))
    assert not fd_device.runs_on([], (9, 0)) and not fd_device.runs_on(["garbage"], (9, 0))


# ------------------------------------------------------------------------------------------------
# int32 offsets and launch configurations
# ------------------------------------------------------------------------------------------------

@needs_triton
def test_int32_offset_guard(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    ok = _rope(n_tokens=100_000, token_stride=3 * 1024)
    assert _select("rope_attention", ok)[0] == "triton"
    too_long = _rope(n_tokens=700_000, token_stride=3 * 1024)  # 2.15e9 elements per image
    name, reason = _select("rope_attention", too_long)
    assert name != "triton" and "int32" in reason


@needs_triton
def test_int32_guard_uses_the_stride_the_kernel_will_see():
    """A qkv whose channel dim is not contiguous is copied first: the guard must look at the
    contiguous token stride, not the original one."""
    from flashdino import ops

    seen = []
    real = dispatch.select

    def spy(op, call, device, backend=None):
        seen.append(call)
        return real(op, call, device, backend)

    qkv = torch.randn(1, 6, 3 * 16, dtype=torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    assert qkv.stride(1) == 1
    try:
        dispatch.select = spy
        ops.rope_attention(qkv, 1, None, backend="torch")
    finally:
        dispatch.select = real
    assert seen[-1].token_stride == 48


@needs_triton
def test_grad_out_with_a_huge_token_stride_is_copied(monkeypatch):
    """The backward indexes grad_out with int32 token offsets as well: a view whose span exceeds
    2**31 elements is made contiguous before the launch."""
    from flashdino.ops.rope_attention import triton as tra

    captured = {}

    def fake_delta(*args, **kwargs):
        captured["grad_out"] = args[1]
        raise RuntimeError("stop")

    class Launcher:
        def __getitem__(self, grid):
            return fake_delta

    monkeypatch.setattr(tra, "_bwd_delta_kernel", Launcher())
    d, heads, n = 16, 1, 4
    qkv = torch.empty(1, n, 3 * heads * d, device="meta")
    out = torch.empty(1, n, heads * d, device="meta")
    lse = torch.empty(1, heads, n, device="meta")
    wide = torch.empty(1, n, 2**30, device="meta")[..., :heads * d]  # token stride 2**30, span 4 * 2**30
    with pytest.raises(RuntimeError, match="stop"):
        tra._backward(wide, qkv, out, lse, None, None, None, None, None, None, heads, 1, 1, 0, "none", 1.0, 1.0, 1e-5, 0.25)
    assert captured["grad_out"].stride(1) == heads * d


@needs_triton
def test_launch_tables_cover_every_supported_head_dim():
    from flashdino.ops.rope_attention import triton as tra

    for d in tra.SUPPORTED_HEAD_DIMS:
        assert d in tra.ELEM_CONFIGS
        for precision in ("half", "tf32"):
            for table in (tra.FWD_CONFIGS, tra.BWD_CONFIGS):
                bm, bn, warps, stages = table[(precision, d)]
                assert bm >= 16 and bn >= 16 and warps in (1, 2, 4, 8) and stages >= 1


@needs_triton
def test_expert_launch_override_is_validated(monkeypatch):
    from flashdino.ops.rope_attention import triton as tra

    monkeypatch.setenv("FLASHDINO_ROPE_ATTN_FWD_CFG", "128,64,4,3")
    assert tra._parse_env_cfg("FLASHDINO_ROPE_ATTN_FWD_CFG") == (128, 64, 4, 3)
    for bad in ("128,64,4", "100,64,4,3", "128,64,3,3", "a,b,c,d", "128,64,4,0"):
        monkeypatch.setenv("FLASHDINO_ROPE_ATTN_FWD_CFG", bad)
        with pytest.raises(ValueError, match="FLASHDINO_ROPE_ATTN_FWD_CFG"):
            tra._parse_env_cfg("FLASHDINO_ROPE_ATTN_FWD_CFG")


@needs_triton
def test_routing_traces_under_torch_compile_fullgraph(monkeypatch):
    """torch.compile reads the routing while tracing: the device rules and the self-check hook must
    trace without a graph break (no probe, lock or device query inside traced code)."""
    _gpu(monkeypatch, (9, 0))
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "1")
    from flashdino.check import selfcheck

    monkeypatch.setattr(selfcheck, "run_probe", lambda *a, **k: pytest.fail("a probe ran while tracing"))
    call = ResidualLayerNormCall(torch.bfloat16, torch.bfloat16, 1024)
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        _, name, _ = dispatch.select("residual_layernorm", call, CUDA)
        seen.append(name)
        return x + 1

    torch._dynamo.reset()
    assert f(torch.ones(2)).tolist() == [2.0, 2.0]
    assert seen == ["triton"]
    # a backend the self-check disabled stays refused in traced code
    monkeypatch.setitem(selfcheck._DISABLED_OPS, ("residual_layernorm", "triton"), "output 1: max error 1e-01")
    seen.clear()
    torch._dynamo.reset()
    f(torch.ones(3))
    assert seen == ["torch"]

"""Fused residual + LayerScale + LayerNorm (``ops.residual_layernorm``): Triton vs the reference.

Without a GPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1) on
tiny shapes; the GPU-marked tests repeat the checks at model sizes in bf16.
"""

import pytest
import torch

from flashdino import dispatch, ops
from flashdino.ops.residual_layernorm import ResidualLayerNormCall
from flashdino.ops.residual_layernorm.reference import residual_layernorm as reference

from _backends import backend_params

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _inputs(shape, dtype=torch.float32, gamma=True, affine=True, device=DEV, grad=False):
    D = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    branch = torch.randn(shape, device=device).to(dtype)
    g = (torch.rand(D, device=device) + 0.5).to(dtype) if gamma else None
    w = (torch.randn(D, device=device) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(D, device=device) * 0.1).to(dtype) if affine else None
    ts = [x, branch, g, w, b]
    if grad:
        for t in ts:
            if t is not None:
                t.requires_grad_(True)
    return ts


def _close(a, b, rtol, atol):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


SHAPES = [(1, 1, 8), (2, 5, 24), (3, 7, 33), (1, 3, 384), (2, 1, 1000), (17, 48), (1, 2, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,affine", [(True, True), (False, True), (True, False)])
def test_forward_fp32_matches_reference(shape, gamma, affine):
    x, br, g, w, b = _inputs(shape, gamma=gamma, affine=affine)
    x_new, normed = ops.residual_layernorm(x, br, g, w, b, 1e-5, backend="triton")
    ref_x, ref_n = reference(x, br, g, w, b, 1e-5)
    assert x_new.dtype == ref_x.dtype and normed.dtype == ref_n.dtype
    assert x_new.shape == ref_x.shape and normed.shape == ref_n.shape
    _close(x_new, ref_x, 1e-6, 1e-6)
    _close(normed, ref_n, 1e-5, 1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 7, 33), (1, 3, 384), (17, 48)])
@pytest.mark.parametrize("gamma,affine", [(True, True), (False, True), (True, False)])
def test_backward_fp32_matches_reference(shape, gamma, affine):
    ins = _inputs(shape, gamma=gamma, affine=affine, grad=True)
    leaves = [t for t in ins if t is not None]
    out = ops.residual_layernorm(*ins, 1e-5, backend="triton")
    ref = reference(*ins, 1e-5)
    gys = [torch.randn_like(o) for o in ref]
    got = torch.autograd.grad(out, leaves, gys)
    want = torch.autograd.grad(ref, leaves, gys)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.shape == e.shape
        _close(a, e, 1e-4, 1e-5)


def test_backward_only_through_normed_or_residual():
    """Either output alone may carry the gradient (the other's grad is None/zero)."""
    ins = _inputs((2, 3, 40), grad=True)
    leaves = [t for t in ins if t is not None]
    for pick in (0, 1):
        out = ops.residual_layernorm(*ins, 1e-5, backend="triton")[pick]
        ref = reference(*ins, 1e-5)[pick]
        gy = torch.randn_like(ref)
        got = torch.autograd.grad(out, leaves, gy, allow_unused=True)
        want = torch.autograd.grad(ref, leaves, gy, allow_unused=True)
        for a, e in zip(got, want):
            if e is None:
                assert a is None or not a.abs().any()
            else:
                _close(a, e, 1e-4, 1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 24), (1, 3, 384), (3, 11)])
def test_forward_fp16(shape):
    x, br, g, w, b = _inputs(shape, dtype=torch.float16)
    x_new, normed = ops.residual_layernorm(x, br, g, w, b, 1e-5, backend="triton")
    ref_x, ref_n = reference(x.float(), br.float(), g.float(), w.float(), b.float(), 1e-5)
    assert x_new.dtype == torch.float16 and normed.dtype == torch.float16
    # x_new follows the eager rounding: (branch * gamma) rounded to fp16, then the sum rounded.
    eager_x = x + br * g
    assert torch.equal(x_new, eager_x)
    _close(x_new.float(), ref_x, 2e-3, 2e-3)
    _close(normed.float(), ref_n, 1e-2, 1e-2)


def test_backward_fp16_close_to_fp32():
    ins = _inputs((3, 4, 64), dtype=torch.float16, grad=True)
    leaves = [t for t in ins if t is not None]
    out = ops.residual_layernorm(*ins, 1e-5, backend="triton")
    ref32 = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = reference(*ref32, 1e-5)
    gys = [torch.randn_like(o) for o in ref]
    got = torch.autograd.grad(out, leaves, [g.half() for g in gys])
    want = torch.autograd.grad(ref, ref32, gys)
    for a, e in zip(got, want):
        assert a.dtype == torch.float16
        rel = (a.float() - e).norm() / e.norm()
        assert rel < 5e-3, rel


def test_mixed_dtypes_promote_like_eager():
    """Autocast-style call: fp32 residual stream, half-precision branch, fp32 gamma / norm weights."""
    x, _, g, w, b = _inputs((2, 6, 48))
    br = torch.randn(2, 6, 48, device=DEV).half()
    x_new, normed = ops.residual_layernorm(x, br, g, w, b, 1e-6, backend="triton")
    ref_x, ref_n = reference(x, br, g, w, b, 1e-6)
    assert x_new.dtype == ref_x.dtype == torch.float32
    _close(x_new, ref_x, 1e-6, 1e-6)
    _close(normed, ref_n, 1e-5, 1e-5)


def test_non_contiguous_inputs():
    base = torch.randn(3, 40, 2 * 24, device=DEV)
    x = base[..., ::2]  # strided last dim
    br = torch.randn(40, 3, 24, device=DEV).transpose(0, 1)  # permuted
    g = torch.rand(48, device=DEV)[::2]
    w, b = torch.randn(24, device=DEV), torch.randn(24, device=DEV)
    assert not x.is_contiguous() and not br.is_contiguous()
    out = ops.residual_layernorm(x, br, g, w, b, 1e-5, backend="triton")
    ref = reference(x, br, g, w, b, 1e-5)
    for a, e in zip(out, ref):
        _close(a, e, 1e-5, 1e-5)


def test_empty_rows():
    x = torch.randn(0, 5, 16, device=DEV)
    x_new, normed = ops.residual_layernorm(x, x.clone(), None, None, None, 1e-5, backend="triton")
    assert x_new.shape == normed.shape == x.shape


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="differ"):
        ops.residual_layernorm(x, torch.randn(2, 3, 9), None, None, None, 1e-5)
    with pytest.raises(TypeError, match="floating point"):
        ops.residual_layernorm(x.long(), x.long(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="gamma must be a \\[8\\] tensor"):
        ops.residual_layernorm(x, x, torch.ones(9), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        ops.residual_layernorm(x, x, None, torch.ones(2, 4), None, 1e-5)
    with pytest.raises(ValueError, match="cannot run this call"):
        ops.residual_layernorm(x.double(), x.double(), None, None, None, 1e-5, backend="triton")


def test_cpu_default_is_the_reference_function():
    call = ResidualLayerNormCall(dtype=torch.float32, branch_dtype=torch.float32, dim=8)
    fn, name, _ = dispatch.select("residual_layernorm", call, torch.device("cpu"))
    assert name == "torch" and fn is reference


def test_opcheck_custom_op():
    from flashdino.ops.residual_layernorm import triton as tn

    x, br, g, w, b = _inputs((2, 3, 16), grad=True)
    torch.library.opcheck(tn.residual_layernorm_fwd, (x, br, g, w, b, 1e-5, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# -- GPU, model sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("D", [384, 768, 1024, 1280, 1536, 4096])
def test_gpu_bf16_model_sizes(D):
    rows = (2, 1 + 4 + 196)
    x, br, g, w, b = _inputs(rows + (D,), dtype=torch.bfloat16, grad=True)
    leaves = [x, br, g, w, b]
    out = ops.residual_layernorm(x, br, g, w, b, 1e-6)  # default dispatch: Triton on CUDA
    eager = reference(x, br, g, w, b, 1e-6)
    # the residual stream is the eager bf16 sequence, bit for bit
    assert torch.equal(out[0], eager[0])
    ref32 = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = reference(*ref32, 1e-6)
    cos = torch.nn.functional.cosine_similarity(out[1].float().flatten(), ref[1].flatten(), dim=0)
    assert cos > 0.9999
    assert ((out[1].float() - ref[1]).norm() / ref[1].norm()) < 1e-2
    gys = [torch.randn_like(o) for o in ref]
    got = torch.autograd.grad(out, leaves, [gy.bfloat16() for gy in gys])
    want = torch.autograd.grad(ref, ref32, gys)
    for a, e in zip(got, want):
        assert ((a.float() - e).norm() / e.norm()) < 2e-2


@pytest.mark.gpu
def test_gpu_autocast_matches_reference():
    x, _, g, w, b = _inputs((4, 261, 768))
    br = torch.randn(4, 261, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        br = torch.nn.functional.linear(br, torch.eye(768, device="cuda"))  # bf16 under autocast
        out = ops.residual_layernorm(x, br, g, w, b, 1e-5)
        ref = reference(x, br, g, w, b, 1e-5)
    for a, e in zip(out, ref):
        assert a.dtype == e.dtype
        _close(a, e, 1e-5, 1e-5)


@pytest.mark.gpu
def test_gpu_fp32_tight():
    ins = _inputs((8, 257, 1024), grad=True)
    out = ops.residual_layernorm(*ins, 1e-5)
    ref = reference(*ins, 1e-5)
    for a, e in zip(out, ref):
        _close(a, e, 1e-5, 1e-5)
    gys = [torch.randn_like(o) for o in ref]
    for a, e in zip(torch.autograd.grad(out, ins, gys), torch.autograd.grad(ref, ins, gys)):
        _close(a, e, 1e-4, 1e-4)


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashdino.ops.final_norm import triton as tf
from flashdino.ops.residual_layernorm import triton as tn
from flashdino.ops.patch_embed import triton as tp


def compile_(fn, types, constexprs, num_warps):
    signature = {a: types[a] for a in fn.arg_names if a in types}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))
    assert kernel.asm.get("cubin")
    print("compiled", fn.__name__, flush=True)


p = "*bf16"
bm, bd, nw = tn.tile_config(1024)
compile_(tn._residual_ln_fwd_kernel,
         dict(X=p, BR=p, G=p, W=p, B=p, XOUT=p, Y=p, MEAN="*fp32", RSTD="*fp32", M="i32", D="i32", eps="fp32"),
         dict(HAS_BRANCH=True, HAS_GAMMA=True, ROUND_PROD=True, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_D=bd), nw)
bm, bd, nw = tn.tile_config(4096)
compile_(tn._ln_bwd_kernel,
         dict(DY=p, DXO=p, XN=p, BR=p, G=p, W=p, MEAN="*fp32", RSTD="*fp32", DX=p, DBR=p, DG_PART="*fp32",
              DW_PART="*fp32", DB_PART="*fp32", M="i32", D="i32", rows_per_prog="i32"),
         dict(HAS_DXO=True, HAS_BRANCH=True, HAS_GAMMA=True, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_D=bd), nw)
bm, bd, nw = tn.tile_config(768)
compile_(tf._final_norm_fwd_kernel,
         dict(X=p, W=p, B=p, PW=p, PB=p, PRE=p, PAT=p, MEAN="*fp32", RSTD="*fp32", M="i32", N="i32", D="i32",
              n_prefix="i32", HW="i32", eps="fp32"),
         dict(HAS_W=True, HAS_B=True, UNTIED=True, NCHW=True, BLOCK_M=bm, BLOCK_D=bd), nw)
for xdt, wdt, prec, cl in (("*bf16", "*bf16", None, False), ("*u8", "*bf16", None, True),
                           ("*fp32", "*fp32", "tf32", False)):
    compile_(tp._patch_embed_kernel,
             dict(X=xdt, WT=wdt, BIAS="*fp32", MASKS="*u8", MT="*fp32", POS="*fp32", OUT="*fp32", M="i32",
                  m_start="i32", D="i32", K="i32", HW="i32", Wp="i32", C="i32", sxb="i32", sxc="i32",
                  sxh="i32", sxw="i32",
                  out_sb="i32", n_prefix="i32"),
             dict(P=14, CHANNELS_LAST=cl, HAS_MASK=True, HAS_POS=True, ROUND_CONV=wdt != "*fp32",
                  PRECISION=prec, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 8)
print("ALL OK")
"""


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile (Triton -> PTX -> cubin with the bundled ptxas) of the norm, final-norm
    and patch-embed kernels for an H100, so GPU-only lowering errors show up on CPU-only machines.
    Runs in a subprocess: the interpreter (TRITON_INTERPRET=1) replaces the compiler in-process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import flashdino

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(flashdino.__file__).parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("no ptxas bundled with triton")
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_fp64_branch_is_left_to_the_reference():
    # Regression: supports() ignored the branch dtype, so an fp64 branch (outputs promote to fp64)
    # was sent to the fp32 Triton kernel, which only approximates the fp64 result.
    x = torch.randn(2, 5, 24, device=DEV)
    branch = torch.randn(2, 5, 24, device=DEV, dtype=torch.float64)
    from flashdino.ops.residual_layernorm import triton as tn

    why = tn.supports(ResidualLayerNormCall(dtype=x.dtype, branch_dtype=branch.dtype, dim=24))
    assert why is not None and "branch" in why
    with pytest.raises(ValueError, match="cannot run"):
        ops.residual_layernorm(x, branch, None, None, None, 1e-6, backend="triton")


# -- every backend against an independent fp64 oracle ----------------------------------------------


def _oracle(x, branch, gamma, weight, bias, eps):
    x_new = x.double() + (branch.double() * gamma.double() if gamma is not None else branch.double())
    mean = x_new.mean(-1, keepdim=True)
    var = ((x_new - mean) ** 2).mean(-1, keepdim=True)
    normed = (x_new - mean) / torch.sqrt(var + eps)
    if weight is not None:
        normed = normed * weight.double()
    if bias is not None:
        normed = normed + bias.double()
    return x_new, normed


@pytest.mark.parametrize("backend", backend_params("residual_layernorm"))
@pytest.mark.parametrize("shape", [(2, 5, 24), (17, 48), (1, 3, 1000)])
@pytest.mark.parametrize("gamma,affine", [(True, True), (False, True), (True, False)])
def test_every_backend_matches_the_oracle(backend, shape, gamma, affine):
    leaves = _inputs(shape, gamma=gamma, affine=affine, grad=True)
    x_new, normed = ops.residual_layernorm(*leaves, 1e-6, backend=backend)
    assert dispatch.last_backend("residual_layernorm") == backend
    want = _oracle(*leaves, 1e-6)
    for a, e in zip((x_new, normed), want):
        assert a.dtype == torch.float32 and a.shape == e.shape
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
    used = [t for t in leaves if t is not None]
    g1, g2 = torch.randn_like(x_new), torch.randn_like(normed)
    got = torch.autograd.grad((x_new, normed), used, (g1, g2))
    expected = torch.autograd.grad(want, used, (g1.double(), g2.double()))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=1e-4)

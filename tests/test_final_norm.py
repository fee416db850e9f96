"""Final norm op (``ops.final_norm``) and the models' use of it, Triton vs the reference.

The whole-model tests run a depth-2 model with the Triton norm / patch-embed kernels forced
(``dispatch.use``, interpreter on CPU) against the forced torch backend.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino import dispatch, ops
from flashdino.ops.final_norm import FinalNormCall
from flashdino.ops.final_norm.reference import final_norm as reference

from _backends import backend_params

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
OUR_OPS = ("residual_layernorm", "final_norm", "patch_embed")


def _params(D, dtype=torch.float32, grad=False, device=DEV):
    ps = [(torch.randn(D, device=device) * 0.5 + 1).to(dtype), (torch.randn(D, device=device) * 0.1).to(dtype),
          (torch.randn(D, device=device) * 0.5 + 1).to(dtype), (torch.randn(D, device=device) * 0.1).to(dtype)]
    return [p.requires_grad_(grad) for p in ps]


CASES = [  # B, n_prefix, H, W, D
    (1, 1, 1, 1, 8), (2, 5, 3, 4, 40), (3, 0, 2, 3, 33), (1, 5, 5, 3, 384), (2, 1, 2, 2, 1000),
]


@pytest.mark.parametrize("B,p,H,W,D", CASES)
@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("nchw", [False, True])
def test_forward_backward_fp32(B, p, H, W, D, untied, nchw):
    x = torch.randn(B, p + H * W, D, device=DEV, requires_grad=True) * 3 + 1
    w, b, pw, pb = _params(D, grad=True)
    pn = (pw, pb) if untied else None
    grid = (H, W) if nchw else None
    got = ops.final_norm(x, p, w, b, 1e-6, prefix_norm=pn, patch_grid=grid, backend="triton")
    want = reference(x, p, w, b, 1e-6, pn, grid)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert a.is_contiguous()
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    leaves = [x, w, b] + ([pw, pb] if untied else [])
    gys = [torch.randn_like(e) for e in want]
    for a, e in zip(torch.autograd.grad(got, leaves, gys), torch.autograd.grad(want, leaves, gys)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_grad_through_one_output_only():
    x = torch.randn(2, 7, 24, device=DEV, requires_grad=True)
    w, b, _, _ = _params(24, grad=True)
    got = ops.final_norm(x, 3, w, b, 1e-6, backend="triton")[1]
    want = reference(x, 3, w, b, 1e-6)[1]
    gy = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (x, w, b), gy), torch.autograd.grad(want, (x, w, b), gy)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("untied", [False, True])
def test_fp16_and_no_affine(untied):
    x = torch.randn(2, 9, 40, device=DEV).half()
    w, b, pw, pb = _params(40, torch.float16)
    got = ops.final_norm(x, 3, w, b, 1e-5, prefix_norm=(pw, pb) if untied else None, patch_grid=(2, 3),
                         backend="triton")
    want = reference(x.float(), 3, w.float(), b.float(), 1e-5, (pw.float(), pb.float()) if untied else None, (2, 3))
    for a, e in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), e, rtol=1e-2, atol=1e-2)
    got = ops.final_norm(x.float(), 3, None, None, 1e-5, backend="triton")
    want = reference(x.float(), 3, None, None, 1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    x = torch.randn(7, 2, 48, device=DEV).transpose(0, 1)[..., ::2]
    w, b, _, _ = _params(24)
    for a, e in zip(ops.final_norm(x, 1, w, b, 1e-6, patch_grid=(2, 3), backend="triton"),
                    reference(x, 1, w, b, 1e-6, None, (2, 3))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x = torch.randn(2, 7, 8)
    w, b, _, _ = _params(8, device="cpu")
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        ops.final_norm(x[0], 1, w, b, 1e-6)
    with pytest.raises(ValueError, match="n_prefix 8 is outside"):
        ops.final_norm(x, 8, w, b, 1e-6)
    with pytest.raises(ValueError, match="patch grid 2x2 does not match the 6 patch tokens"):
        ops.final_norm(x, 1, w, b, 1e-6, patch_grid=(2, 2))
    with pytest.raises(ValueError, match="weight must be a \\[8\\] tensor"):
        ops.final_norm(x, 1, torch.ones(9), b, 1e-6)
    with pytest.raises(TypeError, match="floating point"):
        ops.final_norm(x.long(), 1, None, None, 1e-6)


def test_cpu_default_is_the_reference_function():
    fn, name, _ = dispatch.select("final_norm", FinalNormCall(torch.float32, 8, False), torch.device("cpu"))
    assert name == "torch" and fn is reference


# -- models ---------------------------------------------------------------------------------------


def _tiny(name, **kw):
    torch.manual_seed(0)
    return flashdino.create_model(name, depth=2, embed_dim=64, num_heads=2, **kw).eval()


@pytest.mark.parametrize("untie", [False, True])
def test_model_final_norm_cpu_bitwise_unchanged(untie):
    """The CPU path computes exactly what the models computed before the op existed."""
    m = _tiny("dinov3_vits16", untie_cls_and_patch_norms=untie)
    with torch.no_grad():
        for mod in (m.norm, m.cls_norm):
            if mod is not None:
                mod.weight.normal_()
                mod.bias.normal_()
    x = torch.randn(2, 5 + 6, 64)
    p = m.n_prefix_tokens
    if untie:
        old = (m.cls_norm(x[:, :p]), m.norm(x[:, p:]))
    else:
        xn = m.norm(x)
        old = (xn[:, :p], xn[:, p:])
    new = m._final_norm(x)
    assert all(torch.equal(a, e) for a, e in zip(new, old))
    fmap = m._final_norm(x, patch_grid=(2, 3))[1]
    assert torch.equal(fmap, old[1].reshape(2, 2, 3, 64).permute(0, 3, 1, 2))


@contextlib.contextmanager
def ours(backend, op_names=OUR_OPS):
    """Forces ``backend`` for flashdino's fused ops, then checks that it really ran."""
    with contextlib.ExitStack() as stack:
        for op in op_names:
            stack.enter_context(dispatch.use(backend, op))
        yield
    for op in op_names:
        assert dispatch.last_backend(op) == backend, op


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov2_vits14_reg", "dinov2_vits14"])
def test_whole_model_triton_vs_torch(name):
    m = _tiny(name)
    P = m.patch_size
    x = torch.randn(2, 3, 3 * P, 2 * P, device=DEV)
    m = m.to(DEV)
    masks = torch.zeros(2, 6, dtype=torch.bool, device=DEV)
    masks[0, 1] = masks[1, 4] = True
    with torch.no_grad():
        with ours("torch"):
            want = m.forward_features(x, masks)
            want_il = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
        with ours("triton"):
            got = m.forward_features(x, masks)
            got_il = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    for key, e in want.items():
        if key == "masks":
            continue
        torch.testing.assert_close(got[key], e, rtol=1e-4, atol=1e-4, msg=key)
    for (gp, gc), (ep, ec) in zip(got_il, want_il):
        torch.testing.assert_close(gp, ep, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gc, ec, rtol=1e-4, atol=1e-4)


def test_whole_model_training_grads_triton_vs_torch():
    """Backward through the fused residual LayerNorm and the final norm (the Triton patch embed is
    inference-only, so it is not forced)."""
    grads = {}
    for backend in ("torch", "triton"):
        m = _tiny("dinov3_vits16", untie_cls_and_patch_norms=True).to(DEV).train()
        x = torch.randn(2, 3, 32, 48, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
        with ours(backend, ("residual_layernorm", "final_norm")):
            out = m.forward_features(x)
            loss = out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].mul(0.5).sum() \
                + out["x_storage_tokens"].sum()
            loss.backward()
        grads[backend] = {k: v.grad.clone() for k, v in m.named_parameters() if v.grad is not None}
    assert grads["torch"].keys() == grads["triton"].keys()
    for k, e in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][k], e, rtol=1e-3, atol=1e-5, msg=k)


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("D", [384, 768, 1024, 1280, 1536, 4096])
@pytest.mark.parametrize("untied,nchw", [(False, False), (True, True)])
def test_gpu_bf16_model_sizes(D, untied, nchw):
    B, p, H, W = 4, 5, 16, 16
    x = torch.randn(B, p + H * W, D, device="cuda").bfloat16()
    w, b, pw, pb = _params(D, torch.bfloat16)
    pn = (pw, pb) if untied else None
    grid = (H, W) if nchw else None
    got = ops.final_norm(x, p, w, b, 1e-5, prefix_norm=pn, patch_grid=grid)
    want = reference(x.float(), p, w.float(), b.float(), 1e-5,
                     (pw.float(), pb.float()) if untied else None, grid)
    for a, e in zip(got, want):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape
        assert F.cosine_similarity(a.float().flatten(), e.flatten(), dim=0) > 0.9999
        assert (a.float() - e).norm() / e.norm() < 1e-2


@pytest.mark.gpu
def test_gpu_whole_model_default_vs_torch():
    m = _tiny("dinov3_vits16").cuda()
    x = torch.randn(2, 3, 64, 48, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with dispatch.use("torch"):
            want = m.forward_features(x)
        got = m.forward_features(x)
    for key, e in want.items():
        if key != "masks":
            assert got[key].dtype == e.dtype
            assert F.cosine_similarity(got[key].float().flatten(), e.float().flatten(), dim=0) > 0.999, key


def test_opcheck_custom_op():
    from flashdino.ops.final_norm import triton as tf

    x = torch.randn(2, 7, 16, device=DEV, requires_grad=True)
    w, b, pw, pb = _params(16, grad=True)
    for args in ((x, w, b, None, None, False, 1, 1e-6, 0, 0, False, torch.float32),
                 (x, w, b, pw, pb, True, 3, 1e-6, 2, 2, True, torch.float32)):
        torch.library.opcheck(tf.final_norm_fwd, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_untied_norms_with_mixed_affine_fall_back():
    # Regression: an untied pair where only one norm has a bias passed supports() and the Triton
    # kernel raised, while the reference handles it; supports() now refuses it.
    x = torch.randn(2, 5, 24, device=DEV)
    w, b, pw = torch.randn(24, device=DEV), torch.randn(24, device=DEV), torch.randn(24, device=DEV)
    with pytest.raises(ValueError, match="cannot run"):
        ops.final_norm(x, 1, w, b, 1e-6, prefix_norm=(pw, None), backend="triton")
    # the default order on CUDA skips Triton for this call and runs the reference
    fn, name, _ = dispatch.select("final_norm", FinalNormCall(x.dtype, 24, True), torch.device("cuda"))
    assert name != "triton"
    prefix, patches = ops.final_norm(x, 1, w, b, 1e-6, prefix_norm=(pw, None))
    ref_prefix, ref_patches = reference(x, 1, w, b, 1e-6, prefix_norm=(pw, None))
    torch.testing.assert_close(prefix, ref_prefix)
    torch.testing.assert_close(patches, ref_patches)


# -- every backend against an independent fp64 oracle ----------------------------------------------


def _oracle(x, n_prefix, weight, bias, eps, prefix_norm, patch_grid):
    def ln(t, w, b):
        mean = t.mean(-1, keepdim=True)
        t = (t - mean) / torch.sqrt(((t - mean) ** 2).mean(-1, keepdim=True) + eps)
        return t * w.double() + b.double()

    x = x.double()
    pw, pb = prefix_norm if prefix_norm is not None else (weight, bias)
    prefix, patches = ln(x[:, :n_prefix], pw, pb), ln(x[:, n_prefix:], weight, bias)
    if patch_grid is not None:
        H, W = patch_grid
        fmap = patches.new_empty(x.shape[0], x.shape[2], H, W)
        for t in range(H * W):  # token t of the row-major grid sits at (t // W, t % W)
            fmap[:, :, t // W, t % W] = patches[:, t]
        patches = fmap
    return prefix, patches


@pytest.mark.parametrize("backend", backend_params("final_norm"))
@pytest.mark.parametrize("B,p,H,W,D", [(2, 5, 3, 4, 40), (3, 0, 2, 3, 33), (1, 1, 1, 1, 8)])
@pytest.mark.parametrize("untied,nchw", [(False, False), (True, False), (False, True), (True, True)])
def test_every_backend_matches_the_oracle(backend, B, p, H, W, D, untied, nchw):
    x = (torch.randn(B, p + H * W, D, device=DEV) * 3 + 1).requires_grad_()
    w, b, pw, pb = _params(D, grad=True)
    pn = (pw, pb) if untied else None
    grid = (H, W) if nchw else None
    got = ops.final_norm(x, p, w, b, 1e-6, prefix_norm=pn, patch_grid=grid, backend=backend)
    assert dispatch.last_backend("final_norm") == backend
    want = _oracle(x, p, w, b, 1e-6, pn, grid)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
    leaves = [x, w, b] + ([pw, pb] if untied else [])
    gs = [torch.randn_like(t) for t in got]
    got_g = torch.autograd.grad(got, leaves, gs)
    want_g = torch.autograd.grad(want, leaves, [g.double() for g in gs])
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=1e-4)

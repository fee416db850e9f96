"""CUDA kernel flashdino::rope_attention_qkv_split (flashdino._C) against the PyTorch reference.

Everything marked ``gpu`` needs a CUDA device and a flashdino._C built with CUDA; the rest checks
the host-side contract (supports(), argument errors) wherever the CUDA backend imports.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashdino import _native, dispatch
from flashdino.ops.rope_attention import RopeAttentionCall
from flashdino.ops.rope_attention.grid import RopeGrid
from flashdino.ops.rope_attention.reference import apply_rope
from flashdino.ops.rope_attention.reference import rope_attention as reference_attention
from flashdino.ops.rope_attention.reference import split_qkv
from flashdino.layers.rope import dinov3_periods

_module, _why = _native.native_status()
HAS_CUDA_KERNELS = _module is not None and _module.has_cuda()
pytestmark = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason=f"no CUDA kernels in flashdino._C: {_why}")

if HAS_CUDA_KERNELS:
    from flashdino.ops.rope_attention import cuda as cuda_rope
else:  # pragma: no cover
    cuda_rope = None

DEV = "cuda"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_grid(mode, H, W, n_prefix, head_dim, normalize="separate", device=DEV):
    if mode is None:
        return None
    if mode == "dinov3":
        return RopeGrid("dinov3", H, W, n_prefix, periods=dinov3_periods(head_dim).to(device), normalize=normalize)
    return RopeGrid("vggt", H, W, n_prefix, base=100.0)


def make_norm(head_dim, dtype, bias=True, requires_grad=False):
    w = (1 + 0.3 * torch.randn(head_dim, device=DEV)).to(dtype).requires_grad_(requires_grad)
    b = (0.2 * torch.randn(head_dim, device=DEV)).to(dtype).requires_grad_(requires_grad) if bias else None
    return w, b


def reference_qkv(qkv, num_heads, rope, q_norm=None, k_norm=None, eps=1e-5):
    q, k, v = split_qkv(qkv, num_heads)
    d = q.shape[-1]
    if q_norm is not None:
        q = F.layer_norm(q, (d,), q_norm[0], q_norm[1], eps)
    if k_norm is not None:
        k = F.layer_norm(k, (d,), k_norm[0], k_norm[1], eps)
    if rope is not None:
        q, k = apply_rope(q, k, rope)
    return q, k, v


def strided_qkv(B, N, C3, dtype, kind):
    """qkv [B, N, C3] with the given memory layout (last dim always contiguous)."""
    if kind == "contiguous":
        return torch.randn(B, N, C3, device=DEV, dtype=dtype)
    if kind == "padded":  # row padding + an offset that breaks 16-byte alignment
        base = torch.randn(B, N + 2, C3 + 6, device=DEV, dtype=dtype)
        return base[:, 1:N + 1, 2:C3 + 2]
    if kind == "transposed":  # [N, B, C3] storage, B stride smaller than N stride
        return torch.randn(N, B, C3, device=DEV, dtype=dtype).transpose(0, 1)
    raise ValueError(kind)


# (mode, H, W, n_prefix, frames, heads, head_dim, norm)
CASES = [
    ("dinov3", 5, 7, 5, 1, 3, 64, False),    # DINOv3: CLS + 4 storage tokens, H != W, odd N = 40
    ("dinov3", 4, 4, 0, 1, 2, 128, False),   # no prefix
    ("dinov3", 3, 6, 1, 2, 2, 32, True),     # two frames, qk-norm
    ("dinov3", 2, 3, 5, 1, 1, 24, False),    # d/4 = 6: narrow vectors
    ("vggt", 4, 6, 5, 3, 2, 64, True),       # VGGT global attention: 3 frames of 5 + 24 tokens
    ("vggt", 5, 3, 5, 1, 4, 64, True),       # frame attention, odd N = 20
    ("vggt", 3, 3, 0, 1, 2, 8, False),       # smallest head_dim
    ("vggt", 2, 5, 2, 2, 1, 256, True),      # largest head_dim
    (None, 0, 0, 0, 1, 3, 40, True),         # no RoPE: split + qk-norm only
    (None, 0, 0, 0, 1, 2, 64, False),
]


def case_id(c):
    return f"{c[0]}-{c[1]}x{c[2]}-p{c[3]}-f{c[4]}-h{c[5]}-d{c[6]}{'-norm' if c[7] else ''}"


def _setup(case, dtype, layout, B=2, bias=True):
    mode, H, W, n_prefix, frames, h, d, norm = case
    N = frames * (n_prefix + H * W) if mode is not None else 17
    qkv = strided_qkv(B, N, 3 * h * d, dtype, layout)
    rope = make_grid(mode, H, W, n_prefix, d)
    q_norm = make_norm(d, dtype, bias) if norm else None
    k_norm = make_norm(d, dtype, bias) if norm else None
    return qkv, h, rope, q_norm, k_norm


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype):
    qkv, h, rope, q_norm, k_norm = _setup(case, dtype, "contiguous")
    got = cuda_rope.rope_attention_qkv(qkv, h, rope, q_norm, k_norm, 1e-5)
    want = reference_qkv(qkv, h, rope, q_norm, k_norm, 1e-5)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.is_contiguous() and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    # v is a pure copy; prefix tokens of k without norm are copies too
    assert torch.equal(got[2], want[2])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=case_id)
def test_forward_strided_input(case, dtype, layout):
    qkv, h, rope, q_norm, k_norm = _setup(case, dtype, layout)
    assert not qkv.is_contiguous()
    got = cuda_rope.rope_attention_qkv(qkv, h, rope, q_norm, k_norm)
    want = reference_qkv(qkv, h, rope, q_norm, k_norm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", ["separate", "min", "max"])
def test_dinov3_coordinate_normalisations(normalize):
    d, h = 64, 2
    rope = make_grid("dinov3", 3, 8, 5, d, normalize=normalize)
    qkv = torch.randn(2, 5 + 24, 3 * h * d, device=DEV)
    for g, w in zip(cuda_rope.rope_attention_qkv(qkv, h, rope), reference_qkv(qkv, h, rope)):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.gpu
def test_prefix_tokens_are_not_rotated():
    d, h = 64, 2
    rope = make_grid("dinov3", 4, 4, 5, d)
    qkv = torch.randn(1, 2 * 21, 3 * h * d, device=DEV)  # two frames
    rope = RopeGrid("dinov3", 4, 4, 5, periods=rope.periods)
    q, k, _ = cuda_rope.rope_attention_qkv(qkv, h, rope)
    q0, k0, _ = split_qkv(qkv, h)
    for frame in range(2):
        sl = slice(frame * 21, frame * 21 + 5)
        assert torch.equal(q[:, :, sl], q0[:, :, sl])
        assert torch.equal(k[:, :, sl], k0[:, :, sl])
        assert not torch.allclose(q[:, :, frame * 21 + 5:(frame + 1) * 21], q0[:, :, frame * 21 + 5:(frame + 1) * 21])


@pytest.mark.gpu
def test_bf16_close_to_fp32_reference():
    case = CASES[4]
    qkv, h, rope, q_norm, k_norm = _setup(case, torch.float32, "contiguous")
    want = reference_qkv(qkv, h, rope, q_norm, k_norm)
    got = cuda_rope.rope_attention_qkv(qkv.bfloat16(), h, rope, tuple(t.bfloat16() for t in q_norm),
                             tuple(t.bfloat16() for t in k_norm))
    for g, w in zip(got, want):
        cos = F.cosine_similarity(g.float().flatten(), w.flatten(), dim=0)
        assert cos > 0.999, cos


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[7], CASES[8]], ids=case_id)
def test_backward_matches_autograd_of_reference(case, dtype):
    mode, H, W, n_prefix, frames, h, d, norm = case
    qkv0, h, rope, q_norm0, k_norm0 = _setup(case, dtype, "padded")
    grads = None
    results = []
    for impl in ("cuda", "reference"):
        qkv = qkv0.detach().clone().requires_grad_(True)
        q_norm = tuple(t.detach().clone().requires_grad_(True) for t in q_norm0) if norm else None
        k_norm = tuple(t.detach().clone().requires_grad_(True) for t in k_norm0) if norm else None
        fn = cuda_rope.rope_attention_qkv if impl == "cuda" else reference_qkv
        outs = fn(qkv, h, rope, q_norm, k_norm, 1e-5)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads))
        leaves = [qkv] + (list(q_norm) + list(k_norm) if norm else [])
        results.append(torch.autograd.grad(loss, leaves))
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    for g_cuda, g_ref in zip(*results):
        torch.testing.assert_close(g_cuda, g_ref, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=case_id)
def test_rope_attention_backend(case):
    from flashdino import ops

    qkv, h, rope, q_norm, k_norm = _setup(case, torch.float32, "contiguous")
    got = ops.rope_attention(qkv, h, rope, q_norm=q_norm, k_norm=k_norm, backend="cuda")
    want = reference_attention(qkv, h, rope, q_norm, k_norm, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ops.rope_attention(qkv, h, rope, q_norm=q_norm, k_norm=k_norm, backend="cuda")
    assert dispatch.last_backend("rope_attention") == "cuda"


@pytest.mark.gpu
def test_autocast_with_qk_norm_keeps_fp32_intermediates():
    case = CASES[4]
    qkv, h, rope, q_norm, k_norm = _setup(case, torch.float32, "contiguous")
    want = reference_qkv(qkv, h, rope, q_norm, k_norm)  # fp32 throughout
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = cuda_rope.rope_attention_qkv(qkv.bfloat16(), h, rope, q_norm, k_norm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    case = CASES[4]
    qkv, h, rope, q_norm, k_norm = _setup(case, torch.float32, "contiguous")

    def block(x):
        return cuda_rope.rope_attention(x * 2.0, h, rope, q_norm, k_norm, 1e-5, None).sum(-1)

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(qkv), block(qkv), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8]], ids=case_id)
def test_opcheck(case):
    qkv, h, rope, q_norm, k_norm = _setup(case, torch.float32, "contiguous", B=1)
    d = case[6]
    mode, H, W, n_prefix, freqs, dh, dw = cuda_rope.rope_args(rope, d, qkv.device)
    qw, qb = q_norm if q_norm is not None else (None, None)
    kw, kb = k_norm if k_norm is not None else (None, None)
    qkv.requires_grad_(True)
    for t in (qw, qb, kw, kb):
        if t is not None:
            t.requires_grad_(True)
    args = (qkv, h, mode, H, W, n_prefix, freqs, dh, dw, qw, qb, kw, kb, 1e-5, True)
    torch.library.opcheck(torch.ops.flashdino.rope_attention_qkv_split.default, args)
    B, N, _ = qkv.shape
    grads = tuple(torch.randn(B, h, N, d, device=DEV) for _ in range(3))
    torch.library.opcheck(torch.ops.flashdino.rope_attention_qkv_split_backward.default,
                          grads + (mode, H, W, n_prefix, freqs, dh, dw, True))


# ---- host-side contract (no GPU needed) ---------------------------------------------------------

def _call(dtype, head_dim, rope=None):
    return RopeAttentionCall(dtype=dtype, head_dim=head_dim, n_tokens=10, token_stride=3 * head_dim, rope=rope,
                             qk_norm=False)


def test_supports_reasons():
    assert cuda_rope.supports(_call(torch.bfloat16, 64)) is None
    assert "head_dim" in cuda_rope.supports(_call(torch.float16, 12))
    assert "head_dim" in cuda_rope.supports(_call(torch.float16, 264))
    assert "dtype" in cuda_rope.supports(_call(torch.float64, 64))
    grid = RopeGrid("dinov3", 2, 2, 0, periods=torch.ones(16), normalize="diagonal")
    assert "normalisation" in cuda_rope.supports(_call(torch.float32, 64, grid))


def test_registered_with_dispatcher():
    assert "cuda" in dispatch.backends("rope_attention")


def test_cpu_tensor_is_rejected():
    with pytest.raises(ValueError, match="CUDA"):
        cuda_rope.rope_attention_qkv(torch.randn(1, 4, 3 * 2 * 8), 2)


def test_rope_args():
    grid = RopeGrid("dinov3", 3, 5, 5, periods=dinov3_periods(64), normalize="max")
    mode, H, W, n_prefix, freqs, dh, dw = cuda_rope.rope_args(grid, 64, torch.device("cpu"))
    assert (mode, H, W, n_prefix, dh, dw) == (cuda_rope.MODE_DINOV3, 3, 5, 5, 5.0, 5.0)
    mode, *_, freqs, dh, dw = cuda_rope.rope_args(RopeGrid("vggt", 2, 2, 5), 64, torch.device("cpu"))
    assert mode == cuda_rope.MODE_VGGT and freqs.shape == (16,)
    assert math.isclose(freqs[1].item(), 1 / 100 ** (2 / 32), rel_tol=1e-6)


# ---- the Python glue (custom op registration, fake, autograd incl. the LayerNorm backward,
# ---- torch.compile) on CPU, with a PyTorch stand-in registered as the op's CPU kernel --------------

def _standin_tables(mode, H, W, n_prefix, freqs, denom_h, denom_w, d, dtype, round_mid, n_tokens):
    if mode == cuda_rope.MODE_DINOV3:
        ys = 2 * ((torch.arange(H, dtype=torch.float32) + 0.5) / denom_h) - 1
        xs = 2 * ((torch.arange(W, dtype=torch.float32) + 0.5) / denom_w) - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1)
        angles = (2 * math.pi * coords[:, :, None] / freqs.float()[None, None, :]).flatten(1, 2).tile(2)
        cos, sin = angles.cos(), angles.sin()
    else:
        ys = (torch.arange(H, dtype=torch.float32) + 1)[:, None].expand(H, W).reshape(-1)
        xs = (torch.arange(W, dtype=torch.float32) + 1)[None, :].expand(H, W).reshape(-1)
        ang_y, ang_x = ys[:, None] * freqs.float(), xs[:, None] * freqs.float()
        if round_mid:
            ang_y, ang_x = ang_y.to(dtype).float(), ang_x.to(dtype).float()
        angles = torch.cat([ang_y, ang_y, ang_x, ang_x], -1)
        cos, sin = angles.cos(), angles.sin()
        if round_mid:
            cos, sin = cos.to(dtype).float(), sin.to(dtype).float()
    cos = torch.cat([torch.ones(n_prefix, d), cos])
    sin = torch.cat([torch.zeros(n_prefix, d), sin])
    frames = n_tokens // cos.shape[0]
    return cos.repeat(frames, 1), sin.repeat(frames, 1)


def _standin_rot(x, mode):
    if mode == cuda_rope.MODE_DINOV3:
        x1, x2 = x.chunk(2, -1)
        return torch.cat([-x2, x1], -1)
    y, x_ = x.chunk(2, -1)
    return torch.cat([_standin_rot(y, cuda_rope.MODE_DINOV3), _standin_rot(x_, cuda_rope.MODE_DINOV3)], -1)


def _standin_forward(qkv, num_heads, mode, height, width, n_prefix, freqs, denom_h, denom_w, q_weight, q_bias,
                     k_weight, k_bias, eps, round_mid):
    q, k, v = (t.float() for t in split_qkv(qkv, num_heads))
    d = q.shape[-1]
    outs = []
    for x, w, b in ((q, q_weight, q_bias), (k, k_weight, k_bias)):
        if w is not None:
            x = F.layer_norm(x, (d,), w.float(), None if b is None else b.float(), eps)
            x = x.to(qkv.dtype).float() if round_mid else x
        if mode != cuda_rope.MODE_NONE:
            cos, sin = _standin_tables(mode, height, width, n_prefix, freqs, denom_h, denom_w, d, qkv.dtype,
                                       round_mid, qkv.shape[1])
            x = x * cos + _standin_rot(x, mode) * sin
        outs.append(x.to(qkv.dtype).contiguous())
    return outs[0], outs[1], v.to(qkv.dtype).contiguous()


def _standin_backward(dq, dk, dv, mode, height, width, n_prefix, freqs, denom_h, denom_w, round_mid):
    B, h, N, d = dq.shape
    grads = []
    for g in (dq, dk):
        g = g.float()
        if mode != cuda_rope.MODE_NONE:
            cos, sin = _standin_tables(mode, height, width, n_prefix, freqs, denom_h, denom_w, d, dq.dtype,
                                       round_mid, N)
            g = g * cos - _standin_rot(g, mode) * sin  # rotation by -angle
        grads.append(g.to(dq.dtype))
    grads.append(dv.to(dq.dtype))
    return torch.stack(grads, 2).permute(0, 3, 2, 1, 4).reshape(B, N, 3 * h * d).contiguous()


@pytest.fixture(scope="module")
def cpu_standin():
    cuda_rope.rope_attention_qkv_split.register_kernel("cpu")(_standin_forward)
    cuda_rope.rope_attention_qkv_split_backward.register_kernel("cpu")(_standin_backward)
    yield


def _cpu_case(case, dtype=torch.float32, B=2):
    mode, H, W, n_prefix, frames, h, d, norm = case
    N = frames * (n_prefix + H * W) if mode is not None else 17
    qkv = torch.randn(B, N, 3 * h * d, dtype=dtype)
    rope = make_grid(mode, H, W, n_prefix, d, device="cpu")
    q_norm = ((1 + 0.3 * torch.randn(d)).to(dtype), (0.2 * torch.randn(d)).to(dtype)) if norm else None
    k_norm = ((1 + 0.3 * torch.randn(d)).to(dtype), (0.2 * torch.randn(d)).to(dtype)) if norm else None
    return qkv, h, rope, q_norm, k_norm


GLUE_CASES = [CASES[0], CASES[2], CASES[4], CASES[8]]


def test_layer_norm_backward_formula():
    x = torch.randn(3, 5, 2, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 2, 24, dtype=torch.float64)
    want = torch.autograd.grad((F.layer_norm(x, (24,), w, b, 1e-5) * g).sum(), (x, w, b))
    got = cuda_rope._layer_norm_backward(x.detach(), g, w.detach(), 1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", GLUE_CASES, ids=case_id)
def test_glue_forward_backward_vs_reference(cpu_standin, case):
    qkv0, h, rope, q_norm0, k_norm0 = _cpu_case(case)
    norm = q_norm0 is not None
    results, grads = [], None
    for fn in (cuda_rope.rope_attention_qkv, reference_qkv):
        qkv = qkv0.clone().requires_grad_(True)
        q_norm = tuple(t.clone().requires_grad_(True) for t in q_norm0) if norm else None
        k_norm = tuple(t.clone().requires_grad_(True) for t in k_norm0) if norm else None
        outs = fn(qkv, h, rope, q_norm, k_norm, 1e-5)
        grads = grads or [torch.randn_like(o) for o in outs]
        leaves = [qkv] + (list(q_norm) + list(k_norm) if norm else [])
        results.append((outs, torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, grads)), leaves)))
    (out_c, grad_c), (out_r, grad_r) = results
    for a, e in zip(out_c + grad_c, out_r + grad_r):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", GLUE_CASES, ids=case_id)
def test_glue_opcheck(cpu_standin, case):
    qkv, h, rope, q_norm, k_norm = _cpu_case(case, B=1)
    d = case[6]
    mode, H, W, n_prefix, freqs, dh, dw = cuda_rope.rope_args(rope, d, qkv.device)
    qw, qb = q_norm if q_norm is not None else (None, None)
    kw, kb = k_norm if k_norm is not None else (None, None)
    for t in (qkv, qw, qb, kw, kb):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.flashdino.rope_attention_qkv_split.default,
                          (qkv, h, mode, H, W, n_prefix, freqs, dh, dw, qw, qb, kw, kb, 1e-5, True))
    grads = tuple(torch.randn(1, h, qkv.shape[1], d) for _ in range(3))
    torch.library.opcheck(torch.ops.flashdino.rope_attention_qkv_split_backward.default,
                          grads + (mode, H, W, n_prefix, freqs, dh, dw, True))


def test_glue_compile_fullgraph(cpu_standin):
    qkv, h, rope, q_norm, k_norm = _cpu_case(CASES[4])

    def block(x):
        return cuda_rope.rope_attention(x * 2.0, h, rope, q_norm, k_norm, 1e-5, None).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = qkv.clone().requires_grad_(True)
    out = compiled(x)
    torch.testing.assert_close(out, block(qkv), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == qkv.shape

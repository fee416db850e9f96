"""Triton fused RoPE attention (``flashdino::rope_attention_triton``) against the reference.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
the CPU tests use tiny shapes: N of a few dozen tokens, head dim 16, one or two heads. The
``gpu``-marked tests run the product sizes (N = 201 ... 4101, d = 64/128, bf16/fp16) against an
fp32 reference.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flashdino import dispatch, ops
from flashdino.ops.rope_attention import RopeAttentionCall
from flashdino.ops.rope_attention import grid as rope_grid
from flashdino.ops.rope_attention.grid import RopeGrid
from flashdino.ops.rope_attention.reference import rope_attention as reference

from _backends import backend_params

triton = pytest.importorskip("triton")
tra = pytest.importorskip("flashdino.ops.rope_attention.triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _periods(head_dim, base=100.0, bf16=True):
    p = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    return (p.to(torch.bfloat16).float() if bf16 else p).to(DEVICE)


def _grid(mode, height, width, n_prefix, head_dim, normalize="separate"):
    if mode == "none":
        return None
    return RopeGrid(mode, height, width, n_prefix, periods=_periods(head_dim) if mode == "dinov3" else None,
                    normalize=normalize)


def _norms(head_dim, bias=True, dtype=torch.float32, requires_grad=False):
    def one():
        w = (1 + 0.3 * torch.randn(head_dim)).to(DEVICE, dtype).requires_grad_(requires_grad)
        b = (0.2 * torch.randn(head_dim)).to(DEVICE, dtype).requires_grad_(requires_grad) if bias else None
        return w, b
    return one(), one()


def _qkv(batch, n_tokens, heads, head_dim, dtype=torch.float32, layout="contiguous"):
    width = 3 * heads * head_dim
    if layout == "contiguous":
        return torch.randn(batch, n_tokens, width, device=DEVICE, dtype=dtype)
    if layout == "slice":  # a slice of a wider projection: N stride > 3*h*d, offset start
        return torch.randn(batch, n_tokens, width + 24, device=DEVICE, dtype=dtype)[:, :, 8:8 + width]
    if layout == "nbatch":  # batch stride smaller than N stride: [N, B, C] memory, viewed [B, N, C]
        return torch.randn(n_tokens, batch, width, device=DEVICE, dtype=dtype).transpose(0, 1)
    raise ValueError(layout)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_rotation", tra.K_ROTATIONS)
@pytest.mark.parametrize("mode", ["none", "dinov3", "vggt"])
def test_forward_modes_and_k_rotation(mode, k_rotation):
    d, heads, (H, W), n_prefix, frames = 16, 2, (3, 4), 1, 2
    n = frames * (n_prefix + H * W)
    qkv = _qkv(1, n, heads, d)
    q_norm, k_norm = _norms(d)
    rope = _grid(mode, H, W, n_prefix, d)
    out = tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-5, None, k_rotation=k_rotation)
    ref = reference(qkv, heads, rope, q_norm, k_norm, 1e-5, None)
    assert out.shape == ref.shape == (1, n, heads * d) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "mode,batch,heads,d,H,W,n_prefix,frames,qk_norm,layout,normalize",
    [
        ("dinov3", 2, 1, 16, 2, 5, 0, 1, False, "contiguous", "separate"),   # n_prefix 0, odd N=10
        ("dinov3", 1, 2, 16, 3, 2, 5, 3, False, "slice", "max"),           # 3 frames, N=33
        ("dinov3", 1, 1, 16, 5, 3, 1, 1, True, "nbatch", "min"),            # H>W, N=16
        ("dinov3", 1, 1, 32, 3, 3, 1, 2, False, "contiguous", "separate"),  # head dim 32
        ("vggt", 2, 2, 16, 2, 3, 5, 2, True, "slice", "separate"),          # VGGT global: camera+4 reg
        ("vggt", 1, 1, 16, 4, 3, 0, 1, False, "nbatch", "separate"),        # no prefix, no norm
        ("vggt", 1, 1, 32, 1, 7, 1, 3, True, "contiguous", "separate"),     # 1-row grid, 3 frames
        ("none", 2, 2, 16, 1, 1, 0, 1, False, "slice", "separate"),         # DINOv2 plain, N=23 below
        ("none", 1, 1, 16, 1, 1, 0, 1, True, "nbatch", "separate"),         # qk_norm without RoPE
    ],
)
def test_forward_shapes(mode, batch, heads, d, H, W, n_prefix, frames, qk_norm, layout, normalize):
    n = frames * (n_prefix + H * W) if mode != "none" else 23
    qkv = _qkv(batch, n, heads, d, layout=layout)
    q_norm, k_norm = _norms(d, bias=layout != "nbatch") if qk_norm else (None, None)
    rope = _grid(mode, H, W, n_prefix, d, normalize)
    out = ops.rope_attention(qkv, heads, rope, q_norm=q_norm, k_norm=k_norm, backend="triton")
    ref = reference(qkv, heads, rope, q_norm, k_norm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_forward_prefix_tokens_are_not_rotated():
    """A prefix token's query must attend exactly as if RoPE were off for it (identity rotation)."""
    d, heads, H, W, n_prefix = 16, 1, 2, 2, 5
    n = n_prefix + H * W
    qkv = _qkv(1, n, heads, d)
    rope = _grid("vggt", H, W, n_prefix, d)
    out = tra.rope_attention(qkv, heads, rope)
    ref = reference(qkv, heads, rope)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    # rotating every token (a 3x3 grid without prefix, same N) gives a different result
    wrong = reference(qkv, heads, RopeGrid("vggt", 3, 3, 0))
    assert _rel(out, wrong) > 1e-3


def test_forward_scale_and_eps():
    d, heads = 16, 1
    qkv = _qkv(1, 13, heads, d)
    q_norm, k_norm = _norms(d)
    rope = _grid("vggt", 3, 4, 1, d)
    out = tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-2, 0.7)
    ref = reference(qkv, heads, rope, q_norm, k_norm, 1e-2, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_forward_fp16():
    d, heads, H, W, n_prefix = 16, 2, 3, 4, 1
    n = 2 * (n_prefix + H * W)
    qkv = _qkv(1, n, heads, d, dtype=torch.float16)
    rope = _grid("dinov3", H, W, n_prefix, d)
    out = tra.rope_attention(qkv, heads, rope)
    assert out.dtype == torch.float16
    ref32 = reference(qkv.float(), heads, rope)
    assert _rel(out, ref32) < 5e-3
    rope = _grid("vggt", H, W, n_prefix, d)
    out = tra.rope_attention(qkv, heads, rope)
    ref16 = reference(qkv, heads, rope)  # the reference's own fp16 rounding of the VGGT angles
    assert _rel(out, ref16) < 5e-3
    # fp32 math with the fp16 VGGT tables (the GPU tests' reference) agrees more closely
    assert _rel(out, _reference_fp32(qkv, heads, rope, None, None, torch.float16)) < 2e-3
    torch.testing.assert_close(_reference_fp32(qkv.float(), heads, rope, None, None, torch.float32),
                               reference(qkv.float(), heads, rope))


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

def _grads(fn, qkv, norm_params, grad_out):
    qkv = qkv.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in norm_params]
    out = fn(qkv, params)
    grads = torch.autograd.grad(out, [qkv, *params], grad_out)
    return out, grads


@pytest.mark.parametrize(
    "mode,batch,heads,H,W,n_prefix,frames,norm,layout",
    [
        ("none", 1, 2, 1, 1, 0, 1, "none", "slice"),
        ("dinov3", 2, 1, 3, 2, 1, 2, "none", "contiguous"),
        ("dinov3", 1, 1, 2, 3, 5, 1, "both", "nbatch"),
        ("vggt", 1, 2, 3, 2, 5, 2, "both", "slice"),
        ("vggt", 1, 1, 4, 3, 0, 1, "q_nobias", "contiguous"),
    ],
)
def test_backward(mode, batch, heads, H, W, n_prefix, frames, norm, layout):
    d = 16
    n = frames * (n_prefix + H * W) if mode != "none" else 19
    qkv = _qkv(batch, n, heads, d, layout=layout)
    rope = _grid(mode, H, W, n_prefix, d)
    (qw, qb), (kw, kb) = _norms(d)
    if norm == "both":
        params = [qw, qb, kw, kb]
        split = lambda p: ((p[0], p[1]), (p[2], p[3]))  # noqa: E731
    elif norm == "q_nobias":
        params = [qw]
        split = lambda p: ((p[0], None), None)  # noqa: E731
    else:
        params = []
        split = lambda p: (None, None)  # noqa: E731
    grad_out = torch.randn(batch, n, heads * d, device=DEVICE)

    def run(impl):
        return lambda x, p: impl(x, heads, rope, *split(p), 1e-5, None)

    out, grads = _grads(run(tra.rope_attention), qkv, params, grad_out)
    ref, ref_grads = _grads(run(reference), qkv, params, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    scale = ref_grads[0].abs().max()
    for name, g, r in zip(["qkv", "p0", "p1", "p2", "p3"], grads, ref_grads):
        assert g.shape == r.shape, name
        # absolute tolerance on the qkv-gradient scale: the k-bias gradient is ~0 in exact math
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(scale.item(), 1.0), msg=name)


def test_batch_split_beyond_grid_limit(monkeypatch):
    """batch * heads above the grid limit runs in batch chunks (limit lowered to 2 here)."""
    monkeypatch.setattr(tra, "_MAX_GRID_Y", 2)
    d, heads, H, W = 16, 1, 2, 2
    qkv = _qkv(3, 1 + H * W, heads, d).requires_grad_()
    rope = _grid("dinov3", H, W, 1, d)
    out = tra.rope_attention(qkv, heads, rope)
    ref = reference(qkv, heads, rope)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="split the batch"):
        torch.ops.flashdino.rope_attention_triton(qkv.detach(), rope.frequencies(d, qkv.device), None, None, None,
                                                  None, None, heads, H, W, 1, "dinov3", float(H), float(W), 1e-5,
                                                  0.25, "prepass")


# ------------------------------------------------------------------------------------------------
# prepass / post-pass: cos/sin from the grid's table, several heads per program
# ------------------------------------------------------------------------------------------------

def test_heads_per_program_keeps_enough_programs():
    assert tra._PREPASS_MIN_PROGRAMS == 2048
    assert tra._heads_per_program(17, 64, 16) == 16  # ViT-L 512 px, batch 64: 2176 programs
    assert tra._heads_per_program(17, 8, 16) == 2  # 272 programs per head group: 8 groups of 2
    assert tra._heads_per_program(17, 1, 16) == 1  # batch 1: one head per program
    assert tra._heads_per_program(33, 64, 6) == 6
    assert tra._heads_per_program(20, 32, 6) == 3  # 1280 programs per head group: 2 groups of 3
    assert tra._heads_per_program(20, 16, 6) == 1  # 640 per group: 2048 needs 6 groups (4 does not divide 6)
    for blocks, batch, heads in ((1, 1, 1), (3, 5, 7), (17, 64, 16), (9, 3, 12)):
        h = tra._heads_per_program(blocks, batch, heads)
        assert heads % h == 0 and (h == 1 or blocks * batch * (heads // h) * 2 >= tra._PREPASS_MIN_PROGRAMS)


def _reference_rotated(qkv, heads, rope, q_norm, k_norm, eps=1e-5):
    """q, k [B, h, N, d] after the reference's qk-norm + RoPE (what the prepass must write)."""
    from flashdino.ops.rope_attention.reference import apply_rope, split_qkv

    q, k, _ = split_qkv(qkv, heads)
    d = q.shape[-1]
    if q_norm is not None:
        q = torch.nn.functional.layer_norm(q, (d,), q_norm[0], q_norm[1], eps)
    if k_norm is not None:
        k = torch.nn.functional.layer_norm(k, (d,), k_norm[0], k_norm[1], eps)
    return apply_rope(q, k, rope) if rope is not None else (q, k)


PREPASS_CASES = [  # (mode, batch, heads, H, W, n_prefix, frames, qk_norm, layout, heads per program)
    ("dinov3", 2, 3, 3, 5, 5, 1, False, "contiguous", 3),  # odd heads, all in one program, N=20
    ("dinov3", 1, 4, 2, 3, 1, 3, True, "slice", 2),        # 3 frames, two groups of 2 heads
    ("vggt", 2, 2, 3, 2, 5, 2, True, "nbatch", 2),         # VGGT global: camera + 4 registers, 2 frames
    ("vggt", 1, 3, 1, 7, 0, 1, False, "contiguous", 1),    # no prefix, 1-row grid
    ("none", 2, 2, 1, 1, 0, 1, True, "slice", 2),          # qk-norm without RoPE
]


def _force_heads(monkeypatch, per_program):
    real = tra._heads_per_program
    monkeypatch.setattr(tra, "_heads_per_program", lambda blocks, batch, heads: per_program)
    return real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREPASS_CASES, ids=lambda c: f"{c[0]}-h{c[2]}-f{c[6]}-{c[8]}-x{c[9]}")
def test_prepass_writes_the_reference_rotation(monkeypatch, case, dtype):
    """The prepass buffer is the reference's normalised + rotated q/k (same cos/sin values, from the
    grid's table), whatever the number of heads one program handles."""
    mode, batch, heads, H, W, n_prefix, frames, qk_norm, layout, per_program = case
    _force_heads(monkeypatch, per_program)
    d = 16
    n = frames * (n_prefix + H * W) if mode != "none" else 11
    qkv = _qkv(batch, n, heads, d, dtype=dtype, layout=layout)
    rope = _grid(mode, H, W, n_prefix, d)
    (qw, qb), (kw, kb) = _norms(d, dtype=dtype) if qk_norm else ((None, None), (None, None))
    table = rope.kernel_table(d, dtype, qkv.device) if rope is not None else None
    rqk = tra._prepass(tra._prepare(qkv), table, qw, qb, kw, kb, heads, mode, H, W, n_prefix, 1e-5)
    want_q, want_k = _reference_rotated(qkv, heads, rope, (qw, qb) if qk_norm else None,
                                        (kw, kb) if qk_norm else None)
    assert rqk.dtype == dtype and rqk.shape == (2, batch, heads, n, d)
    if dtype == torch.float32 and not qk_norm:  # same products and sums in fp32: bit for bit
        assert torch.equal(rqk[0], want_q) and torch.equal(rqk[1], want_k)
    else:  # one rounding (kernel, fp32 math) against the reference's per-op roundings / LayerNorm
        tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(rqk[0].float(), want_q.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(rqk[1].float(), want_k.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", PREPASS_CASES, ids=lambda c: f"{c[0]}-h{c[2]}-f{c[6]}-{c[8]}-x{c[9]}")
def test_multi_head_programs_forward_backward_match_the_oracle(monkeypatch, case):
    """Forward and backward (post-pass: inverse rotation, qk-norm backward and its weight-gradient
    partial rows per head) with several heads per program, against the fp64 oracle."""
    mode, batch, heads, H, W, n_prefix, frames, qk_norm, layout, per_program = case
    _force_heads(monkeypatch, per_program)
    d = 16
    n = frames * (n_prefix + H * W) if mode != "none" else 11
    qkv = _qkv(batch, n, heads, d, layout=layout).requires_grad_()
    rope = _grid(mode, H, W, n_prefix, d)
    q_norm, k_norm = _norms(d, requires_grad=True) if qk_norm else (None, None)
    out = tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-5, None)
    want = _oracle(qkv, heads, rope, q_norm, k_norm)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=2e-5)
    leaves = [qkv] + [t for nrm in (q_norm, k_norm) if nrm is not None for t in nrm]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    expected = torch.autograd.grad(want, leaves, g.double())
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-3, atol=5e-5)


def test_cos_sin_are_computed_once_per_grid(monkeypatch):
    """The trigonometry runs once per grid and device (tokens x head dim), not per call, image or
    head: forward + backward of two calls with 2 images x 2 heads compute the tables once."""
    d, heads, H, W, n_prefix = 16, 2, 3, 2, 1
    rope = _grid("vggt", H, W, n_prefix, d)
    calls = []
    compute = RopeGrid._compute_tables
    monkeypatch.setattr(RopeGrid, "_compute_tables", lambda self, *a: calls.append(a) or compute(self, *a))
    qkv = _qkv(2, 2 * (n_prefix + H * W), heads, d).requires_grad_()
    for _ in range(2):
        out = tra.rope_attention(qkv, heads, rope)
        torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert len(calls) == 1
    table = rope.kernel_table(d, qkv.dtype, qkv.device)
    assert table is rope.kernel_table(d, qkv.dtype, qkv.device) and table.is_contiguous()
    cos, sin = rope.tables(d, qkv.dtype, qkv.device)
    assert table.dtype == torch.float32 and torch.equal(table[0], cos) and torch.equal(table[1], sin)


class _GuardedTorch:
    """Stands in for ``torch`` inside the kernel module: ``torch.empty`` buffers get NaN guard zones.

    The interpreter does not fault on out-of-bounds accesses; a write past (or before) a buffer
    lands in its guard zone and is detected afterwards.
    """

    PAD = 4096

    def __init__(self):
        self.guards = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, device=None, dtype=None):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        numel = math.prod(shape)
        flat = torch.full((numel + 2 * self.PAD,), float("nan"), device=device, dtype=dtype)
        self.guards.append(flat)
        return flat[self.PAD:self.PAD + numel].view(shape)

    def check(self):
        assert self.guards
        for flat in self.guards:
            assert flat[:self.PAD].isnan().all() and flat[-self.PAD:].isnan().all(), "out-of-bounds write"


@pytest.mark.parametrize("per_program", [1, 2])
@pytest.mark.parametrize("mode", ["vggt", "none"])
def test_no_out_of_bounds_access(monkeypatch, mode, per_program):
    """Reads: qkv lives inside a NaN-filled buffer (extra rows and columns); any unmasked read outside
    the [B, N, 3*h*d] view poisons the result. Writes: every kernel output has NaN guard zones."""
    guarded = _GuardedTorch()
    monkeypatch.setattr(tra, "torch", guarded)
    _force_heads(monkeypatch, per_program)  # the prepass / post-pass with 1 or both heads per program
    d, heads, H, W, n_prefix = 16, 2, 3, 2, 5
    n = 2 * (n_prefix + H * W) if mode == "vggt" else 21
    width = 3 * heads * d
    buf = torch.full((2, n + 17, width + 40), float("nan"), device=DEVICE)
    qkv = buf[:, 3:3 + n, 24:24 + width]
    qkv.copy_(torch.randn(2, n, width, device=DEVICE))
    qkv.requires_grad_()
    rope = _grid(mode, H, W, n_prefix, d)
    q_norm, k_norm = _norms(d) if mode == "vggt" else (None, None)
    out = tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-5, None)
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert out.isfinite().all() and grad.isfinite().all()
    guarded.check()
    torch.testing.assert_close(out, reference(qkv, heads, rope, q_norm, k_norm), rtol=1e-5, atol=2e-6)


def test_backward_noncontiguous_grad_output():
    d, heads, H, W = 16, 1, 3, 3
    n = 1 + H * W
    qkv = _qkv(1, n, heads, d).requires_grad_()
    rope = _grid("dinov3", H, W, 1, d)
    g_wide = torch.randn(1, n, 2 * heads * d, device=DEVICE)[:, :, ::2]  # channel stride 2
    (gq,) = torch.autograd.grad(tra.rope_attention(qkv, heads, rope), qkv, g_wide)
    (gr,) = torch.autograd.grad(reference(qkv, heads, rope), qkv, g_wide)
    torch.testing.assert_close(gq, gr, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# torch.compile, opcheck, registration
# ------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_forward_backward():
    d, heads, H, W, n_prefix = 16, 1, 2, 3, 1
    n = n_prefix + H * W
    q_norm, k_norm = _norms(d)
    rope = _grid("vggt", H, W, n_prefix, d)

    def f(qkv):
        return tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-5, None).square().sum()

    qkv = _qkv(1, n, heads, d).requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(qkv)
    (grad,) = torch.autograd.grad(loss, qkv)
    qkv_ref = qkv.detach().clone().requires_grad_()
    loss_ref = reference(qkv_ref, heads, rope, q_norm, k_norm).square().sum()
    (grad_ref,) = torch.autograd.grad(loss_ref, qkv_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_through_dispatcher():
    """ops.rope_attention(backend="triton") traces without graph breaks."""
    d, heads, H, W = 16, 1, 2, 3
    rope = _grid("dinov3", H, W, 1, d)
    q_norm, k_norm = _norms(d)
    f = torch.compile(lambda x: ops.rope_attention(x, heads, rope, q_norm=q_norm, k_norm=k_norm, backend="triton"),
                      fullgraph=True, backend="eager")
    qkv = _qkv(1, 1 + H * W, heads, d)
    torch.testing.assert_close(f(qkv), reference(qkv, heads, rope, q_norm, k_norm), rtol=1e-5, atol=2e-6)


def test_opcheck():
    d, heads, H, W, n_prefix = 16, 1, 2, 2, 1
    n = n_prefix + H * W
    qkv = _qkv(1, n, heads, d).requires_grad_()
    (qw, qb), (kw, kb) = _norms(d, requires_grad=True)
    grid = RopeGrid("vggt", H, W, n_prefix)
    freqs = grid.frequencies(d, qkv.device)
    cos_sin = grid.kernel_table(d, qkv.dtype, qkv.device)
    args = (qkv, freqs, cos_sin, qw, qb, kw, kb, heads, H, W, n_prefix, "vggt", 1.0, 1.0, 1e-5, d ** -0.5, "prepass")
    torch.library.opcheck(torch.ops.flashdino.rope_attention_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _call(dtype=torch.bfloat16, head_dim=64, n_tokens=10, token_stride=None, rope=None, qk_norm=False):
    return RopeAttentionCall(dtype=dtype, head_dim=head_dim, n_tokens=n_tokens,
                             token_stride=3 * head_dim if token_stride is None else token_stride, rope=rope,
                             qk_norm=qk_norm)


def test_registered_with_dispatcher():
    assert "triton" in dispatch.backends("rope_attention")
    sup = tra.supports
    assert sup(_call(head_dim=64, n_tokens=1370, qk_norm=True)) is None
    assert sup(_call(torch.float16, 128, 4101, rope=RopeGrid("vggt", 37, 37, 5), qk_norm=True)) is None
    assert "head_dim" in sup(_call(head_dim=48))
    assert "dtype" in sup(_call(torch.float64))
    assert "mode" in sup(_call(torch.float32, rope=RopeGrid("spiral", 2, 2, 0)))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs():
    d, heads = 16, 2
    qkv = _qkv(1, 13, heads, d)
    rope = _grid("dinov3", 3, 4, 1, d)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.rope_attention(qkv[0], heads, rope, backend="triton")
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        ops.rope_attention(qkv[..., :-1], heads, rope, backend="triton")
    with pytest.raises(ValueError, match="head_dim 24"):
        ops.rope_attention(_qkv(1, 13, 1, 24), 1, None, backend="triton")
    with pytest.raises(ValueError, match="n_prefix"):
        ops.rope_attention(qkv, heads, RopeGrid("vggt", 1, 1, 14), backend="triton")
    with pytest.raises(ValueError, match="do not fit a grid"):
        ops.rope_attention(qkv, heads, RopeGrid("vggt", 3, 3, 1), backend="triton")
    with pytest.raises(ValueError, match="periods"):
        ops.rope_attention(qkv, heads, RopeGrid("dinov3", 3, 4, 1, periods=_periods(32)), backend="triton")
    with pytest.raises(ValueError, match="periods on"):
        ops.rope_attention(qkv, heads, RopeGrid("dinov3", 3, 4, 1, periods=_periods(d).to("meta")),
                           backend="triton")
    (qw, qb), _ = _norms(d)
    with pytest.raises(ValueError, match="q_norm weight on meta, qkv on cpu"):
        ops.rope_attention(qkv, heads, rope, q_norm=(qw.to("meta"), qb), backend="triton")
    with pytest.raises(ValueError, match="q_norm bias"):
        ops.rope_attention(qkv, heads, rope, q_norm=(qw, qb.to("meta")), backend="triton")
    with pytest.raises(ValueError, match="k_norm bias must be"):
        ops.rope_attention(qkv, heads, rope, k_norm=(qw, qb[:-1]), backend="triton")
    with pytest.raises(ValueError, match="k_norm weight must be"):
        ops.rope_attention(qkv, heads, rope, k_norm=(qw[:-2], None), backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        ops.rope_attention(qkv.to(torch.int32), heads, rope, backend="triton")
    with pytest.raises(ValueError, match="mode"):
        tra.rope_attention(qkv, heads, RopeGrid("spiral", 3, 4, 1))
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="unknown RoPE mode 'spiral'"):
            ops.rope_attention(qkv, heads, RopeGrid("spiral", 3, 4, 1), backend=backend)
        with pytest.raises(ValueError, match="normalisation 'diagonal'"):
            ops.rope_attention(qkv, heads, _grid("dinov3", 3, 4, 1, d, normalize="diagonal"), backend=backend)
    with pytest.raises(ValueError, match="k_rotation"):
        tra.rope_attention(qkv, heads, rope, k_rotation="sideways")
    # direct op calls are checked too (the kernels do not bounds-check tables or weights)
    op = torch.ops.flashdino.rope_attention_triton
    table = rope.kernel_table(d, qkv.dtype, qkv.device)
    scalars = (heads, 3, 4, 1, "dinov3", 3.0, 4.0, 1e-5, 0.25, "prepass")
    with pytest.raises(ValueError, match="frequency table of shape"):
        op(qkv, _periods(d)[:2], None, None, None, None, None, *scalars)
    with pytest.raises(ValueError, match="qk-norm parameters"):
        op(qkv, _periods(d), table, qw[:4], None, None, None, *scalars)
    with pytest.raises(ValueError, match="not a multiple"):
        op(qkv, _periods(d), None, None, None, None, None, heads, 3, 3, 1, *scalars[4:])
    with pytest.raises(ValueError, match="head_dim 24"):
        op(_qkv(1, 13, 1, 24), None, None, None, None, None, None, 1, 3, 4, 1, "vggt", *scalars[5:])
    for k_rotation in ("prepass", "table"):  # the prepass reads the table too
        with pytest.raises(ValueError, match=r"cos/sin table \[2, 13, 16\].*got None"):
            op(qkv, _periods(d), None, None, None, None, None, *scalars[:-1], k_rotation)
        with pytest.raises(ValueError, match=r"cos/sin table .*got torch.float32 \(2, 12, 16\)"):
            op(qkv, _periods(d), table[:, 1:], None, None, None, None, *scalars[:-1], k_rotation)
        with pytest.raises(ValueError, match=r"cos/sin table .*got torch.float16"):
            op(qkv, _periods(d), table.half(), None, None, None, None, *scalars[:-1], k_rotation)


# ------------------------------------------------------------------------------------------------
# GPU: product sizes, against an fp32 reference
# ------------------------------------------------------------------------------------------------

GPU_CASES = [  # (mode, N-defining grid, n_prefix, frames, head_dim, heads, qk_norm)
    ("dinov3", (14, 14), 5, 1, 64, 6, False),    # N = 201 (DINOv3 224 px)
    ("dinov3", (32, 32), 5, 1, 128, 4, False),   # N = 1029
    ("none", (37, 37), 1, 1, 64, 6, False),      # N = 1370 (DINOv2 518 px)
    ("dinov3", (64, 64), 5, 1, 64, 4, False),    # N = 4101
    ("vggt", (37, 37), 5, 1, 64, 16, True),      # VGGT frame attention, N = 1374
    ("vggt", (37, 37), 5, 3, 64, 16, True),      # VGGT global attention over 3 frames
]


def _gpu_case(mode, grid, n_prefix, frames, d, heads, qk_norm, dtype, batch=2):
    H, W = grid
    n = frames * (n_prefix + H * W)
    qkv = torch.randn(batch, n, 3 * heads * d, device="cuda", dtype=dtype)
    rope = _grid(mode, H, W, n_prefix, d)
    norms = _norms(d, dtype=torch.float32) if qk_norm else (None, None)
    return qkv, rope, norms


def _reference_fp32(qkv, heads, rope, q_norm, k_norm, token_dtype):
    """The reference in fp32, except that VGGT RoPE uses the cos/sin tables of ``token_dtype``.

    The reference rounds VGGT angles (and cos/sin) to the token dtype, as VGGT does, and the kernel
    reproduces that; an all-fp32 reference would differ by that rounding (up to ~0.1 rad in bf16).
    """
    from flashdino.ops.rope_attention.reference import _frame_tables, _rotate_half_per_half
    from flashdino.ops.rope_attention.reference import split_qkv

    qkv = qkv.float()
    n32 = lambda nrm: None if nrm is None else tuple(t.float() if t is not None else None for t in nrm)  # noqa
    if rope is None or rope.mode != "vggt":
        return reference(qkv, heads, rope, n32(q_norm), n32(k_norm))
    q, k, v = split_qkv(qkv, heads)
    d = q.shape[-1]
    if q_norm is not None:
        q = torch.nn.functional.layer_norm(q, (d,), *n32(q_norm), 1e-5)
    if k_norm is not None:
        k = torch.nn.functional.layer_norm(k, (d,), *n32(k_norm), 1e-5)
    cos, sin = (t.float() for t in _frame_tables(rope, q.shape[-2], d, token_dtype, q.device))
    q = q * cos + _rotate_half_per_half(q) * sin
    k = k * cos + _rotate_half_per_half(k) * sin
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}-f{c[3]}-d{c[4]}")
@pytest.mark.parametrize("k_rotation", tra.K_ROTATIONS)
def test_gpu_forward_backward(case, dtype, k_rotation):
    mode, grid, n_prefix, frames, d, heads, qk_norm = case
    qkv, rope, (q_norm, k_norm) = _gpu_case(mode, grid, n_prefix, frames, d, heads, qk_norm, dtype)
    qkv.requires_grad_()
    out = tra.rope_attention(qkv, heads, rope, q_norm, k_norm, 1e-5, None, k_rotation=k_rotation)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    qkv32 = qkv.detach().float().requires_grad_()
    ref = _reference_fp32(qkv32, heads, rope, q_norm, k_norm, dtype)
    (grad_ref,) = torch.autograd.grad(ref, qkv32, grad_out.float())
    assert out.dtype == dtype and grad.dtype == dtype
    assert _cos(out, ref) > 0.9999 and _rel(out, ref) < 2e-2
    assert _cos(grad, grad_ref) > 0.999 and _rel(grad, grad_ref) < 5e-2


@pytest.mark.gpu
def test_gpu_norm_param_grads_and_fp32():
    qkv, rope, (q_norm, k_norm) = _gpu_case("vggt", (37, 37), 5, 2, 64, 4, True, torch.float32, batch=1)
    params = [q_norm[0], q_norm[1], k_norm[0], k_norm[1]]
    grad_out = torch.randn(1, qkv.shape[1], 4 * 64, device="cuda")

    def run(impl):
        return lambda x, p: impl(x, 4, rope, (p[0], p[1]), (p[2], p[3]), 1e-5, None)

    out, grads = _grads(run(tra.rope_attention), qkv, params, grad_out)
    ref, ref_grads = _grads(run(reference), qkv, params, grad_out)
    assert _rel(out, ref) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert _cos(g, r) > 0.9999 and _rel(g, r) < 1e-3


@pytest.mark.gpu
def test_gpu_torch_compile():
    qkv, rope, (q_norm, k_norm) = _gpu_case("vggt", (37, 37), 5, 1, 64, 16, True, torch.bfloat16, batch=1)
    f = torch.compile(lambda x: ops.rope_attention(x, 16, rope, q_norm=q_norm, k_norm=k_norm, backend="triton"))
    out = f(qkv)
    ref = _reference_fp32(qkv, 16, rope, q_norm, k_norm, torch.bfloat16)
    assert _cos(out, ref) > 0.9999 and _rel(out, ref) < 2e-2


# ------------------------------------------------------------------------------------------------
# autocast + qk-norm + vggt RoPE (the VGGT aggregator's default path)
# ------------------------------------------------------------------------------------------------

def _cuda_autocast_vggt_reference(qkv, heads, rope, q_norm, k_norm, eps):
    """What the reference computes under CUDA autocast: F.layer_norm returns fp32 q/k, so the vggt
    tables (built in q's dtype) and the rotation are fp32; SDPA then casts q/k/v to the token dtype."""
    import torch.nn.functional as F
    from flashdino.ops.rope_attention.reference import apply_rope
    from flashdino.ops.rope_attention.reference import split_qkv
    q, k, v = split_qkv(qkv, heads)
    d = q.shape[-1]
    q = F.layer_norm(q.float(), (d,), q_norm[0], q_norm[1], eps)
    k = F.layer_norm(k.float(), (d,), k_norm[0], k_norm[1], eps)
    q, k = apply_rope(q, k, rope)
    out = F.scaled_dot_product_attention(q.to(qkv.dtype).float(), k.to(qkv.dtype).float(), v.float())
    B, _, N, _ = out.shape
    return out.transpose(1, 2).reshape(B, N, -1)


def test_autocast_qk_norm_vggt_uses_fp32_tables(monkeypatch):
    # Regression: the kernels rounded the vggt angles / cos / sin to the token dtype even when the
    # reference's q is fp32 (CUDA autocast + q_norm), off by up to 0.06 rad at fp16 and 0.5 rad at
    # bf16 for positions ~200 (0.125 rad at bf16 for VGGT's 37x37 grid). CPU autocast keeps
    # layer_norm in fp16, so the CUDA policy is forced here.
    monkeypatch.setattr(rope_grid, "layer_norm_returns_fp32", lambda device: True)
    d, heads, H, W = 16, 1, 1, 200
    qkv = _qkv(1, 1 + H * W, heads, d, dtype=torch.float16)
    q_norm, k_norm = _norms(d)
    rope = RopeGrid("vggt", H, W, 1)
    out = ops.rope_attention(qkv, heads, rope, q_norm=q_norm, k_norm=k_norm, backend="triton")
    ref = _cuda_autocast_vggt_reference(qkv, heads, rope, q_norm, k_norm, 1e-5)
    # fp16-rounded tables: max error 3e-3; fp32 tables: 1.5e-4
    assert (out.float() - ref).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autocast_qk_norm_vggt_matches_reference(dtype):
    d, heads, H, W = 64, 2, 37, 37
    qkv = _qkv(2, 5 + H * W, heads, d, dtype=dtype)
    q_norm, k_norm = _norms(d)
    rope = RopeGrid("vggt", H, W, 5)
    with torch.autocast("cuda", dtype=dtype):
        ref = reference(qkv, heads, rope, q_norm, k_norm)
        out = ops.rope_attention(qkv, heads, rope, q_norm=q_norm, k_norm=k_norm, backend="triton")
    assert out.dtype == ref.dtype == dtype
    assert _rel(out, _cuda_autocast_vggt_reference(qkv, heads, rope, q_norm, k_norm, 1e-5)) < 1e-2
    assert _rel(out, ref) < 1e-2


def test_supports_refuses_int32_overflowing_sequences():
    # Regression: token offsets inside the kernels are int32 (tok * s_n); a sequence whose qkv
    # spans 2**31 elements per image (VGGT global attention over ~700 frames) must not reach them.
    sup = tra.supports
    assert sup(_call(n_tokens=700_000, token_stride=3072)) is not None
    assert sup(_call(n_tokens=200_000, token_stride=3072)) is None


def test_fp32_qkv_under_autocast_is_left_to_the_reference():
    # Regression: the reference returns the autocast dtype (SDPA is autocast to it) while the
    # kernels returned fp32 computed in fp32; supports() now refuses this call.
    qkv = _qkv(1, 13, 1, 16)
    rope = _grid("dinov3", 3, 4, 1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference(qkv, 1, rope).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="autocast"):
            ops.rope_attention(qkv, 1, rope, backend="triton")
    assert ops.rope_attention(qkv, 1, rope, backend="triton").dtype == torch.float32  # no autocast: fine


# ------------------------------------------------------------------------------------------------
# every backend against an independent fp64 oracle (written from shared/SPEC.md, not the reference)
# ------------------------------------------------------------------------------------------------

def _oracle_angles(rope, n_tokens, d):
    """Per-token angles [N, d] (0 for prefix tokens) and the rotate-half partner of each channel."""
    tpf = rope.tokens_per_frame
    t = torch.arange(n_tokens) % tpf
    p = (t - rope.n_prefix).clamp(min=0)
    y, x = (p // rope.width).double(), (p % rope.width).double()
    j = torch.arange(d)
    if rope.mode == "dinov3":
        denom = {"separate": (rope.height, rope.width), "max": (max(rope.height, rope.width),) * 2,
                 "min": (min(rope.height, rope.width),) * 2}[rope.normalize]
        cy, cx = 2 * (y + 0.5) / denom[0] - 1, 2 * (x + 0.5) / denom[1] - 1
        period = rope.periods.double().cpu()[j % (d // 4)]
        coord = torch.where(((j // (d // 4)) % 2 == 0)[None, :], cy[:, None], cx[:, None])
        angles = 2 * math.pi * coord / period[None, :]
        partner = (j + d // 2) % d
        sign = torch.where(j < d // 2, -1.0, 1.0).double()
    else:  # vggt: first half by y + 1, second half by x + 1, rotate-half inside each half
        inv_freq = 1.0 / rope.base ** (2 * torch.arange(d // 4, dtype=torch.float64) / (d // 2))
        pos = torch.where((j < d // 2)[None, :], (y + 1)[:, None], (x + 1)[:, None])
        angles = pos * inv_freq[j % (d // 4)][None, :]
        partner = (j // (d // 2)) * (d // 2) + (j % (d // 2) + d // 4) % (d // 2)
        sign = torch.where(j % (d // 2) < d // 4, -1.0, 1.0).double()
    angles = torch.where((t < rope.n_prefix)[:, None], 0.0, angles)
    return angles, partner, sign


def _oracle(qkv, heads, rope, q_norm, k_norm, scale=None, eps=1e-5):
    B, N, C3 = qkv.shape
    d = C3 // (3 * heads)
    q, k, v = qkv.double().reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)  # [B, h, N, d] each

    def norm(t, wb):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        t = (t - mean) / torch.sqrt(var + eps) * wb[0].double()
        return t + wb[1].double() if wb[1] is not None else t

    if q_norm is not None:
        q = norm(q, q_norm)
    if k_norm is not None:
        k = norm(k, k_norm)
    if rope is not None:
        angles, partner, sign = _oracle_angles(rope, N, d)
        cos, sin = torch.cos(angles).to(q.device), torch.sin(angles).to(q.device)
        partner, sign = partner.to(q.device), sign.to(q.device)
        q = q * cos + sign * q[..., partner] * sin
        k = k * cos + sign * k[..., partner] * sin
    scores = (q @ k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, N, heads * d)


ORACLE_CASES = [  # (mode, H, W, n_prefix, frames, qk_norm, normalize, layout)
    ("none", 2, 3, 1, 1, False, "separate", "contiguous"),
    ("none", 2, 3, 1, 1, True, "separate", "slice"),
    ("dinov3", 3, 4, 5, 1, False, "separate", "contiguous"),
    ("dinov3", 2, 5, 1, 1, True, "max", "nbatch"),
    ("dinov3", 4, 2, 0, 2, False, "min", "contiguous"),
    ("vggt", 3, 3, 5, 1, True, "separate", "contiguous"),
    ("vggt", 2, 4, 1, 3, True, "separate", "slice"),
    ("vggt", 3, 2, 0, 1, False, "separate", "contiguous"),
]


@pytest.mark.parametrize("backend", backend_params("rope_attention"))
@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-p{c[3]}-f{c[4]}-"
                         f"{'qkn' if c[5] else 'plain'}-{c[6]}-{c[7]}")
def test_every_backend_matches_the_oracle(backend, case):
    mode, H, W, n_prefix, frames, qk_norm, normalize, layout = case
    d, heads = 16, 2
    qkv = _qkv(2, frames * (n_prefix + H * W), heads, d, layout=layout).requires_grad_()
    rope = _grid(mode, H, W, n_prefix, d, normalize)
    q_norm, k_norm = _norms(d, bias=mode != "dinov3", requires_grad=True) if qk_norm else (None, None)
    scale = 0.3 if mode == "dinov3" else None
    out = ops.rope_attention(qkv, heads, rope, q_norm=q_norm, k_norm=k_norm, scale=scale, backend=backend)
    assert dispatch.last_backend("rope_attention") == backend
    want = _oracle(qkv, heads, rope, q_norm, k_norm, scale)
    assert out.dtype == qkv.dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=2e-5)
    leaves = [qkv] + [t for nrm in (q_norm, k_norm) if nrm is not None for t in nrm if t is not None]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    expected = torch.autograd.grad(want, leaves, g.double())
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-3, atol=5e-5)

"""Triton backend of ``rope_attention``: host functions, custom ops and autograd.

The kernels are in ``triton_kernels.py``. Registered as the custom ops
``flashdino::rope_attention_triton`` (+ ``_bwd``) with fake (meta) implementations and autograd,
so they trace under ``torch.compile(fullgraph=True)``. RoPE geometry (frequency table,
coordinate denominators, cos/sin tables, the dtype rule under autocast) comes from
:class:`~flashdino.ops.rope_attention.grid.RopeGrid`; the op receives it as tensors and floats.

How K (and Q) get rotated, ``k_rotation`` (``FLASHDINO_ROPE_ATTN_K_ROTATION``, default
``"prepass"``):

* ``"prepass"``: one small kernel writes the normalised, rotated q and k once, in the token dtype,
  to a ``[2, B, h, N, d]`` buffer; the attention kernels are then plain flash attention. O(N*d)
  extra traffic against O(N^2*d) work, no transcendental in the inner loop, and the rounding to
  the token dtype before the QK^T product is what the reference does. The prepass (and the
  backward's post-pass) read cos/sin from the grid's cached fp32 table (``RopeGrid.kernel_table``,
  the reference's own values) instead of evaluating sin/cos per batch x head x token x channel;
  one program applies a table tile to several heads (``_heads_per_program``).
* ``"inline"``: Q is rotated in the prologue of each program and every K tile right after its
  load inside the inner loop (cos/sin recomputed per tile).
* ``"table"``: like "inline" but cos/sin come from the fp32 ``[2, tokens_per_frame, d]`` table.

"inline" and "table" are opt-in (not selected by default); ``flashdino check --audit`` compiles
them too and reports them as non-default configurations.

The backward always uses the prepass buffers (recomputed, not saved: memory stays qkv + out +
logsumexp, like SDPA). Without RoPE and qk_norm, q/k/v are read from qkv directly and dq/dk
written directly (no pre- or post-pass).

Launch configurations: the per-head-dim / precision tables ``FWD_CONFIGS`` / ``BWD_CONFIGS`` below,
audited by ``flashdino check --audit``, and the forward's other candidates ``FWD_CANDIDATES`` that
on-device tuning times (``flashdino check --tune``). ``FLASHDINO_ROPE_ATTN_FWD_CFG`` / ``_BWD_CFG``
= ``"BLOCK_M,BLOCK_N,num_warps,num_stages"`` override them for experts (validated, not audited).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ...triton_support import require_triton
from .grid import RopeGrid, rotation_dtype
from .triton_kernels import (_bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_post_kernel, _fwd_kernel,
                             _prepass_kernel)

require_triton()

K_ROTATIONS = ("prepass", "inline", "table")
# Default way of rotating K; FLASHDINO_ROPE_ATTN_K_ROTATION overrides it.
K_ROTATION = os.environ.get("FLASHDINO_ROPE_ATTN_K_ROTATION", "prepass")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# "vggt_f32" is "vggt" without rounding the angles / cos / sin to the token dtype (the rotation
# dtype is fp32, see grid.rotation_dtype).
_MODES = {"none": 0, "dinov3": 1, "vggt": 2, "vggt_f32": 3}
_MAX_GRID_Y = 65535  # CUDA limit of the second grid axis (batch * heads)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), by (precision, head_dim).
# "half" is fp16 / bf16 on tensor cores; "tf32" is fp32 qkv with TF32 dots, routed here only when
# the user allowed TF32 (``torch.backends.cuda.matmul.allow_tf32``). Every entry compiles without
# register spills and within the shared memory of sm_80, sm_86, sm_89 and sm_90, for every
# K-rotation mode, RoPE mode and qk-norm combination the dispatch can select: ``flashdino check
# --audit`` proves it (benchmarks/results/audit_triton.json, tests/test_audit.py). Not yet tuned
# for speed on a GPU. d=128 was BLOCK_N=32 (shared-memory bound); 128x64 with 8 warps and two
# stages fits 96 KiB, under the 99 KiB of sm_86 / sm_89.
FWD_CONFIGS = {
    ("half", 16): (128, 64, 4, 3),
    ("half", 32): (128, 64, 4, 3),
    ("half", 64): (128, 64, 4, 3),
    ("half", 128): (128, 64, 8, 2),
    ("tf32", 16): (64, 32, 4, 2),
    ("tf32", 32): (64, 32, 4, 2),
    ("tf32", 64): (64, 32, 4, 2),
    ("tf32", 128): (64, 32, 8, 2),
}
# The other forward configurations on-device tuning (``flashdino.check.tune``) may time and choose
# for a call of the default K rotation ("prepass"), by (precision, head_dim): the default above is
# always a candidate too. Each one fits the 99 KiB of shared memory of sm_86 / sm_89 (so every
# audited architecture) and compiles without spills; ``flashdino check --audit`` compiles them all
# (selectable by default, since tuning can choose them). Head dims no model of the table uses
# (16, 32) and fp32 (TF32, opt-in) keep their one configuration.
FWD_CANDIDATES = {
    ("half", 64): ((128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2)),
    ("half", 128): ((64, 64, 8, 2), (128, 32, 8, 3)),
}
BWD_CONFIGS = {
    ("half", 16): (64, 64, 4, 2),
    ("half", 32): (64, 64, 4, 2),
    ("half", 64): (64, 64, 4, 2),
    ("half", 128): (64, 64, 8, 2),
    ("tf32", 16): (32, 64, 4, 2),
    ("tf32", 32): (32, 64, 4, 2),
    ("tf32", 64): (32, 64, 4, 2),
    ("tf32", 128): (32, 32, 8, 2),
}
# (BLOCK_T tokens, num_warps) of the element-wise kernels (prepass, delta, post-pass) by head dim.
# d=128 uses 8 warps: the prepass / post-pass keep the [32, 128] fp32 cos/sin tile live across
# their loop over heads, which took the qk-norm post-pass to 255 registers with 4 warps (128 with 8).
ELEM_CONFIGS = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (32, 8)}
_INTERPRETER_CFG = (16, 16, 1, 1)  # small tiles keep the CPU interpreter fast
# The prepass / post-pass programs each handle several heads of one image (one table tile load,
# reused per head) while at least this many programs remain: about 16 per SM of an H100, enough
# in flight to cover memory latency. A heuristic, not measured on a GPU.
_PREPASS_MIN_PROGRAMS = 2048


def _precision(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "tf32"


def _parse_env_cfg(name: str) -> Optional[tuple]:
    """``FLASHDINO_ROPE_ATTN_{FWD,BWD}_CFG="BLOCK_M,BLOCK_N,num_warps,num_stages"``: an expert
    override for GPU sweeps. It is validated (a malformed value raises, naming the variable) but
    not audited: a tile that spills or overflows shared memory is the user's choice."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        cfg = tuple(int(v) for v in value.split(","))
    except ValueError:
        cfg = ()
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    if (len(cfg) != 4 or not all(pow2(v) and 16 <= v <= 256 for v in cfg[:2]) or cfg[2] not in (1, 2, 4, 8, 16)
            or not 1 <= cfg[3] <= 6):
        raise ValueError(f"{name}={value!r}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages' with BLOCK_M and "
                         f"BLOCK_N powers of two in [16, 256], num_warps in 1, 2, 4, 8, 16 and num_stages in "
                         f"1..6 (unset it to use the audited defaults)")
    return cfg


def _fwd_config(head_dim: int, dtype: torch.dtype, chosen: Optional[list] = None) -> tuple:
    if chosen:  # a configuration chosen by on-device tuning (one of fwd_candidates), also interpreted
        return tuple(int(v) for v in chosen)
    if _interpreting():
        return _INTERPRETER_CFG
    return _parse_env_cfg("FLASHDINO_ROPE_ATTN_FWD_CFG") or FWD_CONFIGS[(_precision(dtype), head_dim)]


def fwd_candidates(call) -> tuple:
    """The forward launch configurations tuning may time for ``call`` (a ``RopeAttentionCall``),
    the default first; only the default (or the user's override) when the K rotation or the
    configuration is overridden, since only the prepass path's candidates are audited."""
    key = (_precision(call.dtype), call.head_dim)
    if key not in FWD_CONFIGS:
        return ()
    default = FWD_CONFIGS[key]
    if K_ROTATION != "prepass" or os.environ.get("FLASHDINO_ROPE_ATTN_FWD_CFG"):
        return (default,)
    return (default,) + tuple(c for c in FWD_CANDIDATES.get(key, ()) if c != default)


def config_name(cfg: tuple) -> str:
    """``(128, 64, 4, 3)`` -> ``"128x64w4s3"``: the variant name of a launch configuration."""
    return f"{cfg[0]}x{cfg[1]}w{cfg[2]}s{cfg[3]}"


def _bwd_config(head_dim: int, dtype: torch.dtype) -> tuple:
    if _interpreting():
        return _INTERPRETER_CFG
    return _parse_env_cfg("FLASHDINO_ROPE_ATTN_BWD_CFG") or BWD_CONFIGS[(_precision(dtype), head_dim)]


def _elem_block(head_dim: int) -> tuple:
    if _interpreting():
        return 16, 1
    return ELEM_CONFIGS[head_dim]


def _geometry(qkv: Tensor, num_heads: int, mode: str, height: int, width: int, n_prefix: int):
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    tpf = n_prefix + height * width if mode != "none" else max(N, 1)
    return B, N, head_dim, tpf


def _half_group(mode: str, head_dim: int) -> int:
    return head_dim // 2 if mode == "dinov3" else head_dim // 4 if mode in ("vggt", "vggt_f32") else 1


def _dot_prec(dtype) -> str:
    """Dot precision: fp16/bf16 run on tensor cores whatever this says; fp32 uses TF32 only when
    the user allowed it for matmuls (what SDPA's fp32 path would then do), else IEEE fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _heads_per_program(token_blocks: int, batch: int, num_heads: int) -> int:
    """Heads per prepass / post-pass program: the largest divisor of ``num_heads`` that still
    leaves ``_PREPASS_MIN_PROGRAMS`` programs (grid: token blocks x batch x head groups x q/k)."""
    for heads in range(num_heads, 1, -1):
        if num_heads % heads == 0 and token_blocks * batch * (num_heads // heads) * 2 >= _PREPASS_MIN_PROGRAMS:
            return heads
    return 1


def _prepass(qkv, cos_sin, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, eps):
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    rqk = torch.empty(2, B, num_heads, N, D, device=qkv.device, dtype=qkv.dtype)
    block_t, warps = _elem_block(D)
    n_t = triton.cdiv(N, block_t)
    heads = _heads_per_program(n_t, B, num_heads)
    dummy = qkv
    _prepass_kernel[(n_t, B * (num_heads // heads), 2)](
        qkv, rqk, cos_sin if mode != "none" else dummy,
        qw if qw is not None else dummy, qb if qb is not None else dummy,
        kw if kw is not None else dummy, kb if kb is not None else dummy,
        qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, heads, eps,
        D=D, BLOCK_T=block_t, ROTATE=int(mode != "none"), NORM_Q=qw is not None, HAS_BQ=qb is not None,
        NORM_K=kw is not None, HAS_BK=kb is not None, HALF_G=_half_group(mode, D), num_warps=warps,
    )
    return rqk


def _prepare(qkv: Tensor) -> Tensor:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv


def _validate(qkv, freqs, cos_sin, norm_tensors, num_heads, height, width, n_prefix, mode):
    """Host-side checks of a direct op call (the kernels do not bounds-check tables or weights)."""
    name = "rope_attention_triton"
    if mode not in _MODES:
        raise ValueError(f"{name}: unknown mode {mode!r} (expected one of {tuple(_MODES)})")
    if qkv.dim() != 3 or num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{name}: qkv must be [B, N, 3 * {num_heads} * head_dim], got {tuple(qkv.shape)}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    if qkv.shape[0] * num_heads > _MAX_GRID_Y:  # grid axis 1 holds batch * heads
        raise ValueError(f"{name}: batch * heads = {qkv.shape[0] * num_heads} exceeds {_MAX_GRID_Y}; split the batch")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: qkv dtype {qkv.dtype} is not fp16, bf16 or fp32")
    if mode != "none":
        tpf = n_prefix + height * width
        if height < 1 or width < 1 or n_prefix < 0 or qkv.shape[1] % tpf:
            raise ValueError(f"{name}: N={qkv.shape[1]} is not a multiple of n_prefix + H*W = {n_prefix} + "
                             f"{height}*{width}")
        if freqs is None or freqs.shape != (head_dim // 4,) or freqs.dtype != torch.float32:
            got = None if freqs is None else f"{freqs.dtype} {tuple(freqs.shape)}"
            raise ValueError(f"{name}: RoPE needs an fp32 frequency table of shape [{head_dim // 4}] "
                             f"(RopeGrid.frequencies), got {got}")
        if cos_sin is None or cos_sin.shape != (2, tpf, head_dim) or cos_sin.dtype != torch.float32:
            got = None if cos_sin is None else f"{cos_sin.dtype} {tuple(cos_sin.shape)}"
            raise ValueError(f"{name}: RoPE needs the fp32 cos/sin table [2, {tpf}, {head_dim}] "
                             f"(RopeGrid.kernel_table), got {got}")
    tables = [freqs, cos_sin] if mode != "none" else []
    for t in tables + [t for t in norm_tensors if t is not None]:
        if t.device != qkv.device:
            raise ValueError(f"{name}: a parameter is on {t.device}, qkv on {qkv.device}")
        if all(t is not table for table in tables) and t.shape != (head_dim,):
            raise ValueError(f"{name}: qk-norm parameters must be [{head_dim}], got {tuple(t.shape)}")


def _forward(qkv, freqs, cos_sin, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode, denom_h, denom_w, eps,
             scale, k_rotation, fwd_config=None):
    _validate(qkv, freqs, cos_sin, (qw, qb, kw, kb), num_heads, height, width, n_prefix, mode)
    if k_rotation not in K_ROTATIONS:
        raise ValueError(f"rope_attention_triton: unknown k_rotation {k_rotation!r} (expected one of {K_ROTATIONS})")
    qkv = _prepare(qkv)
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    cos_sin = cos_sin.contiguous() if mode != "none" else None
    transform = mode != "none" or qw is not None or kw is not None
    out = torch.empty(B, N, num_heads * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    rqk = cs = None
    if not transform:
        source = 0
    elif k_rotation == "prepass":
        source = 1
        rqk = _prepass(qkv, cos_sin, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, eps)
    elif k_rotation == "inline":
        source = 2
    else:
        source = 3 if mode != "none" else 2
        cs = cos_sin
    bm, bn, warps, stages = _fwd_config(D, qkv.dtype, fwd_config)
    if source == 3:  # the fp32 cos/sin tiles are pipelined too: 3 stages need 192 KiB smem at d=128,
        # 2 stages 144 KiB (over the 99 KiB of sm_86 / sm_89): one stage at d=128 (flashdino check --audit)
        stages = min(stages, 2 if D < 128 else 1)
    # With stored tiles (SOURCE 0 / 1) the RoPE / norm constexprs are dead code: pass neutral values
    # so that every mode shares one compiled kernel (and the audit's list of variants is exact).
    inline = source >= 2
    dummy = qkv
    _fwd_kernel[(triton.cdiv(N, bm), B * num_heads)](
        qkv, rqk if rqk is not None else dummy, freqs if freqs is not None else dummy,
        cs if cs is not None else dummy,
        qw if qw is not None else dummy, qb if qb is not None else dummy,
        kw if kw is not None else dummy, kb if kb is not None else dummy, out, lse,
        qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, n_prefix, width, denom_h, denom_w, eps,
        scale * 1.4426950408889634,
        D=D, BLOCK_M=bm, BLOCK_N=bn, SOURCE=source, ROPE=_MODES[mode] if inline else 0,
        NORM_Q=inline and qw is not None, HAS_BQ=inline and qb is not None, NORM_K=inline and kw is not None,
        HAS_BK=inline and kb is not None, HALF_G=_half_group(mode, D) if inline else 1,
        DOT_PREC=_dot_prec(qkv.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(grad_out, qkv, out, lse, freqs, cos_sin, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode,
              denom_h, denom_w, eps, scale):
    _validate(qkv, freqs, cos_sin, (qw, qb, kw, kb), num_heads, height, width, n_prefix, mode)
    if grad_out.shape != out.shape:
        raise ValueError(f"rope_attention_triton_bwd: grad_out {tuple(grad_out.shape)} != out {tuple(out.shape)}")
    qkv = _prepare(qkv)
    cos_sin = cos_sin.contiguous() if mode != "none" else None
    # The kernels address a token of grad_out as ``tok * stride`` in int32 (like qkv, whose span
    # supports() bounds): a gradient view with a larger token stride is made contiguous, whose span
    # (N * h * d) is below qkv's (N * 3 * h * d).
    if grad_out.stride(-1) != 1 or grad_out.shape[1] * max(grad_out.stride(1), 1) >= 2**31:
        grad_out = grad_out.contiguous()
    grad_out = grad_out.to(qkv.dtype)
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    transform = mode != "none" or qw is not None or kw is not None
    dqkv = torch.empty(B, N, 3 * num_heads * D, device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    bh = B * num_heads
    block_t, ewarps = _elem_block(D)
    _bwd_delta_kernel[(triton.cdiv(N, block_t), bh)](
        out, grad_out, delta, grad_out.stride(0), grad_out.stride(1), N, num_heads, D=D, BLOCK_M=block_t,
        num_warps=ewarps)
    rqk = grqk = None
    if transform:
        rqk = _prepass(qkv, cos_sin, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, eps)
        grqk = torch.empty(2, B, num_heads, N, D, device=qkv.device, dtype=torch.float32)
    source = 1 if transform else 0
    bm, bn, warps, stages = _bwd_config(D, qkv.dtype)
    common = (qkv, rqk if rqk is not None else qkv, grad_out, lse, delta, dqkv, grqk if grqk is not None else qkv,
              qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), N, num_heads, B,
              scale, scale * 1.4426950408889634)
    meta = dict(D=D, BLOCK_M=bm, BLOCK_N=bn, SOURCE=source, DOT_PREC=_dot_prec(qkv.dtype),
                num_warps=warps, num_stages=stages)
    _bwd_dkdv_kernel[(triton.cdiv(N, bn), bh)](*common, **meta)
    _bwd_dq_kernel[(triton.cdiv(N, bm), bh)](*common, **meta)
    grads = [qkv.new_empty(0) for _ in range(4)]  # distinct tensors: custom-op outputs may not alias
    if transform:
        n_t = triton.cdiv(N, block_t)
        has_norm = qw is not None or kw is not None
        part = torch.empty(2, bh * n_t, 2, D, device=qkv.device, dtype=torch.float32) if has_norm else None
        heads = _heads_per_program(n_t, B, num_heads)
        _bwd_post_kernel[(n_t, B * (num_heads // heads), 2)](
            qkv, grqk, dqkv, part if part is not None else grqk, cos_sin if mode != "none" else qkv,
            qw if qw is not None else qkv, kw if kw is not None else qkv,
            qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, heads, eps,
            D=D, BLOCK_T=block_t, ROTATE=int(mode != "none"), NORM_Q=qw is not None, NORM_K=kw is not None,
            HALF_G=_half_group(mode, D), num_warps=ewarps,
        )
        for sec, weight, bias in ((0, qw, qb), (1, kw, kb)):
            if weight is not None:
                grads[2 * sec] = part[sec, :, 0].sum(0).to(weight.dtype)
                if bias is not None:
                    grads[2 * sec + 1] = part[sec, :, 1].sum(0).to(bias.dtype)
    return (dqkv, *grads)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile / autograd)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("flashdino::rope_attention_triton", mutates_args=())
def rope_attention_triton(
    qkv: Tensor, freqs: Optional[Tensor], cos_sin: Optional[Tensor], q_weight: Optional[Tensor],
    q_bias: Optional[Tensor], k_weight: Optional[Tensor], k_bias: Optional[Tensor], num_heads: int, height: int,
    width: int, n_prefix: int, mode: str, denom_h: float, denom_w: float, eps: float, scale: float, k_rotation: str,
    fwd_config: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, N, h*d], logsumexp [B, h, N] fp32, base-2 and pre-scaled: for the backward).

    ``freqs``: the [d/4] fp32 table of ``RopeGrid.frequencies`` (None without RoPE), read by
    ``k_rotation="inline"``; ``cos_sin``: the fp32 [2, tokens_per_frame, d] table of
    ``RopeGrid.kernel_table`` (None without RoPE), read by the prepass and ``k_rotation="table"``.
    ``fwd_config``: ``[BLOCK_M, BLOCK_N, num_warps, num_stages]`` chosen by tuning (None: the
    default table).
    """
    return _forward(qkv, freqs, cos_sin, q_weight, q_bias, k_weight, k_bias, num_heads, height, width, n_prefix,
                    mode, denom_h, denom_w, eps, scale, k_rotation, fwd_config)


@rope_attention_triton.register_fake
def _(qkv, freqs, cos_sin, q_weight, q_bias, k_weight, k_bias, num_heads, height, width, n_prefix, mode, denom_h,
      denom_w, eps, scale, k_rotation, fwd_config=None):
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    return (qkv.new_empty(B, N, num_heads * head_dim),
            qkv.new_empty(B, num_heads, N, dtype=torch.float32))


@torch.library.custom_op("flashdino::rope_attention_triton_bwd", mutates_args=())
def rope_attention_triton_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, freqs: Optional[Tensor], cos_sin: Optional[Tensor],
    q_weight: Optional[Tensor], q_bias: Optional[Tensor], k_weight: Optional[Tensor], k_bias: Optional[Tensor],
    num_heads: int, height: int, width: int, n_prefix: int, mode: str, denom_h: float, denom_w: float, eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dqkv [B, N, 3*h*d] contiguous, d q_weight, d q_bias, d k_weight, d k_bias); empty when absent."""
    return _backward(grad_out, qkv, out, lse, freqs, cos_sin, q_weight, q_bias, k_weight, k_bias, num_heads,
                     height, width, n_prefix, mode, denom_h, denom_w, eps, scale)


@rope_attention_triton_bwd.register_fake
def _(grad_out, qkv, out, lse, freqs, cos_sin, q_weight, q_bias, k_weight, k_bias, num_heads, height, width,
      n_prefix, mode, denom_h, denom_w, eps, scale):
    return (qkv.new_empty(qkv.shape),
            torch.empty_like(q_weight) if q_weight is not None else qkv.new_empty(0),
            torch.empty_like(q_bias) if q_weight is not None and q_bias is not None else qkv.new_empty(0),
            torch.empty_like(k_weight) if k_weight is not None else qkv.new_empty(0),
            torch.empty_like(k_bias) if k_weight is not None and k_bias is not None else qkv.new_empty(0))


_N_SCALAR_ARGS = 11  # num_heads ... k_rotation, fwd_config


def _setup_context(ctx, inputs, output):
    qkv, freqs, cos_sin, qw, qb, kw, kb = inputs[:7]
    ctx.scalars = inputs[7:16]  # num_heads .. scale (k_rotation and fwd_config are forward-only)
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, freqs, cos_sin, qw, qb, kw, kb)


def _backward_autograd(ctx, grad_out, grad_lse):
    qkv, out, lse, freqs, cos_sin, qw, qb, kw, kb = ctx.saved_tensors
    dqkv, dqw, dqb, dkw, dkb = torch.ops.flashdino.rope_attention_triton_bwd(
        grad_out, qkv, out, lse, freqs, cos_sin, qw, qb, kw, kb, *ctx.scalars)
    return (dqkv, None, None,
            dqw if qw is not None else None,
            dqb if qw is not None and qb is not None else None,
            dkw if kw is not None else None,
            dkb if kw is not None and kb is not None else None) + (None,) * _N_SCALAR_ARGS


rope_attention_triton.register_autograd(_backward_autograd, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Dispatcher entry point
# ----------------------------------------------------------------------------------------------


def rope_attention(qkv: Tensor, num_heads: int, rope: Optional[RopeGrid] = None,
                   q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
                   k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
                   norm_eps: float = 1e-5, scale: Optional[float] = None,
                   k_rotation: Optional[str] = None, fwd_config: Optional[tuple] = None) -> Tensor:
    """Same signature and result as the reference ``rope_attention`` (plus ``k_rotation`` and the
    forward launch configuration ``fwd_config``, one of :func:`fwd_candidates`, which the tuner's
    variants pass)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    k_rotation = k_rotation or K_ROTATION
    if scale is None:
        scale = head_dim ** -0.5
    freqs = cos_sin = None
    if rope is None:
        mode, height, width, n_prefix, denom_h, denom_w = "none", 1, 1, 0, 1.0, 1.0
    else:
        mode, height, width, n_prefix = rope.mode, rope.height, rope.width, rope.n_prefix
        if mode not in ("dinov3", "vggt"):
            raise ValueError(f"rope_attention_triton: unknown RoPE mode {mode!r} (expected 'dinov3' or 'vggt')")
        denom_h, denom_w = rope.denominators()
        freqs = rope.frequencies(head_dim, qkv.device)
        rot_dtype = rotation_dtype(qkv.dtype, q_norm is not None, qkv.device)
        if mode == "vggt" and rot_dtype != qkv.dtype:
            mode = "vggt_f32"
        cos_sin = rope.kernel_table(head_dim, rot_dtype, qkv.device)
    qw, qb = q_norm if q_norm is not None else (None, None)
    kw, kb = k_norm if k_norm is not None else (None, None)
    args = (freqs, cos_sin, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode, float(denom_h), float(denom_w),
            float(norm_eps), float(scale), k_rotation, list(fwd_config) if fwd_config is not None else None)
    max_batch = _MAX_GRID_Y // num_heads
    if qkv.shape[0] > max_batch:  # the grid's second axis holds batch * heads
        return torch.cat([torch.ops.flashdino.rope_attention_triton(part, *args)[0]
                          for part in qkv.split(max_batch)])
    return torch.ops.flashdino.rope_attention_triton(qkv, *args)[0]


def supports(call) -> Optional[str]:
    """None when the Triton kernels run ``call`` (a ``RopeAttentionCall``), else the reason not."""
    dtype, head_dim, n_tokens, rope = call.dtype, call.head_dim, call.n_tokens, call.rope
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (Triton rope_attention covers fp16, bf16, fp32)"
    # Under autocast the reference's SDPA casts fp32 q/k/v to the autocast dtype (and returns it);
    # the kernels would compute and return fp32 (only reachable by calling the op on fp32 qkv:
    # the models' qkv Linear already returns the autocast dtype).
    if dtype == torch.float32 and (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
        return "fp32 qkv under autocast (the reference attends in the autocast dtype)"
    # The kernels address a token of qkv as ``tok * s_n`` in int32 (only the batch offset is
    # int64): refuse sequences whose per-image qkv spans 2**31 elements (e.g. VGGT global
    # attention over ~700 frames at 518 px) rather than read out of bounds.
    if n_tokens * max(call.token_stride, 1) >= 2**31:
        return f"{n_tokens} tokens x stride {call.token_stride} overflows the kernels' int32 token offsets"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (Triton rope_attention covers {SUPPORTED_HEAD_DIMS})"
    if n_tokens < 1:
        return "empty sequence"
    if rope is not None:
        if rope.mode not in ("dinov3", "vggt"):
            return f"RoPE mode {rope.mode!r}"
        if rope.mode == "dinov3" and rope.normalize not in ("separate", "min", "max"):
            return f"RoPE normalisation {rope.normalize!r}"
    # fp32 q/k/v: IEEE fp32 dots have no tensor cores and spill (~29 KB per thread at d=128), so
    # fp32 runs here only as TF32, when the user allowed TF32 for matmuls (SDPA's fp32 path would
    # then use it too); otherwise the reference (SDPA) is both faster and exact. The CPU
    # interpreter (tests) computes fp32 exactly and has no registers to spill.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return ("fp32 qkv without TF32 (the SDPA path is faster; set torch.backends.cuda.matmul.allow_tf32 = True "
                "to run the TF32 kernel, or use bf16 / fp16)")
    return None

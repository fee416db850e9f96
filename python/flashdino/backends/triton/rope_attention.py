"""Fused RoPE flash attention over the fused qkv projection (Triton), forward and backward.

Semantics: exactly ``flashdino.backends.default.rope_attention.rope_attention`` (optional per-head
LayerNorm of q and k, then 2D RoPE in the "dinov3" or "vggt" convention, softmax attention), read
straight from the qkv Linear output ``[B, N, 3*h*d]`` viewed as ``[B, N, 3, h, d]`` through its
strides (no transposes or copies; any B/N strides, unit stride on the channel dim), output written
as a contiguous ``[B, N, h*d]`` ready for the output projection.

Rotation inside the kernels, in fp32:

* token ``n`` of the sequence sits at ``t = n % tokens_per_frame`` of its frame; ``t < n_prefix``
  is a prefix token (CLS / storage / camera / register) and is not rotated; otherwise
  ``p = t - n_prefix``, ``y = p // W``, ``x = p % W``. No position tensor is read.
* "dinov3": coordinate ``2 * ((y + 0.5) / denom) - 1`` (denominators from the ``separate`` /
  ``min`` / ``max`` normalisation), angle ``2*pi*coord / period`` with the ``[d/4]`` periods read
  from memory, layout ``[Y, X, Y, X]`` of ``d/4`` blocks, rotate-half pairing ``i`` with
  ``i + d/2``.
* "vggt": positions ``(y + 1, x + 1)``, ``inv_freq = 1 / base**(arange(0, d/2, 2) / (d/2))``
  (computed by PyTorch exactly as the reference, read from memory), first half rotated by y and
  second half by x, rotate-half pairing ``i`` with ``i + d/4`` inside each half. Like the
  reference, angles and then cos/sin are rounded to the token dtype before use.

Rotation partners are loaded with a second, column-permuted load (``col ^ half_group``) that hits
the same cache lines; with qk_norm both loads are normalised with the row's mean/rstd.

How K (and Q) get rotated (``k_rotation``; the issue asks to measure the options):

* ``"prepass"`` (DEFAULT): one small kernel writes the normalised, rotated q and k once, in the
  token dtype, to a ``[2, B, h, N, d]`` buffer; the attention kernels are then plain flash
  attention. O(N*d) extra traffic against O(N^2*d) work, no transcendental in the inner loop, and
  the rounding to the token dtype before the QK^T product is exactly what the reference does.
* ``"inline"``: Q is rotated in the prologue of each program and every K tile is normalised and
  rotated right after its load inside the inner loop (cos/sin recomputed per tile: MUFU work of
  BLOCK_N*d per tile, comparable to the tile's tensor-core work at d=64 on H100).
* ``"table"``: like "inline" but cos/sin come from a cached fp32 ``[2, tokens_per_frame, d]``
  table (the reference tables, identity rows for the prefix) instead of being recomputed.

The default was chosen on the arithmetic above; the GPU comparison is still to be run
(``benchmarks/test_bench_rope_attention.py -k k_rotation``). The backward always uses the
prepass buffers (recomputed, not saved: memory stays qkv + out + logsumexp like SDPA).

Backward: standard flash-attention 2 (logsumexp saved by the forward, ``delta = rowsum(dO*O)``
preprocessing, one kernel for dK/dV over query blocks, one for dQ over key blocks), gradients of
the rotated q/k accumulated in fp32, then a post-pass applies the inverse rotation and the
LayerNorm backward (partial sums for the norm weight/bias reduced by PyTorch) and writes dq/dk into
the ``[B, N, 3*h*d]`` gradient; dV is written there directly. Without RoPE and qk_norm, q/k/v are
read from qkv directly and dq/dk written directly (no pre- or post-pass).

Registered as the custom ops ``flashdino::rope_attention_triton`` (+ ``_bwd``) with fake
(meta) implementations and autograd, so they trace under ``torch.compile(fullgraph=True)``.

Launch configurations are untuned starting points (checked with ptxas for sm90: no register spills
in the bf16 forward at d=64/128, a few bytes in the d=128 dK/dV kernel); GPU sweeps can override
them with ``FLASHDINO_ROPE_ATTN_FWD_CFG`` / ``FLASHDINO_ROPE_ATTN_BWD_CFG`` =
``"BLOCK_M,BLOCK_N,num_warps,num_stages"``. Not verifiable without a GPU (the interpreter computes
in fp32, cannot run bf16 and does not catch out-of-bounds accesses): bf16 numerics, speed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import dispatch
from ..default.rope import RopeGrid, dinov3_rope_tables, vggt_rope_tables

K_ROTATIONS = ("prepass", "inline", "table")
# Default way of rotating K; FLASHDINO_ROPE_ATTN_K_ROTATION overrides it (for the GPU comparison).
K_ROTATION = os.environ.get("FLASHDINO_ROPE_ATTN_K_ROTATION", "prepass")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# "vggt_f32" is "vggt" without rounding the angles / cos / sin to the token dtype: under autocast
# with q-norm the reference's LayerNorm returns fp32 q, so its vggt tables are fp32 (the dispatcher
# entry below picks it; the rounded tables differ by up to ~0.1 rad at bf16 for 37x37 grids).
_MODES = {"none": 0, "dinov3": 1, "vggt": 2, "vggt_f32": 3}
_MAX_GRID_Y = 65535  # CUDA limit of the second grid axis (batch * heads)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cos_sin(tok, cols, TAB, CS, TPF, n_prefix, GRID_W, denom_h, denom_w,
             ROUND_TY: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, FROM_TABLE: tl.constexpr):
    """cos, sin [BLOCK, D] (fp32) of the tokens ``tok``; identity for prefix tokens."""
    t = tok % TPF
    if FROM_TABLE:
        offs = t[:, None] * D + cols[None, :]
        cos = tl.load(CS + offs)
        sin = tl.load(CS + TPF * D + offs)
    else:
        is_patch = t >= n_prefix
        p = tl.where(is_patch, t - n_prefix, 0)
        y = p // GRID_W
        x = p - y * GRID_W
        freq = tl.load(TAB + (cols % (D // 4))).to(tl.float32)
        if ROPE == 1:  # dinov3: [Y, X, Y, X] blocks of d/4
            cy = 2.0 * tl.math.div_rn(y.to(tl.float32) + 0.5, denom_h) - 1.0
            cx = 2.0 * tl.math.div_rn(x.to(tl.float32) + 0.5, denom_w) - 1.0
            use_x = (cols & (D // 4)) != 0
            coord = tl.where(use_x[None, :], cx[:, None], cy[:, None])
            ang = tl.math.div_rn(6.283185307179586 * coord, freq[None, :])
            cos = tl.cos(ang)
            sin = tl.sin(ang)
        else:  # vggt: first half y, second half x, angles and cos/sin rounded to the token dtype (ROPE 2)
            use_x = (cols & (D // 2)) != 0
            pos = tl.where(use_x[None, :], (x + 1).to(tl.float32)[:, None], (y + 1).to(tl.float32)[:, None])
            ang = pos * freq[None, :]
            if ROPE == 2:  # "vggt_f32" (ROPE == 3) keeps the fp32 angles and cos/sin
                ang = ang.to(ROUND_TY).to(tl.float32)
            cos = tl.cos(ang)
            sin = tl.sin(ang)
            if ROPE == 2:
                cos = cos.to(ROUND_TY).to(tl.float32)
                sin = sin.to(ROUND_TY).to(tl.float32)
        cos = tl.where(is_patch[:, None], cos, 1.0)
        sin = tl.where(is_patch[:, None], sin, 0.0)
    return cos, sin


@triton.jit
def _transform(base, s_n, tok, tmask, cols, W, Bias, eps, cos, sin,
               D: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
               HALF_G: tl.constexpr):
    """Load a [BLOCK, D] q or k tile from qkv, LayerNorm it (optional) and rotate it; fp32."""
    rows = tok[:, None] * s_n
    x = tl.load(base + rows + cols[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / D
        xc = x - mean[:, None]
        var = tl.sum(xc * xc, axis=1) / D
        rstd = tl.rsqrt(var + eps)
        x = xc * rstd[:, None] * tl.load(W + cols).to(tl.float32)[None, :]
        if HAS_BIAS:
            x += tl.load(Bias + cols).to(tl.float32)[None, :]
    if ROPE != 0:
        pcols = cols ^ HALF_G
        xp = tl.load(base + rows + pcols[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        if NORM:
            xp = (xp - mean[:, None]) * rstd[:, None] * tl.load(W + pcols).to(tl.float32)[None, :]
            if HAS_BIAS:
                xp += tl.load(Bias + pcols).to(tl.float32)[None, :]
        sign = tl.where((cols & HALF_G) == 0, -1.0, 1.0)
        x = x * cos + (sign[None, :] * xp) * sin
    return x


@triton.jit
def _qk_tile(QKV, RQK, TAB, CS, W, Bias, b, hh, sec, tok, tmask, cols,
             s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps,
             D: tl.constexpr, SOURCE: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
             HAS_BIAS: tl.constexpr, HALF_G: tl.constexpr):
    """A q (sec=0) or k (sec=1) tile in the token dtype.

    SOURCE 0: straight from qkv (no RoPE, no norm); 1: from the prepass buffer; 2: transformed
    here with cos/sin recomputed; 3: transformed here with cos/sin from the fp32 table.
    """
    if SOURCE == 0:
        base = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
        x = tl.load(base + tok[:, None] * s_n + cols[None, :], mask=tmask[:, None], other=0.0)
    elif SOURCE == 1:
        base = RQK + ((sec * B + b) * NH + hh).to(tl.int64) * N * D
        x = tl.load(base + tok[:, None] * D + cols[None, :], mask=tmask[:, None], other=0.0)
    else:
        cos = 1.0
        sin = 0.0
        if ROPE != 0:
            cos, sin = _cos_sin(tok, cols, TAB, CS, TPF, n_prefix, GRID_W, denom_h, denom_w,
                                QKV.dtype.element_ty, D, ROPE, SOURCE == 3)
        base = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
        x = _transform(base, s_n, tok, tmask, cols, W, Bias, eps, cos, sin, D, ROPE, NORM, HAS_BIAS, HALF_G)
        x = x.to(QKV.dtype.element_ty)
    return x


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _prepass_kernel(QKV, RQK, TAB, QW, QB, KW, KB,
                    s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr,
                    NORM_Q: tl.constexpr, HAS_BQ: tl.constexpr, NORM_K: tl.constexpr, HAS_BK: tl.constexpr,
                    HALF_G: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    sec = tl.program_id(2)
    b = pid_bh // NH
    hh = pid_bh % NH
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    cols = tl.arange(0, D)
    cos = 1.0
    sin = 0.0
    if ROPE != 0:
        cos, sin = _cos_sin(tok, cols, TAB, TAB, TPF, n_prefix, GRID_W, denom_h, denom_w,
                            QKV.dtype.element_ty, D, ROPE, False)
    base = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
    if sec == 0:
        x = _transform(base, s_n, tok, tmask, cols, QW, QB, eps, cos, sin, D, ROPE, NORM_Q, HAS_BQ, HALF_G)
    else:
        x = _transform(base, s_n, tok, tmask, cols, KW, KB, eps, cos, sin, D, ROPE, NORM_K, HAS_BK, HALF_G)
    out = RQK + ((sec * B + b) * NH + hh).to(tl.int64) * N * D
    tl.store(out + tok[:, None] * D + cols[None, :], x.to(RQK.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _fwd_step(acc, m_i, l_i, q, start_n, QKV, RQK, TAB, CS, KW, KB, b, hh, cols,
              s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, SOURCE: tl.constexpr, ROPE: tl.constexpr,
              NORM_K: tl.constexpr, HAS_BK: tl.constexpr, HALF_G: tl.constexpr, MASKED: tl.constexpr,
              DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    k = _qk_tile(QKV, RQK, TAB, CS, KW, KB, b, hh, 1, offs_n, nmask, cols, s_b, s_n, N, NH, B, TPF, n_prefix,
                 GRID_W, denom_h, denom_w, eps, D, SOURCE, ROPE, NORM_K, HAS_BK, HALF_G)
    v_ptr = QKV + b.to(tl.int64) * s_b + (2 * NH + hh) * D + offs_n[:, None] * s_n + cols[None, :]
    v = tl.load(v_ptr, mask=nmask[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(QKV, RQK, TAB, CS, QW, QB, KW, KB, Out, LSE,
                s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOURCE: tl.constexpr,
                ROPE: tl.constexpr, NORM_Q: tl.constexpr, HAS_BQ: tl.constexpr, NORM_K: tl.constexpr,
                HAS_BK: tl.constexpr, HALF_G: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    cols = tl.arange(0, D)
    q = _qk_tile(QKV, RQK, TAB, CS, QW, QB, b, hh, 0, offs_m, mmask, cols, s_b, s_n, N, NH, B, TPF, n_prefix,
                 GRID_W, denom_h, denom_w, eps, D, SOURCE, ROPE, NORM_Q, HAS_BQ, HALF_G)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, start_n, QKV, RQK, TAB, CS, KW, KB, b, hh, cols,
                                  s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps, qk_scale,
                                  D, BLOCK_N, SOURCE, ROPE, NORM_K, HAS_BK, HALF_G, False, DOT_PREC)
    if n_full < N:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, n_full, QKV, RQK, TAB, CS, KW, KB, b, hh, cols,
                                  s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps, qk_scale,
                                  D, BLOCK_N, SOURCE, ROPE, NORM_K, HAS_BK, HALF_G, True, DOT_PREC)
    acc = acc / l_i[:, None]
    out_ptr = Out + (b.to(tl.int64) * N + offs_m[:, None]) * (NH * D) + hh * D + cols[None, :]
    tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=mmask[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mmask)


@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, s_ob, s_on, N, NH, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    cols = tl.arange(0, D)
    o = tl.load(Out + (b.to(tl.int64) * N + offs_m[:, None]) * (NH * D) + hh * D + cols[None, :],
                mask=mmask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * s_ob + offs_m[:, None] * s_on + hh * D + cols[None, :],
                 mask=mmask[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, axis=1), mask=mmask)


@triton.jit
def _bwd_dkdv_kernel(QKV, RQK, DO, LSE, Delta, DQKV, GRQK,
                     s_b, s_n, s_ob, s_on, N, NH, B, sm_scale, qk_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOURCE: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    cols = tl.arange(0, D)
    k = _qk_tile(QKV, RQK, QKV, QKV, QKV, QKV, b, hh, 1, offs_n, nmask, cols, s_b, s_n, N, NH, B, 1, 0,
                 1, 1.0, 1.0, 0.0, D, SOURCE, 0, False, False, 1)
    v = tl.load(QKV + b.to(tl.int64) * s_b + (2 * NH + hh) * D + offs_n[:, None] * s_n + cols[None, :],
                mask=nmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    row = pid_bh.to(tl.int64) * N
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q = _qk_tile(QKV, RQK, QKV, QKV, QKV, QKV, b, hh, 0, offs_m, mmask, cols, s_b, s_n, N, NH, B, 1, 0,
                     1, 1.0, 1.0, 0.0, D, SOURCE, 0, False, False, 1)
        do = tl.load(DO + b.to(tl.int64) * s_ob + offs_m[:, None] * s_on + hh * D + cols[None, :],
                     mask=mmask[:, None], other=0.0)
        lse = tl.load(LSE + row + offs_m, mask=mmask, other=float("inf"))
        delta = tl.load(Delta + row + offs_m, mask=mmask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    dqkv_row = DQKV + (b.to(tl.int64) * N + offs_n[:, None]) * (3 * NH * D) + cols[None, :]
    tl.store(dqkv_row + (2 * NH + hh) * D, dv.to(DQKV.dtype.element_ty), mask=nmask[:, None])
    if SOURCE == 0:
        tl.store(dqkv_row + (NH + hh) * D, dk.to(DQKV.dtype.element_ty), mask=nmask[:, None])
    else:
        g = GRQK + ((B + b) * NH + hh).to(tl.int64) * N * D
        tl.store(g + offs_n[:, None] * D + cols[None, :], dk, mask=nmask[:, None])


@triton.jit
def _bwd_dq_kernel(QKV, RQK, DO, LSE, Delta, DQKV, GRQK,
                   s_b, s_n, s_ob, s_on, N, NH, B, sm_scale, qk_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOURCE: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    cols = tl.arange(0, D)
    q = _qk_tile(QKV, RQK, QKV, QKV, QKV, QKV, b, hh, 0, offs_m, mmask, cols, s_b, s_n, N, NH, B, 1, 0,
                 1, 1.0, 1.0, 0.0, D, SOURCE, 0, False, False, 1)
    do = tl.load(DO + b.to(tl.int64) * s_ob + offs_m[:, None] * s_on + hh * D + cols[None, :],
                 mask=mmask[:, None], other=0.0)
    row = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + row + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(Delta + row + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        k = _qk_tile(QKV, RQK, QKV, QKV, QKV, QKV, b, hh, 1, offs_n, nmask, cols, s_b, s_n, N, NH, B, 1, 0,
                     1, 1.0, 1.0, 0.0, D, SOURCE, 0, False, False, 1)
        v = tl.load(QKV + b.to(tl.int64) * s_b + (2 * NH + hh) * D + offs_n[:, None] * s_n + cols[None, :],
                    mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(nmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    if SOURCE == 0:
        ptr = DQKV + (b.to(tl.int64) * N + offs_m[:, None]) * (3 * NH * D) + hh * D + cols[None, :]
        tl.store(ptr, dq.to(DQKV.dtype.element_ty), mask=mmask[:, None])
    else:
        g = GRQK + (b * NH + hh).to(tl.int64) * N * D
        tl.store(g + offs_m[:, None] * D + cols[None, :], dq, mask=mmask[:, None])


@triton.jit
def _post_one(QKV, G, DQKV, PART, W, b, hh, sec, tok, tmask, cols, cos, sin, part_row,
              s_b, s_n, N, NH, B, eps, D: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
              HALF_G: tl.constexpr):
    gbase = G + ((sec * B + b) * NH + hh).to(tl.int64) * N * D
    g = tl.load(gbase + tok[:, None] * D + cols[None, :], mask=tmask[:, None], other=0.0)
    if ROPE != 0:  # inverse rotation (rotation by -angle)
        gp = tl.load(gbase + tok[:, None] * D + (cols ^ HALF_G)[None, :], mask=tmask[:, None], other=0.0)
        sign = tl.where((cols & HALF_G) == 0, -1.0, 1.0)
        g = g * cos - (sign[None, :] * gp) * sin
    if NORM:  # LayerNorm backward, recomputing mean / rstd from qkv
        xbase = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
        x = tl.load(xbase + tok[:, None] * s_n + cols[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = x - mean[:, None]
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xhat = xc * rstd[:, None]
        dxhat = g * tl.load(W + cols).to(tl.float32)[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        part = PART + part_row * (2 * D)
        tl.store(part + cols, tl.sum(g * xhat, axis=0))
        tl.store(part + D + cols, tl.sum(g, axis=0))
        g = dx
    ptr = DQKV + (b.to(tl.int64) * N + tok[:, None]) * (3 * NH * D) + (sec * NH + hh) * D + cols[None, :]
    tl.store(ptr, g.to(DQKV.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _bwd_post_kernel(QKV, G, DQKV, PART, TAB, QW, KW,
                     s_b, s_n, N, NH, B, TPF, n_prefix, GRID_W, denom_h, denom_w, eps,
                     D: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr,
                     NORM_Q: tl.constexpr, NORM_K: tl.constexpr, HALF_G: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    sec = tl.program_id(2)
    b = pid_bh // NH
    hh = pid_bh % NH
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    cols = tl.arange(0, D)
    cos = 1.0
    sin = 0.0
    if ROPE != 0:
        cos, sin = _cos_sin(tok, cols, TAB, TAB, TPF, n_prefix, GRID_W, denom_h, denom_w,
                            QKV.dtype.element_ty, D, ROPE, False)
    part_row = (sec * B * NH + pid_bh).to(tl.int64) * tl.num_programs(0) + pid_t
    if sec == 0:
        _post_one(QKV, G, DQKV, PART, QW, b, hh, sec, tok, tmask, cols, cos, sin, part_row,
                  s_b, s_n, N, NH, B, eps, D, ROPE, NORM_Q, HALF_G)
    else:
        _post_one(QKV, G, DQKV, PART, KW, b, hh, sec, tok, tmask, cols, cos, sin, part_row,
                  s_b, s_n, N, NH, B, eps, D, ROPE, NORM_K, HALF_G)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

_TABLE_CACHE: dict = {}


def _env_cfg(name: str, default: tuple) -> tuple:
    """FLASHDINO_ROPE_ATTN_{FWD,BWD}_CFG="BLOCK_M,BLOCK_N,num_warps,num_stages" for GPU sweeps."""
    value = os.environ.get(name)
    return tuple(int(v) for v in value.split(",")) if value else default


def _fwd_config(head_dim: int, dtype: torch.dtype) -> tuple:
    if _interpreting():
        return (16, 16, 1, 1)
    # Not yet tuned on a GPU (FA2-style starting points for sm80/sm90; fp32 tiles are smaller so
    # that the pipelined tiles fit the shared memory of sm80 too).
    if dtype == torch.float32:
        default = (64, 32, 4, 2)
    else:
        default = (128, 64, 4, 3) if head_dim <= 64 else (128, 32, 8, 3)  # d=128: no spills at BLOCK_N=32 (ptxas)
    return _env_cfg("FLASHDINO_ROPE_ATTN_FWD_CFG", default)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> tuple:
    if _interpreting():
        return (16, 16, 1, 1)
    if dtype == torch.float32:
        default = (32, 64, 4, 2)
    else:
        default = (64, 64, 4, 2) if head_dim <= 64 else (64, 64, 8, 2)
    return _env_cfg("FLASHDINO_ROPE_ATTN_BWD_CFG", default)


def _elem_block(head_dim: int) -> tuple:
    if _interpreting():
        return 16, 1
    return (64, 4) if head_dim <= 64 else (32, 4)


def _denoms(mode: str, normalize: str, height: int, width: int) -> tuple[float, float]:
    if mode != "dinov3":
        return 1.0, 1.0
    if normalize == "separate":
        return float(height), float(width)
    if normalize == "max":
        return (float(max(height, width)),) * 2
    if normalize == "min":
        return (float(min(height, width)),) * 2
    raise ValueError(f"unknown RoPE coordinate normalisation {normalize!r}")


def _freq_table(mode: str, periods: Optional[Tensor], head_dim: int, base: float, device) -> Tensor:
    if mode == "dinov3":
        return periods.contiguous()
    key = ("inv_freq", head_dim, float(base), device)
    if key not in _TABLE_CACHE:  # exactly the reference expression (vggt_rope_tables)
        half = head_dim // 2
        _TABLE_CACHE[key] = 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))
    return _TABLE_CACHE[key]


def _cos_sin_table(mode, periods, height, width, n_prefix, head_dim, normalize, base, dtype, device) -> Tensor:
    """[2, tokens_per_frame, d] fp32 cos/sin (the reference tables) for k_rotation="table"."""
    pkey = None if periods is None else (periods.data_ptr(), periods._version)
    key = ("cs", mode, height, width, n_prefix, head_dim, normalize, float(base), dtype, device, pkey)
    if key not in _TABLE_CACHE:
        if mode == "dinov3":
            cos, sin = dinov3_rope_tables(height, width, periods, normalize)
        else:
            tab_dtype = torch.float32 if mode == "vggt_f32" else dtype
            cos, sin = vggt_rope_tables(height, width, head_dim, base, tab_dtype, device)
        table = torch.stack([cos.float(), sin.float()])  # [2, HW, d]
        if n_prefix:
            pad = table.new_zeros(2, n_prefix, head_dim)
            pad[0] = 1.0
            table = torch.cat([pad, table], dim=1)
        _TABLE_CACHE[key] = table.contiguous()
    return _TABLE_CACHE[key]


def _geometry(qkv: Tensor, num_heads: int, mode: str, height: int, width: int, n_prefix: int):
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    tpf = n_prefix + height * width if mode != "none" else max(N, 1)
    return B, N, head_dim, tpf


def _half_group(mode: str, head_dim: int) -> int:
    return head_dim // 2 if mode == "dinov3" else head_dim // 4 if mode in ("vggt", "vggt_f32") else 1


def _dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _prepass(qkv, table, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, normalize, eps):
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    dh, dw = _denoms(mode, normalize, height, width)
    rqk = torch.empty(2, B, num_heads, N, D, device=qkv.device, dtype=qkv.dtype)
    block_t, warps = _elem_block(D)
    dummy = qkv
    _prepass_kernel[(triton.cdiv(N, block_t), B * num_heads, 2)](
        qkv, rqk, table if table is not None else dummy,
        qw if qw is not None else dummy, qb if qb is not None else dummy,
        kw if kw is not None else dummy, kb if kb is not None else dummy,
        qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, n_prefix, width, dh, dw, eps,
        D=D, BLOCK_T=block_t, ROPE=_MODES[mode], NORM_Q=qw is not None, HAS_BQ=qb is not None,
        NORM_K=kw is not None, HAS_BK=kb is not None, HALF_G=_half_group(mode, D), num_warps=warps,
    )
    return rqk


def _prepare(qkv: Tensor) -> Tensor:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv


def _validate(qkv, periods, norm_tensors, num_heads, height, width, n_prefix, mode):
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
    if mode == "dinov3" and (periods is None or periods.shape != (head_dim // 4,)):
        raise ValueError(f"{name}: dinov3 RoPE needs periods of shape [{head_dim // 4}]")
    for t in ([periods] if mode == "dinov3" else []) + [t for t in norm_tensors if t is not None]:
        if t.device != qkv.device:
            raise ValueError(f"{name}: a parameter is on {t.device}, qkv on {qkv.device}")
        if t is not periods and t.shape != (head_dim,):
            raise ValueError(f"{name}: qk-norm parameters must be [{head_dim}], got {tuple(t.shape)}")


def _forward(qkv, periods, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode, normalize, base, eps,
             scale, k_rotation):
    _validate(qkv, periods, (qw, qb, kw, kb), num_heads, height, width, n_prefix, mode)
    if k_rotation not in K_ROTATIONS:
        raise ValueError(f"rope_attention_triton: unknown k_rotation {k_rotation!r} (expected one of {K_ROTATIONS})")
    qkv = _prepare(qkv)
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    transform = mode != "none" or qw is not None or kw is not None
    table = _freq_table(mode, periods, D, base, qkv.device) if mode != "none" else None
    out = torch.empty(B, N, num_heads * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    rqk = cs = None
    if not transform:
        source = 0
    elif k_rotation == "prepass":
        source = 1
        rqk = _prepass(qkv, table, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, normalize, eps)
    elif k_rotation == "inline":
        source = 2
    else:
        source = 3 if mode != "none" else 2
        if mode != "none":
            cs = _cos_sin_table(mode, periods, height, width, n_prefix, D, normalize, base, qkv.dtype, qkv.device)
    dh, dw = _denoms(mode, normalize, height, width)
    bm, bn, warps, stages = _fwd_config(D, qkv.dtype)
    if source == 3:  # the fp32 cos/sin tiles are pipelined too: 3 stages need 192 KiB smem at d=128
        stages = min(stages, 2)
    dummy = qkv
    _fwd_kernel[(triton.cdiv(N, bm), B * num_heads)](
        qkv, rqk if rqk is not None else dummy, table if table is not None else dummy,
        cs if cs is not None else dummy,
        qw if qw is not None else dummy, qb if qb is not None else dummy,
        kw if kw is not None else dummy, kb if kb is not None else dummy, out, lse,
        qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, n_prefix, width, dh, dw, eps,
        scale * 1.4426950408889634,
        D=D, BLOCK_M=bm, BLOCK_N=bn, SOURCE=source, ROPE=_MODES[mode], NORM_Q=qw is not None,
        HAS_BQ=qb is not None, NORM_K=kw is not None, HAS_BK=kb is not None, HALF_G=_half_group(mode, D),
        DOT_PREC=_dot_prec(qkv.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(grad_out, qkv, out, lse, periods, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode,
              normalize, base, eps, scale):
    _validate(qkv, periods, (qw, qb, kw, kb), num_heads, height, width, n_prefix, mode)
    if grad_out.shape != out.shape:
        raise ValueError(f"rope_attention_triton_bwd: grad_out {tuple(grad_out.shape)} != out {tuple(out.shape)}")
    qkv = _prepare(qkv)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_out = grad_out.to(qkv.dtype)
    B, N, D, tpf = _geometry(qkv, num_heads, mode, height, width, n_prefix)
    transform = mode != "none" or qw is not None or kw is not None
    table = _freq_table(mode, periods, D, base, qkv.device) if mode != "none" else None
    dqkv = torch.empty(B, N, 3 * num_heads * D, device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    bh = B * num_heads
    block_t, ewarps = _elem_block(D)
    _bwd_delta_kernel[(triton.cdiv(N, block_t), bh)](
        out, grad_out, delta, grad_out.stride(0), grad_out.stride(1), N, num_heads, D=D, BLOCK_M=block_t,
        num_warps=ewarps)
    rqk = grqk = None
    if transform:
        rqk = _prepass(qkv, table, qw, qb, kw, kb, num_heads, mode, height, width, n_prefix, normalize, eps)
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
        dh, dw = _denoms(mode, normalize, height, width)
        _bwd_post_kernel[(n_t, bh, 2)](
            qkv, grqk, dqkv, part if part is not None else grqk, table if table is not None else qkv,
            qw if qw is not None else qkv, kw if kw is not None else qkv,
            qkv.stride(0), qkv.stride(1), N, num_heads, B, tpf, n_prefix, width, dh, dw, eps,
            D=D, BLOCK_T=block_t, ROPE=_MODES[mode], NORM_Q=qw is not None, NORM_K=kw is not None,
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
    qkv: Tensor, periods: Optional[Tensor], q_weight: Optional[Tensor], q_bias: Optional[Tensor],
    k_weight: Optional[Tensor], k_bias: Optional[Tensor], num_heads: int, height: int, width: int,
    n_prefix: int, mode: str, normalize: str, base: float, eps: float, scale: float, k_rotation: str,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, N, h*d], logsumexp [B, h, N] fp32, base-2 and pre-scaled: for the backward)."""
    return _forward(qkv, periods, q_weight, q_bias, k_weight, k_bias, num_heads, height, width, n_prefix,
                    mode, normalize, base, eps, scale, k_rotation)


@rope_attention_triton.register_fake
def _(qkv, periods, q_weight, q_bias, k_weight, k_bias, num_heads, height, width, n_prefix, mode, normalize,
      base, eps, scale, k_rotation):
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    return (qkv.new_empty(B, N, num_heads * head_dim),
            qkv.new_empty(B, num_heads, N, dtype=torch.float32))


@torch.library.custom_op("flashdino::rope_attention_triton_bwd", mutates_args=())
def rope_attention_triton_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, periods: Optional[Tensor],
    q_weight: Optional[Tensor], q_bias: Optional[Tensor], k_weight: Optional[Tensor], k_bias: Optional[Tensor],
    num_heads: int, height: int, width: int, n_prefix: int, mode: str, normalize: str, base: float, eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dqkv [B, N, 3*h*d] contiguous, d q_weight, d q_bias, d k_weight, d k_bias); empty when absent."""
    return _backward(grad_out, qkv, out, lse, periods, q_weight, q_bias, k_weight, k_bias, num_heads, height,
                     width, n_prefix, mode, normalize, base, eps, scale)


@rope_attention_triton_bwd.register_fake
def _(grad_out, qkv, out, lse, periods, q_weight, q_bias, k_weight, k_bias, num_heads, height, width,
      n_prefix, mode, normalize, base, eps, scale):
    return (qkv.new_empty(qkv.shape),
            torch.empty_like(q_weight) if q_weight is not None else qkv.new_empty(0),
            torch.empty_like(q_bias) if q_weight is not None and q_bias is not None else qkv.new_empty(0),
            torch.empty_like(k_weight) if k_weight is not None else qkv.new_empty(0),
            torch.empty_like(k_bias) if k_weight is not None and k_bias is not None else qkv.new_empty(0))


_N_SCALAR_ARGS = 10  # num_heads ... k_rotation


def _setup_context(ctx, inputs, output):
    qkv, periods, qw, qb, kw, kb = inputs[:6]
    ctx.scalars = inputs[6:15]  # num_heads .. scale (k_rotation is forward-only)
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, periods, qw, qb, kw, kb)


def _backward_autograd(ctx, grad_out, grad_lse):
    qkv, out, lse, periods, qw, qb, kw, kb = ctx.saved_tensors
    dqkv, dqw, dqb, dkw, dkb = torch.ops.flashdino.rope_attention_triton_bwd(
        grad_out, qkv, out, lse, periods, qw, qb, kw, kb, *ctx.scalars)
    return (dqkv, None,
            dqw if qw is not None else None,
            dqb if qw is not None and qb is not None else None,
            dkw if kw is not None else None,
            dkb if kw is not None and kb is not None else None) + (None,) * _N_SCALAR_ARGS


rope_attention_triton.register_autograd(_backward_autograd, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Dispatcher entry point
# ----------------------------------------------------------------------------------------------


def _layer_norm_autocasts_to_fp32(device: torch.device) -> bool:
    """Whether ``F.layer_norm`` returns fp32 for low-precision input here: CUDA autocast casts it to
    fp32; CPU autocast keeps the input dtype (so the interpreted CPU path matches its reference)."""
    return device.type == "cuda" and torch.is_autocast_enabled("cuda")


def rope_attention(qkv: Tensor, num_heads: int, rope: Optional[RopeGrid] = None,
                   q_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
                   k_norm: Optional[tuple[Tensor, Optional[Tensor]]] = None,
                   norm_eps: float = 1e-5, scale: Optional[float] = None,
                   k_rotation: Optional[str] = None) -> Tensor:
    """Same signature and result as the reference ``rope_attention`` (plus ``k_rotation``)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if scale is None:
        scale = head_dim ** -0.5
    if rope is None:
        mode, periods, height, width, n_prefix, normalize, base = "none", None, 1, 1, 0, "separate", 100.0
    else:
        mode, height, width, n_prefix = rope.mode, rope.height, rope.width, rope.n_prefix
        # The reference builds the vggt tables in the dtype of q after q_norm: fp32 under CUDA
        # autocast (F.layer_norm is on its fp32 list), the token dtype otherwise.
        if mode == "vggt" and q_norm is not None and _layer_norm_autocasts_to_fp32(qkv.device):
            mode = "vggt_f32"
        periods = rope.periods if mode == "dinov3" else None
        normalize, base = rope.normalize, rope.base
    qw, qb = q_norm if q_norm is not None else (None, None)
    kw, kb = k_norm if k_norm is not None else (None, None)
    args = (periods, qw, qb, kw, kb, num_heads, height, width, n_prefix, mode, normalize, float(base),
            float(norm_eps), float(scale), k_rotation or K_ROTATION)
    max_batch = _MAX_GRID_Y // num_heads
    if qkv.shape[0] > max_batch:  # the grid's second axis holds batch * heads
        return torch.cat([torch.ops.flashdino.rope_attention_triton(part, *args)[0]
                          for part in qkv.split(max_batch)])
    return torch.ops.flashdino.rope_attention_triton(qkv, *args)[0]


def supports(dtype=None, head_dim=None, n_tokens=None, rope=None, qk_norm=False, token_stride=None,
             **_) -> Optional[str]:
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
    if n_tokens is not None and token_stride is not None and n_tokens * max(token_stride, 1) >= 2**31:
        return f"{n_tokens} tokens x stride {token_stride} overflows the kernels' int32 token offsets"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (Triton rope_attention covers {SUPPORTED_HEAD_DIMS})"
    if n_tokens is not None and n_tokens < 1:
        return "empty sequence"
    if rope is not None:
        if rope.mode not in ("dinov3", "vggt"):
            return f"RoPE mode {rope.mode!r}"
        if rope.mode == "dinov3" and rope.normalize not in ("separate", "min", "max"):
            return f"RoPE normalisation {rope.normalize!r}"
    return None


dispatch.register("rope_attention", "triton", rope_attention, supports=supports)

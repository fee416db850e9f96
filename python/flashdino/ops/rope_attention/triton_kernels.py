"""Triton kernels of ``rope_attention``: fused RoPE flash attention, forward and backward.

Semantics: exactly ``reference.rope_attention`` (optional per-head LayerNorm of q and k, then 2D
RoPE in the "dinov3" or "vggt" convention of ``grid.py``, softmax attention), read straight from
the qkv Linear output ``[B, N, 3*h*d]`` viewed as ``[B, N, 3, h, d]`` through its strides (no
transposes or copies; any B/N strides, unit stride on the channel dim), output written as a
contiguous ``[B, N, h*d]``. Host code, custom ops and autograd are in ``triton.py``.

Rotation inside the kernels, in fp32:

* token ``n`` of the sequence sits at ``t = n % tokens_per_frame`` of its frame; ``t < n_prefix``
  is a prefix token and is not rotated; otherwise ``p = t - n_prefix``, ``y = p // W``,
  ``x = p % W``. No position tensor is read.
* "dinov3": coordinate ``2 * ((y + 0.5) / denom) - 1`` with ``RopeGrid.denominators()``, angle
  ``2*pi*coord / period`` with the ``[d/4]`` periods read from memory, layout ``[Y, X, Y, X]`` of
  ``d/4`` blocks, rotate-half pairing ``i`` with ``i + d/2``.
* "vggt": positions ``(y + 1, x + 1)`` times the ``[d/4]`` inverse frequencies of
  ``RopeGrid.frequencies()``, first half rotated by y and second half by x, rotate-half pairing
  ``i`` with ``i + d/4`` inside each half. Angles and then cos/sin are rounded to the token dtype
  (ROPE 2), or kept in fp32 when the reference rotates fp32 q ("vggt_f32", ROPE 3).

Rotation partners are loaded with a second, column-permuted load (``col ^ half_group``) that hits
the same cache lines; with qk_norm both loads are normalised with the row's mean/rstd.

``SOURCE`` selects where q/k tiles come from: 0 straight from qkv (no RoPE, no norm), 1 the
prepass buffer (normalised + rotated once, in the token dtype), 2 transformed in the tile with
cos/sin recomputed, 3 transformed with cos/sin from the fp32 ``[2, tokens_per_frame, d]`` table.

The prepass and the backward's post-pass do no trigonometry: they read cos/sin from that table
(``RopeGrid.kernel_table``, computed once per grid, O(tokens x d)), and each program loads the
table tile of its tokens once and applies it to ``HEADS`` heads of one image in a loop, so the
table is read ``B * h / HEADS`` times, not recomputed for every batch x head.

Backward: flash-attention 2 (logsumexp saved by the forward, ``delta = rowsum(dO*O)``, one kernel
for dK/dV over query blocks, one for dQ over key blocks), gradients of the rotated q/k in fp32,
then a post-pass applies the inverse rotation and the LayerNorm backward and writes dq/dk into
the ``[B, N, 3*h*d]`` gradient; dV is written there directly.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _table_cos_sin(tok, cols, CS, TPF, D: tl.constexpr):
    """cos, sin [BLOCK, D] (fp32) of the tokens ``tok`` from the ``[2, TPF, D]`` table (identity
    rows for prefix tokens). No mask: ``tok % TPF`` is a valid row even for tokens past N."""
    offs = (tok % TPF)[:, None] * D + cols[None, :]
    return tl.load(CS + offs), tl.load(CS + TPF * D + offs)


@triton.jit
def _cos_sin(tok, cols, TAB, CS, TPF, n_prefix, GRID_W, denom_h, denom_w,
             ROUND_TY: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, FROM_TABLE: tl.constexpr):
    """cos, sin [BLOCK, D] (fp32) of the tokens ``tok``; identity for prefix tokens."""
    t = tok % TPF
    if FROM_TABLE:
        cos, sin = _table_cos_sin(tok, cols, CS, TPF, D)
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
def _stored_tile(QKV, RQK, b, hh, sec, tok, tmask, cols, s_b, s_n, N, NH, B,
                 D: tl.constexpr, SOURCE: tl.constexpr):
    """A q (sec=0) or k (sec=1) tile as stored: straight from qkv (SOURCE 0) or from the prepass
    buffer (SOURCE 1). The backward kernels read only these."""
    if SOURCE == 0:
        base = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
        x = tl.load(base + tok[:, None] * s_n + cols[None, :], mask=tmask[:, None], other=0.0)
    else:
        base = RQK + ((sec * B + b) * NH + hh).to(tl.int64) * N * D
        x = tl.load(base + tok[:, None] * D + cols[None, :], mask=tmask[:, None], other=0.0)
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
    if SOURCE < 2:
        x = _stored_tile(QKV, RQK, b, hh, sec, tok, tmask, cols, s_b, s_n, N, NH, B, D, SOURCE)
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
def _prepass_kernel(QKV, RQK, CS, QW, QB, KW, KB,
                    s_b, s_n, N, NH, B, TPF, HEADS, eps,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, ROTATE: tl.constexpr,
                    NORM_Q: tl.constexpr, HAS_BQ: tl.constexpr, NORM_K: tl.constexpr, HAS_BK: tl.constexpr,
                    HALF_G: tl.constexpr):
    """Grid (token blocks, B * NH / HEADS, 2 for q / k): HEADS heads of one image per program,
    cos/sin loaded once from the table and reused for each."""
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    sec = tl.program_id(2)
    groups = NH // HEADS
    b = pid_g // groups
    h0 = (pid_g % groups) * HEADS
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    cols = tl.arange(0, D)
    cos = 1.0
    sin = 0.0
    if ROTATE:
        cos, sin = _table_cos_sin(tok, cols, CS, TPF, D)
    for i in range(HEADS):
        hh = h0 + i
        base = QKV + b.to(tl.int64) * s_b + (sec * NH + hh) * D
        if sec == 0:
            x = _transform(base, s_n, tok, tmask, cols, QW, QB, eps, cos, sin, D, ROTATE, NORM_Q, HAS_BQ, HALF_G)
        else:
            x = _transform(base, s_n, tok, tmask, cols, KW, KB, eps, cos, sin, D, ROTATE, NORM_K, HAS_BK, HALF_G)
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
    k = _stored_tile(QKV, RQK, b, hh, 1, offs_n, nmask, cols, s_b, s_n, N, NH, B, D, SOURCE)
    v = tl.load(QKV + b.to(tl.int64) * s_b + (2 * NH + hh) * D + offs_n[:, None] * s_n + cols[None, :],
                mask=nmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    row = pid_bh.to(tl.int64) * N
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q = _stored_tile(QKV, RQK, b, hh, 0, offs_m, mmask, cols, s_b, s_n, N, NH, B, D, SOURCE)
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
    q = _stored_tile(QKV, RQK, b, hh, 0, offs_m, mmask, cols, s_b, s_n, N, NH, B, D, SOURCE)
    do = tl.load(DO + b.to(tl.int64) * s_ob + offs_m[:, None] * s_on + hh * D + cols[None, :],
                 mask=mmask[:, None], other=0.0)
    row = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + row + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(Delta + row + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        k = _stored_tile(QKV, RQK, b, hh, 1, offs_n, nmask, cols, s_b, s_n, N, NH, B, D, SOURCE)
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
def _bwd_post_kernel(QKV, G, DQKV, PART, CS, QW, KW,
                     s_b, s_n, N, NH, B, TPF, HEADS, eps,
                     D: tl.constexpr, BLOCK_T: tl.constexpr, ROTATE: tl.constexpr,
                     NORM_Q: tl.constexpr, NORM_K: tl.constexpr, HALF_G: tl.constexpr):
    """Grid as the prepass: HEADS heads of one image per program, cos/sin from the table once."""
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    sec = tl.program_id(2)
    groups = NH // HEADS
    b = pid_g // groups
    h0 = (pid_g % groups) * HEADS
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    cols = tl.arange(0, D)
    cos = 1.0
    sin = 0.0
    if ROTATE:
        cos, sin = _table_cos_sin(tok, cols, CS, TPF, D)
    for i in range(HEADS):
        hh = h0 + i
        # one row of weight-gradient partial sums per (q/k, image, head, token block)
        part_row = ((sec * B + b) * NH + hh).to(tl.int64) * tl.num_programs(0) + pid_t
        if sec == 0:
            _post_one(QKV, G, DQKV, PART, QW, b, hh, sec, tok, tmask, cols, cos, sin, part_row,
                      s_b, s_n, N, NH, B, eps, D, ROTATE, NORM_Q, HALF_G)
        else:
            _post_one(QKV, G, DQKV, PART, KW, b, hh, sec, tok, tmask, cols, cos, sin, part_row,
                      s_b, s_n, N, NH, B, eps, D, ROTATE, NORM_K, HALF_G)

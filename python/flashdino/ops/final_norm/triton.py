"""Final LayerNorm of a ViT in one Triton launch, writing the outputs users ask for.

Each program normalises a tile of token rows of ``x`` [B, N, D] (fp32 statistics) and routes
every row to its destination: prefix tokens (CLS + storage/register) to a [B, p, D] buffer, patch
tokens either to [B, HW, D] or transposed into a [B, D, H, W] feature map (what dense heads and
``get_intermediate_layers(reshape=True)`` consume; this saves the separate permute + copy). An
untied model (``cls_norm``) selects the prefix weights per row. Mean and 1/std are saved; the
backward pass reuses the LayerNorm-backward kernel of ``residual_layernorm/triton.py``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_support import require_triton
from ..residual_layernorm.triton import MAX_DIM, _DTYPES, layernorm_backward, norm_output_dtype, tile_config

require_triton()


@triton.jit
def _final_norm_fwd_kernel(
    X, W, B, PW, PB, PRE, PAT, MEAN, RSTD, M, N, D, n_prefix, HW, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UNTIED: tl.constexpr, NCHW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = tl.rsqrt(var + eps)
    y = xc * rstd[:, None]
    b_idx = rows // N
    t_idx = rows - b_idx * N
    is_pre = t_idx < n_prefix
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if UNTIED:
            pw = tl.load(PW + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            w = tl.where(is_pre[:, None], pw, w)
        y = y * w
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if UNTIED:
            pb = tl.load(PB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            b = tl.where(is_pre[:, None], pb, b)
        y = y + b
    b64 = b_idx.to(tl.int64)
    pre_offs = (b64 * n_prefix + t_idx)[:, None] * D + cols[None, :]
    tl.store(PRE + pre_offs, y.to(PRE.dtype.element_ty), mask=mask & is_pre[:, None])
    p_idx = t_idx - n_prefix
    if NCHW:
        pat_offs = (b64 * D * HW)[:, None] + cols[None, :].to(tl.int64) * HW + p_idx[:, None]
    else:
        pat_offs = (b64 * HW + p_idx)[:, None] * D + cols[None, :]
    tl.store(PAT + pat_offs, y.to(PAT.dtype.element_ty), mask=mask & (~is_pre)[:, None])
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _final_norm_nchw_kernel(
    X, W, B, PW, PB, PRE, PAT, MEAN, RSTD, N, D, n_prefix, HW, n_patch_tiles, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UNTIED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The [B, D, H, W] layout with coalesced writes: a program owns BLOCK_T consecutive tokens
    of one image and walks the channels in BLOCK_C chunks (mean, then variance, then normalise
    and store), so each store of a chunk writes BLOCK_T consecutive patches of every channel.
    The row-tile kernel above would write one element per channel and token, HW apart.

    Programs [0, n_patch_tiles) take patches; the next ones take the prefix tokens (to PRE)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    is_patch = pid < n_patch_tiles
    if is_patch:
        p = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # patch index: contiguous, so the stores coalesce
        tmask = p < HW
        t = n_prefix + p
    else:
        t = (pid - n_patch_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < n_prefix
        p = t
    row = b * N + t
    xrow = X + row[:, None] * D
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = tmask[:, None] & (c < D)[None, :]
        acc += tl.sum(tl.load(xrow + c[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
    mean = acc / D
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = tmask[:, None] & (c < D)[None, :]
        xc = tl.where(m, tl.load(xrow + c[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None], 0.0)
        acc += tl.sum(xc * xc, axis=1)
    rstd = tl.rsqrt(acc / D + eps)
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < D
        m = tmask[:, None] & cmask[None, :]
        y = (tl.load(xrow + c[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if is_patch:
            if HAS_W:
                y = y * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            offs = b * D * HW + c[None, :].to(tl.int64) * HW + p[:, None]
            tl.store(PAT + offs, y.to(PAT.dtype.element_ty), mask=m)
        else:
            if HAS_W:
                if UNTIED:
                    y = y * tl.load(PW + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
                else:
                    y = y * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                if UNTIED:
                    y = y + tl.load(PB + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
                else:
                    y = y + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            offs = (b * n_prefix + p[:, None]) * D + c[None, :]
            tl.store(PRE + offs, y.to(PRE.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean, mask=tmask)
    tl.store(RSTD + row, rstd, mask=tmask)


# (BLOCK_T tokens, BLOCK_C channels, num_warps) of the [B, D, H, W] kernel: 64 consecutive patches
# make 128-byte bf16 segments per channel; 64x64 fp32 values are 32 per thread with 4 warps.
NCHW_TILE = (64, 64, 4)


def _out_shapes(x: Tensor, n_prefix: int, grid_h: int, grid_w: int, nchw: bool):
    B, N, D = x.shape
    pat = (B, D, grid_h, grid_w) if nchw else (B, N - n_prefix, D)
    return (B, n_prefix, D), pat


@torch.library.custom_op("flashdino::final_norm_fwd", mutates_args=())
def final_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], prefix_weight: Optional[Tensor],
                   prefix_bias: Optional[Tensor], untied: bool, n_prefix: int, eps: float, grid_h: int,
                   grid_w: int, nchw: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    pre_shape, pat_shape = _out_shapes(x, n_prefix, grid_h, grid_w, nchw)
    prefix = torch.empty(pre_shape, device=x.device, dtype=out_dtype)
    patches = torch.empty(pat_shape, device=x.device, dtype=out_dtype)
    M = B * N
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return prefix, patches, mean, rstd
    xr = x.contiguous()
    if untied and (weight is None) != (prefix_weight is None) or untied and (bias is None) != (prefix_bias is None):
        raise ValueError("final_norm: the prefix and patch norms must both have (or both lack) weight and bias")
    block_m, block_d, num_warps = tile_config(D)
    dummy = xr

    def c(t):
        return t.contiguous() if t is not None else dummy

    if nchw and B <= 65535:  # images on grid axis 1 (CUDA caps it); beyond, the row kernel below
        block_t, block_c, warps = (16, 16, 1) if os.environ.get("TRITON_INTERPRET") == "1" else NCHW_TILE
        HW = N - n_prefix
        n_patch_tiles = triton.cdiv(HW, block_t)
        grid = (n_patch_tiles + triton.cdiv(n_prefix, block_t), B)
        _final_norm_nchw_kernel[grid](
            xr, c(weight), c(bias), c(prefix_weight), c(prefix_bias), prefix, patches, mean, rstd,
            N, D, n_prefix, HW, n_patch_tiles, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, UNTIED=untied,
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps,
        )
        return prefix, patches, mean, rstd
    _final_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        xr, c(weight), c(bias), c(prefix_weight), c(prefix_bias), prefix, patches, mean, rstd,
        M, N, D, n_prefix, N - n_prefix, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, UNTIED=untied, NCHW=nchw,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return prefix, patches, mean, rstd


@final_norm_fwd.register_fake
def _(x, weight, bias, prefix_weight, prefix_bias, untied, n_prefix, eps, grid_h, grid_w, nchw, out_dtype):
    pre_shape, pat_shape = _out_shapes(x, n_prefix, grid_h, grid_w, nchw)
    M = x.shape[0] * x.shape[1]
    return (x.new_empty(pre_shape, dtype=out_dtype), x.new_empty(pat_shape, dtype=out_dtype),
            x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("flashdino::final_norm_bwd", mutates_args=())
def final_norm_bwd(d_prefix: Tensor, d_patches: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool,
                   prefix_weight: Optional[Tensor], untied: bool, mean: Tensor, rstd: Tensor,
                   nchw: bool) -> list[Tensor]:
    B, N, D = x.shape
    p = d_prefix.shape[1]
    if nchw:
        d_patches = d_patches.flatten(2).transpose(1, 2)
    if not untied:
        dy = torch.cat([d_prefix, d_patches.to(d_prefix.dtype)], dim=1)
        dx, _, _, dw, db = layernorm_backward(dy, x, mean, rstd, weight, has_bias, x.dtype)
        out = [dx.view(B, N, D)]
        out += [dw] if weight is not None else []
        out += [db] if has_bias else []
        return out
    mean, rstd = mean.view(B, N), rstd.view(B, N)
    dxp, _, _, dwp, dbp = layernorm_backward(d_prefix, x[:, :p], mean[:, :p].contiguous(),
                                             rstd[:, :p].contiguous(), prefix_weight, has_bias, x.dtype)
    dxt, _, _, dwt, dbt = layernorm_backward(d_patches, x[:, p:], mean[:, p:].contiguous(),
                                             rstd[:, p:].contiguous(), weight, has_bias, x.dtype)
    out = [torch.cat([dxp.view(B, p, D), dxt.view(B, N - p, D)], dim=1)]
    out += [dwt, dwp] if weight is not None else []
    out += [dbt, dbp] if has_bias else []
    return out


@final_norm_bwd.register_fake
def _(d_prefix, d_patches, x, weight, has_bias, prefix_weight, untied, mean, rstd, nchw):
    D = x.shape[-1]
    out = [x.new_empty(x.shape)]
    copies = 2 if untied else 1
    if weight is not None:
        out += [weight.new_empty((D,)) for _ in range(copies)]
    if has_bias:
        out += [x.new_empty((D,), dtype=torch.float32) for _ in range(copies)]
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, prefix_weight, prefix_bias, untied, n_prefix, eps, grid_h, grid_w, nchw, out_dtype = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, weight, prefix_weight, mean, rstd)
    ctx.untied, ctx.nchw, ctx.n_prefix = untied, nchw, n_prefix
    ctx.has_weight = weight is not None
    ctx.bias_dtypes = (bias.dtype if bias is not None else None,
                       prefix_bias.dtype if prefix_bias is not None else None)
    ctx.pat_shape = _out_shapes(x, n_prefix, grid_h, grid_w, nchw)[1]


def _backward(ctx, d_prefix, d_patches, _dmean, _drstd):
    x, weight, prefix_weight, mean, rstd = ctx.saved_tensors
    B, N, D = x.shape
    if d_prefix is None:
        d_prefix = x.new_zeros((B, ctx.n_prefix, D))
    if d_patches is None:
        d_patches = x.new_zeros(ctx.pat_shape)
    has_bias = ctx.bias_dtypes[0] is not None
    grads = iter(final_norm_bwd(d_prefix, d_patches, x, weight, has_bias, prefix_weight, ctx.untied, mean, rstd,
                                ctx.nchw))
    dx = next(grads)
    dw = dpw = db = dpb = None
    if ctx.has_weight:
        dw = next(grads)
        dpw = next(grads) if ctx.untied else None
    if has_bias:
        db = next(grads).to(ctx.bias_dtypes[0])
        dpb = next(grads).to(ctx.bias_dtypes[1]) if ctx.untied else None
    return dx, dw, db, dpw, dpb, None, None, None, None, None, None, None


torch.library.register_autograd("flashdino::final_norm_fwd", _backward, setup_context=_setup_context)


def final_norm(x: Tensor, n_prefix: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               prefix_norm: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
               patch_grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    untied = prefix_norm is not None
    pw, pb = prefix_norm if untied else (None, None)
    gh, gw = patch_grid if patch_grid is not None else (0, 0)
    prefix, patches, _, _ = final_norm_fwd(x, weight, bias, pw, pb, untied, n_prefix, float(eps), gh, gw,
                                           patch_grid is not None, norm_output_dtype(x.dtype, x.device))
    return prefix, patches


def supports(call) -> Optional[str]:
    """None when the kernel runs ``call`` (a ``FinalNormCall``), else the reason not."""
    # The kernel selects the prefix / patch parameters per row, so an untied pair where only one
    # norm has a weight (or a bias) is left to the reference (the kernel would raise).
    if call.mixed_affine:
        return "the prefix and patch norms differ in having a weight / bias"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} (Triton kernel covers fp32/fp16/bf16)"
    if not 0 < call.dim <= MAX_DIM:
        return f"row width {call.dim} (Triton kernel covers 1..{MAX_DIM})"
    return None

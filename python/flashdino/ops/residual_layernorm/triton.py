"""Fused residual + LayerScale + LayerNorm (forward and backward) in Triton.

One pass over a tile of rows computes ``x_new = x + gamma * branch`` and ``layer_norm(x_new)``;
statistics (mean, 1/std) are kept in fp32 and saved for the backward pass. Rounding follows the
eager sequence it replaces: ``gamma * branch`` is rounded to its promoted dtype and ``x_new`` to
the output dtype before the statistics are taken, so ``x_new`` equals the eager residual stream
whenever the hardware rounds like PyTorch's elementwise kernels (the Triton interpreter on CPU
truncates to bf16 instead of rounding, so bf16 is compared with tolerances there).

The backward kernel is shared with the final-norm op (``final_norm/triton.py``): a plain LayerNorm
backward is this kernel without the residual inputs. Weight / bias / gamma gradients are reduced
per program into fp32 partial rows and summed by PyTorch (a [programs, D] buffer).

Registered as the "triton" backend of ``residual_layernorm`` via ``torch.library`` custom ops
(``flashdino::residual_layernorm_fwd`` / ``_bwd``) with fake (meta) implementations, so the op
works under autograd and ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_support import require_triton

require_triton()

MAX_DIM = 8192
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tile_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D, num_warps) for a row width D.

    ~2048 elements per program (one row when D > 2048) and ~8 elements per thread per tensor
    (16 at D = 8192, with 16 warps). ``flashdino check --audit`` compiles every width up to
    ``MAX_DIM`` for sm_80-sm_90: at most ~75 registers in the forward kernels and 128 (the cap of
    16 warps) in the backward kernel, with no spill stores or loads reported by ptxas (an earlier
    review counted the stack frame as spills).
    """
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(16, 2048 // block_d))
    num_warps = max(4, min(16, block_m * block_d // 256))
    return block_m, block_d, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # interpreter: few programs keep the CPU run short
        target = 4
    return max(1, min(n_tiles, target))


@triton.jit
def _residual_ln_fwd_kernel(
    X, BR, G, W, B, XOUT, Y, MEAN, RSTD, M, D, eps,
    HAS_BRANCH: tl.constexpr, HAS_GAMMA: tl.constexpr, ROUND_PROD: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(BR + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
            br = br * g[None, :]
            if ROUND_PROD:  # gamma * branch is computed in the branch dtype by the eager sequence
                br = br.to(BR.dtype.element_ty).to(tl.float32)
        x = (x + br).to(XOUT.dtype.element_ty)
        tl.store(XOUT + offs, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = tl.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    DY, DXO, XN, BR, G, W, MEAN, RSTD, DX, DBR, DG_PART, DW_PART, DB_PART, M, D, rows_per_prog,
    HAS_DXO: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """LayerNorm backward over ``rows_per_prog`` rows, plus the residual / LayerScale terms.

    dy: grad of the normalised output; dxo: grad of x_new (the residual stream output);
    xn: x_new; d(x_new) = LN-backward(dy) + dxo flows to x unchanged and to branch times gamma.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_dg = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (xn - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DXO:
            dx += tl.load(DXO + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_BRANCH:
            if HAS_GAMMA:
                br = tl.load(BR + offs, mask=mask, other=0.0).to(tl.float32)
                acc_dg += tl.sum(dx * br, axis=0)
                tl.store(DBR + offs, (dx * g[None, :]).to(DBR.dtype.element_ty), mask=mask)
            else:
                tl.store(DBR + offs, dx.to(DBR.dtype.element_ty), mask=mask)
        if HAS_W:
            acc_dw += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            acc_db += tl.sum(dy, axis=0)
    part = pid * D + cols
    if HAS_GAMMA:
        tl.store(DG_PART + part, acc_dg, mask=cmask)
    if HAS_W:
        tl.store(DW_PART + part, acc_dw, mask=cmask)
    if HAS_B:
        tl.store(DB_PART + part, acc_db, mask=cmask)


def _rows(t: Tensor, D: int) -> Tensor:
    return t.contiguous().view(-1, D)


def layernorm_backward(dy: Tensor, x_new: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                       has_bias: bool, x_dtype: torch.dtype, dxo: Optional[Tensor] = None,
                       branch: Optional[Tensor] = None, gamma: Optional[Tensor] = None):
    """Launches the backward kernel on [M, D] rows; returns (dx, dbranch, dgamma, dweight, dbias)."""
    D = x_new.shape[-1]
    dy = _rows(dy, D)
    xn = _rows(x_new, D)
    M = xn.shape[0]
    dev = xn.device
    block_m, block_d, num_warps = tile_config(D)
    n_prog = reduction_programs(dev, triton.cdiv(M, block_m))
    rows_per_prog = max(1, triton.cdiv(triton.cdiv(M, n_prog), block_m)) * block_m
    n_prog = max(1, triton.cdiv(M, rows_per_prog))
    dx = torch.empty((M, D), device=dev, dtype=x_dtype)
    has_branch = branch is not None
    br = _rows(branch, D) if has_branch else xn
    dbr = torch.empty((M, D), device=dev, dtype=branch.dtype) if has_branch else dx
    dummy = mean
    has_gamma = has_branch and gamma is not None
    dg_part = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if has_gamma else dummy
    dw_part = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if weight is not None else dummy
    db_part = torch.empty((n_prog, D), device=dev, dtype=torch.float32) if has_bias else dummy
    dxo_rows = _rows(dxo, D) if dxo is not None else dy
    if M > 0:
        _ln_bwd_kernel[(n_prog,)](
            dy, dxo_rows, xn, br, gamma.contiguous() if has_gamma else dummy,
            weight.contiguous() if weight is not None else dummy, mean, rstd,
            dx, dbr, dg_part, dw_part, db_part, M, D, rows_per_prog,
            HAS_DXO=dxo is not None, HAS_BRANCH=has_branch, HAS_GAMMA=has_gamma,
            HAS_W=weight is not None, HAS_B=has_bias, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    else:
        for t in (dg_part, dw_part, db_part):
            if t is not dummy:
                t.zero_()
    dgamma = dg_part.sum(0).to(gamma.dtype) if has_gamma else None
    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum(0) if has_bias else None
    return dx, (dbr if has_branch else None), dgamma, dweight, dbias


# -- custom ops ----------------------------------------------------------------------------------


def _out_dtypes(x: Tensor, branch: Tensor, gamma: Optional[Tensor]) -> tuple[torch.dtype, torch.dtype]:
    prod = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    return prod, torch.promote_types(x.dtype, prod)


@torch.library.custom_op("flashdino::residual_layernorm_fwd", mutates_args=())
def residual_layernorm_fwd(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, norm_dtype: torch.dtype
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    D = x.shape[-1]
    prod_dtype, out_dtype = _out_dtypes(x, branch, gamma)
    xr, br = _rows(x, D), _rows(branch, D)
    M = xr.shape[0]
    x_new = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    normed = torch.empty(x.shape, device=x.device, dtype=norm_dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return x_new, normed, mean, rstd
    block_m, block_d, num_warps = tile_config(D)
    _residual_ln_fwd_kernel[(triton.cdiv(M, block_m),)](
        xr, br, gamma.contiguous() if gamma is not None else xr,
        weight.contiguous() if weight is not None else xr, bias.contiguous() if bias is not None else xr,
        x_new, normed, mean, rstd, M, D, eps,
        HAS_BRANCH=True, HAS_GAMMA=gamma is not None,
        ROUND_PROD=gamma is not None and prod_dtype == branch.dtype and branch.dtype != torch.float32,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return x_new, normed, mean, rstd


@residual_layernorm_fwd.register_fake
def _(x, branch, gamma, weight, bias, eps, norm_dtype):
    _, out_dtype = _out_dtypes(x, branch, gamma)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=norm_dtype),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("flashdino::residual_layernorm_bwd", mutates_args=())
def residual_layernorm_bwd(dy: Tensor, dxo: Optional[Tensor], x_new: Tensor, branch: Tensor,
                           gamma: Optional[Tensor], weight: Optional[Tensor], has_bias: bool, mean: Tensor,
                           rstd: Tensor, x_dtype: torch.dtype) -> list[Tensor]:
    dx, dbr, dg, dw, db = layernorm_backward(dy, x_new, mean, rstd, weight, has_bias, x_dtype, dxo, branch, gamma)
    shape = x_new.shape
    return [t for t in (dx.view(shape), dbr.view(shape), dg, dw, db) if t is not None]


@residual_layernorm_bwd.register_fake
def _(dy, dxo, x_new, branch, gamma, weight, has_bias, mean, rstd, x_dtype):
    out = [x_new.new_empty(x_new.shape, dtype=x_dtype), branch.new_empty(branch.shape)]
    if gamma is not None:
        out.append(gamma.new_empty(gamma.shape))
    if weight is not None:
        out.append(weight.new_empty(weight.shape))
    if has_bias:
        out.append(x_new.new_empty((x_new.shape[-1],), dtype=torch.float32))
    return out


def _setup_context(ctx, inputs, output):
    x, branch, gamma, weight, bias, eps, norm_dtype = inputs
    x_new, _, mean, rstd = output
    ctx.save_for_backward(x_new, branch, gamma, weight, mean, rstd)
    ctx.has_gamma = gamma is not None
    ctx.has_weight = weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.x_dtype = x.dtype


def _backward(ctx, d_x_new, d_normed, _dmean, _drstd):
    x_new, branch, gamma, weight, mean, rstd = ctx.saved_tensors
    if d_normed is None:
        d_normed = torch.zeros_like(x_new, dtype=torch.float32)
    grads = residual_layernorm_bwd(d_normed, d_x_new, x_new, branch, gamma, weight, ctx.bias_dtype is not None,
                                   mean, rstd, ctx.x_dtype)
    it = iter(grads)
    dx, dbr = next(it), next(it)
    dg = next(it) if ctx.has_gamma else None
    dw = next(it) if ctx.has_weight else None
    db = next(it).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dbr, dg, dw, db, None, None


torch.library.register_autograd("flashdino::residual_layernorm_fwd", _backward, setup_context=_setup_context)


def norm_output_dtype(x_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """LayerNorm output dtype: fp32 under autocast (layer_norm is on autocast's fp32 list)."""
    return torch.float32 if torch.is_autocast_enabled(device.type) else x_dtype


def residual_layernorm(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    _, out_dtype = _out_dtypes(x, branch, gamma)
    x_new, normed, _, _ = residual_layernorm_fwd(x, branch, gamma, weight, bias, float(eps),
                                                 norm_output_dtype(out_dtype, x.device))
    return x_new, normed


def supports(call) -> Optional[str]:
    """None when the kernel runs ``call`` (a ``ResidualLayerNormCall``), else the reason not."""
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} (Triton kernel covers fp32/fp16/bf16)"
    # The branch dtype matters too: an fp64 branch promotes the outputs to fp64, which the fp32
    # kernel would only approximate.
    if call.branch_dtype not in _DTYPES:
        return f"branch dtype {call.branch_dtype} (Triton kernel covers fp32/fp16/bf16)"
    if not 0 < call.dim <= MAX_DIM:
        return f"row width {call.dim} (Triton kernel covers 1..{MAX_DIM})"
    return None

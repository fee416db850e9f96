"""Patch embedding as an implicit-im2col GEMM that writes the token buffer directly (Triton).

out[b, p + t, :] = epilogue(sum_k A[b*HW + t, k] * W'[k, :]) where A is gathered from the image
on the fly (k = (c, kh, kw) for NCHW, (kh, kw, c) for NHWC; any input strides), W' is the conv
kernel with the pixel normalisation folded in (uint8: 1/255; mean/std: w / std and
b - sum(w * mean / std)), computed once per call in fp32 on the [D, C*P*P] weights. The epilogue
adds the bias, rounds to the conv dtype (what the eager conv returns), replaces masked patches by
the mask token, adds the position table (DINOv2) and stores into the token buffer after the
prefix tokens. The p prefix rows (CLS [+ pos[0]], storage / register tokens) are written by one
small copy. Inference only: the op falls back to the reference when a gradient is needed.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...triton_support import require_triton

require_triton()

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA limit of the second grid axis (the patch rows)


@triton.jit
def _patch_embed_kernel(
    X, WT, BIAS, MASKS, MT, POS, OUT,
    M, m_start, D, K, HW, Wp, C, sxb, sxc, sxh, sxw, out_sb, n_prefix,
    P: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr,
    ROUND_CONV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fast axis: programs sharing an image tile run together (L2 reuse)
    pid_m = tl.program_id(1)
    rm = m_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < D
    b = rm // HW
    t = rm - b * HW
    hp = t // Wp
    wp = t - hp * Wp
    base = b.to(tl.int64) * sxb + (hp * P).to(tl.int64) * sxh + (wp * P).to(tl.int64) * sxw
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        if CHANNELS_LAST:
            kh = rk // (P * C)
            kw = (rk // C) % P
            c = rk % C
        else:
            c = rk // (P * P)
            kh = (rk // P) % P
            kw = rk % P
        koff = c.to(tl.int64) * sxc + kh.to(tl.int64) * sxh + kw.to(tl.int64) * sxw
        a = tl.load(X + base[:, None] + koff[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
        w = tl.load(WT + rk.to(tl.int64)[:, None] * D + rn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a.to(WT.dtype.element_ty), w, acc, input_precision=PRECISION)
    acc += tl.load(BIAS + rn, mask=nmask, other=0.0)[None, :]
    if ROUND_CONV:  # the eager conv returns its compute dtype
        acc = acc.to(WT.dtype.element_ty).to(tl.float32)
    if HAS_MASK:
        masked = tl.load(MASKS + rm, mask=mmask, other=0) != 0
        mt = tl.load(MT + rn, mask=nmask, other=0.0).to(WT.dtype.element_ty).to(tl.float32)
        acc = tl.where(masked[:, None], mt[None, :], acc)
    omask = mmask[:, None] & nmask[None, :]
    if HAS_POS:
        pos = tl.load(POS + t.to(tl.int64)[:, None] * D + rn[None, :], mask=omask, other=0.0).to(tl.float32)
        acc += pos
    out_offs = b.to(tl.int64)[:, None] * out_sb + (n_prefix + t).to(tl.int64)[:, None] * D + rn[None, :]
    tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=omask)


def _conv_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else weight.dtype


def folded_weights(weight: Tensor, bias: Optional[Tensor], uint8: bool, mean, std, channels_last: bool,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(W' [K, D] in the conv dtype, b' [D] fp32) with the pixel normalisation folded in."""
    D, C, P, _ = weight.shape
    folded = uint8 or mean is not None
    w = weight.float() if folded else weight
    b = bias.float() if bias is not None else torch.zeros(D, device=weight.device, dtype=torch.float32)
    if folded:
        scale = torch.full((C,), 1.0 / 255 if uint8 else 1.0, device=w.device, dtype=torch.float32)
        shift = torch.zeros(C, device=w.device, dtype=torch.float32)
        if mean is not None:
            m = torch.tensor(mean, device=w.device, dtype=torch.float32)
            s = torch.tensor(std, device=w.device, dtype=torch.float32)
            scale = scale / s
            shift = m / s
        # conv((x * scale - shift)) = conv_{w * scale}(x) - sum(w * shift)
        b = b - (w * shift.view(1, C, 1, 1)).sum(dim=(1, 2, 3))
        w = w * scale.view(1, C, 1, 1)
    elif bias is not None:
        b = bias.to(dtype).float()  # the eager conv adds the bias in its compute dtype
    w = w.permute(0, 2, 3, 1) if channels_last else w  # k order (kh, kw, c) matches NHWC memory
    return w.reshape(D, -1).t().to(dtype).contiguous(), b.contiguous()


_CACHE: dict = {}
_CACHE_SIZE = 16


def _cached(tensors: tuple, extra: tuple, build: Callable):
    """``build()``, memoised on the identity and version of ``tensors`` (weights change rarely).

    Entries hold weak references, so a freed tensor whose memory is reused never hits.
    """
    try:
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors) + extra
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return build()
    hit = _CACHE.get(key)
    if hit is not None and all((r is None and t is None) or (r is not None and r() is t)
                               for r, t in zip(hit[0], tensors)):
        return hit[1]
    value = build()
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (tuple(weakref.ref(t) if t is not None else None for t in tensors), value)
    return value


def _tiles(device: torch.device, D: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).

    64x128x32 with 8 warps compiles for sm_90 without register spills (4 warps spill in the
    epilogue; checked with ptxas / cuobjdump). Not yet tuned on a GPU.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreter: large tiles, few programs
        return 32, 64, 64, 4, 1
    return 64, 128 if D >= 128 else 64, 32, 8, 3


@torch.library.custom_op("flashdino::patch_embed_tokens", mutates_args=())
def patch_embed_tokens_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                          extra_tokens: Optional[Tensor], masks: Optional[Tensor], mask_token: Optional[Tensor],
                          pos_embed: Optional[Tensor], channels_last: bool, mean: Optional[list[float]],
                          std: Optional[list[float]], conv_dtype: torch.dtype, tok_dtype: torch.dtype,
                          out_dtype: torch.dtype) -> Tensor:
    D, C, P, _ = weight.shape
    B = x.shape[0]
    if channels_last:
        h, w = x.shape[1], x.shape[2]
        sxb, sxh, sxw, sxc = x.stride()
    else:
        h, w = x.shape[2], x.shape[3]
        sxb, sxc, sxh, sxw = x.stride()
    Hp, Wp = h // P, w // P
    HW = Hp * Wp
    n_cls = 0 if cls_token is None else 1
    R = 0 if extra_tokens is None else extra_tokens.shape[1]
    n_prefix = n_cls + R
    out = torch.empty((B, n_prefix + HW, D), device=x.device, dtype=out_dtype)
    if n_prefix:
        # Prefix rows: CLS (+ its position, added in the dtype the reference adds it in), then the
        # extra tokens; one cached [1, p, D] block copied into every image (one launch).
        def build_prefix():
            parts = []
            if n_cls:
                cls = cls_token.to(tok_dtype)
                if pos_embed is not None:
                    cls = cls + pos_embed[:, :1].to(tok_dtype)
                parts.append(cls.to(out_dtype))
            if R:
                parts.append(extra_tokens.to(out_dtype))
            return torch.cat(parts, dim=1)

        out[:, :n_prefix] = _cached((cls_token, extra_tokens, pos_embed), ("prefix", tok_dtype, out_dtype),
                                    build_prefix)
    M = B * HW
    if M == 0:
        return out
    uint8 = x.dtype == torch.uint8
    wt, bt = _cached((weight, bias), ("weights", uint8, mean and tuple(mean), std and tuple(std), channels_last,
                                      conv_dtype),
                     lambda: folded_weights(weight, bias, uint8, mean, std, channels_last, conv_dtype))
    pos = pos_embed[0, n_cls:].to(tok_dtype).contiguous() if pos_embed is not None else bt
    mask_u8 = masks.contiguous().view(torch.uint8) if masks is not None else bt
    mt = mask_token.reshape(-1).contiguous() if masks is not None else bt
    precision = None  # half-precision operands: the default (tensor cores)
    if conv_dtype == torch.float32:  # fp32: TF32 exactly when the eager (cuDNN) conv would use it
        # (the CPU interpreter computes IEEE fp32; a meta tensor is the compile audit's GPU stand-in)
        precision = "tf32" if torch.backends.cudnn.allow_tf32 and x.device.type != "cpu" else "ieee"
    bm, bn, bk, warps, stages = _tiles(x.device, D)
    # Patch rows run on grid axis 1, which CUDA caps at 65535 programs: launch in chunks of rows
    # (a batch of > 65535 * BLOCK_M patches, e.g. 3064 images of 518 px, failed to launch).
    rows_per_launch = _MAX_GRID_Y * bm
    for m_start in range(0, M, rows_per_launch):
        grid = (triton.cdiv(D, bn), triton.cdiv(min(M - m_start, rows_per_launch), bm))
        _patch_embed_kernel[grid](
            x, wt, bt, mask_u8, mt, pos, out,
            M, m_start, D, wt.shape[0], HW, Wp, C, sxb, sxc, sxh, sxw, out.stride(0), n_prefix,
            P=P, CHANNELS_LAST=channels_last, HAS_MASK=masks is not None, HAS_POS=pos_embed is not None,
            ROUND_CONV=conv_dtype != torch.float32, PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    return out


@patch_embed_tokens_op.register_fake
def _(x, weight, bias, cls_token, extra_tokens, masks, mask_token, pos_embed, channels_last, mean, std,
      conv_dtype, tok_dtype, out_dtype):
    D, _, P, _ = weight.shape
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    n_prefix = (0 if cls_token is None else 1) + (0 if extra_tokens is None else extra_tokens.shape[1])
    return x.new_empty((x.shape[0], n_prefix + (h // P) * (w // P), D), dtype=out_dtype)


def patch_embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                       extra_tokens: Optional[Tensor], masks: Optional[Tensor], mask_token: Optional[Tensor],
                       pos_embed: Optional[Tensor], channels_last: bool, mean, std) -> Tensor:
    conv_dtype = _conv_dtype(x, weight)
    tok_dtype = conv_dtype if cls_token is None else torch.promote_types(conv_dtype, cls_token.dtype)
    out_dtype = tok_dtype if extra_tokens is None else torch.promote_types(tok_dtype, extra_tokens.dtype)
    return patch_embed_tokens_op(x, weight, bias, cls_token, extra_tokens, masks, mask_token, pos_embed,
                                 channels_last, None if mean is None else list(mean),
                                 None if std is None else list(std), conv_dtype, tok_dtype, out_dtype)


def supports(call) -> Optional[str]:
    """None when the kernel runs ``call`` (a ``PatchEmbedCall``), else the reason not."""
    if call.needs_grad:
        return "the Triton patch embedding is inference-only (a gradient is needed)"
    if call.dtype not in _FLOAT + (torch.uint8,):
        return f"pixel dtype {call.dtype}"
    if call.weight_dtype not in _FLOAT:
        return f"weight dtype {call.weight_dtype}"
    return None

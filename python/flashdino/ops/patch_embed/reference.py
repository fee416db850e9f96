"""Reference token preparation (pure PyTorch), the DINOv2 / DINOv3 sequence before the first block:

conv (kernel = stride = P; a bottom/right remainder is dropped) -> flatten row-major -> optional
mask-token replacement -> prepend CLS (+ the learned position table on CLS + patches, DINOv2) ->
storage / register tokens after CLS. Optional input handling (uint8 pixels, channels-last
layout, mean/std normalisation) is applied explicitly here, before the conv; the fast backends
fold it into the conv weights instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize_pixels(x: Tensor, weight: Tensor, channels_last: bool, mean: Optional[Sequence[float]],
                     std: Optional[Sequence[float]]) -> Tensor:
    """NCHW float pixels ready for the conv (uint8 -> [0, 1], then (x - mean) / std)."""
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    target = x.dtype if x.is_floating_point() else weight.dtype
    xf = x.float()
    if x.dtype == torch.uint8:
        xf = xf / 255
    if mean is not None:
        m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        xf = (xf - m) / s
    return xf.to(target)


def patch_embed_tokens(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
    extra_tokens: Optional[Tensor] = None, masks: Optional[Tensor] = None, mask_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None, channels_last: bool = False,
    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
) -> Tensor:
    """Tokens [B, n_cls + R + H*W, D] laid out as [CLS, extra x R, patches]."""
    if channels_last or x.dtype == torch.uint8 or mean is not None:
        x = normalize_pixels(x, weight, channels_last, mean, std)
    P = weight.shape[-1]
    tokens = F.conv2d(x, weight, bias, stride=P).flatten(2).transpose(1, 2)
    if masks is not None:
        tokens = torch.where(masks.unsqueeze(-1), mask_token.reshape(1, -1).to(tokens.dtype).unsqueeze(0), tokens)
    B = tokens.shape[0]
    if pos_embed is not None:  # DINOv2: position table on [CLS, patches]; registers inserted after
        if cls_token is not None:
            tokens = torch.cat([cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + pos_embed.to(tokens.dtype)
        if extra_tokens is not None:
            n_cls = 0 if cls_token is None else 1
            tokens = torch.cat([tokens[:, :n_cls], extra_tokens.expand(B, -1, -1), tokens[:, n_cls:]], dim=1)
        return tokens
    prefix = [] if cls_token is None else [cls_token.expand(B, -1, -1)]
    if extra_tokens is not None:
        prefix.append(extra_tokens.expand(B, -1, -1))
    # torch.cat promotes like the reference: under autocast the stream stays fp32.
    return torch.cat(prefix + [tokens], dim=1) if prefix else tokens

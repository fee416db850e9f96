from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> tokens [B, H*W, D] (row-major). A remainder is dropped."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def tokens(self, x: Tensor, cls_token: Optional[Tensor], *, extra_tokens: Optional[Tensor] = None,
               masks: Optional[Tensor] = None, mask_token: Optional[Tensor] = None,
               pos_embed: Optional[Tensor] = None, strict: bool = False) -> Tensor:
        """The token buffer the first block reads, [B, n_cls + R + H*W, D] = [CLS, extra x R, patches],
        written by one ``ops.patch_embed_tokens`` call (see there for the arguments)."""
        return ops.patch_embed_tokens(x, self.proj.weight, self.proj.bias, cls_token, extra_tokens=extra_tokens,
                                      masks=masks, mask_token=mask_token, pos_embed=pos_embed, strict=strict)

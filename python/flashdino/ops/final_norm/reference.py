"""Reference final LayerNorm of a ViT (pure PyTorch): the CPU path and the semantics of every backend.

``x`` is the last block's output [B, N, D] laid out as [prefix (CLS + storage/register) x p,
patches x H*W]. A tied model normalises all tokens with ``norm``; an untied one
(``untie_cls_and_patch_norms``) uses ``prefix_norm`` for the p prefix tokens and ``norm`` for the
patches. Patches come back as tokens [B, HW, D] or, with ``patch_grid=(H, W)``, as a feature map
[B, D, H, W] (contiguous), the layout of ``get_intermediate_layers(reshape=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def final_norm(x: Tensor, n_prefix: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               prefix_norm: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
               patch_grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """(normalised prefix tokens [B, p, D], normalised patches [B, HW, D] or [B, D, H, W])."""
    D = x.shape[-1]
    if prefix_norm is not None:
        prefix = F.layer_norm(x[:, :n_prefix], (D,), prefix_norm[0], prefix_norm[1], eps)
        patches = F.layer_norm(x[:, n_prefix:], (D,), weight, bias, eps)
    else:
        x_norm = F.layer_norm(x, (D,), weight, bias, eps)
        prefix, patches = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
    if patch_grid is not None:
        H, W = patch_grid
        patches = patches.reshape(x.shape[0], H, W, D).permute(0, 3, 1, 2).contiguous()
    return prefix, patches

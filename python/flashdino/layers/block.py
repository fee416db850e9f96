from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from ..ops import RopeGrid
from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import build_ffn
from .norm import LayerNorm


def _gamma(ls: nn.Module) -> Optional[Tensor]:
    """The LayerScale vector, or None when the block has no LayerScale."""
    return ls.gamma if isinstance(ls, LayerScale) else None


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x).

    ``forward`` runs one block on its own. A stack of blocks runs through :func:`run_blocks`, which
    fuses each block's last residual add with the next block's ``norm1`` (:meth:`forward_open`).
    """

    def __init__(self, dim: int, num_heads: int, ffn: str = "mlp", ffn_hidden: Optional[int] = None,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, eps: float = 1e-5,
                 layerscale_init: Optional[float] = 1e-5, drop_path: float = 0.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm=qk_norm, norm_eps=eps)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = build_ffn(ffn, dim, ffn_hidden or 4 * dim, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, rope: Optional[RopeGrid] = None):
        x, branch, gamma = self.forward_open(x, self.norm1(x), rope)
        return x + (branch * gamma if gamma is not None else branch)

    def forward_open(self, x: Tensor, h: Tensor, rope: Optional[RopeGrid] = None
                     ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The block up to its last residual add, on the residual stream ``x`` and ``h = norm1(x)``.

        Returns ``(x_mid, branch, gamma)``: the block's output is ``x_mid + gamma * branch``
        (``gamma`` the second LayerScale or None), left to the caller so that it can run that add
        and the next block's ``norm1`` as one ``residual_layernorm`` call.
        """
        branch = self.drop_path(self.attn(h, rope))
        x, h = self.norm2.add_and_norm(x, branch, _gamma(self.ls1))  # x += ls1 * branch, then norm2, fused
        return x, self.drop_path(self.mlp(h)), _gamma(self.ls2)


def run_blocks(blocks: Sequence[Block], x: Tensor, rope: Optional[RopeGrid] = None, *,
               shapes: Optional[Sequence[Optional[tuple]]] = None,
               each: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
    """Runs ``blocks`` in order on the residual stream ``x``; returns the stream after the last one.

    The same result as ``for block in blocks: x = block(x, rope)``, with one ``residual_layernorm``
    call per block boundary instead of two passes over the stream: block i's last residual add and
    block i+1's ``norm1`` are fused, so D blocks make 2D - 1 calls (D for ``norm2``, D - 1 at the
    boundaries); the first ``norm1`` is a plain LayerNorm and the last add a plain add (the final
    norm follows). ``each(i, x)`` receives the residual stream after block i as soon as it exists
    (the un-normalised output of ``block(x)``). ``shapes[i]``, when given and not None, is the
    shape the stream is reshaped to before block i (VGGT alternates [B*S, N, C] and [B, S*N, C];
    LayerNorm acts per token, so the reshape commutes with the fused op).
    """
    pending = None  # (branch, gamma) of the previous block's unfinished residual add
    for i, block in enumerate(blocks):
        if pending is None:
            h = block.norm1(x)
        else:
            x, h = block.norm1.add_and_norm(x, *pending)
            if each is not None:
                each(i - 1, x)
        shape = shapes[i] if shapes is not None else None
        if shape is not None:
            x, h = x.reshape(shape), h.reshape(shape)
        x, branch, gamma = block.forward_open(x, h, rope)
        pending = (branch, gamma)
    if pending is not None:
        branch, gamma = pending
        x = x + (branch * gamma if gamma is not None else branch)
        if each is not None:
            each(len(blocks) - 1, x)
    return x

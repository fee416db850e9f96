from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn
from torch.nn.modules import module as _module

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
        x, h = self._attend(x, self.norm1(x), rope)
        return x + self.drop_path(self.ls2(self.mlp(h)))

    def _attend(self, x: Tensor, h: Tensor, rope: Optional[RopeGrid]) -> tuple[Tensor, Tensor]:
        branch = self.drop_path(self.attn(h, rope))
        return self.norm2.add_and_norm(x, branch, _gamma(self.ls1))  # x += ls1 * branch, then norm2, fused

    def forward_open(self, x: Tensor, h: Tensor, rope: Optional[RopeGrid] = None
                     ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The block up to its last residual add, on the residual stream ``x`` and ``h = norm1(x)``.

        Returns ``(x_mid, branch, gamma)``: the block's output is ``x_mid + gamma * branch``
        (``gamma`` the second LayerScale or None), left to the caller so that it can run that add
        and the next block's ``norm1`` as one ``residual_layernorm`` call.
        """
        x, h = self._attend(x, h, rope)
        return x, self.drop_path(self.mlp(h)), _gamma(self.ls2)


def _hooked(module: nn.Module) -> bool:
    """Whether hooks watch calls of ``module`` itself (the fused path never calls it)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _runs_whole(block: Block) -> bool:
    """A block with hooks on itself, its ``norm1`` or its ``ls2`` (modules the fused path does not
    call) runs as ``block(x)``, so that the hooks see what they would see in the plain stack."""
    return _hooked(block) or _hooked(block.norm1) or _hooked(block.ls2)


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

    Forward / backward hooks keep working: a block observed by hooks (on the block, its ``norm1``
    or its ``ls2``; or global module hooks) runs as ``block(x)``, unfused at its two boundaries.
    """
    whole = _global_hooks()
    pending = None  # (branch, gamma) of the previous block's unfinished residual add
    for i, block in enumerate(blocks):
        shape = shapes[i] if shapes is not None else None
        if whole or _runs_whole(block):
            if pending is not None:
                x = _finish(x, *pending)
                pending = None
                if each is not None:
                    each(i - 1, x)
            x = block(x.reshape(shape) if shape is not None else x, rope)
            if each is not None:
                each(i, x)
            continue
        if pending is None:
            h = block.norm1(x)
        else:
            x, h = block.norm1.add_and_norm(x, *pending)
            if each is not None:
                each(i - 1, x)
        if shape is not None:
            x, h = x.reshape(shape), h.reshape(shape)
        x, branch, gamma = block.forward_open(x, h, rope)
        pending = (branch, gamma)
    if pending is not None:
        x = _finish(x, *pending)
        if each is not None:
            each(len(blocks) - 1, x)
    return x


def _finish(x: Tensor, branch: Tensor, gamma: Optional[Tensor]) -> Tensor:
    """A block's last residual add without a fused norm (the last block, or before a hooked one)."""
    return x + (branch * gamma if gamma is not None else branch)

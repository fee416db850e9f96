"""``flashdino.patch`` for timm: DINOv3 (``Eva`` with the DINOv3 RoPE, ``vit_*_patch16_dinov3*``) and
DINOv2 (``VisionTransformer``, ``vit_*_patch14[_reg4]_dinov2``).

flashdino replaces the forwards of

* each block (``EvaBlock`` / ``Block``): the residual + LayerScale + ``norm2`` become one
  ``ops.residual_layernorm``;
* each attention (``EvaAttention`` / ``Attention``): its qkv projection (computed exactly as timm
  computes it, so LoRA on ``qkv`` applies) goes to ``ops.rope_attention``, the DINOv3 RoPE inside;
* the final ``norm``: ``ops.final_norm``;
* ``Eva.rope.get_embed``: it returns a :class:`TimmRopeGrid` (the patch grid and timm's own fp32
  ``periods``) instead of the sin/cos table.

Patch embedding, position embeddings, ``norm1``, the MLP and the model's ``forward`` /
``forward_features`` / ``forward_intermediates`` are timm's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, LayerScale
from timm.layers import pos_embed_sincos as _sincos
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .. import ops
from ..ops import RopeGrid
from ..ops.rope_attention.grid import NORMALIZATIONS
from ._common import (all_of, check_layernorm, check_version, final_norm_forward, original, replacement, require,
                      residual_norm)

# The tested release is the lower bound; the module structure is verified per model too.
TIMM_RANGE = ((1, 0, 31), (2,))
SUPPORTED = ("Eva (DINOv3: vit_*_patch16_dinov3*)", "VisionTransformer (DINOv2: vit_*_patch14[_reg4]_dinov2)")


@dataclass
class TimmRopeGrid(RopeGrid):
    """The RopeGrid of one Eva call, which can also rebuild timm's own sin/cos embedding for the
    calls that run the original attention (attention masks, attention dropout)."""

    embed_dtype: Optional[torch.dtype] = None  # the cached table's dtype, when timm would return its cache

    def timm_embed(self) -> Tensor:
        # RotaryEmbeddingDinoV3._create_embed(no_aug=True) for the grid_offset=0, "ij" grids patch() accepts.
        coords = _sincos._build_grid([self.height, self.width], grid_type="centered", normalize_coords=self.normalize,
                                     ndim=2).flatten(0, -2)
        coords = coords[:, :, None].to(device=self.periods.device, dtype=self.periods.dtype)
        angles = (2 * math.pi * coords / self.periods[None, None, :]).flatten(1)
        embed = torch.cat([_sincos._rope_layout(angles.sin(), True), _sincos._rope_layout(angles.cos(), True)], dim=-1)
        return embed if self.embed_dtype is None else embed.to(self.embed_dtype)


@replacement("get_embed")
def _rope_get_embed(self, shape=None, dtype=None):
    # timm's table while it draws coordinate augmentations or drops patches (it then indexes the
    # table per kept token), or when a caller asks for a dtype.
    if dtype is not None or (self.training and (self.aug_active or self._flashdino_patch_drop)) \
            or (shape is None and self.feat_shape is None):
        return original(self, "get_embed")(shape=shape, dtype=dtype)
    cached = shape is None and self.pos_embed_cached is not None
    height, width = shape if shape is not None else self.feat_shape
    return TimmRopeGrid("dinov3", height, width, self._flashdino_n_prefix, periods=self.periods,
                        normalize=self.normalize_coords,
                        embed_dtype=self.pos_embed_cached.dtype if cached else None)


def _eva_qkv(self, x: Tensor) -> Tensor:
    """EvaAttention's qkv projection, as timm computes it (a q/v bias goes through F.linear on the
    qkv weight, as in timm)."""
    if self.qkv is None:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
    if self.q_bias is None:
        return self.qkv(x)
    bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    if self.qkv_bias_separate:
        return self.qkv(x) + bias
    return F.linear(x, weight=self.qkv.weight, bias=bias)


@replacement()
def _eva_attention_forward(self, x: Tensor, rope=None, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
    if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0) \
            or not isinstance(rope, TimmRopeGrid):
        # No flashdino op masks or drops attention: timm's code runs, on timm's own RoPE table.
        if isinstance(rope, TimmRopeGrid):
            rope = rope.timm_embed()
        return original(self)(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    out = ops.rope_attention(_eva_qkv(self, x), self.num_heads, rope, scale=self.scale)
    return self.proj_drop(self.proj(out))


@replacement()
def _eva_block_forward(self, x: Tensor, rope=None, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
    attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    x, h = residual_norm(x, attn, self.gamma_1, self.norm2, self.drop_path1, self.training)
    mlp = self.mlp(h)
    if self.gamma_2 is not None:
        mlp = self.gamma_2 * mlp
    return x + self.drop_path2(mlp)


@replacement()
def _vit_attention_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
    if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
        return original(self)(x, attn_mask=attn_mask, is_causal=is_causal)
    out = ops.rope_attention(self.qkv(x), self.num_heads, None, scale=self.scale)
    return self.proj_drop(self.proj(out))


@replacement()
def _vit_block_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
    attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
    gamma = self.ls1.gamma if isinstance(self.ls1, LayerScale) else None
    x, h = residual_norm(x, attn, gamma, self.norm2, self.drop_path1, self.training)
    return x + self.drop_path2(self.ls2(self.mlp(h)))


def _check_plain_attention(attn: nn.Module, at: str) -> None:
    for name in ("q_norm", "k_norm", "norm"):
        require(isinstance(getattr(attn, name), nn.Identity), f"{at}: attention has a {name} (not DINO)")
    require(getattr(attn, "gate", None) is None, f"{at}: attention is gated (not DINO)")


def _check_block_common(block: nn.Module, dim: int, at: str) -> None:
    check_layernorm(block.norm2, dim, f"{at} norm2")
    for name in ("drop_path1", "drop_path2"):
        require(isinstance(getattr(block, name), (nn.Identity, DropPath)), f"{at}: {name} is not DropPath")


def _final_norm_step(model: nn.Module, dim: int, where: str) -> list:
    if isinstance(model.norm, nn.Identity):
        return []
    check_layernorm(model.norm, dim, f"{where}.norm")
    return [(model.norm, "forward", final_norm_forward, {})]


def _plan_eva(model: Eva) -> list:
    where, dim = "timm Eva", model.embed_dim
    rope = model.rope
    require(isinstance(rope, _sincos.RotaryEmbeddingDinoV3) and not getattr(model, "rope_mixed", False),
            f"{where} has {type(rope).__name__} RoPE, not DINOv3's",
            "flashdino patches the timm DINOv3 models (vit_*_patch16_dinov3*), not EVA / EVA02 / PE")
    require(rope.rotate_half and float(rope.grid_offset) == 0.0 and rope.grid_indexing == "ij"
            and rope.normalize_coords in NORMALIZATIONS and rope.min_period is None,
            f"{where}: this RoPE configuration (rotate_half={rope.rotate_half}, grid_offset={rope.grid_offset}, "
            f"grid_indexing={rope.grid_indexing!r}, normalize_coords={rope.normalize_coords!r}) is not DINOv3's")
    require(all_of(model.blocks, EvaBlock), f"{where} has blocks other than EvaBlock (post-norm blocks are not DINO)")
    steps = []
    for i, block in enumerate(model.blocks):
        at, attn = f"{where} block {i}", block.attn
        require(type(attn) is EvaAttention, f"{at}: attention is {type(attn).__name__}")
        _check_plain_attention(attn, at)
        require(attn.rotate_half and attn.num_prefix_tokens == model.num_prefix_tokens,
                f"{at}: attention RoPE layout differs from the model's")
        require(attn.head_dim % 4 == 0 and rope.periods.numel() == attn.head_dim // 4,
                f"{at}: head_dim {attn.head_dim} does not fit the RoPE periods ({rope.periods.numel()})")
        _check_block_common(block, dim, at)
        steps += [(attn, "forward", _eva_attention_forward, {}), (block, "forward", _eva_block_forward, {})]
    steps.append((rope, "get_embed", _rope_get_embed,
                  {"n_prefix": int(model.num_prefix_tokens), "patch_drop": model.patch_drop is not None}))
    return steps + _final_norm_step(model, dim, where)


def _plan_vit(model: VisionTransformer) -> list:
    where, dim = "timm VisionTransformer", model.embed_dim
    require(all_of(model.blocks, Block), f"{where} has blocks other than Block",
            "flashdino patches the pre-norm DINOv2 blocks (vit_*_patch14[_reg4]_dinov2)")
    steps = []
    for i, block in enumerate(model.blocks):
        at, attn = f"{where} block {i}", block.attn
        require(type(attn) is Attention, f"{at}: attention is {type(attn).__name__}")
        _check_plain_attention(attn, at)
        require(attn.num_heads * attn.head_dim == attn.attn_dim, f"{at}: attention width")
        for name in ("ls1", "ls2"):
            require(isinstance(getattr(block, name), (nn.Identity, LayerScale)), f"{at}: {name} is not LayerScale")
        _check_block_common(block, dim, at)
        steps += [(attn, "forward", _vit_attention_forward, {}), (block, "forward", _vit_block_forward, {})]
    return steps + _final_norm_step(model, dim, where)


def is_supported_class(module: nn.Module) -> bool:
    return type(module) in (Eva, VisionTransformer)


def plan(model: nn.Module) -> list:
    """Validates ``model`` and returns its replacements ``[(module, method name, function, state)]``;
    raises ``PatchError`` before anything changes."""
    check_version("timm", timm.__version__, *TIMM_RANGE)
    require(is_supported_class(model), f"{type(model).__name__} is not one of {', '.join(SUPPORTED)}")
    return _plan_eva(model) if type(model) is Eva else _plan_vit(model)

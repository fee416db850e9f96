"""``flashdino.patch`` for Hugging Face transformers: ``DINOv3ViTModel`` / ``DINOv3ViTBackbone``,
``Dinov2Model`` / ``Dinov2Backbone`` and ``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersBackbone``.

The three families share one layer layout (``norm1``, ``attention`` with ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj``, ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp``, ``layer_scale2``);
flashdino replaces the forwards of

* each layer: the residual + LayerScale + ``norm2`` become one ``ops.residual_layernorm``;
* each attention: the three projections (called as modules, so PEFT LoRA on them applies) are
  concatenated into a fused qkv for ``ops.rope_attention``, with the DINOv3 RoPE inside it;
* the final norm (``norm`` / ``layernorm``): ``ops.final_norm``;
* DINOv3's RoPE module: it returns a :class:`HFRopeGrid` (the patch grid and the model's own
  inverse frequencies, as RoPE periods) instead of cos/sin tables.

Embeddings, ``norm1``, the MLP, the model's own ``forward`` (output classes, ``hidden_states``
capture, ``return_dict``) are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import transformers
from torch import Tensor, nn
from transformers.models.dinov2 import modeling_dinov2 as _v2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as _v2r
from transformers.models.dinov3_vit import modeling_dinov3_vit as _v3

from .. import ops
from ..ops import RopeGrid
from ._common import (all_of, check_layernorm, check_version, final_norm_forward, original, replacement, require,
                      residual_norm)

# The tested release is the lower bound; the module structure is verified per model too.
TRANSFORMERS_RANGE = ((5, 25), (6,))


@dataclass(frozen=True)
class _Family:
    name: str
    models: tuple  # the classes patch() accepts
    layer: type
    attention: type
    layer_scale: type
    drop_path: type
    encoder: str  # attribute of the model holding the layers
    norm: str  # attribute of the model holding the final LayerNorm
    heads: str  # attribute of the attention holding the head count
    dropout: str  # attribute of the attention holding the attention-dropout probability
    rope: Optional[type] = None


FAMILIES = (
    _Family("DINOv3", (_v3.DINOv3ViTModel, _v3.DINOv3ViTBackbone), _v3.DINOv3ViTLayer, _v3.DINOv3ViTAttention,
            _v3.DINOv3ViTLayerScale, _v3.Dinov3ViTDropPath, "model", "norm", "num_heads", "dropout",
            rope=_v3.DINOv3ViTRopePositionEmbedding),
    _Family("DINOv2", (_v2.Dinov2Model, _v2.Dinov2Backbone), _v2.Dinov2Layer, _v2.Dinov2Attention,
            _v2.Dinov2LayerScale, _v2.Dinov2DropPath, "encoder", "layernorm", "num_attention_heads",
            "attention_dropout"),
    _Family("DINOv2 with registers", (_v2r.Dinov2WithRegistersModel, _v2r.Dinov2WithRegistersBackbone),
            _v2r.Dinov2WithRegistersLayer, _v2r.Dinov2WithRegistersAttention, _v2r.Dinov2WithRegistersLayerScale,
            _v2r.Dinov2WithRegistersDropPath, "encoder", "layernorm", "num_attention_heads", "attention_dropout"),
)
SUPPORTED = tuple(cls.__name__ for family in FAMILIES for cls in family.models)


def family_of(module: nn.Module) -> Optional[_Family]:
    for family in FAMILIES:
        if type(module) in family.models:
            return family
    return None


@dataclass
class HFRopeGrid(RopeGrid):
    """The RopeGrid of one DINOv3ViTModel call, which can also rebuild Hugging Face's own cos/sin
    tables for the calls that run the original attention (attention weights requested)."""

    inv_freq: Optional[Tensor] = None
    table_dtype: Optional[torch.dtype] = None

    def hf_tables(self) -> tuple[Tensor, Tensor]:
        # DINOv3ViTRopePositionEmbedding.forward outside training (a grid is only made there).
        coords = _v3.get_patches_center_coordinates(self.height, self.width, dtype=torch.float32,
                                                    device=self.inv_freq.device)
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cos(angles).to(self.table_dtype), torch.sin(angles).to(self.table_dtype)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


@replacement()
def _rope_forward(self, pixel_values: Tensor):
    config = self.config
    # HF draws random coordinate augmentations in training when any is configured (a draw even for
    # a value of 0): its own tables then, and the attention runs its original code on them.
    if self.training and any(getattr(config, key, None) is not None
                             for key in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")):
        return original(self)(pixel_values)
    patch_h, patch_w = _pair(config.patch_size)
    # periods = 1 / inv_freq: the model's own fp32 frequencies (not the official bf16-rounded periods).
    return HFRopeGrid("dinov3", pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w,
                      self._flashdino_n_prefix, periods=1.0 / self.inv_freq.float(), normalize="separate",
                      inv_freq=self.inv_freq, table_dtype=pixel_values.dtype)


@replacement()
def _attention_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                       position_embeddings=None, **kwargs):
    rope = position_embeddings
    wants_weights = kwargs.get("output_attentions", getattr(self.config, "output_attentions", False))
    dropout = self.training and getattr(self, self._flashdino_dropout) > 0
    if attention_mask is not None or wants_weights or dropout or (rope is not None and not isinstance(rope, HFRopeGrid)):
        # No flashdino op returns attention weights, masks or drops attention: HF's code runs.
        if isinstance(rope, HFRopeGrid):
            rope = rope.hf_tables()
        if rope is not None:
            kwargs["position_embeddings"] = rope
        return original(self)(hidden_states, attention_mask=attention_mask, **kwargs)
    qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
    out = ops.rope_attention(qkv, self._flashdino_heads, rope, scale=self.scaling)
    return self.o_proj(out), None


@replacement()
def _layer_forward(self, *args, **kwargs) -> Tensor:
    # HF's GradientCheckpointingLayer checkpoints inside the class's `forward`, which this
    # instance-level forward replaces: the same checkpointing (minus the KV-cache handling that
    # encoders have no use for) is done here.
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(partial(_layer_body, self, **kwargs), *args)
    return _layer_body(self, *args, **kwargs)


def _layer_body(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, position_embeddings=None,
                **kwargs) -> Tensor:
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    attn, _ = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
    x, h = residual_norm(hidden_states, attn, self.layer_scale1.lambda1, self.norm2, self.drop_path, self.training)
    return self.drop_path(self.layer_scale2(self.mlp(h))) + x


def plan(model: nn.Module) -> list:
    """Validates ``model`` (one of :data:`SUPPORTED`) and returns its replacements
    ``[(module, method name, function, state)]``; raises ``PatchError`` before anything changes."""
    check_version("transformers", transformers.__version__, *TRANSFORMERS_RANGE)
    family = family_of(model)
    require(family is not None, f"{type(model).__name__} is not one of {', '.join(SUPPORTED)}")
    where = type(model).__name__
    dim = model.config.hidden_size
    layers = list(getattr(getattr(model, family.encoder), "layer"))
    require(all_of(layers, family.layer), f"{where} has layers other than {family.layer.__name__}")
    steps = []
    for i, layer in enumerate(layers):
        at = f"{where} layer {i}"
        require(type(layer.attention) is family.attention, f"{at}: attention is {type(layer.attention).__name__}")
        require(all_of((layer.layer_scale1, layer.layer_scale2), family.layer_scale),
                f"{at}: LayerScale is not {family.layer_scale.__name__}")
        require(isinstance(layer.drop_path, (nn.Identity, family.drop_path)),
                f"{at}: drop_path is {type(layer.drop_path).__name__}")
        check_layernorm(layer.norm2, dim, f"{at} norm2")
        attention = layer.attention
        heads = int(getattr(attention, family.heads))
        if family.rope is not None:
            require(attention.head_dim % 4 == 0, f"{at}: head_dim {attention.head_dim} is not a multiple of 4 (2D RoPE)")
        steps.append((attention, "forward", _attention_forward, {"heads": heads, "dropout": family.dropout}))
        steps.append((layer, "forward", _layer_forward, {}))
    check_layernorm(getattr(model, family.norm), dim, f"{where}.{family.norm}")
    steps.append((getattr(model, family.norm), "forward", final_norm_forward, {}))
    if family.rope is not None:
        rope = model.rope_embeddings
        require(type(rope) is family.rope, f"{where}.rope_embeddings is {type(rope).__name__}")
        require(rope.inv_freq.numel() == rope.head_dim // 4, f"{where}: RoPE frequencies do not fit head_dim/4")
        steps.append((rope, "forward", _rope_forward, {"n_prefix": 1 + int(model.config.num_register_tokens)}))
    return steps

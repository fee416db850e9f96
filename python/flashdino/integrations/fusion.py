"""Fusing DINO features with another feature stream, token maps and multi-scale features."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSION_MODES = ("concat", "add", "weighted_sum")


def _as_tokens(x: Tensor, dim: int, name: str, dim_name: str):
    """[B, N, C] tokens or a channel-first map [B, C, H, W] -> ([B, N, C], (H, W) or None)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[1] != dim:
            raise ValueError(
                f"{name} map has {x.shape[1]} channels (shape {tuple(x.shape)}, [B, C, H, W]) "
                f"but the adapter was built with {dim_name}={dim}"
            )
        B, C, H, W = x.shape
        return x.flatten(2).transpose(1, 2), (H, W)
    if x.dim() in (2, 3):
        if x.shape[-1] != dim:
            raise ValueError(
                f"{name} have {x.shape[-1]} channels (shape {tuple(x.shape)}) "
                f"but the adapter was built with {dim_name}={dim}"
            )
        return x, None
    raise ValueError(f"{name} must be [B, C], [B, N, C] or [B, C, H, W], got shape {tuple(x.shape)}")


class FeatureFusionAdapter(nn.Module):
    """Projects DINO features and another stream to ``output_dim`` and fuses them.

    concat: LayerNorm each input, concatenate, Linear(dino_dim + other_dim -> output_dim).
    add: Linear(dino) + Linear(other). weighted_sum: a * Linear(dino) + (1 - a) * Linear(other) with a
    learnable a = sigmoid(alpha) (starts at 0.5). The result goes through a final LayerNorm.
    Inputs are tokens [B, N, C] (or [B, C]) or channel-first maps [B, C, H, W]; maps are returned as
    maps, and another-stream map of a different size is resized (bilinear) to the DINO grid.
    """

    def __init__(self, dino_dim: int, other_dim: int, output_dim: int, fusion_mode: str = "concat"):
        super().__init__()
        for n, v in (("dino_dim", dino_dim), ("other_dim", other_dim), ("output_dim", output_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if fusion_mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion_mode {fusion_mode!r}; use one of {list(FUSION_MODES)}")
        self.dino_dim, self.other_dim, self.output_dim, self.fusion_mode = dino_dim, other_dim, output_dim, fusion_mode
        self.dino_norm = nn.LayerNorm(dino_dim)
        self.other_norm = nn.LayerNorm(other_dim)
        if fusion_mode == "concat":
            self.proj = nn.Linear(dino_dim + other_dim, output_dim)
        else:
            self.dino_proj = nn.Linear(dino_dim, output_dim)
            self.other_proj = nn.Linear(other_dim, output_dim)
        self.alpha = nn.Parameter(torch.zeros(())) if fusion_mode == "weighted_sum" else None
        self.out_norm = nn.LayerNorm(output_dim)

    @property
    def weight(self) -> Optional[Tensor]:
        """The current DINO weight a of weighted_sum (None for other modes)."""
        return None if self.alpha is None else torch.sigmoid(self.alpha)

    def forward(self, dino_features: Tensor, other_features: Tensor) -> Tensor:
        d, d_hw = _as_tokens(dino_features, self.dino_dim, "dino_features", "dino_dim")
        o, o_hw = _as_tokens(other_features, self.other_dim, "other_features", "other_dim")
        if d_hw is not None and o_hw is not None and d_hw != o_hw:
            om = other_features.float() if not other_features.is_floating_point() else other_features
            om = F.interpolate(om, size=d_hw, mode="bilinear", align_corners=False)
            o = om.flatten(2).transpose(1, 2)
        if d.shape[:-1] != o.shape[:-1]:
            raise ValueError(
                f"dino_features {tuple(dino_features.shape)} and other_features {tuple(other_features.shape)} "
                "do not have the same batch / token layout"
            )
        d, o = self.dino_norm(d), self.other_norm(o)
        if self.fusion_mode == "concat":
            y = self.proj(torch.cat([d, o], dim=-1))
        elif self.fusion_mode == "add":
            y = self.dino_proj(d) + self.other_proj(o)
        else:
            a = torch.sigmoid(self.alpha)
            y = a * self.dino_proj(d) + (1 - a) * self.other_proj(o)
        y = self.out_norm(y)
        if d_hw is not None:
            B = y.shape[0]
            y = y.transpose(1, 2).reshape(B, self.output_dim, *d_hw)
        return y

    def extra_repr(self) -> str:
        return f"dino_dim={self.dino_dim}, other_dim={self.other_dim}, output_dim={self.output_dim}, fusion_mode={self.fusion_mode!r}"


def patch_tokens_to_map(tokens: Tensor, h: int, w: int, target_hw: Optional[Sequence[int]] = None,
                        mode: str = "bilinear") -> Tensor:
    """Patch tokens [B, h*w, D] (row-major) -> a channel-first map [B, D, h, w], optionally resized."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got {getattr(tokens, 'shape', type(tokens).__name__)}")
    B, N, D = tokens.shape
    if N != h * w:
        extra = N - h * w
        hint = (f" ({extra} extra tokens: drop the CLS / register tokens first, e.g. tokens[:, {extra}:])"
                if extra > 0 else "")
        raise ValueError(f"tokens have {N} patches but h * w = {h} * {w} = {h * w}{hint}")
    fmap = tokens.transpose(1, 2).reshape(B, D, h, w)
    if target_hw is not None:
        target_hw = (int(target_hw), int(target_hw)) if isinstance(target_hw, int) else tuple(int(v) for v in target_hw)
        if target_hw != (h, w):
            kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            fmap = F.interpolate(fmap, size=target_hw, mode=mode, **kwargs)
    return fmap


def multiscale_feature_maps(model, images: Tensor, layers: Sequence[int] = (5, 11, 23), norm: bool = True) -> list:
    """Feature maps [B, D, h, w] of several blocks (0-based; negative counts from the end), one forward."""
    depth = getattr(model, "n_blocks", None) or len(model.blocks)
    idx = []
    for layer in layers:
        i = int(layer)
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer {layer} is outside the model's {depth} blocks (valid: 0..{depth - 1} or -{depth}..-1)")
        idx.append(j)
    if not idx:
        raise ValueError("layers is empty")
    return list(model.get_intermediate_layers(images, n=idx, reshape=True, norm=norm))


__all__ = ["FeatureFusionAdapter", "FUSION_MODES", "patch_tokens_to_map", "multiscale_feature_maps"]

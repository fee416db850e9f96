"""Fusing DINO features with another feature stream, token maps and multi-scale features.

Two adapters, because their meanings differ:

* :class:`FeatureFusionAdapter` (``dino_dim``, ``other_dim``; called ``(dino, other)``):
  LayerNorm + Linear on tokens or maps, the other stream resized to the DINO grid.
* :class:`DINOv2FeatureFusionAdapter` (``dinov2_dim``, ``mast3r_dim``; called ``(mast3r, dinov2)``):
  the Splatt3R document's adapter, 1x1 convolutions + GroupNorm on maps, the DINOv2 map resized to
  the MASt3R grid. ``FeatureFusionAdapter(dinov2_dim=..., mast3r_dim=...)`` builds this one: the
  document's keywords come with the document's argument order, so neither kind of caller can get
  the other's order by accident.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSION_MODES = ("concat", "add", "weighted_sum")
_MODE_ALIASES = {"addition": "add"}  # the Splatt3R document's YAML spelling


def _fusion_mode(mode) -> str:
    canonical = _MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if canonical not in FUSION_MODES:
        raise ValueError(f"unknown fusion_mode {mode!r}; use one of {list(FUSION_MODES)} ('addition' = 'add')")
    return canonical


def _positive_dims(**dims) -> None:
    for n, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{n} must be a positive int, got {v!r}")


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

    def __new__(cls, *args, **kwargs):
        if cls is FeatureFusionAdapter and {"dinov2_dim", "mast3r_dim"} & kwargs.keys():
            return DINOv2FeatureFusionAdapter(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, dino_dim: int, other_dim: int, output_dim: int, fusion_mode: str = "concat"):
        super().__init__()
        _positive_dims(dino_dim=dino_dim, other_dim=other_dim, output_dim=output_dim)
        fusion_mode = _fusion_mode(fusion_mode)
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


def _group_count(channels: int) -> int:
    # 32 groups, the usual GroupNorm choice, or the largest divisor of the channel count below it
    return math.gcd(32, channels)


class DINOv2FeatureFusionAdapter(nn.Module):
    """The Splatt3R document's adapter: DINOv2 features fused into MASt3R's feature map.

    Both streams get a 1x1 convolution to ``output_dim`` and a GroupNorm (gcd(32, output_dim)
    groups); then ``concat``: cat(MASt3R, DINOv2) -> 1x1 convolution (2 * output_dim -> output_dim);
    ``add`` (alias ``addition``): MASt3R + DINOv2; ``weighted_sum``: alpha * DINOv2 + (1 - alpha) *
    MASt3R with a learnable alpha that starts at 0.5 (the document's formula, unconstrained).

    Called ``adapter(mast3r_features, dinov2_features)`` with maps ``[B, C, H, W]``; the DINOv2 map
    is resized (bilinear) to the MASt3R grid and the result is ``[B, output_dim, H_mast3r,
    W_mast3r]``. Tokens ``[B, N, C]`` of one length for both work too (the result is tokens).
    ``output_dim=None`` keeps ``mast3r_dim``.
    """

    def __init__(self, dinov2_dim: int = 1024, mast3r_dim: int = 768, output_dim: Optional[int] = 768,
                 fusion_mode: str = "concat"):
        super().__init__()
        output_dim = mast3r_dim if output_dim is None else output_dim
        _positive_dims(dinov2_dim=dinov2_dim, mast3r_dim=mast3r_dim, output_dim=output_dim)
        self.fusion_mode = _fusion_mode(fusion_mode)
        self.dinov2_dim, self.mast3r_dim, self.output_dim = dinov2_dim, mast3r_dim, output_dim
        groups = _group_count(output_dim)
        self.dinov2_proj = nn.Conv2d(dinov2_dim, output_dim, kernel_size=1)
        self.mast3r_proj = nn.Conv2d(mast3r_dim, output_dim, kernel_size=1)
        self.dinov2_norm = nn.GroupNorm(groups, output_dim)
        self.mast3r_norm = nn.GroupNorm(groups, output_dim)
        self.fuse = nn.Conv2d(2 * output_dim, output_dim, kernel_size=1) if self.fusion_mode == "concat" else None
        self.alpha = nn.Parameter(torch.tensor(0.5)) if self.fusion_mode == "weighted_sum" else None

    @staticmethod
    def _check(x, dim: int, name: str, dim_name: str) -> None:
        if not isinstance(x, Tensor):
            hint = (" (forward_features returns a dict: take its 'x_norm_patchtokens' and make a map with "
                    "flashdino.integrations.patch_tokens_to_map)") if isinstance(x, dict) else ""
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}{hint}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be a map [B, C, H, W] or tokens [B, N, C], got shape {tuple(x.shape)}")
        channels = x.shape[1] if x.dim() == 4 else x.shape[-1]
        if channels != dim:
            layout = "[B, C, H, W]" if x.dim() == 4 else "[B, N, C]"
            raise ValueError(f"{name} has {channels} channels (shape {tuple(x.shape)}, {layout}) but the adapter "
                             f"was built with {dim_name}={dim}; the call order is "
                             "adapter(mast3r_features, dinov2_features)")

    def forward(self, mast3r_features: Tensor, dinov2_features: Tensor) -> Tensor:
        self._check(mast3r_features, self.mast3r_dim, "mast3r_features", "mast3r_dim")
        self._check(dinov2_features, self.dinov2_dim, "dinov2_features", "dinov2_dim")
        m, d = mast3r_features, dinov2_features
        if m.dim() != d.dim():
            raise ValueError(
                f"mast3r_features {tuple(m.shape)} and dinov2_features {tuple(d.shape)}: give both as maps "
                "[B, C, H, W] (tokens -> map: flashdino.integrations.patch_tokens_to_map(tokens, h, w))")
        tokens = m.dim() == 3
        if tokens:
            if m.shape[:2] != d.shape[:2]:
                raise ValueError(
                    f"mast3r_features {tuple(m.shape)} and dinov2_features {tuple(d.shape)} are tokens of different "
                    "lengths; pass maps [B, C, H, W] so that the DINOv2 map can be resized to the MASt3R grid")
            m, d = m.transpose(1, 2).unsqueeze(-1), d.transpose(1, 2).unsqueeze(-1)
        elif m.shape[0] != d.shape[0]:
            raise ValueError(f"batch sizes differ: mast3r_features {tuple(m.shape)}, dinov2_features {tuple(d.shape)}")
        if d.shape[-2:] != m.shape[-2:]:
            d = F.interpolate(d, size=m.shape[-2:], mode="bilinear", align_corners=False)
        m = self.mast3r_norm(self.mast3r_proj(m))
        d = self.dinov2_norm(self.dinov2_proj(d))
        if self.fusion_mode == "concat":
            y = self.fuse(torch.cat([m, d], dim=1))
        elif self.fusion_mode == "add":
            y = m + d
        else:
            y = self.alpha * d + (1 - self.alpha) * m
        return y.squeeze(-1).transpose(1, 2) if tokens else y

    def extra_repr(self) -> str:
        return (f"dinov2_dim={self.dinov2_dim}, mast3r_dim={self.mast3r_dim}, output_dim={self.output_dim}, "
                f"fusion_mode={self.fusion_mode!r}")


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


__all__ = ["FeatureFusionAdapter", "DINOv2FeatureFusionAdapter", "FUSION_MODES", "patch_tokens_to_map",
           "multiscale_feature_maps"]

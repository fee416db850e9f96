"""A backbone plus (optionally) VGGT's multi-frame aggregator behind one call.

    model = IntegratedModel("dinov3_vitb16", depth=2)                 # single frame
    out = model(images)              # images [B, 3, H, W] uint8 or [0, 1] floats
    out["cls_token"], out["patch_features"], out["feature_map"]

    model = IntegratedModel("dinov3_vits16", use_aggregator=True, depth=2,
                            aggregator_kwargs={"depth": 2})
    out = model(frames)              # frames [B, S, 3, H, W] in [0, 1]
    out["aggregated_tokens_list"], out["patch_start_idx"], out["features"]   # features: the last layer

``dinov3_model=`` is the Spatial-MLLM-style spelling of ``backbone=`` (give one of the two).

Images are taken raw (uint8, or floats in [0, 1]): the model normalises them itself, like VGGT
(single frames with the backbone's mean / std, frames through the aggregator with ImageNet's).
Pass ``normalize=False`` to feed already normalised single-frame batches.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..preprocess import Preprocessor
from .selection import Config, get_dinov3_model, load_pretrained_weights


def _aggregator_class():
    import flashdino

    cls = getattr(flashdino, "Aggregator", None)
    if cls is None:
        try:
            from ..models.aggregator import Aggregator as cls  # noqa: N813
        except ImportError:
            cls = None
    if cls is None:
        raise NotImplementedError("use_aggregator=True needs flashdino.Aggregator, which this build does not have")
    return cls


class IntegratedModel(nn.Module):
    """Backbone features for single frames; VGGT aggregator features for frame sequences.

    backbone (or dinov3_model): variant name or alias. weights: checkpoint / HF folder / hub id for
    the backbone (None: random initialisation, with a warning). use_aggregator: also build a
    :class:`flashdino.Aggregator` whose patch embedding is this backbone (its dims become the
    aggregator's); its last layer is returned as ``features`` too. aa_order: the
    aggregator's frame / global order. aggregator_kwargs: other Aggregator arguments (``depth``,
    ``intermediate_layer_idx``, ...). preprocessing: :class:`flashdino.preprocess.Preprocessor`
    arguments for single frames (default: keep the size, crop to a patch multiple). overrides:
    backbone architecture overrides (``depth=2``).
    """

    def __init__(self, backbone: Optional[str] = None, use_aggregator: bool = False,
                 aa_order: Sequence[str] = ("frame", "global"), weights: Any = None, *,
                 dinov3_model: Optional[str] = None,
                 aggregator_kwargs: Optional[dict] = None, aggregator_weights: Any = None,
                 preprocessing: Optional[dict] = None, normalize: bool = True, prefer_plus: bool = False,
                 satellite: bool = False, pretrained: bool = False, **overrides):
        super().__init__()
        if backbone is not None and dinov3_model is not None and backbone != dinov3_model:
            raise ValueError(f"backbone={backbone!r} and dinov3_model={dinov3_model!r} name the same thing; "
                             "pass only one of them")
        backbone = backbone or dinov3_model or "dinov3_vitb16"
        self.use_aggregator = bool(use_aggregator)
        self.normalize = normalize
        model = get_dinov3_model(Config(model_name=backbone, weights=weights, prefer_plus=prefer_plus,
                                        satellite=satellite, pretrained=pretrained, overrides=overrides))
        self.backbone_name = model.cfg.name
        self.aggregator = None
        if self.use_aggregator:
            Aggregator = _aggregator_class()
            kwargs = dict(aggregator_kwargs or {})
            for key in ("patch_embed", "aa_order", "patch_embed_kwargs"):
                if key in kwargs:
                    raise ValueError(f"aggregator_kwargs[{key!r}] is set by IntegratedModel; use its own argument")
            cfg = model.cfg
            kwargs.setdefault("embed_dim", cfg.embed_dim)
            kwargs.setdefault("num_heads", cfg.num_heads)
            kwargs.setdefault("num_register_tokens", 4)
            if cfg.family == "dinov2":
                kwargs.setdefault("patch_size", cfg.patch_size)
                kwargs.setdefault("img_size", cfg.img_size)
            else:
                kwargs.setdefault("patch_size", cfg.patch_size)
            if kwargs["embed_dim"] != cfg.embed_dim:
                raise ValueError(
                    f"aggregator embed_dim={kwargs['embed_dim']} does not match the {cfg.name} backbone's "
                    f"embed_dim={cfg.embed_dim}")
            self.aggregator = Aggregator(patch_embed=self.backbone_name, aa_order=list(aa_order),
                                         patch_embed_kwargs=overrides or None, **kwargs)
            # the aggregator owns the backbone: give it the weights just loaded
            missing, unexpected = self.aggregator.patch_embed.load_state_dict(model.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.endswith("bias_mask")]:
                raise RuntimeError(f"backbone weights do not fit the aggregator's patch embedding: "
                                   f"missing {missing}, unexpected {unexpected}")
            model = self.aggregator.patch_embed
            if aggregator_weights is not None:
                if hasattr(self.aggregator, "load_vggt_state_dict"):
                    from ..loading.files import read_state_dict

                    sd = aggregator_weights if isinstance(aggregator_weights, dict) else read_state_dict(aggregator_weights)
                    self.aggregator.load_vggt_state_dict(sd)
                else:  # pragma: no cover
                    load_pretrained_weights(self.aggregator, aggregator_weights)
        elif aggregator_weights is not None:
            raise ValueError("aggregator_weights given but use_aggregator=False")
        self.backbone = model
        pre = {"size": None}
        pre.update(preprocessing or {})
        self.preprocessor = Preprocessor.from_variant(model.cfg, **pre)
        self.patch_size = model.patch_size
        self.embed_dim = model.embed_dim

    def _device_dtype(self):
        p = self.backbone.patch_embed.proj.weight
        return p.device, p.dtype

    def prepare(self, images) -> Tensor:
        """Raw single-frame images -> the normalised [B, 3, H, W] batch the backbone sees."""
        device, dtype = self._device_dtype()
        if not self.normalize:
            x = images if isinstance(images, Tensor) else torch.as_tensor(images)
            return x.to(device=device, dtype=dtype)
        return self.preprocessor(images, device=device, dtype=dtype)

    def forward_single(self, images) -> dict:
        x = self.prepare(images)
        out = self.backbone.forward_features(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = out["x_norm_patchtokens"]
        B, _, D = patches.shape
        return {
            "cls_token": out["x_norm_clstoken"],
            "patch_features": patches,
            "feature_map": patches.transpose(1, 2).reshape(B, D, h, w),
            "register_tokens": out[self.backbone.extra_tokens_key],
            "grid": (h, w),
        }

    def forward_frames(self, frames: Tensor, intermediate_layer_idx=None) -> dict:
        if self.aggregator is None:
            raise ValueError(
                f"got frames of shape {tuple(frames.shape)} but this IntegratedModel has no aggregator; "
                "build it with use_aggregator=True, or pass single images [B, 3, H, W]")
        device, dtype = self._device_dtype()
        if frames.dim() != 5:
            raise ValueError(f"expected frames [B, S, 3, H, W], got shape {tuple(frames.shape)}")
        x = frames.to(device)
        x = x.float() / 255.0 if not x.is_floating_point() else x
        P = self.aggregator.patch_size
        H, W = x.shape[-2:]
        if H % P or W % P:  # crop to a patch multiple like the single-frame path
            from ..preprocess import center_crop

            x = center_crop(x, H // P * P, W // P * P)
        args = () if intermediate_layer_idx is None else (intermediate_layer_idx,)
        tokens_list, patch_start_idx = self.aggregator(x.to(dtype), *args)
        last = next(t for t in reversed(tokens_list) if t is not None)
        return {
            "aggregated_tokens_list": tokens_list,
            "features": last,
            "patch_start_idx": patch_start_idx,
            "camera_tokens": last[:, :, 0],
            "patch_features": last[:, :, patch_start_idx:],
            "grid": (x.shape[-2] // P, x.shape[-1] // P),
        }

    def forward(self, images, **kwargs) -> dict:
        if isinstance(images, Tensor) and images.dim() == 5:
            return self.forward_frames(images, **kwargs)
        return self.forward_single(images)


__all__ = ["IntegratedModel"]

"""VGGT's multi-frame aggregator: a DINO patch embedding, then alternating frame / global attention.

A drop-in for ``vggt.models.aggregator.Aggregator`` (VGGT, Wang et al. 2025): the same
constructor arguments and defaults, the same parameter names (VGGT checkpoints load directly,
see :mod:`flashdino.loading.vggt`) and the same forward contract::

    output_list, patch_start_idx = aggregator(images)   # images [B, S, 3, H, W] in [0, 1]

``output_list[i]`` is ``cat(frame block i output, global block i output)`` on the channel dim,
``[B, S, 5 + H/14 * W/14, 2 * embed_dim]``; with ``intermediate_layer_idx`` only the listed layers
are materialised (``None`` elsewhere), which is where most of VGGT's activation memory goes.

Differences from the reference are additions only: DINOv3 patch embeddings
(``patch_embed="dinov3_vitl16"``), chunked patch embedding over frames
(``patch_embed_chunk_size``), 4-D input as a single frame, input checks with clear messages, and
a stop after the last requested layer (later blocks cannot change the returned tensors).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block, PatchEmbed, run_blocks
from ..ops import RopeGrid
from ..variants import VARIANTS, get_config, resolve_name
from .vision_transformer import DinoVisionTransformer, build_model

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# VGGT's own backbone names -> flashdino variant + what VGGT's builder changes in it. VGGT builds
# every DINOv2 backbone with antialiased position interpolation, no offset and LayerScale 1.0;
# its "vitg2" is the plain-MLP giant (hidden 6144), not the hub's fused-SwiGLU dinov2_vitg14.
_VGGT_BACKBONES = {
    "dinov2_vitl14_reg": ("dinov2_vitl14_reg", {}),
    "dinov2_vitb14_reg": ("dinov2_vitb14_reg", {}),
    "dinov2_vits14_reg": ("dinov2_vits14_reg", {}),
    "dinov2_vitg2_reg": ("dinov2_vitg14_reg", {"ffn": "mlp", "ffn_ratio": 4.0}),
}

_UNSET = object()


class VggtRope2D(nn.Module):
    """Holds VGGT's RoPE frequency and one :class:`RopeGrid` per patch-grid size (no parameters).

    The grid gives every patch the integer position (row + 1, col + 1) and the ``n_prefix``
    special tokens (camera + registers) position (0, 0), i.e. no rotation. Global attention reuses
    the same grid: its sequence holds S frames of ``tokens_per_frame`` tokens each.
    """

    def __init__(self, frequency: float = 100.0, n_prefix: int = 5):
        super().__init__()
        self.frequency = float(frequency)
        self.n_prefix = n_prefix
        self._grids: dict = {}

    def grid(self, height: int, width: int) -> RopeGrid:
        key = (height, width)
        grid = self._grids.get(key)
        if grid is None:
            if len(self._grids) >= 8:
                self._grids.clear()
            grid = self._grids[key] = RopeGrid("vggt", height, width, self.n_prefix, base=self.frequency)
        return grid

    def extra_repr(self) -> str:
        return f"frequency={self.frequency}, n_prefix={self.n_prefix}"


# "dinov3_vitl14_reg": the DINOv3 architecture of that size with a 14-pixel patch (no such release).
_DINOV3_PATCH14 = re.compile(r"dinov3_(vit(?:7b|[a-z]))14(plus)?(_reg)?")


def _resolve_patch_embed(name: str) -> tuple[str, Optional[int]]:
    """A non-VGGT patch_embed name -> (flashdino variant, patch size the name asks for or None)."""
    try:
        return resolve_name(name), None
    except ValueError as exc:
        error = exc
    m = _DINOV3_PATCH14.fullmatch(name.strip().lower())
    if m is not None:
        try:
            return resolve_name(f"dinov3_{m.group(1)}16{m.group(2) or ''}"), 14
        except ValueError:
            pass
    raise ValueError(
        f"unknown patch_embed {name!r}: use 'conv', one of VGGT's {sorted(_VGGT_BACKBONES)} "
        f"or a flashdino DINOv2/DINOv3 variant ({error})") from None


def _expand_special(token: Tensor, B: int, S: int) -> Tensor:
    """[1, 2, n, C] -> [B*S, n, C]: slot 0 for frame 0, slot 1 for frames 1..S-1."""
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    rest = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """VGGT's aggregator. Arguments and defaults follow ``vggt.models.aggregator.Aggregator``.

    flashdino-only keyword arguments:

    * ``intermediate_layer_idx``: layers to return (others are ``None`` in the output list);
      ``None`` keeps all ``depth`` layers like the first VGGT release. VGGT's heads read
      ``[4, 11, 17, 23]``. Can also be given per call to :meth:`forward`.
    * ``patch_embed_kwargs``: configuration overrides for the patch-embedding ViT
      (e.g. ``{"depth": 1}`` for tests, or ``{"drop_path_rate": 0.1}``).
    * ``patch_embed_chunk_size``: run the patch-embedding ViT on at most this many frames at a
      time (bounds its activation memory for long sequences); ``None`` runs all frames at once.
    * ``gradient_checkpointing`` (alias ``use_checkpoint``): in training mode, each frame / global
      block runs under ``torch.utils.checkpoint`` (non-reentrant), as the reference does.
    * ``n_storage_tokens``: DINOv3's name for ``num_register_tokens`` (give one of the two).

    ``patch_embed`` names an architecture, never released weights (VGGT's patch embedding is
    trained with the aggregator and comes from its checkpoint), so DINOv3 names may also carry
    ``_reg`` (DINOv3 always has 4 storage tokens) or a 14-pixel patch: ``"dinov3_vitl14_reg"`` is
    the ViT-L/16 architecture with ``patch_size=14``.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        block_fn=None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        patch_embed: str = "dinov2_vitl14_reg",
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100,
        init_values: Optional[float] = 0.01,
        intermediate_layer_idx: Optional[Sequence[int]] = None,
        *,
        patch_embed_kwargs: Optional[dict] = None,
        patch_embed_chunk_size: Optional[int] = None,
        gradient_checkpointing: bool = True,
        use_reentrant: bool = False,
        n_storage_tokens: Optional[int] = None,
    ):
        super().__init__()
        del block_fn  # accepted for signature compatibility; flashdino's Block is always used
        if n_storage_tokens is not None:
            # DINOv3's word for the same tokens; a different explicit num_register_tokens is a conflict
            # (4, the default, cannot be told apart from "not given").
            if num_register_tokens not in (4, n_storage_tokens):
                raise ValueError(
                    f"n_storage_tokens={n_storage_tokens} and num_register_tokens={num_register_tokens} name the "
                    "same tokens; pass only one of them")
            num_register_tokens = n_storage_tokens
        aa_order = list(aa_order)
        if sorted(aa_order) != ["frame", "global"]:
            raise ValueError(f"aa_order must hold 'frame' and 'global' once each, got {aa_order}")
        if aa_block_size < 1 or depth % aa_block_size:
            raise ValueError(f"depth ({depth}) must be a positive multiple of aa_block_size ({aa_block_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if rope_freq > 0 and (embed_dim // num_heads) % 4:
            raise ValueError(f"VGGT RoPE needs a head dim divisible by 4, got {embed_dim // num_heads}")

        self.img_size = img_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.aa_order = aa_order
        self.aa_block_size = aa_block_size
        self.aa_block_num = depth // aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        self.patch_embed_name = patch_embed
        self.patch_embed_chunk_size = patch_embed_chunk_size
        self.gradient_checkpointing = gradient_checkpointing
        self.use_reentrant = use_reentrant
        self.intermediate_layer_idx = self._normalise_layers(intermediate_layer_idx)

        self.patch_size = self._build_patch_embed(patch_embed, img_size, patch_size, num_register_tokens,
                                                  embed_dim, patch_embed_kwargs or {})

        self.rope = VggtRope2D(rope_freq, self.patch_start_idx) if rope_freq > 0 else None
        hidden = int(embed_dim * mlp_ratio)

        def make_block():
            return Block(embed_dim, num_heads, "mlp", hidden, qkv_bias, proj_bias, ffn_bias, eps=1e-5,
                         layerscale_init=init_values, qk_norm=qk_norm)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(depth))

        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.register_buffer("_resnet_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        self._warned_range = False

    # -- construction ---------------------------------------------------------------------------------
    def _build_patch_embed(self, name: str, img_size: int, patch_size: int, num_register_tokens: int,
                           embed_dim: int, overrides: dict) -> int:
        """Creates ``self.patch_embed``; returns the patch size the aggregator works with."""
        if "conv" in name:
            if overrides:
                raise ValueError(f"patch_embed_kwargs {sorted(overrides)} do not apply to a 'conv' patch embedding")
            self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
            return patch_size
        if name in _VGGT_BACKBONES:
            variant, changes = _VGGT_BACKBONES[name]
            cfg = get_config(variant).replace(
                img_size=img_size, patch_size=patch_size, n_storage_tokens=num_register_tokens,
                interpolate_antialias=True, interpolate_offset=0.0, layerscale_init=1.0, **changes)
        else:
            variant, named_patch = _resolve_patch_embed(name)
            cfg = VARIANTS[variant]
            if cfg.family == "dinov3":
                native = named_patch or cfg.patch_size
                if patch_size not in (14, native):  # 14 is the (DINOv2) default: take the variant's own
                    raise ValueError(f"patch_embed {name!r} has patch size {native}, got patch_size={patch_size}")
                patch_size = native
                cfg = cfg.replace(layer_norm_eps=1e-5, patch_size=native)
            else:
                cfg = cfg.replace(img_size=img_size, patch_size=patch_size)
        if overrides:
            cfg = cfg.replace(**overrides)
        cfg = cfg.validate()
        if cfg.embed_dim != embed_dim:
            raise ValueError(
                f"patch_embed {name!r} produces {cfg.embed_dim}-dim tokens but embed_dim={embed_dim}; pick a "
                f"matching backbone or override it with patch_embed_kwargs={{'embed_dim': {embed_dim}, ...}}")
        self.patch_embed = build_model(cfg).init_weights()
        self.patch_embed.mask_token.requires_grad_(False)  # as VGGT: masks are never used
        return cfg.patch_size

    # -- attributes ------------------------------------------------------------------------------------
    @property
    def use_checkpoint(self) -> bool:
        return self.gradient_checkpointing

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        self.gradient_checkpointing = bool(value)

    def _normalise_layers(self, layers) -> Optional[list[int]]:
        if layers is None:
            return None
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for i in layers:
            j = int(i) + self.depth if int(i) < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ValueError(f"intermediate_layer_idx {i} is outside [0, {self.depth - 1}] (depth {self.depth})")
            out.append(j)
        if not out:
            raise ValueError("intermediate_layer_idx is empty; pass None to keep every layer")
        return sorted(set(out))

    # -- forward -------------------------------------------------------------------------------------
    def _check_images(self, images) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"Aggregator: expected an image tensor [B, S, 3, H, W], got {type(images).__name__}")
        if images.dim() == 4:
            images = images.unsqueeze(1)
        elif images.dim() != 5:
            raise ValueError(
                f"Aggregator: expected images [B, S, 3, H, W] (or [B, 3, H, W] for one frame), got shape "
                f"{tuple(images.shape)}")
        if images.shape[2] != 3:
            hint = " (channels-last? use images.permute(0, 1, 4, 2, 3))" if images.shape[-1] == 3 else ""
            raise ValueError(
                f"Aggregator: expected 3 channels, got {images.shape[2]} (shape {tuple(images.shape)}){hint}")
        if not images.is_floating_point():
            raise TypeError(f"Aggregator: got {images.dtype} pixels; pass floats in [0, 1] (e.g. images.float() / 255)")
        H, W = images.shape[-2:]
        P = self.patch_size
        if H % P or W % P or H < P or W < P:
            raise ValueError(
                f"Aggregator: image size {H}x{W} is not a positive multiple of the patch size {P}; resize or crop "
                f"to e.g. {max(H // P, 1) * P}x{max(W // P, 1) * P} (VGGT's preprocessing uses width 518)")
        if images.shape[0] == 0 or images.shape[1] == 0:
            raise ValueError(f"Aggregator: empty batch {tuple(images.shape)}")
        device = self.camera_token.device
        if images.device != device:
            raise ValueError(f"Aggregator: images on {images.device} but the model on {device}; move one with .to()")
        if not self._warned_range and not torch.compiler.is_compiling():
            lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one device sync
            if lo < -1e-3 or hi > 1 + 1e-3:
                self._warned_range = True
                warnings.warn(
                    f"Aggregator: input values span [{lo:.3g}, {hi:.3g}]; VGGT expects images in "
                    "[0, 1] and normalises them itself. The input looks ImageNet-normalised (or 0-255): pass the "
                    "raw [0, 1] images instead.", stacklevel=3)
        return images

    def _embed_frames(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] normalised images -> patch tokens [N, H/P * W/P, C]."""
        chunk = self.patch_embed_chunk_size
        if chunk is not None and chunk > 0 and x.shape[0] > chunk:
            return torch.cat([self._embed_frames_once(part) for part in x.split(chunk)], dim=0)
        return self._embed_frames_once(x)

    def _embed_frames_once(self, x: Tensor) -> Tensor:
        if isinstance(self.patch_embed, DinoVisionTransformer):
            return self.patch_embed.forward_features(x)["x_norm_patchtokens"]
        return self.patch_embed(x)

    def _block(self, block: nn.Module, tokens: Tensor, rope: Optional[RopeGrid]) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, tokens, rope, use_reentrant=self.use_reentrant)
        return block(tokens, rope)

    def forward(self, images: Tensor, intermediate_layer_idx=_UNSET) -> tuple[list[Optional[Tensor]], int]:
        """images [B, S, 3, H, W] (or [B, 3, H, W]) in [0, 1] -> (output_list, patch_start_idx).

        ``intermediate_layer_idx`` overrides the constructor's choice for this call
        (``None`` = every layer; negative indices count from the end).
        """
        images = self._check_images(images)
        keep = (self.intermediate_layer_idx if intermediate_layer_idx is _UNSET
                else self._normalise_layers(intermediate_layer_idx))
        B, S, _, H, W = images.shape
        P = self.patch_size

        weight_dtype = self.camera_token.dtype
        x = (images.float() - self._resnet_mean.float()) / self._resnet_std.float()
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)
        patch_tokens = self._embed_frames(x.reshape(B * S, 3, H, W))
        del x

        camera = _expand_special(self.camera_token, B, S)
        register = _expand_special(self.register_token, B, S)
        # cat promotes like the reference: under autocast the residual stream is fp32.
        tokens = torch.cat([camera, register, patch_tokens], dim=1)
        del patch_tokens, camera, register
        _, N, C = tokens.shape
        rope = self.rope.grid(H // P, W // P) if self.rope is not None else None

        output_list: list[Optional[Tensor]] = [None] * self.depth
        last = self.depth - 1 if keep is None else keep[-1]
        keep_set = None if keep is None else set(keep)
        size = self.aa_block_size
        # Every block to run, in order: per group of aa_block_size layers, the frame blocks on
        # [B*S, N, C] and the global blocks on [B, S*N, C] (in aa_order).
        steps, shapes, layers = [], [], []
        for start in range(0, last + 1, size):
            for kind in self.aa_order:
                blocks = self.frame_blocks if kind == "frame" else self.global_blocks
                shape = (B * S, N, C) if kind == "frame" else (B, S * N, C)
                for i in range(start, start + size):
                    steps.append(blocks[i])
                    shapes.append(shape)
                    layers.append((kind, i))
        saved: dict = {}

        def keep_output(step: int, out: Tensor) -> None:
            kind, i = layers[step]
            if keep_set is not None and i not in keep_set:
                return
            saved[(kind, i)] = out
            if ("frame", i) in saved and ("global", i) in saved:  # layer i complete: its output now
                frame_out = saved.pop(("frame", i)).reshape(B, S, N, C)
                global_out = saved.pop(("global", i)).reshape(B, S, N, C)
                output_list[i] = torch.cat([frame_out, global_out], dim=-1)

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # One checkpoint per block saves one tensor (its input); fusing a block's last add into
            # the next block's norm1 across checkpoints would save two (the stream and the branch).
            for step, (block, shape) in enumerate(zip(steps, shapes)):
                tokens = self._block(block, tokens.reshape(shape), rope)
                keep_output(step, tokens)
        else:  # each block boundary is one fused residual + LayerScale + norm1 call
            run_blocks(steps, tokens, rope, shapes=shapes, each=keep_output)
        return output_list, self.patch_start_idx

    # -- checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_vggt_checkpoint(cls, checkpoint_or_state_dict: Union[str, os.PathLike, dict], *,
                             strict: bool = True, device=None, dtype=None, **ctor_kwargs) -> "Aggregator":
        """Builds an aggregator that fits a VGGT checkpoint (a VGGT-1B ``model.pt``, a safetensors
        file, or a state dict, with or without the ``aggregator.`` prefix) and loads it.

        The architecture is read from the checkpoint (embed dim, depth, heads, backbone, ...);
        ``ctor_kwargs`` override it (``aa_order`` and ``aa_block_size`` cannot be read from
        weights). Keys of VGGT's heads are ignored.
        """
        from ..loading.vggt import infer_aggregator_kwargs, load_vggt_state_dict, read_vggt_checkpoint

        state_dict = read_vggt_checkpoint(checkpoint_or_state_dict)
        kwargs = infer_aggregator_kwargs(state_dict)
        kwargs.update(ctor_kwargs)
        model = cls(**kwargs)
        load_vggt_state_dict(model, state_dict, strict=strict)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model

    def load_vggt_state_dict(self, state_dict: dict, strict: bool = True):
        from ..loading.vggt import load_vggt_state_dict

        return load_vggt_state_dict(self, state_dict, strict=strict)


__all__ = ["Aggregator", "VggtRope2D"]

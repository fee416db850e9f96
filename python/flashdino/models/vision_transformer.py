"""DINOv2 and DINOv3 Vision Transformers with the official API.

Both families share the block stack, the output dictionaries and ``get_intermediate_layers``; they
differ only in how tokens are prepared (learned position table vs 2D RoPE) and in the names of
their extra tokens. Parameter names equal the official checkpoint keys, so official state dicts
load without renaming (the DINOv3 ``bias_mask`` is folded into the qkv bias by the loader).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Block, LayerNorm, PatchEmbed, RopePositionEmbedding, run_blocks
from ..variants import VitConfig


class DinoVisionTransformer(nn.Module):
    """Shared trunk. Subclasses implement :meth:`prepare_tokens_with_masks`."""

    extra_tokens_key = "x_storage_tokens"

    def __init__(self, cfg: VitConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.embed_dim = self.num_features = D
        self.n_blocks = cfg.depth
        self.num_heads = cfg.num_heads
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        drop = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.ffn, cfg.ffn_hidden, cfg.qkv_bias, cfg.proj_bias, cfg.ffn_bias,
                  cfg.layer_norm_eps, cfg.layerscale_init, drop[i])
            for i in range(cfg.depth)
        )
        self.norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.cls_norm = LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.untie_cls_and_patch_norms else None
        self.local_cls_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.local_cls_norm else None
        self.head = nn.Identity()

    # -- attributes downstream code reads --------------------------------------------------------
    @property
    def num_register_tokens(self) -> int:
        return self.n_storage_tokens

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_storage_tokens

    def init_weights(self, std: float = 0.02) -> "DinoVisionTransformer":
        """Random initialisation in the style of the reference (truncated normal, LayerScale init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()
        nn.init.normal_(self.cls_token, std=1e-6 if self.cfg.family == "dinov2" else 0.02)
        nn.init.zeros_(self.mask_token)
        return self

    # -- input checks -------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.cfg.name}: expected an image tensor [B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (add a batch dimension with x[None])" if x.dim() == 3 else ""
            raise ValueError(f"{self.cfg.name}: expected a 4-D image batch [B, C, H, W], got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != self.cfg.in_chans:
            hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if x.shape[-1] == self.cfg.in_chans else ""
            raise ValueError(
                f"{self.cfg.name}: expected {self.cfg.in_chans} input channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)}){hint}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{self.cfg.name}: got {x.dtype} pixels; convert to float and normalise first "
                "(e.g. x.float() / 255, then ImageNet mean/std), or use flashdino.preprocess"
            )
        P = self.patch_size
        if x.shape[-2] < P or x.shape[-1] < P:
            raise ValueError(f"{self.cfg.name}: image {x.shape[-2]}x{x.shape[-1]} is smaller than one {P}x{P} patch")
        weight = self.patch_embed.proj.weight
        if x.device != weight.device:
            raise ValueError(f"{self.cfg.name}: input on {x.device} but model on {weight.device}; move one with .to()")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.cfg.name}: input is {x.dtype} but the weights are {weight.dtype}; "
                f"cast the input (x.to({weight.dtype})) or run under torch.autocast"
            )

    def _check_masks(self, masks: Optional[Tensor], x: Tensor, n_patches: int) -> None:
        if masks is None:
            return
        if masks.dtype != torch.bool or masks.shape != (x.shape[0], n_patches):
            raise ValueError(
                f"{self.cfg.name}: masks must be a bool tensor [B, H*W] = [{x.shape[0]}, {n_patches}], "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )

    # -- the trunk ----------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None):
        """Returns (tokens [B, N, D], rope grid or None, (H, W))."""
        raise NotImplementedError

    def _embed_patches(self, x: Tensor, masks: Optional[Tensor], *, extra_tokens: Optional[Tensor] = None,
                       pos_embed: Optional[Tensor] = None, strict: bool = False):
        """Token buffer [B, N, D] = [CLS, extra tokens, patches] and the patch grid (H, W)."""
        H, W = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        self._check_masks(masks, x, H * W)
        tokens = self.patch_embed.tokens(x, self.cls_token, extra_tokens=extra_tokens, masks=masks,
                                         mask_token=self.mask_token, pos_embed=pos_embed, strict=strict)
        return tokens, H, W

    def _run_blocks(self, x: Tensor, rope, keep: Sequence[int] = (), until: Optional[int] = None):
        """Runs blocks 0..``until`` (every block by default) on tokens ``x``.

        Returns the last output and the outputs of the blocks listed in ``keep``, in that order.
        """
        last = len(self.blocks) - 1 if until is None else until
        kept = {}

        def keep_output(i: int, out: Tensor) -> None:
            if i in keep:
                kept[i] = out

        # Each block boundary is one fused residual + LayerScale + norm1 call (run_blocks).
        x = run_blocks(self.blocks[: last + 1], x, rope, each=keep_output)
        return x, [kept[i] for i in keep]

    def _final_norm(self, x: Tensor, patch_grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """Normalised (prefix tokens [B, p, D], patch tokens [B, HW, D]; [B, D, H, W] with ``patch_grid``);
        the untied ``cls_norm`` normalises the prefix tokens when the model has one."""
        return self.norm.split_norm(x, self.n_prefix_tokens, self.cls_norm, patch_grid)

    def _forward_features_single(self, x: Tensor, masks: Optional[Tensor]) -> dict:
        self._check_input(x)
        tokens, rope, _ = self.prepare_tokens_with_masks(x, masks)
        tokens, _ = self._run_blocks(tokens, rope)
        prefix, patches = self._final_norm(tokens)
        return {
            "x_norm_clstoken": prefix[:, 0],
            self.extra_tokens_key: prefix[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward_features(self, x: Union[Tensor, Sequence[Tensor]], masks=None):
        if isinstance(x, (list, tuple)):
            if masks is None:
                masks = [None] * len(x)
            if len(masks) != len(x):
                raise ValueError(f"{self.cfg.name}: got {len(x)} images but {len(masks)} masks")
            return [self._forward_features_single(xi, mi) for xi, mi in zip(x, masks)]
        return self._forward_features_single(x, masks)

    def forward(self, x, masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, list):
            return [self.head(o["x_norm_clstoken"]) for o in out]
        return self.head(out["x_norm_clstoken"])

    def _block_indices(self, n) -> list[int]:
        """The blocks ``get_intermediate_layers`` returns: the last ``n`` for an int, else the
        indices listed (negative ones count from the end, as in Python)."""
        total = len(self.blocks)
        name = self.cfg.name
        if isinstance(n, bool) or not isinstance(n, (int, Sequence)) or isinstance(n, str):
            raise TypeError(f"{name}: n must be a block count (int) or a list of block indices, got {n!r}")
        if isinstance(n, int):
            if not 1 <= n <= total:
                raise ValueError(f"{name}: n={n} must be between 1 and the number of blocks ({total})")
            return list(range(total - n, total))
        if len(n) == 0:
            raise ValueError(f"{name}: n=[] selects no block; pass a count (n=1 for the last block) or block indices")
        indices = []
        for i in n:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)
            except TypeError:
                raise ValueError(f"{name}: block indices must be integers, got {i!r} in n={list(n)!r}") from None
            if not -total <= i < total:
                raise ValueError(f"{name}: block indices must lie in [-{total}, {total - 1}] for {total} blocks, "
                                 f"got {i}")
            indices.append(i % total)
        return indices

    def get_intermediate_layers(self, x: Tensor, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True):
        """Outputs of the last ``n`` blocks (an int) or of the listed blocks (a list of indices).

        Each output is the patch tokens [B, H*W, D] (``reshape=True``: a [B, D, H, W] map), after
        the final norm unless ``norm=False``, paired with the class token / extra tokens on request.
        """
        wanted = self._block_indices(n)
        self._check_input(x)
        tokens, rope, _ = self.prepare_tokens_with_masks(x)
        _, outputs = self._run_blocks(tokens, rope, keep=wanted, until=max(wanted))
        p = self.n_prefix_tokens
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if norm:
            # Feature maps come straight out of the final-norm op in [B, D, H, W] (no extra copy).
            split = [self._final_norm(o, patch_grid=grid if reshape else None) for o in outputs]
        else:
            split = [(o[:, :p], o[:, p:]) for o in outputs]
            if reshape:
                split = [(pre, pat.reshape(pat.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous())
                         for pre, pat in split]
        class_tokens = [pre[:, 0] for pre, _ in split]
        extra_tokens = [pre[:, 1:] for pre, _ in split]
        patches = [pat for _, pat in split]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)


class DinoV3(DinoVisionTransformer):
    """DINOv3: [CLS, storage x R, patches], 2D RoPE on patch tokens, no absolute positions."""

    extra_tokens_key = "x_storage_tokens"

    def __init__(self, cfg: VitConfig):
        super().__init__(cfg)
        D = cfg.embed_dim
        self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, D)) if cfg.n_storage_tokens else None
        self.rope_embed = RopePositionEmbedding(cfg.head_dim, cfg.rope_base, cfg.rope_normalize_coords)

    def init_weights(self, std: float = 0.02):
        super().init_weights(std)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        return self

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None):
        if x.dtype == torch.float16 and not getattr(self, "_warned_fp16", False):
            self._warned_fp16 = True
            warnings.warn("DINOv3 activations overflow fp16 in released checkpoints; prefer bfloat16",
                          stacklevel=3)
        # [CLS, storage x R, patches]; dtypes promote like the reference torch.cat (fp32 under autocast).
        tokens, H, W = self._embed_patches(x, masks, extra_tokens=self.storage_tokens)
        return tokens, self.rope_embed.grid(H, W, self.n_prefix_tokens), (H, W)


class DinoV2(DinoVisionTransformer):
    """DINOv2: [CLS, registers x R, patches]; a learned position table (interpolated) on CLS + patches."""

    extra_tokens_key = "x_norm_regtokens"

    def __init__(self, cfg: VitConfig):
        super().__init__(cfg)
        D = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, D)) if cfg.n_storage_tokens else None
        self._pos_cache: dict = {}

    def init_weights(self, std: float = 0.02):
        super().init_weights(std)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        return self

    def interpolated_pos_embed(self, H: int, W: int, dtype: torch.dtype) -> Tensor:
        """Position table for an H x W patch grid: [1, 1 + H*W, D]. Cached for inference."""
        pos = self.pos_embed
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad) and not torch.compiler.is_compiling()
        key = (H, W, dtype, pos.device, pos._version, pos.data_ptr())
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        table = interpolate_pos_embed(pos, H, W, self.cfg.interpolate_offset, self.cfg.interpolate_antialias).to(dtype)
        if cacheable:
            self._pos_cache.clear()  # weights can change; keep only the latest size
            self._pos_cache[key] = table
        return table

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None):
        P = self.patch_size
        if x.shape[-2] % P or x.shape[-1] % P:
            raise ValueError(
                f"{self.cfg.name}: image {x.shape[-2]}x{x.shape[-1]} is not a multiple of the patch size {P} "
                f"(the DINOv2 reference raises here); resize or crop to e.g. "
                f"{x.shape[-2] // P * P}x{x.shape[-1] // P * P}"
            )
        # pos on [CLS, patches], then registers after CLS. The table is requested in the weights'
        # dtype; the op casts it to the token dtype exactly as the reference did.
        H, W = x.shape[-2] // P, x.shape[-1] // P
        pos = self.interpolated_pos_embed(H, W, self.pos_embed.dtype)
        tokens, H, W = self._embed_patches(x, masks, extra_tokens=self.register_tokens, pos_embed=pos, strict=True)
        return tokens, None, (H, W)


def interpolate_pos_embed(pos_embed: Tensor, H: int, W: int, offset: float, antialias: bool) -> Tensor:
    """The official DINOv2 bicubic resize of the patch part of the table (fp32)."""
    n_grid = pos_embed.shape[1] - 1
    M = int(math.sqrt(n_grid))
    if H * W == n_grid and H == W:
        return pos_embed
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    grid = patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((H + offset) / M, (W + offset) / M)}
    else:
        kwargs = {"size": (H, W)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if grid.shape[-2:] != (H, W):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(H, W)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, H * W, D)
    return torch.cat([cls_pos, patch_pos], dim=1).to(pos_embed.dtype)


def build_model(cfg: VitConfig) -> DinoVisionTransformer:
    return (DinoV3 if cfg.family == "dinov3" else DinoV2)(cfg)

"""A frozen DINOv3 (or DINOv2) teacher for distillation, from a Hugging Face model folder.

    teacher = DinoV3Teacher(DinoV3Config(root=Path("weights/dinov3-vitb16")), device="cuda")
    cls = teacher.extract_features(images)          # [B, D]
    fmap = teacher.extract_feature_map(images)      # [B, D, h, w]
    maps = teacher.extract_intermediate(images, layers=(3, 7, 11))

The folder holds config.json, model.safetensors and preprocessor_config.json (the layout of
``facebook/dinov3-*`` on the hub). Images may be uint8 (rescaled by 1/255) or floats in [0, 1], in
[B, 3, H, W] or [B, H, W, 3]; they are resized / normalised on the device as preprocessor_config.json
says, and a size that is not a multiple of the patch keeps its top-left part, so the result is
Hugging Face's ``DINOv3ViTImageProcessor`` + ``DINOv3ViTModel`` for that folder at any size (518
included). The model is in eval mode, its parameters do not require grad and every call runs under
``torch.no_grad`` (plain tensors out, usable in a loss that is backpropagated to a student).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..preprocess import Preprocessor
from .fusion import multiscale_feature_maps
from .selection import _dtype


@dataclass
class DinoV3Config:
    """Where the teacher's files are and how to run it.

    root: the HF-format model folder. image_size: override the preprocessor's size (an int, (h, w),
    or 0 to keep each input's size; a remainder below a whole patch is dropped at the bottom / right,
    as the model itself does). dtype: compute dtype
    (bfloat16 runs under autocast on CUDA). layers: default blocks of ``extract_intermediate``.
    """

    root: Union[str, os.PathLike]
    image_size: Optional[Union[int, Sequence[int]]] = None
    dtype: Optional[Union[str, torch.dtype]] = None
    layers: Optional[Sequence[int]] = None
    require_preprocessor: bool = True

    def __post_init__(self):
        self.root = Path(self.root).expanduser()

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def model_file(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def preprocessor_file(self) -> Path:
        return self.root / "preprocessor_config.json"

    def validate(self) -> "DinoV3Config":
        if not self.root.is_dir():
            raise FileNotFoundError(f"DINOv3 teacher folder not found: {self.root}")
        needed = [self.config_file, self.model_file] + ([self.preprocessor_file] if self.require_preprocessor else [])
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"DINOv3 teacher folder {self.root} is missing {', '.join(missing)}; expected a Hugging Face model "
                "folder (config.json, model.safetensors, preprocessor_config.json), e.g. a download of "
                "facebook/dinov3-vitb16-pretrain-lvd1689m or the output of `flashdino convert`"
            )
        return self


def _load_folder_model(root: Path):
    """The flashdino backbone stored in an HF folder (via the loaders of flashdino.loading)."""
    import flashdino
    from .. import loading

    if hasattr(flashdino, "from_pretrained"):
        return flashdino.from_pretrained(str(root))
    if hasattr(loading, "read_hf_folder"):  # pragma: no cover - depends on which loader pieces exist
        from ..models import build_model

        cfg, state_dict, _ = loading.read_hf_folder(root)
        model = build_model(cfg)
        loading.load_weights(model, state_dict)
        return model
    raise NotImplementedError("this flashdino build cannot read Hugging Face folders (flashdino.loading is incomplete)")


class DinoV3Teacher(nn.Module):
    """Frozen feature extractor; see the module docstring.

    A module, so that trainers can treat it like the rest of their model: ``.to()`` moves it,
    ``.parameters()`` lists the (frozen) backbone weights, ``.eval()`` / ``.train()`` set the flag.
    The backbone itself stays in eval mode whatever ``.train()`` says: a teacher is frozen by
    contract, and a trainer that calls ``model.train()`` on everything must not change it.
    """

    def __init__(self, config: Union[DinoV3Config, str, os.PathLike], device: Union[str, torch.device] = "cpu"):
        super().__init__()
        if not isinstance(config, DinoV3Config):
            config = DinoV3Config(root=config)
        self.cfg = self.config = config.validate()
        device = torch.device(device)
        model = _load_folder_model(config.root)
        self.model = model.to(device).eval().requires_grad_(False)
        self.compute_dtype = _dtype(config.dtype) or torch.float32
        if self.compute_dtype != torch.float32 and device.type != "cuda":
            self.model = self.model.to(self.compute_dtype)
        vcfg = model.cfg
        if config.preprocessor_file.is_file():
            # crops to a patch multiple at the top-left, as HF's model does with the remainder
            pre = Preprocessor.from_preprocessor_config(config.preprocessor_file, patch_size=vcfg.patch_size)
        else:
            pre = Preprocessor.from_variant(vcfg, patch_crop="top_left")
        if config.image_size is not None:
            pre = pre.with_size(None if config.image_size == 0 else config.image_size)
        self.preprocessor = pre
        self.patch_size = vcfg.patch_size
        self.num_register_tokens = vcfg.n_storage_tokens
        self.eval()

    # -- properties seed projects read ---------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.embed_dim

    embed_dim = hidden_size

    @property
    def n_blocks(self) -> int:
        return self.model.n_blocks

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    def train(self, mode: bool = True) -> "DinoV3Teacher":
        self.training = bool(mode)
        self.model.eval()
        return self

    # -- running ---------------------------------------------------------------------------------------
    def preprocess(self, images) -> Tensor:
        return self.preprocessor(images, device=self.device)

    def _autocasting(self) -> bool:
        return self.device.type == "cuda" and self.compute_dtype != torch.float32

    def _autocast(self):
        if self._autocasting():
            return torch.autocast("cuda", dtype=self.compute_dtype)
        import contextlib

        return contextlib.nullcontext()

    def _input(self, images) -> Tensor:
        x = self.preprocess(images)
        # without autocast the input must have the weights' dtype (also after teacher.to(torch.bfloat16))
        return x if self._autocasting() else x.to(self.model.cls_token.dtype)

    # no_grad, not inference_mode: the outputs are ordinary tensors that a distillation loss may save
    # for backward and that may be modified in place (the reference teacher runs under no_grad too).
    @torch.no_grad()
    def forward_features(self, images) -> dict:
        x = self._input(images)
        with self._autocast():
            out = self.model.forward_features(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        out = dict(out)
        out["grid"] = (h, w)
        return out

    forward = forward_features

    @torch.no_grad()
    def extract_features(self, images) -> Tensor:
        """CLS token after the final norm: [B, D] (float32)."""
        return self.forward_features(images)["x_norm_clstoken"].float()

    @torch.no_grad()
    def extract_patch_tokens(self, images) -> Tensor:
        """Normalised patch tokens [B, h*w, D] (float32)."""
        return self.forward_features(images)["x_norm_patchtokens"].float()

    @torch.no_grad()
    def extract_feature_map(self, images) -> Tensor:
        """Normalised patch tokens as a map [B, D, h, w] (float32)."""
        out = self.forward_features(images)
        (h, w), tokens = out["grid"], out["x_norm_patchtokens"]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w).float()

    @torch.no_grad()
    def extract_intermediate(self, images, layers: Optional[Sequence[int]] = None, norm: bool = True) -> list:
        """Maps [B, D, h, w] of the given blocks (0-based, negative from the end), in one forward."""
        if layers is None:
            layers = self.cfg.layers
        if layers is None:
            n = self.n_blocks
            layers = sorted({max(n // 4 - 1, 0), max(n // 2 - 1, 0), max(3 * n // 4 - 1, 0), n - 1})
        x = self._input(images)
        with self._autocast():
            maps = multiscale_feature_maps(self.model, x, layers=layers, norm=norm)
        return [m.float() for m in maps]


__all__ = ["DinoV3Config", "DinoV3Teacher"]

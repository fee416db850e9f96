"""Image preprocessing for DINOv2 / DINOv3 backbones, on the device and batched.

The pipeline follows the Hugging Face DINOv3 image processor (rescale -> resize -> centre crop ->
normalise): integer pixels are rescaled by ``rescale_factor`` (1/255), the batch is resized with
the configured resample filter (``bilinear`` / ``bicubic`` / ``nearest``, antialiased by default)
either to a fixed size or kept at its own size, optionally centre-cropped, cropped so that height
and width are multiples of the patch size (centred by default; a preprocessor_config.json keeps the
top-left, because the HF model behind it drops the bottom / right remainder), and normalised with
the mean / std the weights were trained with (ImageNet for the LVD weights, the SAT-493M statistics for the satellite weights).

Accepted inputs: a tensor ``[B, 3, H, W]``, ``[3, H, W]``, ``[H, W, 3]`` or ``[B, H, W, 3]`` (uint8
or float; floats are taken to be in [0, 1]), a numpy array in the same layouts, a PIL image, or a
list of those (all of one size after conversion, or resized to a fixed ``size``).

    pre = Preprocessor.from_variant("dinov3_vitb16", size=224)
    x = pre(images_uint8, device="cuda")          # [B, 3, 224, 224] float32, normalised
    pre = Preprocessor.from_preprocessor_config("model_dir/preprocessor_config.json")
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hugging Face / PIL resample codes (PILImageResampling) -> torch interpolate modes.
_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_SUPPORTED_MODES = ("nearest", "bilinear", "bicubic")
_PATCH_CROPS = ("center", "top_left")

SizeArg = Union[None, int, Sequence[int], Mapping[str, int]]


class PreprocessorConfigError(ValueError):
    """A preprocessor_config.json (or its dict) is missing, malformed or has an unusable value."""


def _resample_mode(value, origin: str = "resample") -> str:
    if isinstance(value, str):
        mode = value.strip().lower()
    elif isinstance(value, int) and not isinstance(value, bool):
        if value not in _RESAMPLE_CODES:
            raise PreprocessorConfigError(f"{origin}: unknown resample code {value}; expected one of {sorted(_RESAMPLE_CODES)}")
        mode = _RESAMPLE_CODES[value]
    else:
        raise PreprocessorConfigError(f"{origin}: resample must be a name or a PIL code, got {value!r}")
    if mode in ("lanczos", "box", "hamming"):
        warnings.warn(f"{origin}: resample {mode!r} is not available for tensors; using 'bicubic' instead", stacklevel=3)
        mode = "bicubic"
    if mode not in _SUPPORTED_MODES:
        raise PreprocessorConfigError(f"{origin}: unsupported resample {value!r}; use one of {list(_SUPPORTED_MODES)}")
    return mode


def _parse_size(size: SizeArg, origin: str = "size"):
    """-> None, ('fixed', (h, w)) or ('shortest_edge', n)."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise PreprocessorConfigError(f"{origin}: expected an int, [height, width] or a dict, got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise PreprocessorConfigError(f"{origin}: size must be positive, got {size}")
        return ("fixed", (size, size))
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            h, w = size["height"], size["width"]
            if not all(isinstance(v, int) and v > 0 for v in (h, w)):
                raise PreprocessorConfigError(f"{origin}: height/width must be positive ints, got {dict(size)}")
            return ("fixed", (int(h), int(w)))
        if "shortest_edge" in size:
            n = size["shortest_edge"]
            if not isinstance(n, int) or n <= 0:
                raise PreprocessorConfigError(f"{origin}: shortest_edge must be a positive int, got {n!r}")
            return ("shortest_edge", int(n))
        raise PreprocessorConfigError(
            f"{origin}: a size dict needs 'height' and 'width' or 'shortest_edge', got keys {sorted(size)}"
        )
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return ("fixed", (int(size[0]), int(size[1])))
    raise PreprocessorConfigError(f"{origin}: expected an int, [height, width] or a dict, got {size!r}")


def _triple(value, name: str, origin: str) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PreprocessorConfigError(f"{origin}: {name} must be 3 numbers, got {value!r}") from None
    if len(out) != 3:
        raise PreprocessorConfigError(f"{origin}: {name} must have 3 values (R, G, B), got {len(out)}: {value!r}")
    if name == "image_std" and any(v <= 0 for v in out):
        raise PreprocessorConfigError(f"{origin}: image_std values must be positive, got {value!r}")
    return out


@dataclass
class Preprocessor:
    """Rescale -> resize -> (centre crop) -> crop to a patch multiple -> normalise.

    size: None keeps each image's size; an int or (h, w) resizes to that size; a dict may also be
      ``{"shortest_edge": n}`` (aspect ratio kept). patch_size: when set, height and width are
      cropped down to multiples of it (needed by DINOv2; DINOv3 would drop the remainder).
    patch_crop: which part that crop keeps: "center", or "top_left", which is what the models
      themselves (and Hugging Face's) do with a remainder, so a pipeline that must reproduce
      HF's processor + model keeps the top-left.
    """

    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    size: SizeArg = 224
    resample: Union[str, int] = "bilinear"
    antialias: bool = True
    do_rescale: Union[bool, str] = "auto"  # "auto": integer inputs only
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True
    crop_size: SizeArg = None  # centre crop after the resize (DINOv2's 256 -> 224)
    patch_size: Optional[int] = None
    patch_crop: str = "center"
    origin: str = field(default="preprocessor", repr=False)

    def __post_init__(self):
        self.image_mean = _triple(self.image_mean, "image_mean", self.origin)
        self.image_std = _triple(self.image_std, "image_std", self.origin)
        self._size = _parse_size(self.size, f"{self.origin}: size")
        crop = _parse_size(self.crop_size, f"{self.origin}: crop_size")
        if crop is not None and crop[0] != "fixed":
            raise PreprocessorConfigError(f"{self.origin}: crop_size must be a fixed height/width, got {self.crop_size!r}")
        self._crop = crop[1] if crop else None
        self._mode = _resample_mode(self.resample, f"{self.origin}: resample")
        if self.do_rescale not in (True, False, "auto"):
            raise PreprocessorConfigError(f"{self.origin}: do_rescale must be true, false or 'auto', got {self.do_rescale!r}")
        if self.patch_size is not None and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise PreprocessorConfigError(f"{self.origin}: patch_size must be a positive int, got {self.patch_size!r}")
        if self.patch_crop not in _PATCH_CROPS:
            raise PreprocessorConfigError(
                f"{self.origin}: patch_crop must be one of {list(_PATCH_CROPS)}, got {self.patch_crop!r}")

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_preprocessor_config(cls, config: Union[str, os.PathLike, Mapping[str, Any]], *,
                                 patch_size: Optional[int] = None, origin: Optional[str] = None,
                                 **overrides) -> "Preprocessor":
        """From a Hugging Face preprocessor_config.json (a path, a model folder or the parsed dict).

        ``origin`` names the source in error messages (default: the path, or "preprocessor config").
        The crop to a multiple of ``patch_size`` keeps the top-left: HF's processor does not crop,
        its model drops the bottom / right remainder, and the output must be the same.
        """
        origin = origin or "preprocessor config"
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            origin = str(path) if origin == "preprocessor config" else origin
            config = read_preprocessor_config(path)
        if not isinstance(config, Mapping):
            raise PreprocessorConfigError(f"{origin}: expected a JSON object, got {type(config).__name__}")
        c = dict(config)
        kwargs: dict = {"origin": origin, "patch_size": patch_size, "patch_crop": "top_left"}
        kwargs["image_mean"] = c.get("image_mean", IMAGENET_MEAN) if c.get("do_normalize", True) else (0.0, 0.0, 0.0)
        kwargs["image_std"] = c.get("image_std", IMAGENET_STD) if c.get("do_normalize", True) else (1.0, 1.0, 1.0)
        kwargs["size"] = c.get("size", 224) if c.get("do_resize", True) else None
        kwargs["resample"] = c.get("resample", 2)
        kwargs["do_rescale"] = "auto" if c.get("do_rescale", True) else False
        factor = c.get("rescale_factor", 1.0 / 255.0)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise PreprocessorConfigError(f"{origin}: rescale_factor must be a positive number, got {factor!r}")
        kwargs["rescale_factor"] = float(factor)
        if c.get("do_center_crop", False):
            kwargs["crop_size"] = c.get("crop_size")
            if kwargs["crop_size"] is None:
                raise PreprocessorConfigError(f"{origin}: do_center_crop is true but crop_size is missing")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_variant(cls, variant, size: SizeArg = 224, **overrides) -> "Preprocessor":
        """From a variant name / alias or a VitConfig: its mean / std and patch size."""
        from .variants import VitConfig, get_config

        cfg = variant if isinstance(variant, VitConfig) else get_config(variant)
        kwargs = dict(image_mean=cfg.image_mean, image_std=cfg.image_std, size=size, patch_size=cfg.patch_size,
                      origin=cfg.name, resample="bilinear" if cfg.family == "dinov3" else "bicubic")
        kwargs.update(overrides)
        return cls(**kwargs)

    def with_size(self, size: SizeArg) -> "Preprocessor":
        return replace(self, size=size)

    # -- the pipeline --------------------------------------------------------------------------------
    def __call__(self, images, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.preprocess(images, device=device, dtype=dtype)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) that an input of height x width comes out as."""
        h, w = self._resized_hw(height, width)
        if self._crop is not None:
            h, w = min(h, self._crop[0]), min(w, self._crop[1])
        if self.patch_size:
            h, w = h // self.patch_size * self.patch_size, w // self.patch_size * self.patch_size
        return h, w

    @property
    def fixed_output_size(self) -> Optional[tuple[int, int]]:
        """(H, W) when every input comes out at that size (a fixed resize, or a crop that always
        applies), else None."""
        hw = self.output_size(10**4, 10**4)
        return hw if hw == self.output_size(37, 5000) else None

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self._size is None:
            return h, w
        kind, value = self._size
        if kind == "fixed":
            return value
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(value * long / short)
        return (value, new_long) if h <= w else (new_long, value)

    def preprocess(self, images, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        x = to_bchw(images, device=device)
        integer = not x.is_floating_point()
        x = x.to(torch.float32) if integer or x.dtype in (torch.float16, torch.bfloat16) else x
        if self.do_rescale is True or (self.do_rescale == "auto" and integer):
            x = x * self.rescale_factor
        H, W = x.shape[-2:]
        h, w = self._resized_hw(H, W)
        if (h, w) != (H, W):
            kwargs = {} if self._mode == "nearest" else {"align_corners": False, "antialias": self.antialias}
            x = F.interpolate(x, size=(h, w), mode=self._mode, **kwargs)
        if self._crop is not None:
            x = center_crop(x, min(h, self._crop[0]), min(w, self._crop[1]))
        if self.patch_size:
            P = self.patch_size
            if x.shape[-2] < P or x.shape[-1] < P:
                raise ValueError(
                    f"{self.origin}: image {x.shape[-2]}x{x.shape[-1]} is smaller than one {P}x{P} patch; "
                    "pass a larger size"
                )
            h, w = x.shape[-2] // P * P, x.shape[-1] // P * P
            x = center_crop(x, h, w) if self.patch_crop == "center" else x[..., :h, :w]
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x.to(dtype).contiguous()

    def resize_uint8(self, image: Tensor) -> Tensor:
        """The resize step alone on uint8 pixels (``[3, H, W]`` or ``[B, 3, H, W]``), kept in uint8.

        PyTorch's uint8 antialiased bilinear kernel runs ~6x the float path per core (the data-set
        decoders call this before ``preprocess``, which then has nothing left to resize). Its result
        is the float path's rounded to integers, within 1/255 of it, and equals torchvision's
        ``v2.Resize(antialias=True)`` on uint8 tensors, the official DINOv3 transform
        (tests/test_decode_fast.py). Bilinear only: the bicubic uint8 kernel clips between its two
        passes and differs by up to ~20/255 next to saturated edges. Anything else (float pixels,
        bicubic / nearest, no antialias, no resize) comes back unchanged, for ``preprocess``.
        """
        if (image.dtype != torch.uint8 or self._mode != "bilinear" or not self.antialias or image.dim() not in (3, 4)
                or image.shape[-3] != 3):
            return image
        H, W = image.shape[-2:]
        h, w = self._resized_hw(H, W)
        if (h, w) == (H, W):
            return image
        x = image if image.dim() == 4 else image[None]
        out = F.interpolate(x.contiguous(), size=(h, w), mode=self._mode, align_corners=False, antialias=True)
        return out if image.dim() == 4 else out[0]

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of the normalisation: [B, 3, H, W] back to [0, 1] pixels (for visualisation)."""
        if not self.do_normalize:
            return x
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x * std + mean


def read_preprocessor_config(path: Union[str, os.PathLike]) -> dict:
    """Parses a preprocessor_config.json with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise PreprocessorConfigError(f"preprocessor config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreprocessorConfigError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PreprocessorConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def center_crop(x: Tensor, h: int, w: int) -> Tensor:
    H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top: top + h, left: left + w]


def _pil_to_tensor(img) -> Tensor:
    from .extract.decode import pil_to_tensor

    return pil_to_tensor(img)


def to_bchw(images, device=None) -> Tensor:
    """A [B, 3, H, W] tensor (dtype kept) from tensors / arrays / PIL images in CHW or HWC layout."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (empty list)")
        parts = [to_bchw(im, device=device) for im in images]
        shapes = {tuple(p.shape[-2:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"images have different sizes {sorted(shapes)}; pass a fixed size to the preprocessor "
                "or preprocess them one at a time"
            )
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            parts = [p.float() / 255 if not p.is_floating_point() else p.float() for p in parts]
        return torch.cat(parts, dim=0)
    if not isinstance(images, Tensor):
        if hasattr(images, "convert") and hasattr(images, "size") and hasattr(images, "mode"):  # PIL
            images = _pil_to_tensor(images)
        else:
            try:
                import numpy as np
            except ImportError:  # pragma: no cover
                np = None
            if np is not None and isinstance(images, np.ndarray):
                images = torch.from_numpy(np.ascontiguousarray(images))
            else:
                raise TypeError(f"expected an image tensor, numpy array or PIL image, got {type(images).__name__}")
    x = images
    if device is not None:
        x = x.to(device)
    if x.dim() == 2:  # grayscale H x W
        x = x[None, None].expand(1, 3, *x.shape)
    elif x.dim() == 3:
        if x.shape[0] in (1, 3):
            x = x[None]
        elif x.shape[-1] in (1, 3):
            x = x.permute(2, 0, 1)[None]
        else:
            raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(x.shape)}; expected [3, H, W] or [H, W, 3]")
    elif x.dim() == 4:
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise ValueError(f"cannot tell the channel axis of a batch of shape {tuple(x.shape)}; expected [B, 3, H, W] or [B, H, W, 3]")
    else:
        raise ValueError(f"expected an image [3, H, W] / [H, W, 3] or a batch [B, 3, H, W] / [B, H, W, 3], got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.dtype == torch.bool:
        raise TypeError("boolean images are not supported; pass uint8 pixels or floats in [0, 1]")
    return x


def load_image(path: Union[str, os.PathLike]) -> Tensor:
    """Reads an image file as a [3, H, W] tensor through flashdino's decoder (EXIF orientation applied).

    uint8 for 8-bit images; float32 in [0, 1] for 16-bit / float images (the preprocessor takes
    both). Raises FileNotFoundError for a missing file and ValueError naming the file otherwise.
    """
    from .extract.decode import decode_image

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path)


def preprocess(images, *, variant: Optional[str] = None, config=None, size: SizeArg = 224, device=None,
               dtype: torch.dtype = torch.float32, **overrides) -> Tensor:
    """One-call preprocessing: from a preprocessor config (path / dict) or a variant's mean / std."""
    if config is not None:
        pre = Preprocessor.from_preprocessor_config(config, **overrides)
    else:
        pre = Preprocessor.from_variant(variant or "dinov3_vitb16", size=size, **overrides)
    return pre(images, device=device, dtype=dtype)


__all__ = ["Preprocessor", "PreprocessorConfigError", "preprocess", "read_preprocessor_config", "to_bchw",
           "load_image", "center_crop", "IMAGENET_MEAN", "IMAGENET_STD"]

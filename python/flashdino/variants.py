"""The one table of named DINOv2 / DINOv3 backbone configurations.

Every entry point, loader, alias and test reads its architecture from here. Numbers follow the
official hub definitions of DINOv3 and DINOv2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

Family = Literal["dinov2", "dinov3"]
FfnKind = Literal["mlp", "swiglu", "swiglu_fused"]


@dataclass(frozen=True)
class VitConfig:
    """Architecture of one backbone. Fields may be overridden per instance (e.g. ``depth=2``)."""

    name: str
    family: Family
    embed_dim: int
    depth: int
    num_heads: int
    ffn: FfnKind = "mlp"
    ffn_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_size: int = 16
    n_storage_tokens: int = 0
    layer_norm_eps: float = 1e-5
    layerscale_init: float = 1e-5
    drop_path_rate: float = 0.0
    in_chans: int = 3
    # DINOv3: 2D RoPE. DINOv2: learned absolute position table of img_size // patch_size squared.
    rope_base: float = 100.0
    rope_normalize_coords: Literal["separate", "min", "max"] = "separate"
    img_size: int = 224
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False
    untie_cls_and_patch_norms: bool = False
    local_cls_norm: bool = False
    # SwiGLU hidden sizes are rounded up to this multiple (64 for the 7B model).
    swiglu_align: int = 8
    # Which normalisation the released weights were trained with (used by preprocessing).
    image_mean: tuple = (0.485, 0.456, 0.406)
    image_std: tuple = (0.229, 0.224, 0.225)
    weights: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_storage_tokens

    @property
    def uses_rope(self) -> bool:
        return self.family == "dinov3"

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        gated = int(hidden * 2 / 3)
        return -(-gated // self.swiglu_align) * self.swiglu_align

    def replace(self, **overrides) -> "VitConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"{self.name}: unknown configuration field(s) {unknown}; valid fields: {sorted(known)}"
            )
        # lists (from YAML / JSON) become tuples: configs are frozen and hashable
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})

    def validate(self) -> "VitConfig":
        """Checks every field's type and range (configs come from users and downloaded files)."""
        for f in dataclasses.fields(self):
            check_field(self.name, f.name, getattr(self, f.name))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                             "set embed_dim to a multiple of num_heads (or change num_heads)")
        if self.uses_rope and self.head_dim % 4:
            raise ValueError(f"{self.name}: 2D RoPE needs a head dim (embed_dim / num_heads) divisible by 4, got "
                             f"{self.head_dim}; change embed_dim or num_heads")
        if self.ffn_hidden < 1:
            raise ValueError(f"{self.name}: ffn_ratio {self.ffn_ratio} gives an MLP of {self.ffn_hidden} hidden units "
                             f"at embed_dim {self.embed_dim}; raise ffn_ratio (released models use 3 to 6)")
        if self.family == "dinov2" and self.img_size < self.patch_size:
            raise ValueError(f"{self.name}: img_size {self.img_size} is smaller than patch_size {self.patch_size}, "
                             f"so the DINOv2 position table would be empty; set img_size >= {self.patch_size}")
        if len(self.image_mean) != self.in_chans or len(self.image_std) != self.in_chans:
            raise ValueError(f"{self.name}: image_mean / image_std need {self.in_chans} values (in_chans)")
        return self

    def architecture_differences(self, other: "VitConfig") -> list:
        """(field, self's value, other's value) for every field that changes the computed function."""
        out = []
        for name in ARCHITECTURE_FIELDS:
            if name == "img_size" and self.family == other.family == "dinov3":
                continue  # no position table: the size is only a preprocessing default
            a, b = getattr(self, name), getattr(other, name)
            same = abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-30) if isinstance(a, float) and isinstance(b, float) \
                else a == b
            if not same:
                out.append((name, a, b))
        return out


# Fields that change what a model computes from given weights (not the name, the training-only
# fields such as local_cls_norm, or the weights table). ffn_hidden stands for ffn_ratio and
# swiglu_align together.
ARCHITECTURE_FIELDS = ("family", "embed_dim", "depth", "num_heads", "ffn", "ffn_hidden", "qkv_bias", "proj_bias",
                       "ffn_bias", "patch_size", "n_storage_tokens", "layer_norm_eps", "in_chans", "rope_base",
                       "rope_normalize_coords", "img_size", "interpolate_offset", "interpolate_antialias",
                       "untie_cls_and_patch_norms")

# Bounds far beyond every released model, so that a hostile or mistyped config is refused before
# it allocates memory (a 1e9-block model, a 65536-wide one), and sizes that build no model (0
# blocks, 0 heads, a 0-pixel patch) are refused where they are set. (low, high), inclusive;
# _POSITIVE fields must also be > 0.
LIMITS = {"embed_dim": (1, 16384), "depth": (1, 256), "num_heads": (1, 512), "patch_size": (1, 256),
          "n_storage_tokens": (0, 256), "in_chans": (1, 64), "img_size": (1, 16384), "swiglu_align": (1, 1024),
          "ffn_ratio": (0.0, 64.0), "layer_norm_eps": (0.0, 1.0), "layerscale_init": (0.0, 1e3),
          "drop_path_rate": (0.0, 1.0), "rope_base": (0.0, 1e12), "interpolate_offset": (0.0, 1.0)}
_POSITIVE = ("ffn_ratio", "layer_norm_eps", "rope_base")
# What each bounded field is, for the error that refuses a value (the fix names the range).
_MEANING = {"embed_dim": "the token width", "depth": "the number of transformer blocks",
            "num_heads": "the number of attention heads", "patch_size": "the patch side in pixels",
            "n_storage_tokens": "the number of storage (register) tokens", "in_chans": "the number of image channels",
            "img_size": "the training image side in pixels", "swiglu_align": "the SwiGLU hidden-size multiple",
            "ffn_ratio": "the MLP hidden size / embed_dim", "layer_norm_eps": "the LayerNorm epsilon",
            "layerscale_init": "the LayerScale initial value", "drop_path_rate": "the stochastic-depth rate",
            "rope_base": "the RoPE period base", "interpolate_offset": "the position-table interpolation offset"}
_CHOICES = {"family": ("dinov2", "dinov3"), "ffn": ("mlp", "swiglu", "swiglu_fused"),
            "rope_normalize_coords": ("separate", "min", "max")}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               tuple: "a list of numbers", dict: "a mapping"}


def check_field(cfg_name: str, name: str, value) -> None:
    """Raises ValueError naming the field, the value and the expected type or range."""
    kind = _FIELD_KINDS[name]
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if kind is tuple:
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(f"{cfg_name}: {name} = {value!r} ({type(value).__name__}) must be {_KIND_NAMES[kind]}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"{cfg_name}: {name} = {value!r} must be one of {', '.join(map(repr, _CHOICES[name]))}")
    if name in LIMITS:
        low, high = LIMITS[name]
        if not (low <= value <= high) or (isinstance(value, float) and value != value):
            raise ValueError(f"{cfg_name}: {name} = {value!r} is outside the supported range [{low}, {high}] "
                             f"({_MEANING[name]}); set {name} to a value in that range")
    if name in _POSITIVE and value <= 0:
        raise ValueError(f"{cfg_name}: {name} = {value!r} must be positive ({_MEANING[name]}); "
                         f"set {name} to a value above 0")


_FIELD_KINDS = {f.name: {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple, "dict": dict}.get(
    str(f.type).split("[")[0], str) for f in dataclasses.fields(VitConfig)}
_FIELD_KINDS.update(family=str, ffn=str, rope_normalize_coords=str)

_DINOV2_BASE = "https://dl.fbaipublicfiles.com/dinov2"
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)


def _v3(name, dim, depth, heads, ffn="mlp", ratio=4.0, dataset="lvd1689m", **kw) -> VitConfig:
    arch = name.removeprefix("dinov3_").removesuffix(f"_{dataset}")
    return VitConfig(
        name=name, family="dinov3", embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn,
        ffn_ratio=ratio, patch_size=16, n_storage_tokens=4, layer_norm_eps=1e-5,
        weights={dataset: f"facebook/dinov3-{arch}-pretrain-{dataset}"}, **kw,
    )


def _v2(name, dim, depth, heads, reg: bool, ffn="mlp", **kw) -> VitConfig:
    arch = name.split("_")[1]
    hf = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}[arch]
    return VitConfig(
        name=name, family="dinov2", embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn,
        patch_size=14, n_storage_tokens=4 if reg else 0, layer_norm_eps=1e-6, img_size=518,
        interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg, layerscale_init=1.0,
        weights={
            "lvd142m": f"{_DINOV2_BASE}/dinov2_{arch}/dinov2_{arch}{'_reg4' if reg else ''}_pretrain.pth",
            "hf": f"facebook/dinov2-{'with-registers-' if reg else ''}{hf}",
        },
        **kw,
    )


def _dinov2_pair(arch, dim, depth, heads, **kw):
    return [_v2(f"dinov2_{arch}", dim, depth, heads, reg=False, **kw), _v2(f"dinov2_{arch}_reg", dim, depth, heads, reg=True, **kw)]


_ALL = [
    _v3("dinov3_vits16", 384, 12, 6),
    _v3("dinov3_vits16plus", 384, 12, 6, ffn="swiglu", ratio=6.0),
    _v3("dinov3_vitb16", 768, 12, 12),
    # The vitl16 SAT weights carry local_cls_norm: they load into dinov3_vitl16_sat493m below.
    _v3("dinov3_vitl16", 1024, 24, 16),
    _v3("dinov3_vitl16plus", 1024, 24, 16, ffn="swiglu", ratio=6.0),
    _v3("dinov3_vith16plus", 1280, 32, 20, ffn="swiglu", ratio=6.0),
    _v3("dinov3_vit7b16", 4096, 40, 32, ffn="swiglu", ratio=3.0, qkv_bias=False, swiglu_align=64,
        local_cls_norm=True),
    # SAT-493M (satellite) weights: same architectures, own normalisation, vitl16 adds local_cls_norm.
    _v3("dinov3_vitl16_sat493m", 1024, 24, 16, dataset="sat493m", local_cls_norm=True,
        image_mean=SAT_MEAN, image_std=SAT_STD),
    _v3("dinov3_vit7b16_sat493m", 4096, 40, 32, ffn="swiglu", ratio=3.0, qkv_bias=False, swiglu_align=64,
        dataset="sat493m", local_cls_norm=True, image_mean=SAT_MEAN, image_std=SAT_STD),
    *_dinov2_pair("vits14", 384, 12, 6),
    *_dinov2_pair("vitb14", 768, 12, 12),
    *_dinov2_pair("vitl14", 1024, 24, 16),
    *_dinov2_pair("vitg14", 1536, 40, 24, ffn="swiglu_fused"),
]
VARIANTS: dict[str, VitConfig] = {c.name: c.validate() for c in _ALL}

# Short names used by downstream projects (tree segmentation tools, teacher configs).
ALIASES: dict[str, str] = {
    "small": "dinov3_vits16",
    "small_plus": "dinov3_vits16plus",
    "base": "dinov3_vitb16",
    "large": "dinov3_vitl16",
    "large_plus": "dinov3_vitl16plus",
    "huge_plus": "dinov3_vith16plus",
    "giant": "dinov3_vith16plus",
    "mega": "dinov3_vit7b16",
    "dinov3_small": "dinov3_vits16",
    "dinov3_base": "dinov3_vitb16",
    "dinov3_large": "dinov3_vitl16",
    "dinov3_giant": "dinov3_vith16plus",
    "dinov3_mega": "dinov3_vit7b16",
    "dinov2_small": "dinov2_vits14",
    "dinov2_base": "dinov2_vitb14",
    "dinov2_large": "dinov2_vitl14",
    "dinov2_giant": "dinov2_vitg14",
    # DINOv2-style "_reg" spellings (VGGT / Spatial-MLLM code): every DINOv3 ViT has its 4 storage tokens.
    "dinov3_vits16_reg": "dinov3_vits16",
    "dinov3_vits16plus_reg": "dinov3_vits16plus",
    "dinov3_vitb16_reg": "dinov3_vitb16",
    "dinov3_vitl16_reg": "dinov3_vitl16",
    "dinov3_vitl16plus_reg": "dinov3_vitl16plus",
    "dinov3_vith16plus_reg": "dinov3_vith16plus",
    "dinov3_vit7b16_reg": "dinov3_vit7b16",
}


# DINOv3 names with a 14-pixel patch or the code's ViT-g: architectures without released weights.
_UNRELEASED = re.compile(r"dinov3_vit(7b|[a-z])(14|16)(plus)?(_reg)?")
_VITG = {"embed_dim": 1536, "depth": 40, "num_heads": 24}


def unreleased_hint(name: str) -> Optional[str]:
    m = _UNRELEASED.fullmatch(name.strip().lower())
    if m is None:
        return None
    size, patch, plus = m.group(1), m.group(2), m.group(3) or ""
    if size == "g":
        fix = ", ".join(f"{k}={v}" for k, v in _VITG.items())
        return (f"{name!r} was never released: DINOv3 published no ViT-g weights. Did you mean 'dinov3_vith16plus' "
                f"(alias 'giant', the largest below 7B) or 'dinov3_vit7b16'? To build the DINOv3 code's ViT-g with "
                f"random weights, take 'dinov3_vitl16' with the overrides {fix}"
                + (", patch_size=14" if patch == "14" else "") + ".")
    standard = f"dinov3_vit{size}16{plus}"
    if patch != "14" or standard not in VARIANTS:
        return None
    return (f"{name!r} was never released: DINOv3 ViTs use 16-pixel patches. Did you mean {standard!r}? To build "
            f"that architecture with 14-pixel patches (random weights, none exist), take {standard!r} with the "
            f"override patch_size=14 (YAML: `patch_size: 14` next to the name; Python: "
            f"IntegratedModel({standard!r}, patch_size=14) or create_model({standard!r}, patch_size=14)).")


def resolve_name(name: str) -> str:
    """Canonical variant name for a name or alias; a clear error with suggestions otherwise."""
    key = name.strip()
    if key in VARIANTS:
        return key
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    hint = unreleased_hint(key)
    if hint is not None:
        raise ValueError(hint)
    choices = sorted(VARIANTS) + sorted(ALIASES)
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    # the closest names only: the full list (30 names with aliases) would bury the suggestion
    raise ValueError(f"Unknown model name {name!r}.{hint} `flashdino models` lists all {len(VARIANTS)} models and "
                     "their aliases (Python: flashdino.list_models()).")


def get_config(name: str, **overrides) -> VitConfig:
    cfg = VARIANTS[resolve_name(name)]
    return cfg.replace(**overrides).validate() if overrides else cfg


def infer_variant(embed_dim: int, depth: int, family: Optional[str] = None, ffn: Optional[str] = None,
                  n_storage_tokens: Optional[int] = None) -> list[str]:
    """Names of the variants a checkpoint with these dimensions could belong to (for error reports)."""
    out = []
    for c in VARIANTS.values():
        if c.embed_dim != embed_dim or c.depth != depth:
            continue
        if family and c.family != family:
            continue
        if ffn and c.ffn != ffn:
            continue
        if n_storage_tokens is not None and c.n_storage_tokens != n_storage_tokens:
            continue
        out.append(c.name)
    return out

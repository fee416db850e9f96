"""Loading VGGT checkpoints into :class:`flashdino.Aggregator`.

A VGGT checkpoint (e.g. ``facebook/VGGT-1B``'s ``model.pt``) holds the whole model: the
aggregator under ``aggregator.`` and the heads under ``camera_head.``, ``depth_head.``,
``point_head.`` and ``track_head.``. flashdino's aggregator uses VGGT's parameter names (its
patch-embedding ViT uses the official DINOv2 names), so loading is a prefix strip plus strict
checking with a readable report.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch

from ..variants import infer_variant
from .errors import CheckpointError
from .files import read_state_dict, unwrap_state_dict, warn_non_finite
from .sources import download_hub_file, download_url, is_hub_id, is_url

logger = logging.getLogger("flashdino")

AGGREGATOR_PREFIX = "aggregator."
HEAD_PREFIXES = ("camera_head.", "depth_head.", "point_head.", "track_head.")
_AGGREGATOR_MARKERS = ("frame_blocks.", "global_blocks.")
_AGGREGATOR_TOKENS = ("camera_token", "register_token")
_SHOW = 8

# (backbone embed dim, depth) of VGGT's DINOv2 patch embeddings -> VGGT's backbone names.
_VGGT_BACKBONE_BY_SHAPE = {
    (1024, 24): "dinov2_vitl14_reg",
    (768, 12): "dinov2_vitb14_reg",
    (384, 12): "dinov2_vits14_reg",
    (1536, 40): "dinov2_vitg2_reg",
}


@dataclass
class VggtLoadReport:
    """What :func:`load_vggt_state_dict` did."""

    loaded: int = 0
    prefix: str = ""
    ignored: list = field(default_factory=list)  # keys of VGGT's heads (and other non-aggregator keys)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} aggregator tensors"
                 + (f" (prefix {self.prefix!r} stripped)" if self.prefix else "")]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} keys that are not part of the aggregator "
                         f"({', '.join(_top_names(self.ignored))})")
        lines.extend(_problem_lines(self))
        return "\n".join(lines)


def _top_names(keys) -> list[str]:
    return sorted({k.removeprefix("module.").removeprefix("model.").split(".")[0] for k in keys})


def _problem_lines(report: VggtLoadReport) -> list[str]:
    lines = []
    for title, items in (("missing from the checkpoint", report.missing),
                         ("unexpected (not in the model)", report.unexpected)):
        if items:
            shown = ", ".join(items[:_SHOW]) + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")
            lines.append(f"  {len(items)} {title}: {shown}")
    if report.mismatched:
        lines.append(f"  {len(report.mismatched)} with a different shape:")
        for key, got, want in report.mismatched[:_SHOW]:
            lines.append(f"    {key}: checkpoint {list(got)} vs model {list(want)}")
        if len(report.mismatched) > _SHOW:
            lines.append(f"    ... (+{len(report.mismatched) - _SHOW} more)")
    return lines


VGGT_HUB_FILES = ("model.safetensors", "model.pt")


def _checkpoint_in_folder(folder: Path) -> Path:
    for name in VGGT_HUB_FILES + ("model.pth", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} is a folder without {' / '.join(VGGT_HUB_FILES)}; pass the checkpoint file")


def read_vggt_checkpoint(source: Union[str, os.PathLike, Mapping]) -> dict[str, torch.Tensor]:
    """A flat state dict from a file (.pt/.pth/.bin/.safetensors), a folder holding one, a Hugging
    Face repository id (``"facebook/VGGT-1B"``), a URL, or a (possibly wrapped) dict."""
    if isinstance(source, Mapping):
        sd = unwrap_state_dict(dict(source), "state dict")
        warn_non_finite(sd, "state dict")
        return sd
    path = Path(source)
    if not path.exists():
        text = os.fspath(source)
        if is_url(text):
            path = download_url(text)
        elif is_hub_id(text):
            path = download_hub_file(text, VGGT_HUB_FILES)
    elif path.is_dir():
        path = _checkpoint_in_folder(path)
    sd = read_state_dict(path)
    warn_non_finite(sd, str(path))
    return sd


def _describe(keys: list[str]) -> str:
    """A guess of what a non-aggregator checkpoint is, for the error message."""
    keyset = set(keys)
    if "cls_token" in keyset and any(k.startswith("blocks.") for k in keyset):
        kind = "DINOv3" if ("storage_tokens" in keyset or "rope_embed.periods" in keyset) else "DINOv2"
        return (f"it looks like a {kind} backbone checkpoint; load it with flashdino.create_model(name, weights=...) "
                "or as the aggregator's patch embedding via aggregator.patch_embed.load_state_dict(...)")
    if any(k.startswith("embeddings.") or k.startswith("encoder.layer.") for k in keyset):
        return "it looks like a Hugging Face transformers model, not a VGGT checkpoint"
    if any(k.startswith(HEAD_PREFIXES) for k in keyset):
        return "it holds VGGT head weights but no aggregator"
    return "no VGGT aggregator keys (camera_token, frame_blocks.*, global_blocks.*) were found"


def split_vggt_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list, str]:
    """(aggregator state dict without prefix, ignored keys, stripped prefix)."""
    keys = list(state_dict)
    wrapper = ""
    for candidate in ("module.", "model."):
        if keys and all(k.startswith(candidate) for k in keys):
            wrapper = candidate
            break
    prefix = wrapper + AGGREGATOR_PREFIX
    if any(k.startswith(prefix) for k in keys):
        agg = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        ignored = [k for k in keys if not k.startswith(prefix)]
    else:
        prefix = wrapper
        agg, ignored = {}, []
        for k, v in state_dict.items():
            name = k[len(wrapper):]
            if name.startswith(HEAD_PREFIXES):
                ignored.append(k)
            else:
                agg[name] = v
    if not any(k.startswith(_AGGREGATOR_MARKERS) or k in _AGGREGATOR_TOKENS for k in agg):
        first = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise CheckpointError(
            f"not a VGGT aggregator checkpoint: {_describe([k[len(wrapper):] for k in keys])} "
            f"({len(keys)} keys, first: {first or 'none'})")
    return agg, ignored, prefix


def _fold_bias_masks(sd: dict) -> dict:
    """DINOv3 official weights carry attn.qkv.bias_mask; the bias used is bias * mask."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith("attn.qkv.bias_mask")]:
        bias_key = key[: -len("_mask")]
        mask = out.pop(key)
        if bias_key in out and not torch.isnan(mask).any():
            out[bias_key] = out[bias_key] * mask.to(out[bias_key].dtype)
    return out


def _block_count(sd: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def infer_aggregator_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`flashdino.Aggregator` that fit a VGGT checkpoint.

    ``aa_order`` and ``aa_block_size`` cannot be read from weights (defaults apply). The heads of
    a DINOv2 patch embedding of a non-standard size are taken equal to the aggregator's.
    """
    sd, _, _ = split_vggt_state_dict(state_dict)
    kw: dict = {}
    if "camera_token" not in sd or "register_token" not in sd:
        raise CheckpointError("VGGT aggregator checkpoint without camera_token / register_token")
    C = sd["camera_token"].shape[-1]
    kw["embed_dim"] = C
    kw["num_register_tokens"] = sd["register_token"].shape[2]
    kw["depth"] = _block_count(sd, "frame_blocks.")
    b0 = "frame_blocks.0."
    kw["qk_norm"] = f"{b0}attn.q_norm.weight" in sd
    if kw["qk_norm"]:
        kw["num_heads"] = C // sd[f"{b0}attn.q_norm.weight"].shape[0]
    if f"{b0}mlp.fc1.weight" in sd:
        kw["mlp_ratio"] = sd[f"{b0}mlp.fc1.weight"].shape[0] / C
        kw["ffn_bias"] = f"{b0}mlp.fc1.bias" in sd
    kw["qkv_bias"] = f"{b0}attn.qkv.bias" in sd
    kw["proj_bias"] = f"{b0}attn.proj.bias" in sd
    if f"{b0}ls1.gamma" not in sd and kw["depth"]:
        kw["init_values"] = None

    if "patch_embed.cls_token" not in sd:
        if "patch_embed.proj.weight" in sd:
            kw["patch_embed"] = "conv"
            kw["patch_size"] = sd["patch_embed.proj.weight"].shape[-1]
        return kw

    D = sd["patch_embed.cls_token"].shape[-1]
    depth = _block_count(sd, "patch_embed.blocks.")
    P = sd["patch_embed.patch_embed.proj.weight"].shape[-1] if "patch_embed.patch_embed.proj.weight" in sd else None
    gated = "patch_embed.blocks.0.mlp.w12.weight" in sd or "patch_embed.blocks.0.mlp.w1.weight" in sd
    if "patch_embed.storage_tokens" in sd or "patch_embed.rope_embed.periods" in sd:
        names = infer_variant(D, depth, family="dinov3", ffn="swiglu" if gated else "mlp")
        local = "patch_embed.local_cls_norm.weight" in sd
        names = [n for n in names if n.endswith("_sat493m") == local] or names
        if names:
            kw["patch_embed"] = names[0]
            return kw
        # a non-standard size: the closest family member with the checkpoint's dimensions
        overrides: dict = {"embed_dim": D, "depth": depth}
        if "patch_embed.rope_embed.periods" in sd:
            overrides["num_heads"] = D // (4 * sd["patch_embed.rope_embed.periods"].numel())
        if "patch_embed.storage_tokens" in sd:
            overrides["n_storage_tokens"] = sd["patch_embed.storage_tokens"].shape[1]
        fc1 = "patch_embed.blocks.0.mlp.fc1.weight"
        if fc1 in sd:
            overrides["ffn_ratio"] = sd[fc1].shape[0] / D
        kw["patch_embed"] = "dinov3_vits16plus" if gated else "dinov3_vits16"
        kw["patch_embed_kwargs"] = overrides
        return kw

    if P is not None:
        kw["patch_size"] = P
        n_grid = sd["patch_embed.pos_embed"].shape[1] - 1 if "patch_embed.pos_embed" in sd else 0
        side = math.isqrt(n_grid)
        if side * side == n_grid and side:
            kw["img_size"] = side * P
    name = _VGGT_BACKBONE_BY_SHAPE.get((D, depth))
    if name == "dinov2_vitg2_reg" and "patch_embed.blocks.0.mlp.w12.weight" in sd:
        name = "dinov2_vitg14_reg"
    if name is None:
        overrides = {"embed_dim": D, "depth": depth, "num_heads": kw.get("num_heads", max(D // 64, 1))}
        if "patch_embed.blocks.0.mlp.fc1.weight" in sd:
            overrides["ffn_ratio"] = sd["patch_embed.blocks.0.mlp.fc1.weight"].shape[0] / D
        name = "dinov2_vitl14_reg"
        kw["patch_embed_kwargs"] = overrides
    kw["patch_embed"] = name
    return kw


def load_vggt_state_dict(aggregator: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                         strict: bool = True) -> VggtLoadReport:
    """Loads a VGGT (or VGGT-aggregator) state dict into ``aggregator``.

    Keys may carry the ``aggregator.`` prefix (a whole VGGT model: the heads' keys are ignored
    and listed in the report) or not. With ``strict`` (default) any missing, unexpected or
    mis-shaped key raises :class:`CheckpointError` listing them; otherwise the matching tensors are
    loaded and the report lists the rest.
    """
    if not isinstance(state_dict, Mapping):
        state_dict = read_vggt_checkpoint(state_dict)
    agg, ignored, prefix = split_vggt_state_dict(state_dict)
    agg = _fold_bias_masks(agg)
    expected = aggregator.state_dict()
    report = VggtLoadReport(prefix=prefix, ignored=ignored)
    report.missing = [k for k in expected if k not in agg]
    report.unexpected = [k for k in agg if k not in expected]
    report.mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in agg.items()
                         if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not report.ok and strict:
        counts = (f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
                  f"{len(report.mismatched)} mis-shaped")
        hint = ""
        try:
            guess = infer_aggregator_kwargs(agg)
            mine = {"embed_dim": getattr(aggregator, "embed_dim", None), "depth": getattr(aggregator, "depth", None),
                    "patch_embed": getattr(aggregator, "patch_embed_name", None)}
            diff = {k: v for k, v in guess.items() if k in mine and mine[k] != v}
            if diff:
                hint = (f"\nThe checkpoint looks like {diff} (the model has "
                        f"{ {k: mine[k] for k in diff} }); build a fitting model with "
                        "flashdino.Aggregator.from_vggt_checkpoint(path).")
        except CheckpointError:
            pass
        raise CheckpointError(
            f"VGGT checkpoint does not fit this Aggregator ({counts} keys):\n"
            + "\n".join(_problem_lines(report)) + hint)
    bad = {k for k, _, _ in report.mismatched}
    to_load = {k: v for k, v in agg.items() if k in expected and k not in bad}
    aggregator.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    if ignored:
        logger.info("VGGT checkpoint: ignored %d keys outside the aggregator (%s)", len(ignored),
                    ", ".join(_top_names(ignored)))
    return report


__all__ = ["VggtLoadReport", "read_vggt_checkpoint", "split_vggt_state_dict", "infer_aggregator_kwargs",
           "load_vggt_state_dict", "AGGREGATOR_PREFIX", "HEAD_PREFIXES"]

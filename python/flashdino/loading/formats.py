"""Checkpoint key layouts and their conversion to flashdino's canonical state dict.

The canonical layout is the model's own ``state_dict()``: the official DINOv2 / DINOv3 keys, with
the DINOv3 ``attn.qkv.bias_mask`` folded into ``attn.qkv.bias``. Supported inputs (detected from
the keys, see :func:`detect_format`):

- ``official_dinov3`` / ``official_dinov2``: Meta's .pth files and flashdino's own safetensors;
- ``hf_dinov3``: transformers ``DINOv3ViTModel`` (``embeddings.*``, ``layer.{i}.attention.q_proj``...);
- ``hf_dinov2``: transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (saved or in-memory names);
- ``timm_dinov3``: timm ``Eva`` DINOv3 models (``reg_token``, ``gamma_1``, ``q_bias`` / ``v_bias``, ``fc1_g``);
- ``timm_dinov2``: timm ``VisionTransformer`` DINOv2 models (``reg_token``, position table without
  the CLS entry for the register models, ``fc1`` / ``fc2`` for the packed SwiGLU of the giant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..layers.rope import dinov3_periods
from ..variants import VARIANTS, VitConfig, infer_variant
from .errors import CheckpointError

FORMATS = ("official_dinov3", "official_dinov2", "hf_dinov3", "hf_dinov2", "timm_dinov3", "timm_dinov2")

# Prefixes that wrappers (DDP, torch.compile, training frameworks, HF heads) put before every key.
_STRIP_PREFIXES = ("module.", "_orig_mod.", "teacher.", "student.", "backbone.", "encoder_q.", "dinov2.",
                   "dinov3.", "model.")


def strip_common_prefix(sd: dict) -> dict:
    """Removes wrapper prefixes shared by every key (``module.``, ``backbone.``, ``model.`` ...)."""
    for _ in range(4):
        if not sd:
            return sd
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
        else:
            return sd
    return sd


def _any(keys, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in keys)


def detect_format(sd: dict) -> str:
    """The key layout of a (prefix-stripped) state dict; ``"unknown"`` when nothing fits."""
    keys = list(sd)
    if _any(keys, r"^embeddings\.") or _any(keys, r"^(model\.)?layer\.\d+\.attention\.") or \
            _any(keys, r"^encoder\.layer\.\d+\."):
        if "embeddings.position_embeddings" in sd or _any(keys, r"^encoder\.layer\.\d+\.") or \
                "layernorm.weight" in sd:
            return "hf_dinov2"
        return "hf_dinov3"
    if "pos_embed" in sd:
        if "reg_token" in sd or "mask_token" not in sd:
            return "timm_dinov2"
        return "official_dinov2"
    if "reg_token" in sd or _any(keys, r"\.gamma_1$") or _any(keys, r"\.attn\.[qv]_bias$") or \
            _any(keys, r"\.mlp\.fc1_[gx]\."):
        return "timm_dinov3"
    if _any(keys, r"^blocks\.\d+\.") or "cls_token" in sd:
        if "storage_tokens" in sd or "rope_embed.periods" in sd or _any(keys, r"bias_mask$"):
            return "official_dinov3"
        if "register_tokens" in sd:
            return "official_dinov2"
        return "official_dinov3"
    return "unknown"


@dataclass
class Canonical:
    """A state dict in flashdino's layout, with where it came from and what was filled in."""

    state_dict: dict
    format: str
    notes: list = field(default_factory=list)
    # Dimensions read from the checkpoint itself (before any adaptation to the model).
    arch: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# renaming, one function per layout; the output may hold per-block "attn.{q,k,v}.*" parts and any
# FFN packing, which _finish() merges / adapts to the target configuration.

_HF3_BLOCK = [
    (r"norm1\.", "norm1."), (r"norm2\.", "norm2."),
    (r"attention\.q_proj\.", "attn.q."), (r"attention\.k_proj\.", "attn.k."), (r"attention\.v_proj\.", "attn.v."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"layer_scale1\.lambda1$", "ls1.gamma"), (r"layer_scale2\.lambda1$", "ls2.gamma"),
    (r"mlp\.gate_proj\.", "mlp.w1."),
]
_HF3_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens", "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_HF2_BLOCK = [
    (r"norm1\.", "norm1."), (r"norm2\.", "norm2."),
    (r"attention\.attention\.query\.", "attn.q."), (r"attention\.attention\.key\.", "attn.k."),
    (r"attention\.attention\.value\.", "attn.v."), (r"attention\.output\.dense\.", "attn.proj."),
    (r"attention\.q_proj\.", "attn.q."), (r"attention\.k_proj\.", "attn.k."), (r"attention\.v_proj\.", "attn.v."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"layer_scale1\.lambda1$", "ls1.gamma"), (r"layer_scale2\.lambda1$", "ls2.gamma"),
    (r"mlp\.fc1\.", "mlp.fc1."), (r"mlp\.fc2\.", "mlp.fc2."),
    (r"mlp\.weights_in\.", "mlp.w12."), (r"mlp\.weights_out\.", "mlp.w3."),
    (r"mlp\.gate_proj\.", "mlp.w1."), (r"mlp\.up_proj\.", "mlp.w2."), (r"mlp\.down_proj\.", "mlp.w3."),
]
_HF2_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _rename_block(rest: str, table) -> Optional[str]:
    for pattern, repl in table:
        m = re.match(pattern, rest)
        if m:
            return repl + rest[m.end():]
    return None


def _rename_hf(sd: dict, fmt: str) -> dict:
    out = {}
    top = _HF3_TOP if fmt == "hf_dinov3" else _HF2_TOP
    rx = re.compile(r"^(?:model\.|encoder\.)?layer\.(\d+)\.(.+)$")
    gated_blocks = {m.group(1) for k in sd for m in [rx.match(k)] if m and m.group(2).startswith("mlp.gate_proj.")}
    for k, v in sd.items():
        m = rx.match(k)
        if m:
            i, rest = m.groups()
            if fmt == "hf_dinov3":
                new = _rename_block(rest, _HF3_BLOCK)
                if new is None and rest.startswith("mlp.up_proj."):
                    new = ("mlp.w2." if i in gated_blocks else "mlp.fc1.") + rest[len("mlp.up_proj."):]
                elif new is None and rest.startswith("mlp.down_proj."):
                    new = ("mlp.w3." if i in gated_blocks else "mlp.fc2.") + rest[len("mlp.down_proj."):]
            else:
                new = _rename_block(rest, _HF2_BLOCK)
            out[f"blocks.{i}.{new}" if new else k] = v
        else:
            out[top.get(k, k)] = v
    return out


def _rename_timm(sd: dict, fmt: str) -> dict:
    out = {}
    swiglu_blocks = {k.split(".")[1] for k in sd if re.match(r"^blocks\.\d+\.mlp\.fc1_g\.", k)}
    for k, v in sd.items():
        if k == "reg_token":
            k = "storage_tokens" if fmt == "timm_dinov3" else "register_tokens"
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            rest = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma", "attn.q_bias": "attn.q.bias",
                    "attn.k_bias": "attn.k.bias", "attn.v_bias": "attn.v.bias"}.get(rest, rest)
            rest = re.sub(r"^mlp\.fc1_g\.", "mlp.w1.", rest)
            rest = re.sub(r"^mlp\.fc1_x\.", "mlp.w2.", rest)
            if i in swiglu_blocks:
                rest = re.sub(r"^mlp\.fc2\.", "mlp.w3.", rest)
            k = f"blocks.{i}.{rest}"
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------


def infer_arch(sd: dict) -> dict:
    """Dimensions of a checkpoint in (renamed) canonical layout: embed dim, depth, FFN, extra tokens."""
    arch: dict = {}
    for key in ("cls_token", "patch_embed.proj.weight", "norm.weight"):
        if key in sd:
            arch["embed_dim"] = int(sd[key].shape[0 if key != "cls_token" else -1])
            break
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}
    arch["depth"] = (max(blocks) + 1) if blocks else 0
    if "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].dim() == 4:
        arch["patch_size"] = int(sd["patch_embed.proj.weight"].shape[-1])
    if "pos_embed" in sd:
        arch["family"] = "dinov2"
        n = sd["pos_embed"].shape[1]
        side = int(round((n - 1) ** 0.5))
        if side * side != n - 1:
            side = int(round(n ** 0.5))
        arch["pos_grid"] = side
    elif "storage_tokens" in sd or "rope_embed.periods" in sd:
        arch["family"] = "dinov3"
    extra = sd.get("storage_tokens", sd.get("register_tokens"))
    arch["n_storage_tokens"] = int(extra.shape[1]) if extra is not None and extra.dim() == 3 else 0
    if "rope_embed.periods" in sd and "embed_dim" in arch:
        head_dim = 4 * sd["rope_embed.periods"].numel()
        if head_dim and arch["embed_dim"] % head_dim == 0:
            arch["num_heads"] = arch["embed_dim"] // head_dim
    b0 = "blocks.0.mlp."
    if b0 + "w12.weight" in sd:
        arch["ffn"] = "swiglu_fused"
    elif b0 + "w1.weight" in sd:
        arch["ffn"] = "swiglu"
    elif b0 + "fc1.weight" in sd:
        # timm packs the DINOv2-g SwiGLU input projection into fc1 (rows = 2 x the columns of fc2).
        packed = b0 + "fc2.weight" in sd and sd[b0 + "fc1.weight"].shape[0] == 2 * sd[b0 + "fc2.weight"].shape[1]
        arch["ffn"] = "swiglu_fused" if packed else "mlp"
    return arch


def describe_arch(arch: dict) -> str:
    parts = []
    if "embed_dim" in arch:
        parts.append(f"embed {arch['embed_dim']}")
    parts.append(f"{arch.get('depth', 0)} blocks")
    if arch.get("ffn") and arch["ffn"] != "mlp":
        parts.append(arch["ffn"].replace("_", " "))
    if arch.get("n_storage_tokens"):
        parts.append(f"{arch['n_storage_tokens']} register tokens")
    if arch.get("patch_size"):
        parts.append(f"patch {arch['patch_size']}")
    return ", ".join(parts)


def guess_variants(arch: dict) -> list:
    if "embed_dim" not in arch:
        return []
    names = infer_variant(arch["embed_dim"], arch.get("depth", 0), family=arch.get("family"), ffn=arch.get("ffn"),
                          n_storage_tokens=arch.get("n_storage_tokens"))
    if arch.get("patch_size"):
        names = [n for n in names if VARIANTS[n].patch_size == arch["patch_size"]]
    return names


# ---------------------------------------------------------------------------------------------------


def _block_ids(sd: dict) -> list:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(r"^blocks\.(\d+)\.", k)] if m})


def _merge_qkv(sd: dict, notes: list) -> None:
    for i in _block_ids(sd):
        p = f"blocks.{i}.attn."
        parts_w = [sd.get(p + f"{c}.weight") for c in "qkv"]
        if any(w is not None for w in parts_w):
            if any(w is None for w in parts_w):
                missing = [p + f"{c}.weight" for c, w in zip("qkv", parts_w) if w is None]
                raise CheckpointError(f"checkpoint has separate q/k/v projections but lacks {', '.join(missing)}")
            if p + "qkv.weight" in sd:
                raise CheckpointError(f"checkpoint has both {p}qkv.weight and separate q/k/v weights")
            sd[p + "qkv.weight"] = torch.cat(parts_w, dim=0)
            for c in "qkv":
                del sd[p + f"{c}.weight"]
        parts_b = [sd.pop(p + f"{c}.bias", None) for c in "qkv"]
        if any(b is not None for b in parts_b):
            if p + "qkv.bias" in sd:
                raise CheckpointError(f"checkpoint has both {p}qkv.bias and separate q/k/v biases")
            ref = next(b for b in parts_b if b is not None)
            parts_b = [b if b is not None else torch.zeros_like(ref) for b in parts_b]
            sd[p + "qkv.bias"] = torch.cat(parts_b, dim=0)


def _fold_bias_mask(sd: dict, notes: list) -> None:
    masks = [k for k in sd if k.endswith("attn.qkv.bias_mask")]
    for k in masks:
        mask = sd.pop(k)
        if torch.isnan(mask.float()).any():
            raise CheckpointError(
                f"{k} holds NaN: it is an uninitialised buffer, so the checkpoint was saved from a model whose "
                "weights were never loaded; use the released checkpoint file instead"
            )
        bias_key = k[: -len("_mask")]
        if bias_key in sd:
            bias = sd[bias_key]
            if bias.shape != mask.shape:
                raise CheckpointError(f"{k} has shape {tuple(mask.shape)} but {bias_key} has {tuple(bias.shape)}")
            sd[bias_key] = (bias.float() * mask.float()).to(bias.dtype)
    if masks:
        notes.append(f"folded {len(masks)} attn.qkv.bias_mask buffers into the qkv biases")


def _adapt_ffn(sd: dict, cfg: VitConfig, notes: list) -> None:
    for i in _block_ids(sd):
        p = f"blocks.{i}.mlp."
        has = lambda name: p + name + ".weight" in sd  # noqa: E731
        if cfg.ffn == "swiglu_fused" and not has("w12"):
            if has("w1") and has("w2"):
                for t in ("weight", "bias"):
                    if p + f"w1.{t}" in sd:
                        sd[p + f"w12.{t}"] = torch.cat([sd.pop(p + f"w1.{t}"), sd.pop(p + f"w2.{t}")], dim=0)
            elif has("fc1") and has("fc2") and sd[p + "fc1.weight"].shape[0] == 2 * sd[p + "fc2.weight"].shape[1]:
                for t in ("weight", "bias"):
                    if p + f"fc1.{t}" in sd:
                        sd[p + f"w12.{t}"] = sd.pop(p + f"fc1.{t}")
                    if p + f"fc2.{t}" in sd:
                        sd[p + f"w3.{t}"] = sd.pop(p + f"fc2.{t}")
        elif cfg.ffn == "swiglu" and not has("w1"):
            src = "w12" if has("w12") else ("fc1" if has("fc1") and has("fc2") and
                                            sd[p + "fc1.weight"].shape[0] == 2 * sd[p + "fc2.weight"].shape[1] else None)
            if src:
                for t in ("weight", "bias"):
                    if p + f"{src}.{t}" in sd:
                        a, b = sd.pop(p + f"{src}.{t}").chunk(2, dim=0)
                        sd[p + f"w1.{t}"], sd[p + f"w2.{t}"] = a.clone(), b.clone()
                    if src == "fc1" and p + f"fc2.{t}" in sd:
                        sd[p + f"w3.{t}"] = sd.pop(p + f"fc2.{t}")


def _fix_shapes(sd: dict, fmt: str, cfg: VitConfig, notes: list) -> None:
    mt = sd.get("mask_token")
    if mt is not None and mt.dim() == 3 and mt.shape[:2] == (1, 1):
        sd["mask_token"] = mt.reshape(1, mt.shape[-1])
    pos = sd.get("pos_embed")
    if fmt == "timm_dinov2" and pos is not None and pos.dim() == 3:
        n = pos.shape[1]
        side = int(round(n ** 0.5))
        if side * side == n and n > 1:
            # timm's register models keep no CLS entry: the CLS position is already added to cls_token.
            sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
            notes.append("position table had no CLS entry (timm register layout): CLS position set to 0, "
                         "timm's cls_token already includes it")


def _fill_missing(sd: dict, fmt: str, cfg: VitConfig, notes: list) -> None:
    cls = sd.get("cls_token")
    D = int(cls.shape[-1]) if cls is not None else cfg.embed_dim  # the checkpoint's width, fitting or not
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    if fmt.startswith(("hf_", "timm_")):
        if "mask_token" not in sd and fmt.startswith("timm_"):
            sd["mask_token"] = torch.zeros(1, D, dtype=dtype)
            notes.append("no mask_token in a timm checkpoint: set to zeros (only used with masks)")
        if cfg.local_cls_norm and "local_cls_norm.weight" not in sd:
            sd["local_cls_norm.weight"] = torch.ones(D, dtype=dtype)
            sd["local_cls_norm.bias"] = torch.zeros(D, dtype=dtype)
            notes.append("local_cls_norm is not in this format (training only, unused at inference): set to identity")
    if cfg.uses_rope and "rope_embed.periods" not in sd and fmt in ("hf_dinov3", "timm_dinov3"):
        sd["rope_embed.periods"] = dinov3_periods(cfg.head_dim, cfg.rope_base)
        notes.append(f"no RoPE periods in a {fmt} checkpoint: using the official bf16-rounded periods "
                     "(as in Meta's released checkpoints)")
    if fmt == "timm_dinov3" and cfg.qkv_bias:
        added = 0
        for i in _block_ids(sd):
            key = f"blocks.{i}.attn.qkv.bias"
            w = sd.get(f"blocks.{i}.attn.qkv.weight")
            if key not in sd and w is not None:
                sd[key] = torch.zeros(w.shape[0], dtype=w.dtype)
                added += 1
        if added:
            notes.append(f"timm model without qkv bias: {added} qkv biases set to zeros (the same function)")


def canonicalize(state_dict: dict, cfg: VitConfig) -> Canonical:
    """Converts a state dict of any supported layout to the canonical layout for ``cfg``."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError("the checkpoint holds no tensors")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entries are not tensors: {', '.join(map(str, bad[:5]))}")
    sd = strip_common_prefix(dict(state_dict))
    fmt = detect_format(sd)
    if fmt == "unknown":
        # e.g. a classifier checkpoint: "dinov2.*" backbone keys next to "classifier.*" (reported as unexpected)
        for prefix in _STRIP_PREFIXES:
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if inner and detect_format(inner) != "unknown":
                sd = {**{k: v for k, v in sd.items() if not k.startswith(prefix)}, **inner}
                fmt = detect_format(inner)
                break
    if fmt == "unknown":
        sample = ", ".join(list(sd)[:6])
        raise CheckpointError(
            f"unrecognised checkpoint layout (first keys: {sample}); expected an official DINOv2/DINOv3 "
            "checkpoint, a flashdino safetensors file, a timm or a Hugging Face DINOv2/DINOv3 state dict"
        )
    notes: list = []
    if fmt.startswith("hf_"):
        sd = _rename_hf(sd, fmt)
    elif fmt.startswith("timm_"):
        sd = _rename_timm(sd, fmt)
    _merge_qkv(sd, notes)
    _fold_bias_mask(sd, notes)
    _fix_shapes(sd, fmt, cfg, notes)
    arch = infer_arch(sd)
    arch.setdefault("family", fmt.split("_")[-1])
    _adapt_ffn(sd, cfg, notes)
    _fill_missing(sd, fmt, cfg, notes)
    return Canonical(sd, fmt, notes, arch)


def to_canonical(state_dict: dict, model_cfg: VitConfig) -> dict:
    """The canonical (flashdino / official minus ``bias_mask``) state dict for ``model_cfg``."""
    return canonicalize(state_dict, model_cfg).state_dict

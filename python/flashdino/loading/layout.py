"""The canonical state-dict layout of a configuration, computed without building a model.

Loading checks a checkpoint against this table before any model memory is allocated, so a config
that does not fit its weights (or asks for an absurd size) fails in milliseconds. The table must
equal ``build_model(cfg).state_dict()`` key by key; tests/test_loading_safety.py compares the two for
every variant and every optional part.
"""

from __future__ import annotations

from ..variants import VitConfig


def _linear(prefix: str, n_in: int, n_out: int, bias: bool) -> dict:
    out = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        out[f"{prefix}.bias"] = (n_out,)
    return out


def _norm(prefix: str, dim: int) -> dict:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def canonical_shapes(cfg: VitConfig) -> dict:
    """{key: shape} of the canonical (flashdino / official) state dict of ``cfg``, in model order."""
    D, P, H = cfg.embed_dim, cfg.patch_size, cfg.ffn_hidden
    shapes: dict = {"cls_token": (1, 1, D), "mask_token": (1, D)}
    if cfg.family == "dinov3":
        if cfg.n_storage_tokens:
            shapes["storage_tokens"] = (1, cfg.n_storage_tokens, D)
    else:
        grid = cfg.img_size // P
        shapes["pos_embed"] = (1, 1 + grid * grid, D)
        if cfg.n_storage_tokens:
            shapes["register_tokens"] = (1, cfg.n_storage_tokens, D)
    shapes["patch_embed.proj.weight"] = (D, cfg.in_chans, P, P)
    shapes["patch_embed.proj.bias"] = (D,)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        shapes.update(_norm(f"{b}.norm1", D))
        shapes.update(_linear(f"{b}.attn.qkv", D, 3 * D, cfg.qkv_bias))
        shapes.update(_linear(f"{b}.attn.proj", D, D, cfg.proj_bias))
        if cfg.layerscale_init:
            shapes[f"{b}.ls1.gamma"] = (D,)
        shapes.update(_norm(f"{b}.norm2", D))
        if cfg.ffn == "mlp":
            shapes.update(_linear(f"{b}.mlp.fc1", D, H, cfg.ffn_bias))
            shapes.update(_linear(f"{b}.mlp.fc2", H, D, cfg.ffn_bias))
        elif cfg.ffn == "swiglu":
            shapes.update(_linear(f"{b}.mlp.w1", D, H, cfg.ffn_bias))
            shapes.update(_linear(f"{b}.mlp.w2", D, H, cfg.ffn_bias))
            shapes.update(_linear(f"{b}.mlp.w3", H, D, cfg.ffn_bias))
        else:
            shapes.update(_linear(f"{b}.mlp.w12", D, 2 * H, cfg.ffn_bias))
            shapes.update(_linear(f"{b}.mlp.w3", H, D, cfg.ffn_bias))
        if cfg.layerscale_init:
            shapes[f"{b}.ls2.gamma"] = (D,)
    shapes.update(_norm("norm", D))
    if cfg.untie_cls_and_patch_norms:
        shapes.update(_norm("cls_norm", D))
    if cfg.local_cls_norm:
        shapes.update(_norm("local_cls_norm", D))
    if cfg.family == "dinov3":
        shapes["rope_embed.periods"] = (cfg.head_dim // 4,)
    return shapes

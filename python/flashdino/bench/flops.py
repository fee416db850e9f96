"""Model FLOPs (one multiply-add = 2 FLOPs), the numerator of every MFU.

Per block ``8*N*D^2`` (qkv + proj) ``+ 4*N^2*D`` (attention) ``+ 4*N*D*hidden`` (MLP) or
``+ 6*N*D*hidden`` (SwiGLU, three GEMMs), i.e. ``24*N*D^2 + 4*N^2*D`` for an MLP x4; plus the
patch-embedding GEMM ``2*HW*D*3*P^2``; training counts 3x the forward.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["tokens_per_image", "flop_breakdown", "model_flops", "attention_flops", "block_flops",
           "aggregator_flops"]


def tokens_per_image(cfg, height: int, width: Optional[int] = None) -> int:
    """N = 1 + R + H*W for an image of height x width pixels (a remainder that is not a whole patch is dropped)."""
    width = height if width is None else width
    P = cfg.patch_size
    return 1 + cfg.n_storage_tokens + (height // P) * (width // P)


def block_flops(n_tok: int, seq: int, dim: int, hidden: int, ffn_gemms: int = 2) -> dict:
    """One transformer block over ``n_tok`` tokens attending within sequences of ``seq`` tokens."""
    return dict(qkv_proj=8.0 * n_tok * dim * dim, attention=4.0 * n_tok * seq * dim,
                ffn=2.0 * ffn_gemms * n_tok * dim * hidden)


def flop_breakdown(cfg, height: int, width: Optional[int] = None) -> dict:
    """Forward FLOPs of one image, split by part."""
    width = height if width is None else width
    N, D, P = tokens_per_image(cfg, height, width), cfg.embed_dim, cfg.patch_size
    per_block = block_flops(N, N, D, cfg.ffn_hidden, 2 if cfg.ffn == "mlp" else 3)
    block = sum(per_block.values())
    patch_embed = 2.0 * (height // P) * (width // P) * D * cfg.in_chans * P * P
    return dict(tokens=N, per_block=per_block, block=block, blocks=block * cfg.depth, patch_embed=patch_embed,
                total=block * cfg.depth + patch_embed)


def model_flops(cfg, height: int, width: Optional[int] = None, batch: int = 1, training: bool = False) -> float:
    """Model FLOPs of one call on ``batch`` images; training (forward + backward) counts 3x the forward."""
    return flop_breakdown(cfg, height, width)["total"] * batch * (3.0 if training else 1.0)


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, backward: bool = False) -> float:
    """Matmul FLOPs of softmax attention: 4*B*h*Nq*Nk*d forward; the backward counts 2.5x that."""
    fwd = 4.0 * batch * heads * n_q * n_k * head_dim
    return fwd * (1.0 + 2.5) if backward else fwd


def aggregator_flops(model, batch: int, frames: int, height: int, width: int) -> float:
    """Forward FLOPs of a VGGT aggregator: the patch-embedding ViT, then frame + global blocks."""
    P, D = model.patch_size, model.embed_dim
    hw = (height // P) * (width // P)
    images = batch * frames
    total = 2.0 * images * hw * 3 * P * P * D  # the patch projection
    pe = model.patch_embed
    if hasattr(pe, "blocks"):
        n = 1 + pe.n_storage_tokens + hw
        mlp = pe.blocks[0].mlp
        hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 4 * pe.embed_dim
        total += len(pe.blocks) * sum(block_flops(images * n, n, pe.embed_dim, hidden).values())
    n_tok = model.patch_start_idx + hw
    hidden = model.frame_blocks[0].mlp.fc1.out_features
    total += model.depth * sum(block_flops(images * n_tok, n_tok, D, hidden).values())  # frame attention
    total += model.depth * sum(block_flops(images * n_tok, frames * n_tok, D, hidden).values())  # global
    return total

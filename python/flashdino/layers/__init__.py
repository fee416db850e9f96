"""Small composable layers the DINOv2 / DINOv3 backbones and the VGGT aggregator are built from."""

from .attention import Attention
from .block import Block, run_blocks
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLU, SwiGLUFused, build_ffn
from .norm import LayerNorm
from .patch_embed import PatchEmbed
from .rope import RopePositionEmbedding, dinov3_periods

__all__ = ["Attention", "Block", "DropPath", "LayerNorm", "LayerScale", "Mlp", "SwiGLU", "SwiGLUFused", "build_ffn",
           "PatchEmbed", "RopePositionEmbedding", "dinov3_periods", "run_blocks"]

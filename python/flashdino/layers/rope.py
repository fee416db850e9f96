"""The DINOv3 RoPE module: holds the periods buffer and describes the token grid per input."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import RopeGrid


def dinov3_periods(head_dim: int, base: float = 100.0, round_to_bf16: bool = True) -> torch.Tensor:
    """base ** (2i / (d/2)) for i < d/4. The released checkpoints hold these rounded to bfloat16."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    periods = base**exponents
    return periods.to(torch.bfloat16).float() if round_to_bf16 else periods


class RopePositionEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 100.0, normalize_coords: str = "separate"):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.normalize_coords = normalize_coords
        self.register_buffer("periods", dinov3_periods(head_dim, base), persistent=True)

    def reset_parameters(self):
        self.periods.copy_(dinov3_periods(self.head_dim, self.base))

    def grid(self, height: int, width: int, n_prefix: int) -> RopeGrid:
        return RopeGrid("dinov3", height, width, n_prefix, periods=self.periods.float(),
                        normalize=self.normalize_coords, base=self.base)

"""Feed-forward layers. Parameter names follow the official checkpoints."""

import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv3 gated FFN: w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SwiGLUFused(nn.Module):
    """DINOv2-g gated FFN with one packed input projection w12 = [w1; w2]."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def build_ffn(kind: str, dim: int, hidden: int, bias: bool = True) -> nn.Module:
    layers = {"mlp": Mlp, "swiglu": SwiGLU, "swiglu_fused": SwiGLUFused}
    if kind not in layers:
        raise ValueError(f"unknown FFN kind {kind!r}; expected one of {sorted(layers)}")
    return layers[kind](dim, hidden, bias)

"""Reference 2D rotary position embedding (pure PyTorch).

Two conventions share one description of the token grid (:class:`RopeGrid`):

* ``"dinov3"``: coordinates in [-1, 1] (``separate``/``min``/``max`` normalisation), angles
  ``2*pi*coord/period`` laid out per head as ``[Y, X, Y, X]`` (each block ``d/4`` wide) and a
  rotate-half pairing of channel ``i`` with ``i + d/2``. q and k are rotated in fp32.
* ``"vggt"``: integer coordinates ``(row + 1, col + 1)``, the first half of the head rotated by y
  and the second by x, each half with its own rotate-half (pairing ``i`` with ``i + d/4``);
  angles are rounded to the token dtype before cos/sin, and the rotation runs in that dtype.

Prefix tokens (CLS + storage tokens, or camera + register tokens) get the identity rotation:
cos = 1 and sin = 0 reproduce them bit for bit, so one elementwise pass covers the whole sequence.
A sequence may hold several frames of ``tokens_per_frame`` tokens each (VGGT global attention);
every frame reuses the same positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RopeGrid:
    mode: str  # "dinov3" | "vggt"
    height: int
    width: int
    n_prefix: int
    periods: Optional[Tensor] = None  # dinov3: [d/4] fp32
    normalize: str = "separate"  # dinov3 coordinate normalisation
    base: float = 100.0  # vggt base frequency
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens_per_frame(self) -> int:
        return self.n_prefix + self.height * self.width

    def tables(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [tokens_per_frame, head_dim], identity rows for the prefix."""
        key = (head_dim, dtype, device)
        if key not in self._cache:
            if self.mode == "dinov3":
                cos, sin = dinov3_rope_tables(self.height, self.width, self.periods.to(device), self.normalize)
            elif self.mode == "vggt":
                cos, sin = vggt_rope_tables(self.height, self.width, head_dim, self.base, dtype, device)
            else:
                raise ValueError(f"unknown RoPE mode {self.mode!r} (expected 'dinov3' or 'vggt')")
            self._cache[key] = (_with_identity_prefix(cos, self.n_prefix, 1.0),
                                _with_identity_prefix(sin, self.n_prefix, 0.0))
        return self._cache[key]


def _with_identity_prefix(table: Tensor, n_prefix: int, value: float) -> Tensor:
    if n_prefix == 0:
        return table
    pad = table.new_full((n_prefix, table.shape[-1]), value)
    return torch.cat([pad, table], dim=0)


def dinov3_coords(height: int, width: int, normalize: str, device=None) -> Tensor:
    """Patch-centre coordinates in [-1, 1], shape [H*W, 2] as (y, x), row-major."""
    dd = dict(device=device, dtype=torch.float32)
    if normalize == "separate":
        denom_h, denom_w = height, width
    elif normalize == "max":
        denom_h = denom_w = max(height, width)
    elif normalize == "min":
        denom_h = denom_w = min(height, width)
    else:
        raise ValueError(f"unknown RoPE coordinate normalisation {normalize!r}")
    coords_h = torch.arange(0.5, height, **dd) / denom_h
    coords_w = torch.arange(0.5, width, **dd) / denom_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def dinov3_rope_tables(height: int, width: int, periods: Tensor, normalize: str = "separate"):
    coords = dinov3_coords(height, width, normalize, periods.device)
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]  # [HW, 2, d/4]
    angles = angles.flatten(1, 2).tile(2)  # [HW, d] as [Y, X, Y, X]
    return torch.cos(angles), torch.sin(angles)


def vggt_rope_tables(height: int, width: int, head_dim: int, base: float, dtype, device):
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))  # [d/4]
    ys = torch.arange(height, device=device, dtype=torch.float32) + 1
    xs = torch.arange(width, device=device, dtype=torch.float32) + 1
    pos_y = ys[:, None].expand(height, width).reshape(-1)
    pos_x = xs[None, :].expand(height, width).reshape(-1)
    ang_y = (pos_y[:, None] * inv_freq[None, :]).to(dtype)
    ang_x = (pos_x[:, None] * inv_freq[None, :]).to(dtype)
    angles = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)  # [HW, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _swap_halves(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def _signed_sin(grid: RopeGrid, sin: Tensor) -> Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin exactly
    (a sign flip is exact), which saves one elementwise pass per tensor."""
    key = ("signed", sin.shape, sin.device)
    if key not in grid._cache:
        half = sin.shape[-1] // 2
        grid._cache[key] = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return grid._cache[key]


def _rotate_half_per_half(x: Tensor) -> Tensor:
    y_part, x_part = x.chunk(2, dim=-1)
    return torch.cat([_rotate_half(y_part), _rotate_half(x_part)], dim=-1)


def _frame_tables(grid: RopeGrid, n_tokens: int, head_dim: int, dtype, device):
    cos, sin = grid.tables(head_dim, dtype, device)
    # // and % rather than divmod(): divmod() is undefined on the symbolic sizes of an ONNX export.
    frames, rem = n_tokens // grid.tokens_per_frame, n_tokens % grid.tokens_per_frame
    if rem or frames == 0:
        raise ValueError(
            f"RoPE grid {grid.height}x{grid.width} with {grid.n_prefix} prefix tokens "
            f"({grid.tokens_per_frame} tokens per frame) does not match a sequence of {n_tokens} tokens"
        )
    if frames > 1:
        cos, sin = cos.repeat(frames, 1), sin.repeat(frames, 1)
    return cos, sin


def apply_rope(q: Tensor, k: Tensor, grid: RopeGrid) -> tuple[Tensor, Tensor]:
    """Rotate q and k of shape [B, heads, N, d]; returns tensors of the input dtypes."""
    n_tokens, head_dim = q.shape[-2], q.shape[-1]
    if grid.mode == "dinov3":
        cos, sin = _frame_tables(grid, n_tokens, head_dim, torch.float32, q.device)
        sin = _signed_sin(grid, sin)
        qf, kf = q.float(), k.float()
        q_out = qf * cos + _swap_halves(qf) * sin
        k_out = kf * cos + _swap_halves(kf) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)
    cos, sin = _frame_tables(grid, n_tokens, head_dim, q.dtype, q.device)
    q_out = q * cos + _rotate_half_per_half(q) * sin
    k_out = k * cos.to(k.dtype) + _rotate_half_per_half(k) * sin.to(k.dtype)
    return q_out, k_out

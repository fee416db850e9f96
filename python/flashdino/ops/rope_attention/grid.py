"""2D rotary position embedding geometry: the one owner of RoPE for the reference and the kernels.

Two conventions share one description of the token grid (:class:`RopeGrid`):

* ``"dinov3"``: coordinates in [-1, 1], ``2 * (i + 0.5) / denom - 1`` with the denominators of
  the ``separate`` / ``min`` / ``max`` normalisation, angles ``2*pi*coord/period`` laid out per
  head as ``[Y, X, Y, X]`` (each block ``d/4`` wide) and a rotate-half pairing of channel ``i``
  with ``i + d/2``. q and k are rotated in fp32.
* ``"vggt"``: integer coordinates ``(row + 1, col + 1)``, inverse frequencies
  ``1 / base**(arange(0, d/2, 2) / (d/2))``, the first half of the head rotated by y and the
  second by x, each half with its own rotate-half (pairing ``i`` with ``i + d/4``); angles and
  cos/sin are rounded to the dtype of q as it reaches the rotation (:func:`rotation_dtype`).

Prefix tokens (CLS + storage tokens, or camera + register tokens) get the identity rotation:
cos = 1 and sin = 0 reproduce them bit for bit. A sequence may hold several frames of
``tokens_per_frame`` tokens each (VGGT global attention); every frame reuses the same positions.

The reference reads :meth:`RopeGrid.tables`; the Triton prepass, its backward post-pass and the
"table" variant read the same values as one fp32 tensor (:meth:`RopeGrid.kernel_table`), so the
trigonometry runs once per grid (tokens x head dim), not per image and head. The CUDA kernels
and the opt-in "inline" Triton variant recompute the angles from :meth:`RopeGrid.frequencies`
and :meth:`RopeGrid.denominators`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

MODES = ("dinov3", "vggt")
NORMALIZATIONS = ("separate", "min", "max")


def layer_norm_returns_fp32(device: torch.device) -> bool:
    """Whether ``F.layer_norm`` of low-precision input returns fp32 here: CUDA autocast lists it
    as an fp32 op; CPU autocast keeps the input dtype."""
    return device.type == "cuda" and torch.is_autocast_enabled("cuda")


def rotation_dtype(token_dtype: torch.dtype, q_normed: bool, device: torch.device) -> torch.dtype:
    """dtype of q when the reference rotates it: the token dtype, or fp32 after a qk-norm whose
    LayerNorm autocast promotes. The "vggt" angles and cos/sin are rounded to this dtype."""
    return torch.float32 if q_normed and layer_norm_returns_fp32(device) else token_dtype


@dataclass
class RopeGrid:
    """Token grid of one frame: ``n_prefix`` unrotated tokens, then ``height`` x ``width`` patches."""

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

    def denominators(self) -> tuple[float, float]:
        """(y, x) coordinate denominators of "dinov3"; (1, 1) for "vggt" (integer positions)."""
        if self.mode != "dinov3":
            return 1.0, 1.0
        if self.normalize == "separate":
            return float(self.height), float(self.width)
        if self.normalize == "max":
            return (float(max(self.height, self.width)),) * 2
        if self.normalize == "min":
            return (float(min(self.height, self.width)),) * 2
        raise ValueError(f"unknown RoPE coordinate normalisation {self.normalize!r} (expected one of {NORMALIZATIONS})")

    def frequencies(self, head_dim: int, device: torch.device) -> Tensor:
        """The [d/4] fp32 table the kernels read: "dinov3" periods or "vggt" inverse frequencies."""
        if self.mode == "dinov3":
            return self.periods.to(device=device, dtype=torch.float32).contiguous()
        if self.mode != "vggt":
            raise ValueError(f"unknown RoPE mode {self.mode!r} (expected one of {MODES})")
        if torch.compiler.is_compiling():  # a traced graph computes it; no Python cache inside a trace
            return vggt_inverse_frequencies(head_dim, self.base, device)
        key = ("inv_freq", head_dim, device)
        if key not in self._cache:
            self._cache[key] = vggt_inverse_frequencies(head_dim, self.base, device)
        return self._cache[key]

    def tables(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [tokens_per_frame, head_dim], identity rows for the prefix.

        ``dtype`` is the rotation dtype (:func:`rotation_dtype`); "dinov3" tables are fp32 always.
        """
        if self.mode == "dinov3":
            dtype = torch.float32
        key = (head_dim, dtype, device)
        if torch.compiler.is_compiling():  # a traced graph computes them; no Python cache inside a trace
            return self._compute_tables(head_dim, dtype, device)
        if key not in self._cache:
            self._cache[key] = self._compute_tables(head_dim, dtype, device)
        return self._cache[key]

    def _compute_tables(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.mode == "dinov3":
            cos, sin = dinov3_rope_tables(self.height, self.width, self.periods.to(device), self.normalize)
        elif self.mode == "vggt":
            cos, sin = vggt_rope_tables(self.height, self.width, self.frequencies(head_dim, device), dtype)
        else:
            raise ValueError(f"unknown RoPE mode {self.mode!r} (expected one of {MODES})")
        return _with_identity_prefix(cos, self.n_prefix, 1.0), _with_identity_prefix(sin, self.n_prefix, 0.0)

    def kernel_table(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """:meth:`tables` as one contiguous fp32 tensor ``[2 (cos, sin), tokens_per_frame, head_dim]``
        (the values rounded to ``dtype`` first, exactly as the reference rotates), for the kernels."""
        if torch.compiler.is_compiling():
            cos, sin = self.tables(head_dim, dtype, device)
            return torch.stack([cos.float(), sin.float()])
        key = ("kernel_table", head_dim, torch.float32 if self.mode == "dinov3" else dtype, device)
        if key not in self._cache:
            cos, sin = self.tables(head_dim, dtype, device)
            self._cache[key] = torch.stack([cos.float(), sin.float()])
        return self._cache[key]


def _with_identity_prefix(table: Tensor, n_prefix: int, value: float) -> Tensor:
    if n_prefix == 0:
        return table
    pad = table.new_full((n_prefix, table.shape[-1]), value)
    return torch.cat([pad, table], dim=0)


def dinov3_coords(height: int, width: int, normalize: str, device=None) -> Tensor:
    """Patch-centre coordinates in [-1, 1], shape [H*W, 2] as (y, x), row-major."""
    denom_h, denom_w = RopeGrid("dinov3", height, width, 0, normalize=normalize).denominators()
    dd = dict(device=device, dtype=torch.float32)
    coords_h = torch.arange(0.5, height, **dd) / denom_h
    coords_w = torch.arange(0.5, width, **dd) / denom_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def dinov3_rope_tables(height: int, width: int, periods: Tensor, normalize: str = "separate"):
    coords = dinov3_coords(height, width, normalize, periods.device)
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]  # [HW, 2, d/4]
    angles = angles.flatten(1, 2).tile(2)  # [HW, d] as [Y, X, Y, X]
    return torch.cos(angles), torch.sin(angles)


def vggt_inverse_frequencies(head_dim: int, base: float, device) -> Tensor:
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))  # [d/4]


def vggt_rope_tables(height: int, width: int, inv_freq: Tensor, dtype):
    device = inv_freq.device
    ys = torch.arange(height, device=device, dtype=torch.float32) + 1
    xs = torch.arange(width, device=device, dtype=torch.float32) + 1
    pos_y = ys[:, None].expand(height, width).reshape(-1)
    pos_x = xs[None, :].expand(height, width).reshape(-1)
    ang_y = (pos_y[:, None] * inv_freq[None, :]).to(dtype)
    ang_x = (pos_x[:, None] * inv_freq[None, :]).to(dtype)
    angles = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)  # [HW, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)

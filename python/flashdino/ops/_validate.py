"""Argument checks shared by the ops' public functions (each op validates once, before dispatch)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_vector(op: str, name: str, t: Optional[Tensor], size: int, like: Tensor, like_name: str = "x") -> None:
    """``t`` is None or a floating [size] tensor on ``like``'s device; a ValueError / TypeError
    naming the op and the argument otherwise."""
    if t is None:
        return
    if not isinstance(t, Tensor) or t.shape != (size,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a [{size}] tensor, got {shape}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} on {t.device}, {like_name} on {like.device}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")

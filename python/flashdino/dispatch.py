"""The one place that decides which backend runs each op.

Backends register an implementation per op (``backends/{default,triton,cuda}``); the reference
("torch") implementation always exists. Selection order:

1. an explicit ``backend=`` argument (an error if that backend cannot run the call);
2. the environment: ``FLASHDINO_BACKEND_<OP>`` then ``FLASHDINO_BACKEND`` (``torch``, ``triton``,
   ``cuda`` or ``auto``); a forced backend that cannot run the call falls back with a warning;
3. on CUDA tensors, the op's preference list (written from measurements next to each op),
   skipping backends that are missing or do not support the call; anything else runs "torch".

``explain()`` reports, for ``python -m flashdino.info``, what would run and why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")


@dataclass
class Impl:
    fn: Callable
    # Returns None when the call is supported, else a short reason.
    supports: Callable[..., Optional[str]]


_REGISTRY: dict[str, dict[str, Impl]] = {}
_PREFERENCE: dict[str, tuple[str, ...]] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it could not be loaded


def register(op: str, backend: str, fn: Callable, supports: Optional[Callable[..., Optional[str]]] = None):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, supports or (lambda **_: None))


def set_preference(op: str, order: tuple[str, ...]):
    _PREFERENCE[op] = order


def mark_unavailable(backend: str, reason: str):
    _UNAVAILABLE[backend] = reason


def load_backends():
    """Registers every backend that can load (idempotent). ``flashdino.ops`` calls it on import,
    so that no import happens inside a traced (torch.compile) call."""
    from .backends import load_all

    load_all()


_load_backends = load_backends


def _env_choice(op: str) -> Optional[str]:
    value = os.environ.get(f"FLASHDINO_BACKEND_{op.upper()}") or os.environ.get("FLASHDINO_BACKEND")
    if not value or value.lower() == "auto":
        return None
    value = value.lower()
    if value not in BACKENDS:
        raise ValueError(f"FLASHDINO_BACKEND={value!r} is not one of {BACKENDS + ('auto',)}")
    return value


def _why_not(op: str, backend: str, device: torch.device, facts: dict) -> Optional[str]:
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        return _UNAVAILABLE.get(backend, f"no {backend} implementation of {op}")
    if backend != "torch" and device.type != "cuda":
        interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if not interpreted:
            return f"tensors are on {device.type}, the {backend} kernels need CUDA"
    return impls[backend].supports(**facts)


def select(op: str, device: torch.device, backend: Optional[str] = None, **facts) -> tuple[Callable, str, str]:
    """(implementation, backend name, reason) for one call."""
    _load_backends()
    if backend is not None:
        why = _why_not(op, backend, device, facts)
        if why:
            raise ValueError(f"{op}: backend {backend!r} cannot run this call: {why}")
        return _REGISTRY[op][backend].fn, backend, "requested by the caller"
    forced = _env_choice(op)
    if forced is not None:
        why = _why_not(op, forced, device, facts)
        if why is None:
            return _REGISTRY[op][forced].fn, forced, "forced by FLASHDINO_BACKEND"
        warnings.warn(f"{op}: FLASHDINO_BACKEND={forced} cannot run this call ({why}); using the default order",
                      stacklevel=3)
    reasons = []
    if device.type == "cuda":
        for name in _PREFERENCE.get(op, ("torch",)):
            why = _why_not(op, name, device, facts)
            if why is None:
                reason = "preferred on CUDA" if not reasons else "; ".join(reasons)
                return _REGISTRY[op][name].fn, name, reason
            reasons.append(f"{name}: {why}")
    else:
        reasons.append(f"tensors on {device.type}")
    return _REGISTRY[op]["torch"].fn, "torch", "; ".join(reasons) or "reference path"


def explain(device: Optional[torch.device] = None, **facts) -> dict[str, tuple[str, str]]:
    """Backend and reason per op for a typical call on ``device``."""
    _load_backends()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for op in sorted(_REGISTRY):
        op_facts = facts.get(op, {})
        try:
            _, name, reason = select(op, device, **op_facts)
        except Exception as exc:  # pragma: no cover - report, never crash the info command
            name, reason = "?", str(exc)
        out[op] = (name, reason)
    return out


def unavailable() -> dict[str, str]:
    _load_backends()
    return dict(_UNAVAILABLE)

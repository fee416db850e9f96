"""Which flashdino backend a benchmark runs, and which one actually ran.

The only place in the benchmarks that steers dispatch: ``forced_backend("torch")`` for the
reference path, ``forced_backend(None)`` for the default choice.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .. import dispatch, ops  # noqa: F401  (importing ops registers every op with dispatch)

__all__ = ["forced_backend", "backends_ran", "dispatch_explain"]


@contextlib.contextmanager
def forced_backend(name: Optional[str]) -> Iterator[None]:
    """Forces every op to ``name`` inside the block; ``None`` leaves the default dispatch alone."""
    if name is None:
        yield
        return
    with dispatch.use(name):
        yield


def backends_ran() -> Optional[dict[str, str]]:
    """{op: backend of its last eager call in this process} for the ops that ran."""
    out = {}
    for op in dispatch.ops():
        name = dispatch.last_backend(op)
        if name is not None:
            out[op] = name if isinstance(name, str) else str(name)
    return out


def dispatch_explain(device: torch.device) -> dict | str:
    """{op: "backend (reason)"} for a typical call on ``device``; a report line, never an error."""
    try:
        return {op: f"{name} ({why})" for op, (name, why) in dispatch.explain(device).items()}
    except Exception as exc:
        return f"unavailable: {exc}"

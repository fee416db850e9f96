"""Per-backend implementations of flashdino's ops.

``default`` is the pure-PyTorch reference (always present); ``triton`` and ``cuda`` register
themselves only when their toolchain imports. Loading never raises: a missing backend is
recorded with its reason for ``python -m flashdino.info``.
"""

from __future__ import annotations

_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .. import dispatch
    from . import default  # noqa: F401  (registers the reference implementations)

    try:
        from . import triton as _triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        dispatch.mark_unavailable("triton", f"Triton backend did not load: {exc}")
    try:
        from . import cuda as _cuda  # noqa: F401
    except Exception as exc:
        dispatch.mark_unavailable("cuda", f"CUDA backend did not load: {exc}")

"""Whether Triton can be used, and why not."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)"
    return True, f"triton {triton.__version__}"


def require_triton():
    ok, why = triton_status()
    if not ok:
        raise ImportError(why)

"""Whether Triton can be used, and why not."""

from __future__ import annotations

import functools
import os


MIN_TRITON = (3, 2)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in str(text).split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    # Oldest supported: 3.2 (tl.dot(input_precision=...), tl.math.div_rn and the custom-op
    # integration the kernels rely on). An older Triton leaves every op on its other backends.
    version = _version_tuple(getattr(triton, "__version__", "0"))
    if version < MIN_TRITON:
        return False, (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest "
                       f"flashdino supports (pip install -U triton)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)"
    return True, f"triton {triton.__version__}"


def require_triton():
    ok, why = triton_status()
    if not ok:
        raise ImportError(why)

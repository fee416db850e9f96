"""Device facts the dispatch routes on, behind functions that tests can replace.

Rules, applied to CUDA tensors only (``dispatch._why_not``):

* "triton": compute capability >= 8.0. The kernels use bf16 / TF32 tensor-core dots and are
  audited (registers, spills, shared memory) for sm_80, sm_86, sm_89 and sm_90; on sm_70 / sm_75
  the attention spills tens of KB per thread, so older GPUs take the next backend.
* "cuda" (``flashdino._C``): the GPU must be one the extension has machine code for. The build
  records its architectures (``_C.cuda_architectures()``, e.g. ``['80', '86', '89', '90a']``);
  SASS for ``sm_XY`` runs on the same major version with minor >= Y, an arch-specific ``XYa``
  only on exactly X.Y. Anything else would be a launch error, so the call goes to the next backend
  and ``flashdino info`` shows why.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

MIN_TRITON_CAPABILITY = (8, 0)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device: the only capability query of the routing."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def built_architectures() -> list[str]:
    """Architectures ``flashdino._C`` carries kernels for (empty when it is not built with CUDA)."""
    from .._native import cuda_architectures

    return cuda_architectures()


def _parse_arch(arch: str) -> Optional[tuple[int, int, bool]]:
    """'90a' -> (9, 0, True); '86' -> (8, 6, False); None if unreadable."""
    text = str(arch).strip().lower().removeprefix("sm_").removeprefix("compute_")
    text = text.split("-")[0]
    specific = text.endswith(("a", "f"))
    digits = text.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        return None
    return int(digits[:-1]), int(digits[-1]), specific


def runs_on(archs: list[str], cc: tuple[int, int]) -> bool:
    """Whether kernels built for ``archs`` have machine code for a GPU of capability ``cc``."""
    for arch in archs:
        parsed = _parse_arch(arch)
        if parsed is None:
            continue
        major, minor, specific = parsed
        if specific and (major, minor) == tuple(cc):
            return True
        if not specific and major == cc[0] and minor <= cc[1]:
            return True
    return False


def _sm(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def backend_rule(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` may run on the CUDA ``device``, else the reason it may not."""
    if device.type != "cuda" or backend == "torch":
        return None
    try:
        cc = capability(device)
    except Exception as exc:  # no driver / no such device: the reference raises its own, clearer error
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"cannot query the CUDA device ({exc.__class__.__name__}: {first})"
    if backend == "triton" and tuple(cc) < MIN_TRITON_CAPABILITY:
        return (f"compute capability {cc[0]}.{cc[1]} ({_sm(cc)}): flashdino's Triton kernels need sm_80 or newer "
                f"(bf16 / TF32 tensor cores; audited for sm_80-sm_90)")
    if backend == "cuda":
        archs = built_architectures()
        if not runs_on(archs, cc):
            built = ", ".join(f"sm_{a}" for a in archs) or "no architecture"
            return (f"flashdino._C has kernels for {built}, not for this GPU ({_sm(cc)}); rebuild with "
                    f"FLASHDINO_CUDA_ARCHITECTURES={cc[0]}{cc[1]} to use it")
    return None

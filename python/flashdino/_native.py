"""Loading of the optional compiled extension ``flashdino._C``.

The extension links neither libtorch nor libcudart dynamically; tensors cross as data pointers,
sizes, strides and the current CUDA stream. When it is missing (no CUDA compiler at build time,
or a CPU-only install) flashdino runs on Triton or the PyTorch path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util


@functools.lru_cache(maxsize=None)
def native_status() -> tuple[object, str]:
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, ("flashdino._C is not built (a source checkout on PYTHONPATH, or an install with "
                      "FLASHDINO_NATIVE=OFF / no C++ compiler)")
    try:
        _C = importlib.import_module(f"{__package__}._C")
    except Exception as exc:
        return None, f"flashdino._C is present but failed to import ({exc.__class__.__name__}: {exc})"
    has_cuda = bool(getattr(_C, "has_cuda", lambda: False)())
    if not has_cuda:
        return _C, "flashdino._C built without CUDA (no GPU or no CUDA compiler at build time, or FLASHDINO_CUDA=OFF)"
    archs = ", ".join(f"sm_{a}" for a in cuda_architectures(_C)) or "no architectures"
    return _C, f"flashdino._C with CUDA kernels for {archs}"


def cuda_architectures(module=None) -> list[str]:
    """Architectures the CUDA kernels were compiled for, e.g. ['80', '90a'] (empty without CUDA)."""
    module = module if module is not None else native_status()[0]
    if module is None:
        return []
    archs = getattr(module, "cuda_architectures", lambda: [])()
    if isinstance(archs, str):  # tolerate an older build that returned "80;90a"
        archs = [a for a in archs.replace(",", ";").split(";") if a]
    return list(archs)


def require_native():
    module, why = native_status()
    if module is None or not getattr(module, "has_cuda", lambda: False)():
        raise ImportError(why)
    return module

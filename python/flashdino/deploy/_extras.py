"""Optional runtimes: import them on demand, and say which extra installs a missing one."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module -> the pip extra that installs it
EXTRAS = {
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnx_ir": "onnx",
    "onnxruntime": "onnx",
    "openvino": "openvino",
}


class MissingExtraError(ImportError):
    """A runtime or exporter package is not installed; the message names the pip extra."""


def require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0])
        fix = f'pip install "flashdino[{extra}]"' if extra else f"pip install {module}"
        raise MissingExtraError(f"{purpose} needs the '{module}' package, which is not installed ({exc}); "
                                f"install it with: {fix}") from None


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def version(module: str) -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version({"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(module, module))
    except Exception:
        return getattr(importlib.import_module(module), "__version__", "unknown")

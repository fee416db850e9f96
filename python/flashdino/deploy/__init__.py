"""Deployment on CPU: ONNX export with dynamic shapes, and ``optimize()`` over the fastest installed runtime.

Heavy packages (onnx, onnxscript, onnxruntime, openvino) are imported only when a function needs
them; a missing one raises :class:`MissingExtraError` naming the pip extra.
"""

from ._extras import MissingExtraError
from .onnx_export import ExportError, export_onnx, read_metadata
from .optimized import RUNTIMES, OptimizedModel, choose_runtime, installed_runtimes, optimize

__all__ = ["export_onnx", "read_metadata", "ExportError", "MissingExtraError", "optimize", "OptimizedModel",
           "RUNTIMES", "choose_runtime", "installed_runtimes"]

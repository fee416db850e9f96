"""Kernels from the compiled extension ``flashdino._C`` (which does not link libtorch).

Host wrappers live one file per op here; they pass data pointers, sizes, strides and the
current CUDA stream to the native library.
"""

from ..._native import require_native
from .._autoload import import_submodules

require_native()
import_submodules(__name__, __path__)

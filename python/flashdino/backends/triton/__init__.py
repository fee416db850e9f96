"""Triton kernels, one file per fused op (kernel + autograd wrapper + registration).

Importing this package registers every kernel with the dispatcher; it raises ImportError when
Triton is unusable, which ``backends.load_all`` records as the reason for the fallback.
"""

from ...triton_support import require_triton
from .._autoload import import_submodules

require_triton()
import_submodules(__name__, __path__)

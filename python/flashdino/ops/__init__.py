"""Public ops, one package each: ``flashdino/ops/<op>/``.

Every package holds the public function (validation + its one dispatch call) in ``__init__.py``,
the pure-PyTorch reference in ``reference.py`` and the kernels in ``triton.py`` / ``cuda.py``.
Importing a package declares the op with ``flashdino.dispatch`` and registers the backends that
load on this machine.
"""

from .final_norm import final_norm
from .patch_embed import patch_embed_tokens, patch_grid
from .residual_layernorm import residual_layernorm
from .rope_attention import RopeGrid, rope_attention

__all__ = ["RopeGrid", "rope_attention", "residual_layernorm", "final_norm", "patch_embed_tokens", "patch_grid"]

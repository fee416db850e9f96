"""Public ops: one dispatch point each (see ``flashdino.dispatch``).

Each op validates its arguments once here, then runs the backend chosen for the call. The
"torch" backend is the reference implementation in ``flashdino.backends.default``.
"""

from .rope_attention import RopeGrid, rope_attention
from .norms import residual_layernorm
from .final_norm import final_norm
from .patch_embed import patch_embed_tokens, patch_grid

__all__ = ["RopeGrid", "rope_attention", "residual_layernorm", "final_norm", "patch_embed_tokens", "patch_grid"]

from .. import dispatch as _dispatch

_dispatch.load_backends()

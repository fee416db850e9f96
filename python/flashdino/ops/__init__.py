"""Public ops, one package each: ``flashdino/ops/<op>/``.

Every package holds the public function (validation + its one dispatch call) in ``__init__.py``,
the pure-PyTorch reference in ``reference.py`` and the kernels in ``triton.py`` / ``cuda.py``.
Importing a package declares the op with ``flashdino.dispatch``, registers its reference and
registers its kernels lazily: ``triton.py`` / ``cuda.py`` (and Triton itself) are imported the first
time a call or a report needs them, never in a CPU-only process.
"""

from .final_norm import final_norm
from .patch_embed import patch_embed_tokens, patch_grid
from .residual_layernorm import residual_layernorm
from .rope_attention import RopeGrid, rope_attention

from .. import dispatch as _dispatch
from ..check import device as _device, selfcheck as _selfcheck, tune as _tune

# On a GPU every fast backend must also suit the device and pass its first-use self-check; among
# those, the fastest for the call's shape bucket is measured on the device (FLASHDINO_TUNE=0: off).
_dispatch.set_gpu_rules(device_rule=_device.backend_rule, first_use_check=_selfcheck.verify)
_dispatch.set_tuner(_tune.choose)
_dispatch.check_environment()  # every op is declared now: a FLASHDINO_BACKEND_<OP> naming none warns

__all__ = ["RopeGrid", "rope_attention", "residual_layernorm", "final_norm", "patch_embed_tokens", "patch_grid"]

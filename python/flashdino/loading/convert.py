"""Command line: ``python -m flashdino.loading.convert SRC OUT.safetensors [--model NAME] [--dtype bf16]``.

The function lives in :mod:`flashdino.loading.converter` (``flashdino.loading.convert``).
"""

from __future__ import annotations

import sys
import types

from .converter import convert, main


class _CallableModule(types.ModuleType):
    # ``import flashdino.loading.convert`` rebinds ``flashdino.loading.convert`` to this module; keep it callable.
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())

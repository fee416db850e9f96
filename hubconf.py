"""torch.hub entry points: ``torch.hub.load("/path/to/flashdino", "dinov3_vits16", source="local")``.

Every variant of ``flashdino.factory.ENTRY_POINTS`` is exposed with the arguments of
``flashdino.create_model`` (``pretrained=``, ``weights=``, architecture overrides).
"""

import os as _os
import sys as _sys

dependencies = ["torch"]

_PYTHON_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "python")
if _os.path.isdir(_PYTHON_DIR) and _PYTHON_DIR not in _sys.path:
    _sys.path.insert(0, _PYTHON_DIR)

from flashdino.factory import ENTRY_POINTS as _ENTRY_POINTS  # noqa: E402

globals().update(_ENTRY_POINTS)

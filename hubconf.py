"""torch.hub entry points: ``torch.hub.load("/path/to/flashdino", "dinov3_vits16", source="local")``.

Every variant of ``flashdino.factory.ENTRY_POINTS`` is exposed with the arguments of
``flashdino.create_model`` (``weights=``, architecture overrides). As in Meta's own hubconf files,
``pretrained`` defaults to True (the variant's first weights entry: a Hugging Face id for DINOv3,
the public URL for DINOv2); pass ``pretrained=False`` for random weights.
"""

import os as _os
import sys as _sys

dependencies = ["torch"]

_PYTHON_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "python")
if _os.path.isdir(_PYTHON_DIR) and _PYTHON_DIR not in _sys.path:
    _sys.path.insert(0, _PYTHON_DIR)

from flashdino.factory import ENTRY_POINTS as _ENTRY_POINTS  # noqa: E402


def _hub_entry(name, build):
    def entry(*, pretrained: bool = True, weights=None, check_hash: bool = False, **kwargs):
        # check_hash is accepted for compatibility with the official hub entry points (unused).
        return build(pretrained=pretrained, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = build.__doc__
    return entry


globals().update({_name: _hub_entry(_name, _build) for _name, _build in _ENTRY_POINTS.items()})

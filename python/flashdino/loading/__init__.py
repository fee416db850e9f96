"""Finding, reading, checking and converting checkpoints; never building models.

- :func:`read_checkpoint`: a source (file, folder, hub id, URL, tag, dict) -> configuration,
  canonical state dict and preprocessing config, checked against each other;
- :func:`load_weights` (model, source, strict): fills an existing model from any supported source;
- :func:`read_hf_folder`: ``(VitConfig, canonical state dict, preprocessor dict or None)``;
- :func:`to_canonical` / :func:`detect_format`: key layouts -> flashdino's canonical layout;
- :func:`convert` (and ``python -m flashdino.loading.convert``): write a canonical safetensors file.

``flashdino.factory`` builds models from what this package returns; :mod:`.sources` is the only
module that downloads.
"""

from .converter import convert
from .errors import CheckpointError, Fix, NonFiniteWeightsWarning, WeightsUnavailableError
from .files import read_state_dict, unwrap_state_dict
from .formats import FORMATS, canonicalize, detect_format, to_canonical
from .hf import config_from_hf
from .layout import canonical_shapes
from .load import (Checkpoint, LoadReport, config_for_source, expected_shapes, load_source, load_weights,
                   read_checkpoint, read_hf_folder)
from .sources import Source, download_hub, download_url, looks_like_pretrained_source, resolve

__all__ = ["CheckpointError", "WeightsUnavailableError", "NonFiniteWeightsWarning", "Fix", "read_state_dict", "unwrap_state_dict", "FORMATS",
           "canonicalize", "detect_format", "to_canonical", "config_from_hf", "read_hf_folder", "LoadReport",
           "Checkpoint", "read_checkpoint", "canonical_shapes", "config_for_source", "expected_shapes",
           "load_source", "load_weights", "Source", "download_hub", "download_url", "looks_like_pretrained_source",
           "resolve", "convert"]

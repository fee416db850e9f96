"""Finding, reading, converting and strictly loading checkpoints.

- :func:`load_weights` (model, source, strict): every supported source and layout;
- :func:`from_pretrained` (HF folder / hub id / flashdino file): builds the model from its config;
- :func:`read_hf_folder`: ``(VitConfig, canonical state dict, preprocessor dict or None)``;
- :func:`to_canonical` / :func:`detect_format`: key layouts -> flashdino's canonical layout;
- :func:`convert` (and ``python -m flashdino.loading.convert``): write a canonical safetensors file.
"""

from .converter import convert
from .errors import CheckpointError, WeightsUnavailableError
from .files import read_state_dict, unwrap_state_dict
from .formats import FORMATS, canonicalize, detect_format, to_canonical
from .hf import config_from_hf, read_hf_folder
from .load import LoadReport, expected_shapes, from_pretrained, load_source, load_weights
from .sources import Source, download_hub, download_url, looks_like_pretrained_source, resolve

__all__ = ["CheckpointError", "WeightsUnavailableError", "read_state_dict", "unwrap_state_dict", "FORMATS",
           "canonicalize", "detect_format", "to_canonical", "config_from_hf", "read_hf_folder", "LoadReport",
           "expected_shapes", "from_pretrained", "load_source", "load_weights", "Source", "download_hub",
           "download_url", "looks_like_pretrained_source", "resolve", "convert"]

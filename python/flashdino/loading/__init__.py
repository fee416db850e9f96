"""Finding, reading, converting and strictly loading checkpoints."""

from .errors import CheckpointError, WeightsUnavailableError
from .files import read_state_dict, unwrap_state_dict

__all__ = ["CheckpointError", "WeightsUnavailableError", "read_state_dict", "unwrap_state_dict"]

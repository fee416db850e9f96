"""Errors raised while finding, reading or matching weights. Each message names the fix."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model."""


class WeightsUnavailableError(RuntimeError):
    """Weights cannot be obtained (gated, offline, missing); the message says what to do."""

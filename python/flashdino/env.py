"""Numbers read from environment variables, with errors that name the variable and the fix.

The one place that parses numeric switches (``FLASHDINO_DOWNLOAD_TIMEOUT``, ``FLASHDINO_CACHE_MAX_GB``,
torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` ...): a bad value must not surface as Python's
"invalid literal for int() with base 10: 'abc'", which names neither the variable nor what to do.
Imports nothing of flashdino.
"""

from __future__ import annotations

import math
import os
from typing import Optional


class EnvironmentVariableError(ValueError):
    """An environment variable holds a value flashdino cannot use; the message names it and the fix."""


def _raw(name: str) -> Optional[str]:
    raw = os.environ.get(name)
    return None if raw is None or not raw.strip() else raw.strip()


def _bounds(name: str, raw: str, value, minimum, maximum, example) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = f">= {minimum:g}" if minimum is not None else ""
        high = f"<= {maximum:g}" if maximum is not None else ""
        raise EnvironmentVariableError(f"{name}={raw!r} is out of range (must be {' and '.join(x for x in (low, high) if x)}); "
                                       f"unset it or set e.g. {name}={example}")


def env_int(name: str, default: int, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``int(os.environ[name])``, ``default`` when unset or empty; raises :class:`EnvironmentVariableError`."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvironmentVariableError(f"{name}={raw!r} is not an integer; unset it or set e.g. {name}={default}") from None
    _bounds(name, raw, value, minimum, maximum, default)
    return value


def env_float(name: str, default: float, *, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """``float(os.environ[name])`` (finite), ``default`` when unset or empty; raises :class:`EnvironmentVariableError`."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise EnvironmentVariableError(f"{name}={raw!r} is not a finite number; unset it or set e.g. {name}={default:g}")
    _bounds(name, raw, value, minimum, maximum, f"{default:g}")
    return value


def torchrun_env() -> tuple[int, int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; a plain process is (0, 1, 0, 1).

    Checked together, so that a hand-set ``RANK=3 WORLD_SIZE=2`` is reported before any process group waits.
    """
    world = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    local_world = env_int("LOCAL_WORLD_SIZE", 1, minimum=1)
    local_rank = env_int("LOCAL_RANK", 0, minimum=0)
    # Only checked when both are set: some launchers set RANK / LOCAL_RANK without the sizes.
    if rank >= world and _raw("WORLD_SIZE") is not None:
        raise EnvironmentVariableError(f"RANK={rank} but WORLD_SIZE={world}: RANK must be below WORLD_SIZE "
                                       "(start the job with torchrun, which sets both)")
    if local_rank >= local_world and _raw("LOCAL_WORLD_SIZE") is not None:
        raise EnvironmentVariableError(f"LOCAL_RANK={local_rank} but LOCAL_WORLD_SIZE={local_world}: LOCAL_RANK must be "
                                       "below LOCAL_WORLD_SIZE (start the job with torchrun, which sets both)")
    return rank, world, local_rank, local_world


__all__ = ["EnvironmentVariableError", "env_int", "env_float", "torchrun_env"]

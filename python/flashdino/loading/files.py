"""Reading state dicts from disk without executing code.

``.safetensors`` files are read with safetensors; anything else goes through
``torch.load(weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Union

import torch

from .errors import CheckpointError

# Containers that training scripts wrap state dicts in (checked in this order).
_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "model_state_dict", "model_ema")


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors / .pth / .pt / .bin file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a file, or a Hugging Face model folder to load_weights")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot read safetensors file {path} ({exc}); the file is truncated or corrupt: download it again"
        ) from exc


def _needs_code(exc: BaseException) -> bool:
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL" in text or "allowlist" in text or "add_safe_globals" in text


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_code(exc):
            raise _corrupt(path, exc) from exc
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line),
                      str(exc).splitlines()[0] if str(exc) else "")
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs code execution to unpickle "
            f"({detail}). flashdino only loads plain tensors "
            "(torch.load(weights_only=True)); if you trust the file, re-save its state dict with "
            "`torch.save(model.state_dict(), ...)` or convert it to safetensors"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the (safe) unpickler means a damaged file
        raise _corrupt(path, exc) from exc
    return unwrap_state_dict(obj, str(path))


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"cannot read checkpoint {path} ({exc.__class__.__name__}: {first[:200]}); "
        "the file is truncated or corrupt: download it again"
    )


def unwrap_state_dict(obj, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Finds the tensor dict inside common training-checkpoint containers."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(f"{origin} holds no state dict of tensors (found {type(obj).__name__})")

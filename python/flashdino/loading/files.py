"""Reading state dicts from disk without executing code.

What a file is comes from its first bytes, not its name: safetensors files are read with
safetensors, ``torch.save`` files with ``torch.load(weights_only=True)`` (which refuses pickles that
would run code), and anything else (an image, an HTML error page, a bare pickle) is named in the
error instead of being fed to an unpickler.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError, NonFiniteWeightsWarning

# Containers that training scripts wrap state dicts in (checked in this order).
_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "model_state_dict", "model_ema")

# The first bytes of files that people pass as weights by mistake.
_NOT_CHECKPOINTS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"7z\xbc\xaf", "a 7-Zip archive (unpack it first)"), (b"\xfd7zXZ", "an xz archive (unpack it first)"),
    (b"\x89HDF", "an HDF5 file (Keras / h5py), not a PyTorch checkpoint"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"),
)
# torch.save's legacy (non-zip) format starts with this pickled magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"
_SNIFF_BYTES = 64


def sniff(path: Path) -> tuple[str, str]:
    """(kind, description): kind is "safetensors", "torch", "pickle" or "other"."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors", "a safetensors file"
    if head.startswith(b"PK\x03\x04"):
        return "torch", "a zip archive"  # torch.save's default format is a zip archive
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch", "a legacy torch.save file"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", f"a bare Python pickle (protocol {head[1]}), not a torch.save or safetensors file"
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            return "other", what
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "other", "an HTML/XML page (often an error or login page saved instead of the download)"
    if text.startswith((b"{", b"[")):
        return "other", "JSON text, not a checkpoint"
    return "torch", "an unknown file"


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a safetensors or ``torch.save`` file (any file name)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a file, or a Hugging Face model folder to load_weights")
    try:
        size = path.stat().st_size
        kind, what = sniff(path) if size else ("", "")
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    if kind == "other":
        raise CheckpointError(f"{path} is {what}, not a model checkpoint; pass a .safetensors / .pth / .bin "
                              "checkpoint file or a Hugging Face model folder")
    if kind == "pickle":
        raise CheckpointError(
            f"{path} is {what}; flashdino reads only files written by torch.save or safetensors and never "
            "unpickles arbitrary objects. If you trust the file, load it in Python yourself and save the "
            "state dict with torch.save(state_dict, 'model.pth') or safetensors.torch.save_file(...)")
    if kind == "safetensors" or (path.suffix == ".safetensors" and kind != "torch"):
        return _read_safetensors(path)
    return _read_torch(path)


def completeness_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a whole checkpoint, else what is missing (for downloads of unknown length).

    Cheap structural checks where the format allows (safetensors: the header's last data offset is
    the file's end; zip: the central directory at the end is readable), else a full safe load.
    """
    kind, what = sniff(path)
    size = path.stat().st_size
    if kind == "safetensors":
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            return f"unreadable safetensors header ({type(exc).__name__})"
        if 8 + n + end != size:
            return f"the safetensors header describes {8 + n + end} bytes, the file has {size}"
        return None
    if kind == "torch" and what == "a zip archive":
        try:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return f"zip archive without its central directory ({exc})"
        return None
    try:
        read_state_dict(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read safetensors file {path} ({_first_line(exc)}); the file is truncated or corrupt: "
            "download it again"
        ) from exc


def _first_line(exc: BaseException) -> str:
    # torch's own advice ("re-run torch.load with weights_only=False") is unsafe: never repeat it.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln]
    return f"{exc.__class__.__name__}: {lines[0][:200]}" if lines else exc.__class__.__name__


def _global_needed(exc: BaseException) -> Optional[str]:
    for line in str(exc).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:200]
    return None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = _global_needed(exc)
        if needed is None:
            raise _corrupt(path, exc) from exc
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs code execution to unpickle "
            f"({needed}). flashdino only loads plain tensors; if you trust the file, re-save its "
            "state dict with `torch.save(model.state_dict(), ...)` or convert it to safetensors"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the (safe) unpickler means a damaged file
        raise _corrupt(path, exc) from exc
    return unwrap_state_dict(obj, str(path))


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)}); the file is truncated or corrupt: "
                           "download it again")


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


def check_floating(state_dict: dict, origin: str) -> None:
    """Refuses integer / bool / complex tensors: casting them into float weights would be silent garbage."""
    bad = [(k, v.dtype) for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and not v.is_floating_point()]
    if bad:
        shown = ", ".join(f"{k} ({str(d).replace('torch.', '')})" for k, d in bad[:5])
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{origin} holds non-floating tensors: {shown}{more}; model weights must be float32 / bfloat16 / "
            "float16 (a quantised or non-model file cannot be loaded: dequantise it, or pass the original weights)")


_NON_FINITE_SHOWN = 8


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating tensors holding inf or NaN (one float64 sum per tensor: no mask allocated;
    a finite checkpoint's sum cannot overflow float64)."""
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()
            and not torch.isfinite(v.sum(dtype=torch.float64))]


def _caller_outside_flashdino() -> int:
    """The ``stacklevel`` of the first frame outside flashdino (where the user's call is)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("flashdino", "hubconf"):
        frame, level = frame.f_back, level + 1
    return level


def warn_non_finite(state_dict: dict, origin: str) -> list[str]:
    """One :class:`NonFiniteWeightsWarning` naming the tensors with inf / NaN values (the first few and a
    count); returns all their names. Loading goes on: the file may be wanted for inspection."""
    bad = non_finite_tensors(state_dict)
    if bad:
        shown = ", ".join(bad[:_NON_FINITE_SHOWN])
        more = f" and {len(bad) - _NON_FINITE_SHOWN} more" if len(bad) > _NON_FINITE_SHOWN else ""
        warnings.warn(f"{origin}: {len(bad)} weight tensor(s) hold inf or NaN values ({shown}{more}); outputs that "
                      "depend on them will be NaN or inf: the checkpoint is damaged or diverged in training, load "
                      "another one", NonFiniteWeightsWarning, stacklevel=_caller_outside_flashdino())
    return bad


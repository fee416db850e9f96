"""One shard on disk: written in a stream and hashed as it is written; verified before it is reused.

A shard is a plain safetensors file (any safetensors reader opens it). flashdino writes the bytes
itself with ordinary ``write`` calls instead of ``safetensors.torch.save_file``, for two reasons:
a full disk is then an ``OSError`` (ENOSPC) the command reports in one line, and the SHA-256
digest is computed from the very bytes written, without reading a gigabyte shard back.

Next to ``shards/NNNNNN.safetensors`` lies its check file ``shards/NNNNNN.check.json`` (format
marker, shard index, byte count, digest, row and image counts). A shard counts as finished only
when both agree: a resume checks sizes, headers and records always and the digest by default, so a
shard copied over another, truncated or bit-flipped is redone instead of trusted.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch

SHARD_FORMAT = "flashdino.features.shard/2"
CHECK_FORMAT = "flashdino.features.check/1"
SHARDS = "shards"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_CHUNK = 8 << 20


def shard_path(out_dir, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"{k:06d}.safetensors"


def check_path(out_dir, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"{k:06d}.check.json"


def _hasher():
    # SHA-256: in hashlib everywhere, and the fastest of its digests where the CPU has SHA extensions
    return hashlib.sha256()


def write_safetensors(fh, tensors: dict, metadata: dict) -> tuple[int, str]:
    """Writes ``tensors`` as a safetensors file to the open binary file ``fh``; returns (bytes, sha256 hex).

    Tensors are laid out in name order, each right after the previous one (what the format asks);
    the header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
    """
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    flat, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"shard tensor {name}: dtype {t.dtype} is not stored")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        flat.append(t.reshape(-1).view(torch.uint8))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    h = _hasher()
    total = 0
    # each part is hashed in a second thread while it is written (both release the GIL): the digest
    # costs little more wall time than the write itself
    with ThreadPoolExecutor(max_workers=1) as pool:
        for part in [len(head).to_bytes(8, "little"), head, *(b.numpy() for b in flat if b.numel())]:
            view = memoryview(part).cast("B")
            hashing = pool.submit(h.update, view)
            try:
                fh.write(view)
            finally:
                hashing.result()
            total += len(view)
    return total, h.hexdigest()


def file_digest(path) -> str:
    h = _hasher()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def expected_rows(tensors_or_shapes: dict) -> Optional[str]:
    """Why the tensors of one shard disagree on their row counts (None when they agree)."""
    shapes = {n: tuple(s) for n, s in tensors_or_shapes.items()}
    if "grid" not in shapes:
        return "no grid tensor"
    n = shapes["grid"][0]
    for name, s in shapes.items():
        if name.rsplit(".", 1)[-1] != "patch" and (not s or s[0] != n):
            return f"{name} has {s[0] if s else 0} rows, grid has {n}"
    return None


def read_check(out_dir, k: int) -> dict:
    """The check record of shard k; raises ValueError naming the problem."""
    p = check_path(out_dir, k)
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{p.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p.name} is unreadable ({exc})") from None
    if not isinstance(rec, dict) or rec.get("format") != CHECK_FORMAT or rec.get("shard") != k:
        raise ValueError(f"{p.name} is not the check record of shard {k}")
    return rec


def verify(out_dir, k: int, *, indices: Optional[Sequence[int]] = None, ids: Optional[Sequence[str]] = None,
           checksum: bool = True) -> Optional[str]:
    """Why shard k cannot be trusted, or None when it is sound.

    Always: the check record, the byte count, the header (format marker, shard index), the records
    (the expected image indices and ids) and the row counts of every tensor. With ``checksum``: the
    SHA-256 digest of the whole file.
    """
    from safetensors import safe_open

    p = shard_path(out_dir, k)
    if not p.is_file():
        return "missing"
    try:
        rec = read_check(out_dir, k)
    except ValueError as exc:
        return str(exc)
    if p.stat().st_size != rec.get("bytes"):
        return f"{p.stat().st_size} bytes, its check record says {rec.get('bytes')} (truncated or replaced)"
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
            grid = f.get_tensor("grid") if "grid" in shapes else None
    except Exception as exc:  # noqa: BLE001 - any unreadable header means: redo it
        return f"unreadable header ({exc})"
    if meta.get("format") != SHARD_FORMAT or meta.get("shard") != str(k):
        return f"its header says shard {meta.get('shard')!r} of format {meta.get('format')!r} (a copy of another file?)"
    try:
        records = json.loads(meta["records"])
    except (KeyError, ValueError) as exc:
        return f"unreadable records ({exc})"
    if indices is not None and [r.get("index") for r in records] != list(indices):
        return "its records are for other images"
    if ids is not None and [r.get("id") for r in records] != list(ids):
        return "its records name other image ids"
    good = sum(r.get("error") is None for r in records)
    tokens = int((grid[:, 0] * grid[:, 1]).sum()) if grid is not None and grid.ndim == 2 else -1
    why = expected_rows(shapes)
    if why is None and shapes["grid"][0] != good:
        why = f"{shapes['grid'][0]} rows for {good} good images"
    if why is None and (rec.get("rows") != good or rec.get("images") != len(records)):
        why = f"{good} rows and {len(records)} images, its check record says {rec.get('rows')} and {rec.get('images')}"
    if why is None and any(n.rsplit(".", 1)[-1] == "patch" and s[0] != tokens for n, s in shapes.items()):
        why = f"patch tokens do not add up to the {tokens} its grids give"
    if why:
        return why
    if checksum and file_digest(p) != rec.get("sha256"):
        return "checksum mismatch (the bytes changed after it was written)"
    return None


__all__ = ["SHARD_FORMAT", "CHECK_FORMAT", "shard_path", "check_path", "write_safetensors", "file_digest", "verify",
           "read_check", "expected_rows"]

"""The on-disk cache of ``optimize()``: entries flashdino wrote, verified before use, bounded in size.

The root is ``$FLASHDINO_CACHE_DIR`` (default ``~/.cache/flashdino/optimized``). One entry is one
folder ``<variant>-<runtime>-<precision>-<digest of the key>`` holding

- the artefacts the runtime loads (``model.onnx``, ``model.onnx.data`` when the weights are stored
  outside the graph, ``model.int8.onnx``), built in a private staging folder and moved in;
- ``entry.json``, written last: flashdino's format marker, the key (architecture, a hash of the
  weights, runtime and versions, precision, outputs) and the size and SHA-256 of every artefact;
- compiled OpenVINO models, one per input shape (``openvino/<shape>.blob``), each with its own
  record (``<shape>.json``: marker, size, SHA-256), added when a shape is first compiled.

Nothing is loaded unverified: before use every recorded file is checked against its size and
SHA-256, and a blob's bytes are hashed before they are imported. A mismatch rebuilds the entry (or
recompiles the blob); only files that flashdino's records name, or that it writes under its own
names in its own entry folders, are removed or replaced.

A cache that cannot be written (read-only, no permission, disk full) is not an error: a complete
entry in it is used as it is, and otherwise the export goes to a private temporary folder that is
removed once the runtime has loaded it, with one warning.

The cache is bounded: ``FLASHDINO_CACHE_MAX_GB`` (default 5) is its size limit; after an entry or
a blob is added, whole entries are evicted least recently used first (a use touches
``entry.json``), never the one in use, and only entries that carry flashdino's marker. Models whose
weights have no recorded source (random initialisation, or tensors set by hand) would add a new
entry per process, since their weights differ each time: they keep one entry per (variant, runtime,
precision), which a new one replaces, and they are evicted before anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from ..env import env_float
from ..outputs import atomic_write

MARKER = "flashdino.optimize-cache"
FORMAT = 2
RECORD = "entry.json"
BLOB_DIR = "openvino"
DIR_ENV = "FLASHDINO_CACHE_DIR"
MAX_GB_ENV = "FLASHDINO_CACHE_MAX_GB"
DEFAULT_MAX_GB = 5.0
# Names flashdino writes into its entry folders (format 1 kept OpenVINO's CACHE_DIR in openvino_blobs/).
_OWN_FILES = ("model.onnx", "model.onnx.data", "model.int8.onnx", RECORD)
_OWN_BLOB_DIRS = (BLOB_DIR, "openvino_blobs")


def default_cache_dir() -> Path:
    env = os.environ.get(DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashdino" / "optimized"


def max_bytes() -> int:
    """The size limit of the cache in bytes (``FLASHDINO_CACHE_MAX_GB``; 0 keeps only the entry in use)."""
    return int(env_float(MAX_GB_ENV, DEFAULT_MAX_GB, minimum=0) * 1024**3)


def _sha256(data_or_path) -> str:
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return hashlib.sha256(data_or_path).hexdigest()
    h = hashlib.sha256()
    with open(data_or_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _file_problem(path: Path, rec: dict, hashes: bool = True) -> Optional[str]:
    """None when ``path`` has the recorded size and (``hashes``) SHA-256, else what differs."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path.name} is missing"
    if size != int(rec["size"]):
        return f"{path.name} has {size} bytes, its record says {rec['size']} (corrupt or replaced)"
    if hashes and _sha256(path) != rec["sha256"]:
        return f"{path.name} does not match its recorded hash (corrupt or modified)"
    return None


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_ours(record: Optional[dict]) -> bool:
    """An ``entry.json`` written by flashdino (this format, or format 1 whose key held the format)."""
    if record is None:
        return False
    key = record.get("key")
    return record.get("marker") == MARKER or (isinstance(key, dict) and key.get("format") == 1 and "files" in record)


def _remove_own(folder: Path) -> None:
    """Removes the files flashdino wrote in an entry folder (its records' files, its own names and its
    blob folders), then the folders if they are empty; anything else stays."""
    record = _read_json(folder / RECORD)
    names = set(_OWN_FILES)
    if _is_ours(record) and isinstance(record.get("files"), dict):
        names |= {n for n in record["files"] if "/" not in n and "\\" not in n and n not in ("", ".", "..")}
    for name in names - {RECORD}:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    for sub in _OWN_BLOB_DIRS:
        blobs = folder / sub
        if blobs.is_dir() and not blobs.is_symlink():
            for f in blobs.iterdir():
                if f.suffix in (".blob", ".json") and f.is_file() and not f.is_symlink():
                    with contextlib.suppress(OSError):
                        f.unlink()
            with contextlib.suppress(OSError):
                blobs.rmdir()
    with contextlib.suppress(OSError):  # the record last: a crash before leaves an entry that is not trusted
        (folder / RECORD).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class CacheEntry:
    """One entry of the cache (see the module documentation)."""

    def __init__(self, root, key: dict, *, unnamed_weights: bool = False):
        self.root = Path(root).expanduser()
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = self.root / f"{key['variant']}-{key['runtime']}-{key['precision']}-{self.digest}"
        self.unnamed_weights = unnamed_weights
        self.rebuilt_because: Optional[str] = None
        self.hit = False
        self.temporary = False  # True: the cache could not be written; the folder is private and removed later
        self.blobs_loaded = 0  # compiled models served from the cache (a warm start compiles nothing)
        max_bytes()  # a bad FLASHDINO_CACHE_MAX_GB is reported before any export

    def path(self, name: str) -> Path:
        return self.folder / name

    # -- whole entries ------------------------------------------------------------------------------

    def problem(self, hashes: bool = True) -> Optional[str]:
        """None when the entry can be used, else why not (every recorded file is hashed; with
        ``hashes=False`` only the record and the file sizes are checked: a cheap look, for a
        caller that decides whether to use the entry and leaves the full check to the load)."""
        record_path = self.folder / RECORD
        if not record_path.is_file():
            return "no entry record" if not self.folder.exists() else "incomplete entry (no record)"
        record = _read_json(record_path)
        if record is None:
            return "unreadable entry (entry.json is not a JSON object)"
        if not _is_ours(record) or record.get("format") != FORMAT:
            return "the entry was written by another flashdino version"
        if record.get("key") != self.key:
            return "the entry was made for other weights, versions or options"
        files = record.get("files")
        if not isinstance(files, dict) or not files:
            return "unreadable entry (no file list)"
        try:
            for name, rec in sorted(files.items()):
                why = _file_problem(self.folder / name, rec, hashes)
                if why:
                    return why
        except (KeyError, TypeError, ValueError) as exc:
            return f"unreadable entry ({type(exc).__name__}: {exc})"
        return None

    def get(self, build: Callable[[Path], None], *, hashes: bool = True) -> "CacheEntry":
        """Uses the entry if it verifies; else ``build(folder)`` writes the artefacts into a fresh folder
        and the entry is (re)published, or kept private when the cache cannot be written.
        ``hashes=False``: the record and file sizes only, for a caller that checks ``problem()`` before it
        reads the files (OpenVINO's warm start reads stored compiled models, not the export)."""
        why = self.problem(hashes)
        if why is None:
            self.hit = True
            with contextlib.suppress(OSError):  # last use, for eviction; a read-only cache stays as it is
                os.utime(self.folder / RECORD)
            return self
        if self.folder.exists():
            self.rebuilt_because = why
            warnings.warn(f"flashdino.optimize: rebuilding the cache entry {self.folder}: {why}", stacklevel=4)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        except OSError as exc:
            return self._build_privately(build, exc)
        try:
            build(staging)
            record = {"marker": MARKER, "format": FORMAT, "key": self.key, "unnamed_weights": self.unnamed_weights,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "files": {p.relative_to(staging).as_posix(): _describe(p)
                                for p in sorted(staging.rglob("*")) if p.is_file()}}
            (staging / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
            self._publish(staging)
        except Exception as exc:  # noqa: BLE001 - a full disk or a cache that turned unwritable meanwhile
            cause = exc if isinstance(exc, OSError) else exc.__cause__  # export errors wrap the OSError
            if not isinstance(cause, OSError):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return self._build_privately(build, cause)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self.evict()
        return self

    def _publish(self, staging: Path) -> None:
        if self.folder.exists():
            if self.problem() is None:  # another process published this entry while we built it: use theirs
                return
            _remove_own(self.folder)
        try:
            os.rename(staging, self.folder)  # the usual case: no folder (or an empty one) under that name
            return
        except OSError:
            pass
        if self.problem() is None:  # another process published the same entry meanwhile
            return
        # Files of someone else remain in the folder: move flashdino's own files in, the record last.
        for src in sorted(staging.rglob("*"), key=lambda p: p.name == RECORD):
            if src.is_file():
                dest = self.folder / src.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)

    def _build_privately(self, build: Callable[[Path], None], exc: OSError) -> "CacheEntry":
        warnings.warn(f"flashdino.optimize: the cache folder {self.root} cannot be written ({exc.strerror or exc}); "
                      f"running without a cache, so each process exports again (set {DIR_ENV} to a writable "
                      "folder to keep the export)", stacklevel=4)
        self.folder = Path(tempfile.mkdtemp(prefix="flashdino-optimize-"))
        self.temporary = True
        build(self.folder)
        return self

    def invalidate(self) -> None:
        """Removes this entry's files (a file that verified but does not load)."""
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        else:
            _remove_own(self.folder)
        self.hit = False

    def release(self) -> None:
        """Removes a private (no-cache) folder once the runtime has loaded what it needs."""
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- compiled blobs -----------------------------------------------------------------------------

    def _blob_paths(self, tag: str) -> tuple[Path, Path]:
        return self.folder / BLOB_DIR / f"{tag}.blob", self.folder / BLOB_DIR / f"{tag}.json"

    def read_blob(self, tag: str) -> Optional[bytes]:
        """The compiled model for ``tag`` when one is stored and its bytes match its record, else None
        (a mismatching one is removed, so that it is compiled and stored again)."""
        if self.temporary:
            return None
        blob, rec_path = self._blob_paths(tag)
        record = _read_json(rec_path)
        if record is None or record.get("marker") != MARKER or not blob.is_file():
            return None
        try:
            data = blob.read_bytes()
        except OSError:
            return None
        if len(data) == record.get("size") and _sha256(data) == record.get("sha256") \
                and record.get("entry") == self.digest:
            self.blobs_loaded += 1
            return data
        warnings.warn(f"flashdino.optimize: the compiled model {blob} does not match its record (corrupt or "
                      "replaced); compiling again", stacklevel=4)
        for p in (rec_path, blob):
            with contextlib.suppress(OSError):
                p.unlink()
        return None

    def write_blob(self, tag: str, data: bytes) -> None:
        """Stores a compiled model; a cache that cannot be written just means compiling next time."""
        if self.temporary:
            return
        blob, rec_path = self._blob_paths(tag)
        try:
            blob.parent.mkdir(exist_ok=True)
            with atomic_write(blob) as tmp:
                tmp.write_bytes(data)
            record = {"marker": MARKER, "entry": self.digest, "size": len(data), "sha256": _sha256(data)}
            with atomic_write(rec_path) as tmp:
                tmp.write_text(json.dumps(record))
        except OSError:
            return
        self.evict()

    # -- the size bound -----------------------------------------------------------------------------

    def evict(self) -> None:
        """Least recently used entries out until the cache fits ``FLASHDINO_CACHE_MAX_GB``; entries of
        unnamed weights first, and only one of them per (variant, runtime, precision)."""
        if self.temporary:
            return
        with contextlib.suppress(OSError):
            evict(self.root, keep=self)


def _entries(root: Path) -> list[tuple[Path, dict, float]]:
    out = []
    for folder in root.iterdir():
        if folder.is_symlink() or not folder.is_dir() or folder.name.startswith("."):
            continue
        record = _read_json(folder / RECORD)
        if _is_ours(record):
            with contextlib.suppress(OSError):
                out.append((folder, record, (folder / RECORD).stat().st_mtime))
    return out


def _slot(record: dict) -> tuple:
    key = record.get("key") or {}
    return key.get("variant"), key.get("runtime"), key.get("precision")


def evict(root: Path, keep: Optional[CacheEntry] = None, limit: Optional[int] = None) -> list[Path]:
    """Removes whole entries (see :meth:`CacheEntry.evict`); returns their folders."""
    limit = max_bytes() if limit is None else limit
    entries = _entries(Path(root))
    kept = keep.folder if keep is not None else None
    removed = []
    if keep is not None and keep.unnamed_weights:
        slot = (keep.key["variant"], keep.key["runtime"], keep.key["precision"])
        for folder, record, _ in entries:
            if folder != kept and record.get("unnamed_weights") and _slot(record) == slot:
                _remove_own(folder)
                removed.append(folder)
    entries = [e for e in entries if e[0] not in removed]
    sizes = {folder: _folder_bytes(folder) for folder, _, _ in entries}
    total = sum(sizes.values())
    for folder, record, _ in sorted(entries, key=lambda e: (not e[1].get("unnamed_weights"), e[2])):
        if total <= limit:
            break
        if folder == kept:
            continue
        _remove_own(folder)
        removed.append(folder)
        total -= sizes[folder]
    return removed


__all__ = ["CacheEntry", "default_cache_dir", "max_bytes", "evict", "MARKER", "DIR_ENV", "MAX_GB_ENV"]

"""The output folder of a streamed extraction.

    DIR/settings.json              what produced the folder (model, weights digest, preprocessing,
                                   store, inputs digest, shard size); a rerun must match it
    DIR/shards/NNNNNN.safetensors  images [k*S, (k+1)*S) of the input order; tensors of the good
                                   images (rows) plus, in the metadata, one record per image
    DIR/shards/NNNNNN.check.json   its byte count, SHA-256 digest and row counts (``shardfile``)
    DIR/manifest.rank<R>.jsonl     each rank's records, appended after each shard it commits
    DIR/manifest.jsonl             all records in input order (rank 0, after the run)
    DIR/cls.npy, DIR/pooled.npy    [N_good, D] float32, concatenated in input order (rank 0)

A shard file is the unit of progress: it appears by an atomic rename (``outputs.atomic_write``)
only when complete, carries its own records, and is never rewritten by a resume. Everything else
is derived from the shards, so a kill -9 at any moment loses at most the shards in flight.

Ownership: flashdino deletes or replaces only files it wrote, recognised by their format markers
(``settings.json`` with ``format: flashdino.features/N``, shards and check records with theirs,
its own temporary-file names). A folder holding anything else under those names is refused, with
``--overwrite`` too; other files in the folder are never touched.

Tensors in a shard (n good rows, T = their patch tokens in total): ``cls`` [n, D], ``pooled`` [n, D],
``storage`` [n, R, D], ``patch`` [T, D] (row i's tokens are the next ``grid[i][0] * grid[i][1]``),
``grid`` [n, 2] and ``size`` [n, 2] (original height, width) int64; intermediate layers as
``layer<L>.cls`` etc. Metadata: ``records`` (JSON list) and ``ids`` (JSON list of the rows' ids).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..outputs import OutputPathError, atomic_write, folder_problem, input_clash, name_problem
from . import shardfile
from .shardfile import SHARD_FORMAT, SHARDS, check_path, shard_path

FORMAT = "flashdino.features/3"
READABLE_FORMATS = ("flashdino.features/2", FORMAT)  # /2: the same layout without check records
SETTINGS = "settings.json"
MANIFEST = "manifest.jsonl"
LOCK = ".lock"
CONSOLIDATED = ("cls", "pooled")
_RANK_LOG = re.compile(r"manifest\.rank\d+\.jsonl")
# atomic_write's temporary names (".NAME.RANDOM.tmp.SUFFIX") of the files this module writes
_OWN_TMP = re.compile(r"\.(settings\.json|manifest\.jsonl|cls\.npy|pooled\.npy|\d{6}\.safetensors|\d{6}\.check\.json)"
                      r"\.[A-Za-z0-9_]+\.tmp\.(json|jsonl|npy|safetensors)")
_OWN_SHARD_NAME = re.compile(r"\d{6}\.(safetensors|check\.json)")


class OutputDirError(OutputPathError):
    """The output folder cannot be used as asked (other settings, a file in the way, incomplete)."""


def rank_manifest(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"manifest.rank{rank}.jsonl"


def shard_done(out_dir: Path, k: int, *, checksum: bool = False, indices=None, ids=None) -> bool:
    """True when shard k and its check record agree (see :func:`shardfile.verify`)."""
    return shardfile.verify(out_dir, k, indices=indices, ids=ids, checksum=checksum) is None


def output_paths(out_dir) -> list[Path]:
    """Every path an extraction into ``out_dir`` writes (for the overlap checks against the inputs)."""
    out = Path(out_dir)
    return [out, out / SHARDS, out / SETTINGS, out / MANIFEST, out / LOCK, *(out / f"{c}.npy" for c in CONSOLIDATED)]


def check_out_dir(out_dir, *, inputs: Sequence = ()) -> Path:
    """Location checks before any work: a usable name, not a file, not an input nor in one, writable."""
    out = Path(out_dir).expanduser()
    why = name_problem(out)
    if why:
        raise OutputDirError(f"cannot write --out: {why}; choose a shorter name")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file; give a folder (or a name ending in .safetensors for one file)")
    inputs = [i for i in inputs if i is not None]
    for p in output_paths(out):
        clash = input_clash(p, inputs)
        if clash:
            raise OutputDirError(f"--out {out}: {p} {clash}; choose an --out folder outside the inputs")
    why = folder_problem(out)
    if why:
        raise OutputDirError(f"cannot write --out {out}: {why}")
    return out


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def is_own_settings(d) -> bool:
    return isinstance(d, dict) and str(d.get("format", "")).startswith("flashdino.features/")


def _own_shard_file(p: Path) -> bool:
    """A shard or check record written by flashdino (by its format marker), or one of its temporary files."""
    if _OWN_TMP.fullmatch(p.name):
        return True
    if not _OWN_SHARD_NAME.fullmatch(p.name) or p.is_symlink() or not p.is_file():
        return False
    if p.name.endswith(".check.json"):
        try:
            return json.loads(p.read_text(encoding="utf-8")).get("format") == shardfile.CHECK_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = json.loads(fh.read(n)) if 0 < n < (64 << 20) else {}
        return head.get("__metadata__", {}).get("format") == SHARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def foreign_files(out_dir) -> list[Path]:
    """Files under ``out_dir/shards`` that flashdino did not write."""
    d = Path(out_dir) / SHARDS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if not _own_shard_file(p))


def clear_outputs(out_dir: Path) -> None:
    """Removes what an extraction wrote: its shards, check records, manifests, merged arrays and settings,
    each recognised as flashdino's; anything else in the folder stays."""
    out = Path(out_dir)
    shards = out / SHARDS
    if shards.is_dir() and not shards.is_symlink():
        for p in shards.iterdir():
            if _own_shard_file(p):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        with contextlib.suppress(OSError):
            shards.rmdir()  # only when empty: a file flashdino did not write keeps it
    logs = [p for p in out.iterdir() if _RANK_LOG.fullmatch(p.name)] if out.is_dir() else []
    for p in [*(out / f"{c}.npy" for c in CONSOLIDATED), out / MANIFEST, *logs, out / SETTINGS]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _load_settings(sp: Path):
    try:
        return json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return exc


def _inputs_change(out: Path, old: dict, new: dict, ids: Optional[Sequence[str]]) -> Optional[str]:
    """Names the input that changed when only the inputs differ (else None)."""
    rest = {"inputs", "inputs_sha256", "num_images"}
    if {k: v for k, v in old.items() if k not in rest} != {k: v for k, v in new.items() if k not in rest}:
        return None
    a, b = old.get("inputs") or [], new.get("inputs") or []
    for n, (x, y) in enumerate(zip(a, b), 1):
        if x.get("absolute") != y.get("absolute"):
            return f"input {n} changed: {x.get('given')!r} ({x.get('absolute')}) before, {y.get('given')!r} " \
                   f"({y.get('absolute')}) now"
        if x.get("given") != y.get("given"):
            return (f"input {n} is the same folder/file spelled differently: {x.get('given')!r} before, "
                    f"{y.get('given')!r} now (image ids are the paths as given); rerun with {x.get('given')!r} "
                    "to resume")
    if len(a) != len(b):
        return f"{len(a)} inputs before, {len(b)} now ({', '.join(repr(x.get('given')) for x in (a if len(a) > len(b) else b)[min(len(a), len(b)):])})"
    if ids is not None:
        S = old.get("shard_size", 1)
        for k in range(-(-old.get("num_images", 0) // S)):
            p = shard_path(out, k)
            if not p.is_file():
                continue
            with contextlib.suppress(Exception):
                for r in shard_records(p):
                    i = r["index"]
                    if i >= len(ids) or ids[i] != r["id"]:
                        now = repr(ids[i]) if i < len(ids) else "nothing (fewer images now)"
                        return f"the images in the inputs changed: image {i} was {r['id']!r}, now {now}"
    return (f"the images in the inputs changed ({old.get('num_images')} images before, {new.get('num_images')} now; "
            "files added, removed or renamed)")


def prepare_dir(out_dir: Path, settings: dict, *, overwrite: bool, ids: Optional[Sequence[str]] = None) -> bool:
    """Rank 0: creates the folder or checks a previous run's settings. Returns True when resuming.

    Different settings are refused (the diff is in the message) unless ``overwrite``, which clears
    the previous outputs. A ``settings.json`` or shard-folder entries flashdino did not write are
    refused whatever ``overwrite`` says. Temporary files of killed writers are removed.
    """
    out = Path(out_dir)
    sp = out / SETTINGS
    resuming = False
    links = [p.name for p in (out / SETTINGS, out / MANIFEST, out / LOCK, *(out / f"{c}.npy" for c in CONSOLIDATED))
             if p.is_symlink()]
    links += sorted(p.name for p in out.iterdir() if _RANK_LOG.fullmatch(p.name) and p.is_symlink())
    if links:  # writing through a planted link would replace its target
        raise OutputDirError(f"--out {out}: {links[0]} is a symbolic link, which flashdino never creates; it was left "
                             "alone: remove it (its target is not touched) and rerun")
    foreign = foreign_files(out)
    if foreign:
        raise OutputDirError(f"--out {out}: {out / SHARDS} holds files flashdino did not write (e.g. {foreign[0].name}); "
                             "flashdino never deletes those: choose another --out folder")
    if sp.is_symlink() or sp.exists():
        old = _load_settings(sp) if sp.is_file() and not sp.is_symlink() else OSError("not a regular file")
        if not is_own_settings(old):
            why = f"unreadable: {old}" if isinstance(old, Exception) else "no flashdino format marker"
            raise OutputDirError(f"--out {out} has a {SETTINGS} that flashdino did not write ({why}); flashdino never "
                                 "replaces it, --overwrite included: choose another --out folder")
        if old != settings:
            if not overwrite:
                change = _inputs_change(out, old, settings, ids)
                if change:
                    raise OutputDirError(f"--out {out} holds features of other inputs: {change}; pass --overwrite to "
                                         "start over, or choose another folder")
                diff = _diff(old, settings)
                shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} differences)" if len(diff) > 6 else "")
                raise OutputDirError(f"--out {out} holds features made with other settings ({shown}); pass --overwrite "
                                     "to replace them, or choose another folder")
            clear_outputs(out)
        else:
            resuming = True
    else:
        # without flashdino's settings.json, files under the names it writes are someone else's
        theirs = []
        if out.is_dir():
            theirs = [p.name for p in (out / MANIFEST, *(out / f"{c}.npy" for c in CONSOLIDATED)) if p.exists()]
            theirs += sorted(p.name for p in out.iterdir() if _RANK_LOG.fullmatch(p.name))
        if theirs:
            raise OutputDirError(f"--out {out} holds {theirs[0]} but no flashdino {SETTINGS}: flashdino did not write "
                                 "it and never replaces it, --overwrite included: choose another --out folder")
        if (out / SHARDS).is_dir() and any((out / SHARDS).iterdir()):
            if not overwrite:
                raise OutputDirError(f"--out {out} has shards but no {SETTINGS}; pass --overwrite to replace them")
            clear_outputs(out)
    with filesystem_errors(out / SHARDS):
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
    for folder in (out, out / SHARDS):
        for p in folder.iterdir():
            if _OWN_TMP.fullmatch(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()  # left by a writer killed with SIGKILL (no Python cleanup ran)
    if not resuming:
        with filesystem_errors(sp), atomic_write(sp) as tmp:
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
    return resuming


def read_settings(out_dir: Path) -> dict:
    """The settings of a features folder; refuses folders flashdino did not write or a newer format."""
    sp = Path(out_dir) / SETTINGS
    try:
        d = json.loads(sp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputDirError(f"{out_dir} is not a features folder: {SETTINGS} is missing") from None
    except (OSError, ValueError) as exc:
        raise OutputDirError(f"{sp}: unreadable ({exc})") from None
    if not is_own_settings(d):
        raise OutputDirError(f"{sp} was not written by flashdino features (no format marker)")
    if d["format"] not in READABLE_FORMATS:
        raise OutputDirError(f"{sp}: format {d['format']!r} is not one this flashdino reads ({', '.join(READABLE_FORMATS)}); "
                             "upgrade flashdino to read it")
    expected = {"num_images": int, "shard_size": int, "store": list, "model": str, "preprocess": dict}
    bad = [k for k, t in expected.items() if not isinstance(d.get(k), t)]
    if bad or d["shard_size"] < 1 or d["num_images"] < 0:
        raise OutputDirError(f"{sp}: damaged ({', '.join(bad) or 'shard_size / num_images'} missing or invalid); "
                             "rerun the features command with --overwrite to rebuild the folder")
    return d


def describe_oserror(exc: OSError) -> str:
    """The reason of an OSError with the fix for the common ones (a full disk, a quota)."""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{text}: free some space (or use another disk) and rerun the same command; finished shards are kept"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{text}: choose a shorter name"
    return text


@contextlib.contextmanager
def filesystem_errors(what):
    """OSError (disk full, permissions, a vanished folder) as one line naming the file."""
    try:
        yield
    except OutputPathError:
        raise
    except OSError as exc:
        raise OutputDirError(f"cannot write {what}: {describe_oserror(exc)}") from None


_HELD: set = set()  # (st_dev, st_ino) of the lock files this process holds: POSIX locks do not nest


@contextlib.contextmanager
def locked(out_dir: Path):
    """Holds an exclusive lock on the folder: a second run into it fails at once instead of racing.

    The lock file is created with O_EXCL | O_NOFOLLOW and reopened with O_NOFOLLOW: a symbolic link
    (or any file that is not a plain, singly linked lock file) planted as ``.lock`` is refused, never
    followed or truncated. The lock is a POSIX record lock (``lockf``): it belongs to this process
    alone, so forked DataLoader workers do not inherit it, and the kernel drops it when the process
    dies, however it dies, even while orphaned workers live on.
    """
    import fcntl

    out = Path(out_dir)
    with filesystem_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

    def busy(holder: str):
        return OutputDirError(f"--out {out} is being written by another run ({holder or 'another process'}); wait for "
                              "it or choose another folder")

    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) in _HELD:
            raise busy(f"pid {os.getpid()}, this process") from None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else (
                "a file with other hard links" if stat.S_ISREG(st.st_mode) else "not a regular file")
            raise OutputDirError(f"{path} is {kind}, which flashdino never creates; it was left alone: remove it "
                                 "and rerun") from None
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise OutputDirError(f"cannot open the lock file {path}: {describe_oserror(exc)}") from None
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
            os.close(fd)
            raise OutputDirError(f"{path} changed while it was opened; rerun")
    try:
        st = os.fstat(fd)
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if text and not text.startswith("pid "):
            raise OutputDirError(f"{path} is not flashdino's lock file; it was left alone: remove or rename it and rerun")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise busy(text) from None
            raise OutputDirError(f"cannot lock {path} ({exc.strerror or exc}); the filesystem of --out does not "
                                 "support file locks: choose an --out folder on another filesystem") from None
        with filesystem_errors(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        _HELD.add((st.st_dev, st.st_ino))
        try:
            yield
        finally:
            _HELD.discard((st.st_dev, st.st_ino))
    finally:
        os.close(fd)  # releases the lock


def write_shard(out_dir: Path, k: int, records: list, tensors: dict) -> Path:
    """Commits shard k: its check record, then the shard itself by an atomic rename."""
    ids = [r["id"] for r in records if r.get("error") is None]
    meta = {"format": SHARD_FORMAT, "shard": str(k), "records": json.dumps(records), "ids": json.dumps(ids)}
    path = shard_path(out_dir, k)
    with filesystem_errors(path), atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            nbytes, digest = shardfile.write_safetensors(fh, tensors, meta)
        check = {"format": shardfile.CHECK_FORMAT, "shard": k, "bytes": nbytes, "sha256": digest, "rows": len(ids),
                 "images": len(records)}
        with atomic_write(check_path(out_dir, k)) as ctmp:
            ctmp.write_text(json.dumps(check), encoding="utf-8")
    return path


def append_records(out_dir: Path, rank: int, records: list) -> None:
    path = rank_manifest(out_dir, rank)
    with filesystem_errors(path), open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def shard_records(path: Path) -> list:
    """The records in a shard's header; a damaged shard is an OutputDirError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["records"])
    except Exception as exc:  # noqa: BLE001 - SafetensorError, KeyError, JSON errors: one message naming the file
        raise OutputDirError(f"{path}: damaged shard ({exc.__class__.__name__}: {exc}); rerun the features command "
                             "that wrote it: a resume verifies every shard and redoes damaged ones") from None


def merge(out_dir: Path, num_shards: int) -> dict:
    with filesystem_errors(f"the merged files in {out_dir}"):
        return _merge(out_dir, num_shards)


def _write_npy(fh, shape: tuple, chunks) -> None:
    """A float32 .npy file written with ordinary writes (a full disk is an OSError; no memory map
    of a file that cannot be extended, which ends in SIGBUS)."""
    import numpy as np

    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                              "fortran_order": False, "shape": tuple(shape)})
    for a in chunks:
        if a.size:
            fh.write(memoryview(np.ascontiguousarray(a, dtype="<f4")).cast("B"))


def _merge(out_dir: Path, num_shards: int) -> dict:
    """Rank 0, after all ranks finished: manifest.jsonl and cls.npy / pooled.npy in input order.

    Built from the shards themselves (the rank logs may miss the last shard of a killed rank);
    streamed shard by shard, so memory stays flat. Returns counts.
    """
    from safetensors import safe_open

    out = Path(out_dir)
    bad = [(k, why) for k in range(num_shards) if (why := shardfile.verify(out, k, checksum=False))]
    if bad:
        raise OutputDirError(f"{out}: {len(bad)} of {num_shards} shards missing or damaged (e.g. shard {bad[0][0]}: "
                             f"{bad[0][1]}); run the same command again to finish")
    n_good = n_failed = n_nonfinite = 0
    keys: dict = {}
    for k in range(num_shards):
        recs = shard_records(shard_path(out, k))
        n_good += sum(r.get("error") is None for r in recs)
        n_failed += sum(r.get("error") is not None for r in recs)
        n_nonfinite += sum(bool(r.get("nonfinite")) for r in recs)
        with safe_open(str(shard_path(out, k)), "pt") as f:
            for c in CONSOLIDATED:
                if c in f.keys():
                    keys[c] = tuple(f.get_slice(c).get_shape()[1:])
    with atomic_write(out / MANIFEST) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for k in range(num_shards):
            for r in shard_records(shard_path(out, k)):
                fh.write(json.dumps(r) + "\n")

    def rows_of(c: str):
        for k in range(num_shards):
            with safe_open(str(shard_path(out, k)), "pt") as f:
                yield f.get_tensor(c).to(torch.float32).numpy()

    for c, tail in keys.items():
        with atomic_write(out / f"{c}.npy") as tmp, open(tmp, "wb") as fh:
            _write_npy(fh, (n_good, *tail), rows_of(c))
    for p in out.iterdir():
        if _RANK_LOG.fullmatch(p.name):
            with contextlib.suppress(OSError):
                p.unlink()  # merged: manifest.jsonl now holds every record
    return {"images": n_good + n_failed, "good": n_good, "failed": n_failed, "nonfinite": n_nonfinite}


__all__ = ["FORMAT", "READABLE_FORMATS", "OutputDirError", "check_out_dir", "prepare_dir", "locked", "filesystem_errors",
           "read_settings", "write_shard", "append_records", "merge", "shard_path", "check_path", "shard_done",
           "clear_outputs", "foreign_files", "is_own_settings", "output_paths", "describe_oserror"]

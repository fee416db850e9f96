"""The output folder of a streamed extraction.

    DIR/settings.json              what produced the folder (model, weights digest, preprocessing,
                                   store, inputs digest, shard size); a rerun must match it
    DIR/shards/NNNNNN.safetensors  images [k*S, (k+1)*S) of the input order; tensors of the good
                                   images (rows) plus, in the metadata, one record per image
    DIR/manifest.rank<R>.jsonl     each rank's records, appended after each shard it commits
    DIR/manifest.jsonl             all records in input order (rank 0, after the run)
    DIR/cls.npy, DIR/pooled.npy    [N_good, D] float32, concatenated in input order (rank 0)

A shard file is the unit of progress: it appears by an atomic rename (``outputs.atomic_write``)
only when complete, carries its own records, and is never rewritten by a resume. Everything else
is derived from the shards, so a kill -9 at any moment loses at most the shards in flight.

Tensors in a shard (n good rows, T = their patch tokens in total): ``cls`` [n, D], ``pooled`` [n, D],
``storage`` [n, R, D], ``patch`` [T, D] (row i's tokens are the next ``grid[i][0] * grid[i][1]``),
``grid`` [n, 2] and ``size`` [n, 2] (original height, width) int64; intermediate layers as
``layer<L>.cls`` etc. Metadata: ``records`` (JSON list) and ``ids`` (JSON list of the rows' ids).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..outputs import OutputPathError, atomic_write, folder_problem

FORMAT = "flashdino.features/2"
SHARD_FORMAT = "flashdino.features.shard/2"
SETTINGS = "settings.json"
MANIFEST = "manifest.jsonl"
SHARDS = "shards"
CONSOLIDATED = ("cls", "pooled")


class OutputDirError(OutputPathError):
    """The output folder cannot be used as asked (other settings, a file in the way, incomplete)."""


def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"{k:06d}.safetensors"


def rank_manifest(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"manifest.rank{rank}.jsonl"


def shard_done(out_dir: Path, k: int) -> bool:
    """True when shard k was committed and its header is readable (an atomic rename never leaves half)."""
    from safetensors import safe_open

    p = shard_path(out_dir, k)
    if not p.is_file():
        return False
    try:
        with safe_open(str(p), "pt") as f:
            return (f.metadata() or {}).get("format") == SHARD_FORMAT
    except Exception:  # noqa: BLE001 - an unreadable shard is simply not done: it is redone
        return False


def check_out_dir(out_dir, *, inputs: Sequence = ()) -> Path:
    """Location checks before any work: not a file, not an input, writable. Returns the folder."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file; give a folder (or a name ending in .safetensors for one file)")
    for src in inputs:
        if src is not None and out.resolve() == Path(src).expanduser().resolve():
            raise OutputDirError(f"--out {out} is also an input; choose another folder")
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


def clear_outputs(out_dir: Path) -> None:
    """Removes what an extraction wrote (only its own files: other files in the folder stay)."""
    out = Path(out_dir)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    logs = glob.glob(str(out / "manifest.rank*.jsonl"))
    for name in [SETTINGS, MANIFEST, *(f"{c}.npy" for c in CONSOLIDATED), *logs]:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def prepare_dir(out_dir: Path, settings: dict, *, overwrite: bool) -> bool:
    """Rank 0: creates the folder or checks a previous run's settings. Returns True when resuming.

    Different settings are refused (the diff is in the message) unless ``overwrite``, which clears
    the previous outputs. Temporary files of killed writers are removed.
    """
    out = Path(out_dir)
    sp = out / SETTINGS
    resuming = False
    if sp.is_file():
        try:
            old = json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            old = {"unreadable": str(exc)}
        if old != settings:
            if not overwrite:
                diff = _diff(old, settings)
                shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} differences)" if len(diff) > 6 else "")
                raise OutputDirError(f"--out {out} holds features made with other settings ({shown}); pass --overwrite "
                                     "to replace them, or choose another folder")
            clear_outputs(out)
        else:
            resuming = True
    elif (out / SHARDS).is_dir() and any((out / SHARDS).iterdir()):
        if not overwrite:
            raise OutputDirError(f"--out {out} has shards but no {SETTINGS}; pass --overwrite to replace them")
        clear_outputs(out)
    with filesystem_errors(out / SHARDS):
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
    for tmp in glob.glob(str(out / SHARDS / ".*.tmp*")) + glob.glob(str(out / ".*.tmp*")):
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # left by a writer killed with SIGKILL (no Python cleanup ran)
    if not resuming:
        with filesystem_errors(sp), atomic_write(sp) as tmp:
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
    return resuming


def read_settings(out_dir: Path) -> dict:
    sp = Path(out_dir) / SETTINGS
    try:
        return json.loads(sp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputDirError(f"{out_dir} is not a features folder: {SETTINGS} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"{sp}: unreadable ({exc})") from None


@contextlib.contextmanager
def filesystem_errors(what):
    """OSError (disk full, permissions, a vanished folder) as one line naming the file."""
    try:
        yield
    except OutputPathError:
        raise
    except OSError as exc:
        raise OutputDirError(f"cannot write {what}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def locked(out_dir: Path):
    """Holds an exclusive lock on the folder: a second run into it fails at once instead of racing."""
    import fcntl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputDirError(f"--out {out} is being written by another run ({holder}); wait for it or "
                                 "choose another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_shard(out_dir: Path, k: int, records: list, tensors: dict) -> Path:
    from safetensors.torch import save_file

    ids = [r["id"] for r in records if r.get("error") is None]
    meta = {"format": SHARD_FORMAT, "shard": str(k), "records": json.dumps(records), "ids": json.dumps(ids)}
    path = shard_path(out_dir, k)
    with filesystem_errors(path), atomic_write(path) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=meta)
    return path


def append_records(out_dir: Path, rank: int, records: list) -> None:
    path = rank_manifest(out_dir, rank)
    with filesystem_errors(path), open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def shard_records(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["records"])


def merge(out_dir: Path, num_shards: int) -> dict:
    with filesystem_errors(f"the merged files in {out_dir}"):
        return _merge(out_dir, num_shards)


def _merge(out_dir: Path, num_shards: int) -> dict:
    """Rank 0, after all ranks finished: manifest.jsonl and cls.npy / pooled.npy in input order.

    Built from the shards themselves (the rank logs may miss the last shard of a killed rank);
    streamed shard by shard, so memory stays flat. Returns counts.
    """
    import numpy as np
    from safetensors import safe_open

    out = Path(out_dir)
    missing = [k for k in range(num_shards) if not shard_done(out, k)]
    if missing:
        raise OutputDirError(f"{out}: {len(missing)} of {num_shards} shards missing (e.g. {missing[0]}); "
                             "run the same command again to finish")
    n_good = n_failed = 0
    keys: dict = {}
    for k in range(num_shards):
        with safe_open(str(shard_path(out, k)), "pt") as f:
            recs = json.loads(f.metadata()["records"])
            n_good += sum(r.get("error") is None for r in recs)
            n_failed += sum(r.get("error") is not None for r in recs)
            for c in CONSOLIDATED:
                if c in f.keys():
                    keys[c] = f.get_slice(c).get_shape()[1:]
    with atomic_write(out / MANIFEST) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for k in range(num_shards):
            for r in shard_records(shard_path(out, k)):
                fh.write(json.dumps(r) + "\n")
    for c, tail in keys.items():
        with atomic_write(out / f"{c}.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_good, *tail))
            row = 0
            for k in range(num_shards):
                with safe_open(str(shard_path(out, k)), "pt") as f:
                    t = f.get_tensor(c).to(torch.float32).numpy()
                arr[row: row + len(t)] = t
                row += len(t)
            arr.flush()
            del arr
    for p in glob.glob(str(out / "manifest.rank*.jsonl")):
        with contextlib.suppress(OSError):
            os.unlink(p)  # merged: manifest.jsonl now holds every record
    return {"images": n_good + n_failed, "good": n_good, "failed": n_failed}


__all__ = ["FORMAT", "OutputDirError", "check_out_dir", "prepare_dir", "locked", "filesystem_errors", "read_settings",
           "write_shard", "append_records", "merge", "shard_path", "shard_done", "clear_outputs"]

"""Writing output files without ever hurting the user's data.

Every file flashdino writes (features, converted checkpoints, exports, shards) goes through
:func:`check_output_path` before any computation and :func:`atomic_write` for the bytes:

- an existing output is refused unless ``overwrite=True``, and an output that is one of the inputs
  is refused always (``--weights w.safetensors --out w.safetensors`` must not eat the checkpoint);
- problems with the location (a folder in the way, no write permission) are reported before the
  work starts, in one line;
- the bytes go to a unique temporary file in the destination folder, are fsynced and renamed over
  the destination in one step, so a reader sees the old file or the new one, never half of one,
  and two concurrent writers never share a temporary name;
- on any exception, Ctrl-C included, the temporary file is removed.

An output that is a symbolic link is written through: the link stays and its target is replaced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputPathError(OSError):
    """The output location cannot be used; the message names the path and the fix."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = (),
                      what: str = "output", overwrite_flag: str = "--overwrite") -> Path:
    """Validates an output file location before any work; returns it as a ``Path``.

    Creates missing parent folders (and says which, through the returned path's caller) only when
    they can be created; raises :class:`OutputPathError` otherwise.
    """
    out = Path(path).expanduser()
    why = name_problem(out)
    if why:
        raise OutputPathError(f"cannot write {what}: {why}; choose a shorter name")
    clash = input_clash(out, inputs)
    if clash:
        raise OutputPathError(f"{what} {out} {clash}; choose another {what} path")
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is a folder; give a file name inside it, e.g. {out / 'out.safetensors'}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputPathError(f"{what} {out} already exists; pass {overwrite_flag} to replace it, "
                                  "or choose another path")
    why = folder_problem(out.parent if str(out.parent) else Path("."))
    if why:
        raise OutputPathError(f"cannot write {what} {out}: {why}")
    if out.exists() and not os.access(out.resolve().parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot replace {what} {out}: no write permission in {out.resolve().parent}")
    return out


def input_clash(out: PathLike, inputs: Iterable[PathLike]) -> Optional[str]:
    """How the output ``out`` collides with an input (is one, or lies inside an input folder), or None.

    Inputs are files (images, lists, tars, weights) or folders (of images, of weights): an output in
    an input folder would replace or join the inputs (and be read back as one by the next run).
    """
    o = Path(out).expanduser()
    o_real = Path(os.path.realpath(o))
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        s_real = Path(os.path.realpath(src))
        if _same_file(o, src) or o_real == s_real:
            return f"is also an input ({src})"
        if src.is_dir() and s_real in o_real.parents:
            if o.exists():  # e.g. the checkpoint of an input weights folder
                return f"is also an input (a file in the input folder {src})"
            return f"lies inside the input folder {src}"
    return None


def name_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be a file name on its filesystem (a component over NAME_MAX bytes), or None."""
    p = Path(path).expanduser()
    limit = 255
    with contextlib.suppress(OSError, ValueError, AttributeError):
        anc = Path(os.path.abspath(p)).parent
        while not os.path.isdir(anc) and anc != anc.parent:
            anc = anc.parent
        limit = os.pathconf(anc, "PC_NAME_MAX")
    for part in p.parts:
        n = len(os.fsencode(part))
        if n > limit:
            return f"the name {part[:40]}... is {n} bytes long, over this filesystem's limit of {limit}"
    return None


def folder_problem(folder: PathLike) -> Optional[str]:
    """Why ``folder`` cannot be written or created (its nearest existing ancestor is a file or not
    writable), or None."""
    existing = Path(folder).expanduser()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no write permission in {existing}"
    return None


def missing_parents(path: PathLike) -> list[Path]:
    """Folders that writing ``path`` will create, outermost first (for a notice to the user)."""
    out, missing = Path(path).expanduser().parent, []
    while str(out) and not out.exists():
        missing.append(out)
        if out.parent == out:
            break
        out = out.parent
    return list(reversed(missing))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_new(tmp: Path, dest: Path) -> None:
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputPathError(f"{dest} appeared while this run was writing it (another run with the same output?); "
                              "it was left alone: pass --overwrite to replace it, or choose another path") from None
    except OSError:  # a filesystem without hard links: a last check, then the rename
        if dest.exists():
            raise OutputPathError(f"{dest} appeared while this run was writing it (another run with the same "
                                  "output?); it was left alone: pass --overwrite to replace it") from None
        os.replace(tmp, dest)
        return
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, *, suffix: Optional[str] = None, overwrite: bool = True) -> Iterator[Path]:
    """Yields a fresh temporary path next to ``path``; on success it replaces ``path`` atomically.

    The caller writes the whole file to the yielded path (by name: safetensors, torch, ONNX writers
    all take a path). The temporary name keeps the destination's suffix unless ``suffix`` is given,
    since some writers look at it. With ``overwrite=False`` the file is published only if ``path``
    still does not exist (a hard link, which fails on an existing name), so of two runs racing to
    the same new output one fails with :class:`OutputPathError` instead of silently losing its work.
    """
    dest = Path(path).expanduser()
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix if suffix is not None else dest.suffix}",
                                    dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would (or keep the old one)
        os.chmod(tmp, dest.stat().st_mode & 0o7777 if dest.exists() else 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _publish_new(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


__all__ = ["OutputPathError", "check_output_path", "folder_problem", "input_clash", "name_problem", "missing_parents", "atomic_write"]

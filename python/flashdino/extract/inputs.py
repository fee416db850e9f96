"""What to process, in one deterministic order that every rank and every rerun agrees on.

Inputs are image files, folders (searched recursively; entries sorted by their path relative to
the folder; hidden files such as macOS ``._x.jpg`` skipped), WebDataset-style ``.tar`` shards (their
image members in archive order; ``.tar`` files inside folders are expanded in place) and a list
file (``--list``): a text file with one path per line (optionally ``path<TAB>id``; ``#`` comments),
or a CSV file whose first column is the path and optional second column the id (a header row
naming ``path`` / ``id`` is recognised). Relative paths in a list are relative to the list's folder.

Each image becomes an :class:`Item` with a unique id (its path as given, ``TAR/MEMBER`` for tar
members, or the list's id column); the position in the returned list is the order of the output.
Files named in a list are not checked here: a missing one is a per-image failure, so a list of a
million paths costs no up-front ``stat``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import stat
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_HEADER_NAMES = ("path", "file", "filename", "image", "image_path")


class InputError(ValueError):
    """The inputs cannot be listed (missing file, empty folder, malformed list, duplicate ids)."""


class Item(NamedTuple):
    """One image: ``id`` (unique), ``path`` of the file or tar, and for tar members (offset, size).

    ``error``: set for an entry found while listing that cannot be an image (a tar link to nothing,
    a FIFO, a folder loop): it is recorded as a failure like an unreadable file, never dropped.
    """

    id: str
    path: str
    offset: int = -1
    size: int = -1
    error: Optional[str] = None

    @property
    def in_tar(self) -> bool:
        return self.offset >= 0

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path} is shorter than its index says (truncated tar?)")
        return data


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def special_file(st) -> Optional[str]:
    """What a non-regular file is (for the failure record), or None for a regular file."""
    mode = st.st_mode
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _compressed(path: Path) -> Optional[str]:
    magic = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return None
    return next((name for m, name in magic.items() if head.startswith(m)), None)


def _tar_items(path: Path) -> list[Item]:
    """The image members of an uncompressed tar, in archive order.

    Hard links point at an earlier member's data (as ``tar`` stores them) and symbolic links at a
    member by name: both resolve to that member's bytes. Links to nothing, device / FIFO members,
    sparse members and members cut off by a truncated archive are recorded as failures.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read tar shard {path}: {exc.strerror or exc}") from None
    kind = special_file(st)
    if kind:  # never opened: reading a FIFO blocks, a device may have side effects
        return [Item(str(path), str(path), error=f"is {kind}, not a tar file")]
    comp = _compressed(path)
    if comp:
        raise InputError(f"cannot read tar shard {path}: it is {comp}-compressed (only uncompressed .tar files can be "
                         f"read image by image; decompress it first)")
    items: list[Item] = []
    data: dict = {}  # member name -> (offset, size) of the regular members so far
    try:
        tf = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise InputError(f"cannot read tar shard {path}: not a tar file, or damaged ({exc})") from None
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.ReadError, EOFError, OSError) as exc:
                items.append(Item(f"{path}/<after byte {tf.offset}>", str(path),
                                  error=f"truncated or damaged tar: the archive ends or breaks at byte {tf.offset} "
                                        f"({exc}); the members after it cannot be listed"))
                break
            if m is None:
                break
            name = m.name
            if m.isreg() and not m.issparse():
                data[name] = (m.offset_data, m.size)
            if not _is_image(name):
                continue
            ident = f"{path}/{name}"
            if m.isreg() and not m.issparse():
                items.append(Item(ident, str(path), m.offset_data, m.size))
            elif m.islnk() or m.issym():
                target = m.linkname if m.islnk() else posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                                                      m.linkname))
                if target in data:
                    items.append(Item(ident, str(path), *data[target]))
                else:
                    how = "hard link" if m.islnk() else "symbolic link"
                    items.append(Item(ident, str(path), error=f"tar {how} to {m.linkname!r}, which is not a file "
                                                              "stored before it in the archive"))
            else:
                what = "a sparse file" if m.issparse() else "not a regular file"
                items.append(Item(ident, str(path), error=f"tar member is {what}"))
        end = tf.offset
    size = st.st_size
    if not (items and items[-1].error and "truncated" in items[-1].error) and end >= size and size > 0:
        # a complete archive ends with zero blocks; without them it was most likely cut at a header boundary
        items.append(Item(f"{path}/<after byte {end}>", str(path),
                          error=f"truncated tar: no end-of-archive marker after byte {end}; members after it "
                                "(if there were any) are lost"))
    for n, it in enumerate(items):
        if it.error is None and it.offset + it.size > size:
            items[n] = it._replace(offset=-1, size=-1, error=f"truncated tar: the member's data ends at byte "
                                                           f"{it.offset + it.size}, the file at {size}")
    return items


def _folder_items(folder: Path) -> list[Item]:
    """Images and tars under ``folder``, symbolic links to folders followed; a folder reached twice
    (a link loop, or two links to one folder) is listed once, the first time it is reached."""
    found = []
    seen: set = set()
    loops = []
    unlisted: list[Item] = []

    def unreadable(exc: OSError) -> None:  # os.walk skips a folder it cannot list: record it instead
        where = exc.filename or str(folder)
        unlisted.append(Item(str(where), str(where), error=f"cannot list this folder ({exc.strerror or exc}); "
                                                          "the images in it were not processed"))

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(root)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            loops.append(root)
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and (_is_image(f) or _is_tar(f)):
                rel = os.path.relpath(os.path.join(root, f), folder)
                found.append(tuple(Path(rel).parts))
    items: list[Item] = []
    for parts in sorted(found):
        p = folder.joinpath(*parts)
        items.extend(_tar_items(p) if _is_tar(p.name) else [Item(str(p), str(p))])
    items.extend(sorted(unlisted))
    if not items:
        raise InputError(f"no images found in folder {folder} (looked recursively for {', '.join(IMAGE_EXTENSIONS)} "
                         "and .tar shards)" + (f"; {len(loops)} folders skipped as links to folders already searched"
                                               if loops else ""))
    return items


def read_list(list_file) -> list[Item]:
    """Items of a ``--list`` file (text or CSV), ids from its id column or the path."""
    lf = Path(list_file)
    try:
        kind = special_file(lf.stat())
    except OSError:
        raise InputError(f"--list {lf}: no such file") from None
    if kind:
        raise InputError(f"--list {lf}: is {kind}, not a list file")
    base = lf.parent
    rows: list[tuple[int, str, Optional[str]]] = []
    try:
        text = lf.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"--list {lf}: not UTF-8 text ({exc})") from None
    if lf.suffix.lower() in (".csv", ".tsv"):
        reader = csv.reader(text.splitlines(), delimiter="\t" if lf.suffix.lower() == ".tsv" else ",")
        lines = [(n, row) for n, row in enumerate(reader, 1) if row and any(c.strip() for c in row)]
        path_col, id_col = 0, 1
        if lines and lines[0][1][0].strip().lower() in _HEADER_NAMES:
            header = [c.strip().lower() for c in lines[0][1]]
            path_col = header.index(lines[0][1][0].strip().lower())
            id_col = header.index("id") if "id" in header else None
            lines = lines[1:]
        for n, row in lines:
            if path_col >= len(row):
                raise InputError(f"--list {lf}, line {n}: no path column")
            ident = row[id_col].strip() if id_col is not None and id_col < len(row) and row[id_col].strip() else None
            rows.append((n, row[path_col].strip(), ident))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, ident = line.partition("\t")
            rows.append((n, path.strip(), ident.strip() or None))
    if not rows:
        raise InputError(f"--list {lf}: no paths in the file")
    items = []
    for n, path, ident in rows:
        full = Path(path) if os.path.isabs(path) else base / path
        if _is_tar(path):
            items.extend(_tar_items(full))
        else:
            items.append(Item(ident if ident is not None else str(full), str(full)))
    return items


def collect_items(inputs: Sequence[str] = (), list_file=None) -> list[Item]:
    """All images of the inputs (then the list file), in processing order; ids are checked unique."""
    items: list[Item] = []
    for item in inputs:
        p = Path(item)
        try:
            st = p.stat()
        except OSError:
            raise InputError(f"no such file or folder: {p}") from None
        kind = special_file(st)
        if kind == "a folder":
            items.extend(_folder_items(p))
        elif kind is None:
            items.extend(_tar_items(p) if _is_tar(p.name) else [Item(str(p), str(p))])
        else:
            raise InputError(f"input {p} is {kind}, not an image file, a folder or a .tar shard")
    if list_file is not None:
        items.extend(read_list(list_file))
    if not items:
        raise InputError("no input images: pass image files, folders, .tar shards or --list FILE")
    seen: set = set()
    dupes = []
    for it in items:
        if it.id in seen:
            dupes.append(it.id)
        seen.add(it.id)
    if dupes:
        raise InputError(f"{len(dupes)} duplicate image ids (e.g. {dupes[0]!r}); every image must appear once "
                         "(give each a distinct id column in --list)")
    return items


def fingerprint(items: Iterable[Item]) -> str:
    """A digest of the ordered work list: a rerun with other inputs must not reuse finished shards."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\0{it.path}\0{it.offset}\0{it.size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


__all__ = ["IMAGE_EXTENSIONS", "InputError", "Item", "special_file", "collect_items", "read_list", "fingerprint"]

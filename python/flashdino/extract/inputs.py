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
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_HEADER_NAMES = ("path", "file", "filename", "image", "image_path")


class InputError(ValueError):
    """The inputs cannot be listed (missing file, empty folder, malformed list, duplicate ids)."""


class Item(NamedTuple):
    """One image: ``id`` (unique), ``path`` of the file or tar, and for tar members (offset, size)."""

    id: str
    path: str
    offset: int = -1
    size: int = -1

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


def _tar_items(path: Path) -> list[Item]:
    try:
        with tarfile.open(path, mode="r:") as tf:
            # offset_data / size let any worker read a member with one seek, without the tar module
            return [Item(f"{path}/{m.name}", str(path), m.offset_data, m.size)
                    for m in tf.getmembers() if m.isfile() and _is_image(m.name)]
    except tarfile.ReadError as exc:
        raise InputError(f"cannot read tar shard {path}: {exc} (only uncompressed .tar files can be read "
                         "image by image; decompress .tar.gz shards first)") from None


def _folder_items(folder: Path) -> list[Item]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and (_is_image(f) or _is_tar(f)):
                rel = os.path.relpath(os.path.join(root, f), folder)
                found.append(tuple(Path(rel).parts))
    items: list[Item] = []
    for parts in sorted(found):
        p = folder.joinpath(*parts)
        items.extend(_tar_items(p) if _is_tar(p.name) else [Item(str(p), str(p))])
    if not items:
        raise InputError(f"no images found in folder {folder} (looked recursively for {', '.join(IMAGE_EXTENSIONS)} "
                         "and .tar shards)")
    return items


def read_list(list_file) -> list[Item]:
    """Items of a ``--list`` file (text or CSV), ids from its id column or the path."""
    lf = Path(list_file)
    if not lf.is_file():
        raise InputError(f"--list {lf}: no such file")
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
        if p.is_dir():
            items.extend(_folder_items(p))
        elif p.is_file():
            items.extend(_tar_items(p) if _is_tar(p.name) else [Item(str(p), str(p))])
        else:
            raise InputError(f"no such file or folder: {p}")
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


__all__ = ["IMAGE_EXTENSIONS", "InputError", "Item", "collect_items", "read_list", "fingerprint"]

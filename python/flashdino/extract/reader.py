"""Reading a features folder written by ``flashdino features ... --out DIR``.

    fs = flashdino.read_features("feats/")
    len(fs), fs.ids[:3], fs.failed[:3]        # good images in input order; (id, reason) of the others
    fs.cls, fs.pooled                         # [N, D] float32, memory-mapped (nothing read up front)
    fs.patch(i), fs.grid(i)                   # patch tokens [h*w, D] of image i, its (h, w) grid
    for shard in fs.shards(): shard["ids"], shard["cls"], ...
    fs.verify()                               # every shard's checksum (read_features(..., verify=True))

Nothing is trusted unchecked: the format version, the manifest against the settings (one record
per input image, in order), ``cls.npy`` / ``pooled.npy`` against the manifest (one row per good
image) when the folder is opened, and each shard's records and row counts against the manifest
when it is first read. Any damage is a :class:`~flashdino.extract.writer.OutputDirError` naming the file.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import shardfile, writer


_RERUN = "rerun the features command that wrote it: a resume verifies every shard and redoes damaged ones"


def _damaged(path, why: str) -> writer.OutputDirError:
    return writer.OutputDirError(f"{path}: {why}; {_RERUN}")


def _read_manifest(path: Path, num_images: int, shard_size: int) -> list:
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except ValueError as exc:
                        raise _damaged(path, f"line {n} is not a JSON record ({exc})") from None
                    if not isinstance(r, dict) or not {"index", "id", "shard"} <= set(r) or (
                            r.get("error") is None and not (isinstance(r.get("row"), int)
                                                            and isinstance(r.get("grid"), list) and len(r["grid"]) == 2)):
                        raise _damaged(path, f"line {n} is not an image record")
                    records.append(r)
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"unreadable ({exc})") from None
    if len(records) != num_images or any(r["index"] != i or r["shard"] != i // shard_size for i, r in enumerate(records)):
        raise _damaged(path, f"{len(records)} records for the {num_images} images of its settings (lines missing, "
                             "added or reordered)")
    return records


class FeatureSet:
    """The features of one folder; rows are the successfully processed images in input order."""

    def __init__(self, folder, *, verify: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"features folder not found: {self.folder}")
        self.settings = writer.read_settings(self.folder)
        manifest = self.folder / writer.MANIFEST
        if not manifest.is_file():
            raise writer.OutputDirError(f"{self.folder}: no {writer.MANIFEST}: the extraction did not finish; "
                                        "rerun the same command to complete it")
        self.records = _read_manifest(manifest, self.settings["num_images"], self.settings["shard_size"])
        good = [r for r in self.records if r.get("error") is None]
        self.ids = [r["id"] for r in good]
        self.failed = [(r["id"], r["error"]) for r in self.records if r.get("error") is not None]
        self._shard_of = [r["shard"] for r in good]
        self._row_of = [r["row"] for r in good]
        self._grids = [tuple(r["grid"]) for r in good]
        self._num_shards = -(-self.settings["num_images"] // self.settings["shard_size"])
        self._handles: dict = {}
        self._offsets: dict = {}
        self._mm: dict = {}
        for name in writer.CONSOLIDATED:
            if (self.folder / f"{name}.npy").is_file():
                self._consolidated(name)  # reads the header only: its row count is checked now
        if verify:
            self.verify()

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"FeatureSet({str(self.folder)!r}: {len(self)} images, {len(self.failed)} failed, "
                f"model {self.settings.get('model')}, store {self.settings.get('store')})")

    @property
    def model(self) -> str:
        return self.settings["model"]

    def _consolidated(self, name: str) -> torch.Tensor:
        import numpy as np

        if name not in self._mm:
            p = self.folder / f"{name}.npy"
            if not p.is_file():
                raise KeyError(f"{self.folder} has no {name} features (stored: {', '.join(self.settings['store'])}; "
                               f"rerun with --store including {name})")
            # copy-on-write mapping: pages are read on access; writes (if any) never reach the file
            try:
                arr = np.load(p, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise _damaged(p, f"unreadable ({exc})") from None
            if arr.ndim != 2 or arr.shape[0] != len(self.ids) or arr.dtype != np.float32:
                raise _damaged(p, f"{arr.shape[0] if arr.ndim else 0} rows of {arr.dtype} for the {len(self.ids)} "
                                  f"good images of {writer.MANIFEST}")
            self._mm[name] = torch.from_numpy(arr)
        return self._mm[name]

    @property
    def cls(self) -> torch.Tensor:
        """[N, D] float32 CLS tokens, memory-mapped."""
        return self._consolidated("cls")

    @property
    def pooled(self) -> torch.Tensor:
        """[N, D] float32 mean patch tokens, memory-mapped."""
        return self._consolidated("pooled")

    def _shard(self, k: int):
        """Shard k, opened once; its records and row counts are checked against the manifest first."""
        from safetensors import safe_open

        if k not in self._handles:
            p = writer.shard_path(self.folder, k)
            try:
                f = safe_open(str(p), "pt")
                recs = json.loads(f.metadata()["records"])
                shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
                grids = f.get_tensor("grid")
            except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: name the file
                raise _damaged(p, f"unreadable shard ({exc.__class__.__name__}: {exc})") from None
            mine = self._records_of(k)
            if [(r["index"], r["id"], r.get("row")) for r in recs] != [(r["index"], r["id"], r.get("row")) for r in mine]:
                raise _damaged(p, f"its records differ from {writer.MANIFEST}'s for shard {k}")
            why = shardfile.expected_rows(shapes)
            good = sum(r.get("error") is None for r in mine)
            counts = (grids[:, 0] * grids[:, 1]).tolist() if grids.ndim == 2 else []
            if why is None and len(counts) != good:
                why = f"{len(counts)} rows for {good} good images"
            if why is None and any(n.rsplit(".", 1)[-1] == "patch" and s[0] != sum(counts) for n, s in shapes.items()):
                why = "its patch tokens do not add up to its grids"
            if why:
                raise _damaged(p, why)
            self._offsets[k] = [0] + list(itertools.accumulate(counts))
            self._handles[k] = f
        return self._handles[k]

    def _records_of(self, k: int) -> list:
        S = self.settings["shard_size"]
        return self.records[k * S: (k + 1) * S]

    def verify(self) -> None:
        """Checks every shard against its check record, checksum included (reads the whole folder)."""
        if self.settings.get("format") == writer.FORMAT:
            S = self.settings["shard_size"]
            for k in range(self._num_shards):
                lo, hi = k * S, min((k + 1) * S, len(self.records))
                why = shardfile.verify(self.folder, k, indices=range(lo, hi),
                                       ids=[r["id"] for r in self.records[lo:hi]])
                if why:
                    raise _damaged(writer.shard_path(self.folder, k), why)
        for k in range(self._num_shards):
            self._shard(k)

    def grid(self, i: int) -> tuple[int, int]:
        """(h, w) patch grid of image i."""
        return self._grids[self._index(i)]

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i % n

    def patch(self, i: int, layer: Optional[int] = None) -> torch.Tensor:
        """Patch tokens [h*w, D] of image i (the last layer, or ``layer`` if it was stored)."""
        i = self._index(i)
        name = "patch" if layer is None else f"layer{layer}.patch"
        f = self._shard(self._shard_of[i])
        if name not in f.keys():
            raise KeyError(f"{self.folder} has no {name} (stored: {', '.join(self.settings['store'])}, layers "
                           f"{self.settings.get('layers')})")
        off = self._offsets[self._shard_of[i]]
        r = self._row_of[i]
        try:
            return f.get_slice(name)[off[r]: off[r + 1]]
        except Exception as exc:  # noqa: BLE001 - a shard cut short after it was opened
            raise _damaged(writer.shard_path(self.folder, self._shard_of[i]), f"unreadable ({exc})") from None

    def index_of(self, ident: str) -> int:
        """Row of the image with this id (a dict is built on first use)."""
        if not hasattr(self, "_by_id"):
            self._by_id = {v: j for j, v in enumerate(self.ids)}
        return self._by_id[ident]

    def shards(self) -> Iterator[dict]:
        """Each shard as a dict: ``ids``, ``records`` and its tensors (see ``flashdino.extract.writer``)."""
        from safetensors.torch import load_file

        for k in range(self._num_shards):
            p = writer.shard_path(self.folder, k)
            self._shard(k)  # checked against the manifest
            recs = self._records_of(k)
            try:
                tensors = load_file(str(p))
            except Exception as exc:  # noqa: BLE001
                raise _damaged(p, f"unreadable ({exc.__class__.__name__}: {exc})") from None
            yield {"shard": k, "ids": [r["id"] for r in recs if r.get("error") is None], "records": recs, **tensors}

    def __iter__(self):
        return self.shards()


def read_features(folder, *, verify: bool = False) -> FeatureSet:
    """Opens a features folder (``flashdino features ... --out DIR``); see :class:`FeatureSet`.

    The cheap checks run always; ``verify=True`` also checks every shard's checksum.
    """
    return FeatureSet(folder, verify=verify)


__all__ = ["FeatureSet", "read_features"]

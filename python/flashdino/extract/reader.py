"""Reading a features folder written by ``flashdino features ... --out DIR``.

    fs = flashdino.read_features("feats/")
    len(fs), fs.ids[:3], fs.failed[:3]        # good images in input order; (id, reason) of the others
    fs.cls, fs.pooled                         # [N, D] float32, memory-mapped (nothing read up front)
    fs.patch(i), fs.grid(i)                   # patch tokens [h*w, D] of image i, its (h, w) grid
    for shard in fs.shards(): shard["ids"], shard["cls"], ...
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import writer


class FeatureSet:
    """The features of one folder; rows are the successfully processed images in input order."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"features folder not found: {self.folder}")
        self.settings = writer.read_settings(self.folder)
        manifest = self.folder / writer.MANIFEST
        if not manifest.is_file():
            raise writer.OutputDirError(f"{self.folder}: no {writer.MANIFEST}: the extraction did not finish; "
                                        "rerun the same command to complete it")
        with open(manifest, encoding="utf-8") as fh:
            self.records = [json.loads(line) for line in fh if line.strip()]
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
            self._mm[name] = torch.from_numpy(np.load(p, mmap_mode="c"))
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
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(str(writer.shard_path(self.folder, k)), "pt")
            grids = self._handles[k].get_tensor("grid")
            counts = (grids[:, 0] * grids[:, 1]).tolist()
            self._offsets[k] = [0] + list(itertools.accumulate(counts))
        return self._handles[k]

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
        return f.get_slice(name)[off[r]: off[r + 1]]

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
            recs = writer.shard_records(p)
            yield {"shard": k, "ids": [r["id"] for r in recs if r.get("error") is None], "records": recs,
                   **load_file(str(p))}

    def __iter__(self):
        return self.shards()


def read_features(folder) -> FeatureSet:
    """Opens a features folder (``flashdino features ... --out DIR``); see :class:`FeatureSet`."""
    return FeatureSet(folder)


__all__ = ["FeatureSet", "read_features"]

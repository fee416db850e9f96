"""Decoding and preprocessing off the critical path: a map-style Dataset for a DataLoader.

Each worker decodes (``decode.decode_image``) and preprocesses (the model's ``Preprocessor``, on the
CPU) one image; the collate function groups a batch by processed size so that every group is one
model call (with a fixed ``--size`` that is the whole batch; with native sizes, equal sizes).
A bad image never raises: it comes back as a failure with its reason, and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .decode import DecodeError, decode_image, jpeg_for_device
from .inputs import Item

# Native-size inputs above this many pixels are refused per image (an 8000 x 8000 photo at --size 0
# is 250k tokens: hours of attention on a CPU, an out-of-memory error on most GPUs).
DEFAULT_MAX_PIXELS = 2048 * 2048
# Source images above this many pixels are refused before their pixels are decoded, at any --size:
# decoding needs several bytes per pixel (a 16-bit 12000 x 12000 PNG: gigabytes), and a worker the
# OOM killer ends takes its whole batch with it. 2**27 = 134 M pixels passes a 100 MP camera's photos.
DEFAULT_MAX_SOURCE_PIXELS = 2**27


class ImageDataset(Dataset):
    """``dataset[i]`` -> dict(index, x [3, h, w] float32 or None, size (H, W) or None, error or None)."""

    def __init__(self, items: Sequence[Item], preprocessor, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_source_pixels: Optional[int] = DEFAULT_MAX_SOURCE_PIXELS, fast: bool = True):
        """fast: JPEGs decoded by libjpeg-turbo through torchvision (the same pixels as Pillow) and
        8-bit images resized as uint8 (within 1/255 of the float resize; ``Preprocessor.resize_uint8``);
        False: Pillow and the float resize throughout."""
        self.fast = fast
        self.jpegs_to_device = False  # set by the loop on CUDA: JPEGs leave as bytes, for nvJPEG in batches
        self.items = items
        self.pre = preprocessor
        self.max_pixels = max_pixels
        self.max_source_pixels = max_source_pixels
        self.patch = preprocessor.patch_size or 1

    def __len__(self) -> int:
        return len(self.items)

    def _check(self, h: int, w: int) -> None:
        if self.max_source_pixels is not None and h * w > self.max_source_pixels:
            raise ValueError(f"too large to decode: {w}x{h} = {h * w} pixels, over --max-source-pixels "
                             f"{self.max_source_pixels}; raise it for files you trust (decoding needs several bytes "
                             "per pixel)")
        oh, ow = self.pre.output_size(h, w)
        if oh < self.patch or ow < self.patch:
            raise ValueError(f"too small: {w}x{h} pixels give a {ow}x{oh} input, less than one "
                             f"{self.patch}x{self.patch} patch")
        if self.max_pixels is not None and oh * ow > self.max_pixels:
            raise ValueError(f"too large: {w}x{h} pixels give a {ow}x{oh} input = {oh * ow} pixels, over "
                             f"--max-pixels {self.max_pixels}; pass a fixed --size (e.g. 224) or raise --max-pixels")

    def load(self, index: int):
        """(pixels [3, H, W] as decoded, (H, W)); raises DecodeError."""
        item = self.items[index]
        if item.error is not None:
            raise DecodeError(item.id, item.error)
        try:
            source = item.read_bytes() if item.in_tar else item.path
        except OSError as exc:
            raise DecodeError(item.id, f"cannot read ({exc})") from None
        img = decode_image(source, name=item.id, check_size=self._check, fast=self.fast)
        return img, tuple(img.shape[-2:])

    def __getitem__(self, index: int) -> dict:
        if self.jpegs_to_device:
            item = self.items[index]
            try:
                found = jpeg_for_device(item.read_bytes() if item.in_tar else item.path, name=item.id,
                                        check_size=self._check)
            except DecodeError as exc:
                return {"index": index, "x": None, "size": None, "error": exc.reason}
            except Exception:  # noqa: BLE001 - unreadable here: the CPU path below records why
                found = None
            if found is not None:
                data, size = found
                return {"index": index, "x": None, "size": size, "error": None,
                        "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        return self.sample(index)

    def sample(self, index: int) -> dict:
        """The item decoded and preprocessed on the CPU (or its failure)."""
        try:
            img, size = self.load(index)
            x = self.pre(self.pre.resize_uint8(img) if self.fast else img)[0]  # uint8 resize: ~6x faster per core
        except DecodeError as exc:
            return {"index": index, "x": None, "size": None, "error": exc.reason}
        except Exception as exc:  # noqa: BLE001 - one image must not end a million-image run; the reason is kept
            return {"index": index, "x": None, "size": None, "error": f"{exc.__class__.__name__}: {exc}"}
        return {"index": index, "x": x, "size": size, "error": None}


def collate_by_size(samples: list) -> dict:
    """A batch as groups of equal processed size: {"groups": [(indices, x [n, 3, h, w])], ...}."""
    groups: dict = {}
    failures, sizes = [], {}
    jpegs = []
    for s in samples:
        if s.get("jpeg") is not None:
            jpegs.append((s["index"], s["jpeg"], s["size"]))
            continue
        if s["x"] is None:
            failures.append((s["index"], s["error"]))
            continue
        sizes[s["index"]] = s["size"]
        groups.setdefault(tuple(s["x"].shape), []).append(s)
    return {
        "groups": [([s["index"] for s in g], torch.stack([s["x"] for s in g])) for g in groups.values()],
        "failures": failures,
        "sizes": sizes,
        "jpegs": jpegs,  # (index, file bytes, (H, W)) for decode_jpegs_on_device
    }


def _one(sample):
    return sample


# A batch whose decoding takes longer than this (a worker stuck on a hostile file or a hung network
# filesystem) is given up on and redone image by image, each image with the same limit.
DEFAULT_DECODE_TIMEOUT = 600.0


class DecodeStalled(RuntimeError):
    """The decoding workers delivered nothing within the deadline."""


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raises :class:`DecodeStalled` in the main thread if the block runs longer than ``seconds``.

    Not the DataLoader's own ``timeout``: with one set, the loader stops polling its workers'
    liveness and would notice a dead worker only when the timeout ends. A real-time timer
    (SIGALRM) leaves that 5-second polling in place. Elsewhere than in the main thread: no deadline.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise DecodeStalled(f"no image decoded within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# A worker killed while it was sending a batch leaves a truncated message in the loader's pipe: the
# main process's next() then fails reading it instead of with the loader's liveness check.
_TRUNCATED_MESSAGE = (EOFError, ConnectionError, pickle.UnpicklingError)


def worker_died(exc: BaseException) -> bool:
    """True for what the DataLoader's ``next()`` raises when a worker process died (killed by a
    signal, e.g. the OOM killer): its liveness check's RuntimeError, or the truncated message of a
    worker killed mid-send; and for a :class:`DecodeStalled` deadline."""
    return isinstance(exc, (DecodeStalled, *_TRUNCATED_MESSAGE)) or (
        isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc))


def decode_isolated(dataset: ImageDataset, indices: Sequence[int], timeout: float = DEFAULT_DECODE_TIMEOUT) -> dict:
    """A batch decoded one image per short-lived worker process, as ``collate_by_size`` gives it.

    The fallback after a decoding worker died or stalled: the image that kills (or stalls) its
    process again is named and recorded as failed, the others of its batch come back as usual.
    """
    samples = []
    for i in indices:
        loader = DataLoader(dataset, batch_size=None, sampler=[i], num_workers=1, collate_fn=_one,
                            worker_init_fn=_worker_init)
        try:
            with deadline(timeout):
                samples.append(next(iter(loader)))
        except Exception as exc:  # noqa: BLE001 - a worker's death, or re-raised
            if not worker_died(exc):
                raise
            if isinstance(exc, DecodeStalled):
                why = (f"decoding it took longer than {timeout:g} s (a damaged file, or a stalled filesystem?); "
                       "raise --decode-timeout if it is just slow")
            else:
                detail = str(exc).rstrip(". ") or f"its message broke off: {type(exc).__name__}"
                why = (f"the decoding process died on this image ({detail}; out of memory? lower "
                       "--max-source-pixels or give the machine more memory)")
            samples.append({"index": i, "x": None, "size": None, "error": why})
        finally:
            del loader
    return collate_by_size(samples)


def quiet_sigchld() -> None:
    """Removes PyTorch's SIGCHLD handler, which raises a worker's death in the main thread wherever it
    happens to be (inside the model, inside a write); the loader's own liveness check then reports it
    from ``next()``, where the extraction loop handles it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def nvjpeg_decoder():
    """``decode(list of uint8 byte tensors, device) -> list of [3, H, W] uint8`` on the GPU (torchvision's
    batched nvJPEG op, RGB), or None where torchvision or its CUDA decoder is missing."""
    from .decode import _READ_MODE_RGB, _torchvision_jpeg

    if not _torchvision_jpeg() or not hasattr(torch.ops.image, "decode_jpegs_cuda"):
        return None
    op = torch.ops.image.decode_jpegs_cuda

    def decode(datas: list, device) -> list:
        return op(datas, _READ_MODE_RGB, torch.device(device))

    return decode


def decode_jpegs_on_device(dataset: ImageDataset, jpegs: list, device, decoder) -> dict:
    """Decodes a batch's JPEG bytes on ``device`` in one call and preprocesses them there.

    jpegs: ``collate_by_size``'s (index, bytes, (H, W)). Returns the same dict as the collate (groups on
    ``device``). An image the GPU decoder fails on, or returns in another shape, and the whole batch if
    the call fails, go through the CPU decoder instead (``dataset.sample``): same pixels, its failures
    recorded with their reasons.
    """
    try:
        images = list(decoder([data for _, data, _ in jpegs], device))
    except Exception:  # noqa: BLE001 - e.g. a corrupt file failing the batched call: each image on the CPU
        images = [None] * len(jpegs)
    samples = []
    for (index, _, size), img in zip(jpegs, images):
        if img is None or img.dtype != torch.uint8 or tuple(img.shape) != (3, *size):
            samples.append(dataset.sample(index))
            continue
        try:
            samples.append({"index": index, "x": dataset.pre(img)[0], "size": size, "error": None})
        except Exception:  # noqa: BLE001 - preprocessing on the device failed: the CPU path decides
            samples.append(dataset.sample(index))
    out = collate_by_size(samples)
    out["groups"] = [(ix, x.to(device, non_blocking=True)) for ix, x in out["groups"]]
    return out


def _worker_init(_worker_id: int) -> None:
    # one thread per worker: N workers x all cores each would oversubscribe the CPU that also runs the model
    torch.set_num_threads(1)


def default_workers(local_world_size: int = 1) -> int:
    """Workers per rank: the cores left after the ranks themselves, at most 8 (decoding scales no further)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_world_size) - 1))


def make_loader(dataset: ImageDataset, batches: Sequence[Sequence[int]], *, workers: int, device: str,
                prefetch: int = 4) -> DataLoader:
    """A DataLoader yielding ``collate_by_size`` batches in the given order (``batches``: index lists)."""
    cuda = str(device).startswith("cuda")
    kwargs = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_sampler=list(batches), num_workers=workers, collate_fn=collate_by_size,
                      pin_memory=cuda, **kwargs)


__all__ = ["ImageDataset", "collate_by_size", "make_loader", "default_workers", "decode_isolated", "worker_died",
           "quiet_sigchld", "deadline", "DecodeStalled", "nvjpeg_decoder", "decode_jpegs_on_device",
           "DEFAULT_MAX_PIXELS", "DEFAULT_DECODE_TIMEOUT", "DEFAULT_MAX_SOURCE_PIXELS"]

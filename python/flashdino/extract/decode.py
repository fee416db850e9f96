"""The image decoder of flashdino: every image file read by the package goes through here.

``decode_image`` turns a file (or its bytes) into a ``[3, H, W]`` tensor the way the reference
DINOv2 / DINOv3 pipelines see it (``PIL.Image.open(f).convert("RGB")``), plus what they get wrong
or refuse:

- EXIF orientation is applied, so a phone photo is upright (its pixels are stored sideways);
- 8-bit images (RGB, grayscale, palette, CMYK, YCbCr, with or without alpha) come back as uint8;
  the alpha channel is dropped, as ``convert("RGB")`` does, so features match the reference;
- 16-bit and 32-bit integer images and float images come back as float32 in [0, 1], scaled by
  their bit depth (floats outside [0, 1]: by their own range), never clipped to 8 bits;
- animated files (GIF, APNG, WebP, multi-page TIFF) give their first frame;
- decompression bombs, empty / truncated / non-image files raise :class:`DecodeError` with a
  one-line reason, which the extraction pipeline records per image instead of stopping.

Pillow reads every header (format, mode, size, EXIF) and decodes everything, except one case
where a faster decoder gives the same pixels: 8-bit RGB or grayscale JPEGs go through
libjpeg-turbo in torchvision's ``decode_jpeg`` op (EXIF orientation applied by it) when torchvision
is installed, ~1.6-2.7x Pillow's images/s per core (benchmarks/bench_extract.py). Both use
libjpeg-turbo's default (islow) IDCT, and the output is bit-identical to Pillow's
(tests/test_decode_fast.py); anything it fails on, any warning, any other shape goes back to Pillow.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

Source = Union[str, os.PathLike, bytes]

# EXIF orientations 5-8 store the image transposed: height and width swap when it is shown upright.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_INT_MODE_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is the one-line explanation stored in manifests."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name = name
        self.reason = reason


def _open(source: Source, name: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DecodeError(name, "empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DecodeError(name, "file not found") from None
        except OSError as exc:
            raise DecodeError(name, f"cannot access the file ({exc.strerror or exc})") from None
        if stat.S_ISDIR(st.st_mode):
            raise DecodeError(name, "is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):  # never opened: reading a FIFO blocks forever, a device may never end
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else (
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or other special file")
            raise DecodeError(name, f"is {kind}, not a regular image file")
        if st.st_size == 0:
            raise DecodeError(name, "empty file (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            # over MAX_IMAGE_PIXELS Pillow only warns (the error comes at twice that); callers that
            # care about size pass check_size, which sees the real dimensions before any decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # oddities of readable headers (see decode_image)
            return Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise DecodeError(name, f"decompression bomb refused by Pillow ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS "
                                "only for files you trust") from None
    except UnidentifiedImageError:
        raise DecodeError(name, "not an image file Pillow can identify (corrupt or unsupported format)") from None
    except PermissionError as exc:
        raise DecodeError(name, f"cannot read the file ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - format plugins raise anything on hostile bytes (TypeError, struct.error)
        raise DecodeError(name, f"corrupt image header ({exc.__class__.__name__}: {exc})") from None


def upright_size(img) -> tuple[int, int]:
    """(height, width) of an opened image once its EXIF orientation is applied (header only)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a malformed EXIF block: the pixels are still usable, shown as stored
        orientation = None
    return (w, h) if orientation in _TRANSPOSED_ORIENTATIONS else (h, w)


def pil_to_tensor(img) -> Tensor:
    """A PIL image (already upright) as [3, H, W]: uint8 for 8-bit modes, float32 in [0, 1] for deeper ones."""
    import numpy as np

    mode = img.mode
    if mode in _INT_MODE_MAX or mode == "I" or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("float image with NaN or infinite pixels")
        if mode in _INT_MODE_MAX or (mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
            # mode "I" is how Pillow opens 16-bit PNG / TIFF files; their full scale is 65535
            arr = arr / 65535.0
        elif mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            pass
        else:
            lo, hi = arr.min(), arr.max()
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        t = torch.from_numpy(arr.astype(np.float32))
        return t[None].expand(3, -1, -1).contiguous()
    if mode != "RGB":
        with warnings.catch_warnings():
            # the reference pipelines drop palette transparency the same way; one warning per image is noise
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            img = img.convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


_FAST_JPEG_MODES = ("RGB", "L")
_READ_MODE_RGB = 3  # torchvision.io.ImageReadMode.RGB.value
_tv_decode_jpeg = None  # decode(uint8 bytes tensor) -> [3, H, W] uint8, looked up once; False when missing


def _torchvision_jpeg():
    """torchvision's JPEG decoder op, from its image library alone.

    ``import torchvision`` imports its models and ops, and with them torch._dynamo and sympy: seconds
    of start-up in every DataLoader worker, more than a small job spends decoding. Loading the
    library that registers ``torch.ops.image`` takes ~25 ms. Where that library is not found (another
    torchvision layout, a build without it), Pillow decodes everything.
    """
    global _tv_decode_jpeg
    if _tv_decode_jpeg is None:
        _tv_decode_jpeg = False
        try:
            import importlib.util

            spec = importlib.util.find_spec("torchvision")
            folders = list(spec.submodule_search_locations or []) if spec else []
            if not hasattr(torch.ops.image, "decode_jpeg"):
                for lib in (Path(f) / n for f in folders for n in ("image_stable.so", "image.so", "image.pyd")):
                    if lib.is_file():
                        torch.ops.load_library(str(lib))
                        break
            op = torch.ops.image.decode_jpeg

            def decode_jpeg(data: Tensor) -> Tensor:
                return op(data, _READ_MODE_RGB, True)  # RGB, EXIF orientation applied

            _tv_decode_jpeg = decode_jpeg
        except Exception:  # noqa: BLE001 - not installed, or a library that does not load (mismatched torch)
            _tv_decode_jpeg = False
    return _tv_decode_jpeg


def jpeg_fast_path_applies(img) -> bool:
    """Whether an opened PIL image is a JPEG that libjpeg-turbo via torchvision decodes as Pillow does."""
    return img.format == "JPEG" and img.mode in _FAST_JPEG_MODES and bool(_torchvision_jpeg())


def _read_regular_file(source: Source) -> Optional[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        path = Path(source)
        if not stat.S_ISREG(path.stat().st_mode):
            return None  # a pipe or device was read once by Pillow already
        return path.read_bytes()
    except OSError:
        return None


def _decode_jpeg_fast(source: Source, upright: tuple[int, int]) -> Optional[Tensor]:
    """The pixels through torchvision's libjpeg-turbo decoder, or None to let Pillow decode them."""
    data = _read_regular_file(source)
    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a libjpeg warning means a damaged file: Pillow decides about it
            out = _torchvision_jpeg()(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except Exception:  # noqa: BLE001 - truncated / corrupt / unsupported: Pillow's path names the reason
        return None
    if out.dtype != torch.uint8 or tuple(out.shape) != (3, *upright):
        return None
    return out


def jpeg_for_device(source: Source, *, name: Optional[str] = None,
                    check_size: Optional[Callable[[int, int], None]] = None) -> Optional[tuple[bytes, tuple]]:
    """(file bytes, (H, W)) of a JPEG that a GPU decoder (nvJPEG) decodes as Pillow does, or None.

    The header is read and ``check_size`` applied as in :func:`decode_image` (its DecodeError
    propagates). None, for :func:`decode_image` to handle on the CPU: not a JPEG, a mode other than
    8-bit RGB / grayscale, or an EXIF orientation other than upright (nvJPEG does not rotate).
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    img = _open(source, name)
    try:
        if img.format != "JPEG" or img.mode not in _FAST_JPEG_MODES:
            return None
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - a malformed EXIF block: the CPU decoder decides
            return None
        if orientation not in (None, 1):
            return None
        w, h = img.size
        if h < 1 or w < 1:
            return None
        _check_size(check_size, name, h, w)
    finally:
        img.close()
    data = _read_regular_file(source)
    return None if data is None else (data, (h, w))


def _check_size(check_size: Optional[Callable[[int, int], None]], name: str, h: int, w: int) -> None:
    """Runs the caller's size check on the header's upright size; its ValueError becomes a DecodeError."""
    if check_size is None:
        return
    try:
        check_size(h, w)
    except DecodeError:
        raise
    except ValueError as exc:
        raise DecodeError(name, str(exc)) from None


def decode_image(source: Source, *, name: Optional[str] = None,
                 check_size: Optional[Callable[[int, int], None]] = None, fast: bool = True) -> Tensor:
    """Decodes one image to ``[3, H, W]``: uint8 for 8-bit images, float32 in [0, 1] for deeper ones.

    source: a path or the file's bytes. name: how errors name the image (default: the path).
    check_size(height, width): called with the upright size from the header, before the pixels are
    decoded; raise :class:`DecodeError` (or ValueError) there to refuse an image cheaply.
    fast: decode 8-bit RGB / grayscale JPEGs with torchvision's libjpeg-turbo when it is installed
    (the same pixels, faster); False: Pillow for everything.
    Raises :class:`DecodeError` for anything unusable.
    """
    from PIL import Image, ImageOps

    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    img = _open(source, name)
    try:
        h, w = upright_size(img)
        if h < 1 or w < 1:
            raise DecodeError(name, f"image has no pixels ({w}x{h})")
        _check_size(check_size, name, h, w)
        if fast and jpeg_fast_path_applies(img):
            pixels = _decode_jpeg_fast(source, (h, w))
            if pixels is not None:
                return pixels
        try:
            with warnings.catch_warnings():
                # Pillow warns about oddities of files it still decodes; over a data set that is noise
                warnings.simplefilter("ignore", UserWarning)
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # animated: the first frame, as a still image viewer shows it
                img.load()
                upright = ImageOps.exif_transpose(img)
                return pil_to_tensor(upright)
        except Image.DecompressionBombError as exc:
            raise DecodeError(name, f"decompression bomb refused by Pillow ({exc})") from None
        except MemoryError:
            raise DecodeError(name, "out of memory decoding it (a header claiming a huge image?)") from None
        except Exception as exc:  # noqa: BLE001 - as above: any decoder failure is this image's failure
            text = str(exc) or exc.__class__.__name__
            raise DecodeError(name, f"corrupt or truncated image ({exc.__class__.__name__}: {text})") from None
    finally:
        img.close()


__all__ = ["DecodeError", "decode_image", "pil_to_tensor", "upright_size", "jpeg_fast_path_applies",
           "jpeg_for_device"]

"""The fast decoding path of the extraction pipeline against Pillow's, the official transforms and HF.

- JPEG decoding through torchvision's libjpeg-turbo is bit-identical to the Pillow path (every
  EXIF orientation, grayscale, progressive), and every other case is routed to Pillow;
- the uint8 resize (``Preprocessor.resize_uint8``) is within 1/255 of the float path and equal to
  torchvision's ``v2.Resize(antialias=True)`` on uint8 tensors, the official DINOv3 transform.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flashdino.extract import decode
from flashdino.extract.decode import DecodeError, decode_image
from flashdino.preprocess import Preprocessor

pytest.importorskip("torchvision")


def _photo(h=120, w=160, seed=0) -> np.ndarray:
    """Smooth colour fields plus noise and one hard edge: compresses like a photo, exercises clipping."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    arr[:, w // 2:] = np.where(arr[:, w // 2:] > 128, 255, 0)  # saturated blocks: bicubic overshoots here
    return arr.clip(0, 255).astype(np.uint8)


def _jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the torchvision decoder (real decoding still happens)."""
    real = decode._torchvision_jpeg()
    assert real, "torchvision.io.decode_jpeg should load when torchvision is installed"
    calls = []

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(decode, "_tv_decode_jpeg", counting)
    return calls


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_is_bit_identical_to_pillow_with_exif(orientation, spy, tmp_path):
    ex = Image.Exif()
    ex[0x0112] = orientation
    data = _jpeg(_photo(), exif=ex)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    ref = decode_image(data, fast=False)
    for source in (data, path):
        got = decode_image(source)
        assert got.dtype == torch.uint8 and torch.equal(got, ref), orientation
    assert len(spy) == 2
    assert ref.shape[1:] == ((160, 120) if orientation >= 5 else (120, 160))


@pytest.mark.parametrize("kind", ["L", "progressive", "subsampling444"])
def test_fast_jpeg_other_encodings(kind, spy):
    arr = _photo(seed=1)
    if kind == "L":
        data = _jpeg(np.asarray(Image.fromarray(arr).convert("L")))
    elif kind == "progressive":
        data = _jpeg(arr, progressive=True)
    else:
        data = _jpeg(arr, subsampling=0)
    assert torch.equal(decode_image(data), decode_image(data, fast=False))
    assert len(spy) == 1


def test_other_formats_and_modes_go_to_pillow(spy, tmp_path):
    arr = _photo(seed=2)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, format="JPEG")
    for data in (png.getvalue(), cmyk.getvalue()):
        assert torch.equal(decode_image(data), decode_image(data, fast=False))
    assert spy == []


def test_damaged_jpeg_gets_pillows_verdict(spy):
    data = _jpeg(_photo(seed=3))
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(DecodeError) as fast_err:
            decode_image(data[:cut], name="x.jpg")
        with pytest.raises(DecodeError) as pil_err:
            decode_image(data[:cut], name="x.jpg", fast=False)
        assert fast_err.value.reason == pil_err.value.reason
    assert len(spy) == 2  # tried, failed, handed to Pillow


def test_size_check_runs_before_the_fast_decoder(spy):
    def refuse(h, w):
        raise ValueError(f"too large: {w}x{h}")

    with pytest.raises(DecodeError, match="too large: 160x120"):
        decode_image(_jpeg(_photo()), check_size=refuse)
    assert spy == []


def test_the_op_is_torchvisions_decode_jpeg():
    """The library-only lookup (no `import torchvision`) calls the op as torchvision.io.decode_jpeg does."""
    import warnings

    data = torch.frombuffer(bytearray(_jpeg(_photo(seed=6))), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 announces the deprecation of its decoders
        from torchvision.io import ImageReadMode, decode_jpeg

        ref = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    assert decode._READ_MODE_RGB == ImageReadMode.RGB.value
    assert torch.equal(decode._torchvision_jpeg()(data), ref)


def test_decoding_does_not_import_torchvision(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a.jpg").write_bytes(_jpeg(_photo(seed=7)))
    code = ("import sys; from flashdino.extract import decode; x = decode.decode_image(sys.argv[1]); "
            "assert decode._tv_decode_jpeg, 'fast path unavailable'; "
            "print(x.shape, 'torchvision' in sys.modules)")
    env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(decode.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.jpg")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.Size([3,", "120,", "160])", "False"]


def test_without_torchvision_pillow_decodes(monkeypatch):
    data = _jpeg(_photo(seed=4))
    ref = decode_image(data)
    monkeypatch.setattr(decode, "_tv_decode_jpeg", False)  # what a failed import leaves
    got = decode_image(data)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("size", [(224, 224), (37, 300), (240, 320)])  # down, mixed, up
def test_uint8_resize_tolerance(size):
    mode = "bilinear"
    from torchvision.transforms import v2

    img = torch.from_numpy(_photo(480, 640, seed=5)).permute(2, 0, 1).contiguous()
    pre = Preprocessor(size=size, resample=mode)
    fast = pre.resize_uint8(img)
    assert fast.dtype == torch.uint8 and fast.shape == (3, *size)
    # the official DINOv3 transform (v2.Resize on uint8 tensors) gives the same pixels
    official = v2.Resize(size, antialias=True, interpolation=getattr(v2.InterpolationMode, mode.upper()))(img)
    assert torch.equal(fast, official)
    # the float path, rounded: within 1/255, so the model inputs differ by at most 1/255 / std
    ref = F.interpolate(img[None].float(), size=size, mode=mode, align_corners=False, antialias=True)[0]
    diff = (fast.float() - ref).abs()
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.5
    assert (pre(fast) - pre(img)).abs().max() <= (1 + 1e-3) / 255 / min(pre.image_std)


def test_uint8_resize_leaves_what_it_does_not_cover():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    assert Preprocessor(size=(40, 50)).resize_uint8(img) is img  # no resize
    assert Preprocessor(size=32, resample="nearest").resize_uint8(img) is img
    assert Preprocessor(size=32, resample="bicubic").resize_uint8(img) is img  # its uint8 kernel clips mid-way
    assert Preprocessor(size=32, antialias=False).resize_uint8(img) is img
    deep = img.float() / 255
    assert Preprocessor(size=32).resize_uint8(deep) is deep  # 16-bit / float images keep the float path


# -- GPU decoding (nvJPEG): the routing, with a stand-in decoder (no GPU here) ----------------------------
def _folder_of_kinds(tmp_path):
    from flashdino.extract.inputs import collect_items

    arr = _photo(seed=8)
    (tmp_path / "a_plain.jpg").write_bytes(_jpeg(arr))
    ex = Image.Exif()
    ex[0x0112] = 6
    (tmp_path / "b_rotated.jpg").write_bytes(_jpeg(arr, exif=ex))
    Image.fromarray(arr).save(tmp_path / "c.png")
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, format="JPEG")
    (tmp_path / "d_cmyk.jpg").write_bytes(cmyk.getvalue())
    (tmp_path / "e_gray.jpg").write_bytes(_jpeg(np.asarray(Image.fromarray(arr).convert("L"))))
    data = _jpeg(_photo(seed=9))
    (tmp_path / "f_truncated.jpg").write_bytes(data[: len(data) // 2])
    return collect_items([str(tmp_path)])


def test_gpu_routing_sends_only_upright_8bit_jpegs(tmp_path):
    from flashdino.extract.dataset import ImageDataset

    items = _folder_of_kinds(tmp_path)
    ds = ImageDataset(items, Preprocessor(size=32))
    ds.jpegs_to_device = True
    routed = {ds.items[i].path.split("/")[-1]: "jpeg" in ds[i] for i in range(len(ds))}
    assert routed == {"a_plain.jpg": True, "b_rotated.jpg": False, "c.png": False, "d_cmyk.jpg": False,
                      "e_gray.jpg": True, "f_truncated.jpg": True}  # its header is fine: the decoder decides
    sample = ds[0]
    assert sample["size"] == (120, 160) and bytes(sample["jpeg"].numpy()) == (tmp_path / "a_plain.jpg").read_bytes()


@pytest.mark.parametrize("failure", ["none", "batch_call_fails", "wrong_shape"])
def test_gpu_batch_decode_falls_back_to_the_cpu(tmp_path, failure):
    from flashdino.extract.dataset import ImageDataset, collate_by_size, decode_jpegs_on_device

    items = _folder_of_kinds(tmp_path)
    pre = Preprocessor(size=32)
    ds = ImageDataset(items, pre)
    ds.jpegs_to_device = True
    batch = collate_by_size([ds[i] for i in range(len(ds))])
    assert [ix for ix, _, _ in batch["jpegs"]] == [0, 4, 5]
    calls = []

    def stand_in(datas, device):  # what decode_jpegs_cuda returns, computed on the CPU
        calls.append(len(datas))
        if failure == "batch_call_fails":
            raise RuntimeError("nvJPEG: corrupt stream")
        out = []
        for d in datas:
            try:
                img = decode_image(bytes(d.numpy()), fast=False)
            except DecodeError:
                img = torch.zeros(3, 8, 8, dtype=torch.uint8)  # a garbage result of the wrong shape
            out.append(img[:, :-1] if failure == "wrong_shape" else img)
        return out

    got = decode_jpegs_on_device(ds, batch["jpegs"], "cpu", stand_in)
    assert calls == [3]  # one batched call
    assert [ix for ix, _ in got["failures"]] == [5] and "truncated" in got["failures"][0][1]
    xs = {i: x for ix, x in got["groups"] for i, x in zip(ix, x)}
    assert sorted(xs) == [0, 4] and got["sizes"] == {0: (120, 160), 4: (120, 160)}
    for i in (0, 4):
        cpu = ds.sample(i)["x"]
        if failure == "none":  # decoded "on the device": the float resize of the same pixels
            ref = pre(decode_image(items[i].path))[0]
            torch.testing.assert_close(xs[i], ref, rtol=0, atol=1e-6)
            assert (xs[i] - cpu).abs().max() <= (1 + 1e-3) / 255 / min(pre.image_std)
        else:  # the CPU path, exactly
            assert torch.equal(xs[i], cpu)


def test_no_gpu_decoder_without_its_op(monkeypatch):
    from flashdino.extract import dataset

    monkeypatch.setattr(decode, "_tv_decode_jpeg", False)
    assert dataset.nvjpeg_decoder() is None

"""Data-set extraction: the decoder, inputs, the sharded pipeline, resume after SIGKILL, torchrun ranks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import flashdino
from flashdino import cli
from flashdino.extract.decode import DecodeError, decode_image
from flashdino.extract.inputs import InputError, collect_items
from flashdino.preprocess import load_image

TINY = dict(depth=1, embed_dim=32, num_heads=2)
TINY_ARGS = ["--override", "depth=1", "--override", "embed_dim=32", "--override", "num_heads=2"]
RUN_ARGS = [*TINY_ARGS, "--size", "32", "--quiet", "--store", "cls,pooled,patch,storage"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ENV = dict(os.environ, PYTHONPATH=str(Path(flashdino.__file__).resolve().parents[1]) + os.pathsep
           + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif_rotated(arr, path, fmt="PNG"):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    Image.fromarray(arr).save(path, format=fmt, exif=exif)


def _cmyk_jpeg(rng, path):
    Image.fromarray(rng.integers(0, 256, (30, 26, 4), dtype=np.uint8), mode="CMYK").save(path, format="JPEG")


def _gif(rng, path):
    frames = [Image.fromarray(_rgb(rng, 28, 28)).convert("P") for _ in range(2)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def make_dataset(root: Path, seed: int = 0):
    """~200 small images of every kind + bad files; returns (good ids in input order, {bad id: reason part})."""
    rng = np.random.default_rng(seed)
    good, bad = [], {}
    for d in ("d0", "d1"):
        (root / d).mkdir(parents=True)
    for i in range(190):
        p = root / ("d0" if i < 100 else "d1") / f"img{i:03d}"
        kind = i % 10
        if i % 23 == 5:
            p = p.with_suffix(".jpg")
            p.write_bytes(b"")
            bad[str(p)] = "empty file (0 bytes)"
            continue
        if i % 29 == 7:
            buf = io.BytesIO()
            Image.fromarray(_rgb(rng, 30, 30)).save(buf, format="PNG")
            p = p.with_suffix(".png")
            p.write_bytes(buf.getvalue()[:120])  # a header and a cut-off stream
            bad[str(p)] = "truncated"
            continue
        if i % 31 == 3:
            p = p.with_suffix(".jpg")
            p.write_text("this is a text file with an image extension")
            bad[str(p)] = "not an image file"
            continue
        h, w = (int(v) for v in rng.integers(20, 48, 2))
        if kind == 0:
            Image.fromarray(_rgb(rng, h, w)).convert("L").save(p.with_suffix(".png"))
        elif kind == 1:
            Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA").save(p.with_suffix(".png"))
        elif kind == 2:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(p.with_suffix(".png"))
        elif kind == 3:
            _exif_rotated(_rgb(rng, h, w), p.with_suffix(".jpg"), "JPEG")
        elif kind == 4:
            _cmyk_jpeg(rng, p.with_suffix(".jpeg"))
        elif kind == 5:
            _gif(rng, p.with_suffix(".gif"))
        elif kind == 6:
            Image.fromarray(_rgb(rng, h, w)).save(p.with_suffix(".jpg"), quality=90)
        else:
            Image.fromarray(_rgb(rng, h, w)).save(p.with_suffix(".png"))
        good.append(str(next(q for q in p.parent.glob(p.name + ".*"))))
    # a WebDataset-style shard after the d1 images (sorted: "shard.tar" > "img..."), members in archive order
    tar = root / "d1" / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for j in range(8):
            buf = io.BytesIO()
            Image.fromarray(_rgb(rng, 30, 34)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"s{j:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
            good.append(f"{tar}/s{j:03d}.png")
        meta = b'{"label": 1}'
        info = tarfile.TarInfo("s000.json")
        info.size = len(meta)
        tf.addfile(info, io.BytesIO(meta))  # not an image: not an input
    (root / "d0" / "._img000.jpg").write_bytes(b"AppleDouble junk")  # hidden: skipped
    order = {v: k for k, v in enumerate(sorted([*good[:-8], *bad]))}
    good = sorted(good[:-8], key=order.get) + good[-8:]
    return good, bad


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    good, bad = make_dataset(root)
    return root, good, bad


def _reference(model, path: Path, size=(32, 32)):
    """Features of one plain RGB file, computed without flashdino's decoder or preprocessor: the official
    DINOv3 transform (v2.ToImage, v2.Resize(antialias=True) on the uint8 pixels, v2.ToDtype(scale=True))."""
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]
    if size is not None:
        try:
            from torchvision.transforms import v2

            x = v2.Resize(size, antialias=True)(x)
        except ImportError:  # the same uint8 kernel, called directly
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = x.float() / 255
    with torch.no_grad():
        return model.forward_features((x - MEAN) / STD)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _torchrun(args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "flashdino", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


# -- the decoder ------------------------------------------------------------------------------------
def test_decoder_bit_depths_modes_and_orientation(tmp_path):
    rng = np.random.default_rng(1)
    a16 = np.array([[0, 257, 65535], [30000, 1, 65534]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    x = decode_image(tmp_path / "g16.png")
    assert x.dtype == torch.float32 and x.shape == (3, 2, 3)
    np.testing.assert_allclose(x[0].numpy(), a16 / 65535.0, rtol=1e-6)  # scaled by the bit depth, not clipped
    assert torch.equal(x[0], x[2])

    f = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tiff")
    np.testing.assert_allclose(decode_image(tmp_path / "f.tiff")[1].numpy(), f)
    Image.fromarray(f * 8 - 2, mode="F").save(tmp_path / "wide.tiff")  # outside [0, 1]: its own range
    np.testing.assert_allclose(decode_image(tmp_path / "wide.tiff")[1].numpy(), f, atol=1e-6)

    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    x = decode_image(tmp_path / "a.png")  # alpha dropped as the reference convert("RGB") does
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))

    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    assert torch.equal(decode_image(tmp_path / "l.png"), torch.from_numpy(gray)[None].expand(3, -1, -1))

    _cmyk_jpeg(rng, tmp_path / "c.jpg")
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    assert torch.equal(decode_image(tmp_path / "c.jpg"), torch.from_numpy(ref.copy()).permute(2, 0, 1))

    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    _exif_rotated(arr, tmp_path / "rot.png")
    x = decode_image(tmp_path / "rot.png")
    assert x.shape == (3, 30, 20)  # upright: height and width swapped
    assert torch.equal(x, torch.from_numpy(np.rot90(arr, k=-1).copy()).permute(2, 0, 1))
    assert torch.equal(load_image(tmp_path / "rot.png"), x)  # the public loader is the same decoder

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=50)
    x = decode_image(tmp_path / "anim.gif")
    assert x.shape == (3, 8, 8) and x[0].min() > 200 and x[2].max() < 50  # the first frame


def test_decoder_failures(tmp_path, monkeypatch):
    import PIL.Image

    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:150])
    cases = {"zero.png": "empty file", "text.jpg": "not an image file", "cut.png": "truncated",
             "missing.png": "file not found"}
    for name, reason in cases.items():
        with pytest.raises(DecodeError, match=f"cannot read image .*{name}: .*{reason}"):
            decode_image(tmp_path / name)
    with pytest.raises(ValueError, match="cannot read image .*text.jpg"):
        load_image(tmp_path / "text.jpg")

    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    seen = []

    def refuse(h, w):
        seen.append((h, w))
        raise ValueError("too wide")

    with pytest.raises(DecodeError, match="big.png: too wide"):
        decode_image(tmp_path / "big.png", check_size=refuse)
    assert seen == [(30, 40)]
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > twice the limit: a "bomb"
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(tmp_path / "big.png")


# -- inputs -----------------------------------------------------------------------------------------
def test_inputs_order_tar_and_lists(dataset, tmp_path):
    root, good, bad = dataset
    items = collect_items([str(root)])
    assert [it.id for it in items] == sorted([*good[:-8], *bad]) + good[-8:]
    tar_items = [it for it in items if it.in_tar]
    with tarfile.open(root / "d1" / "shard.tar") as tf:
        assert tar_items[3].read_bytes() == tf.extractfile("s003.png").read()

    (tmp_path / "sub").mkdir()
    lst = tmp_path / "sub" / "list.csv"
    lst.write_text(f"path,id\n{good[0]},first\n../rel.png,second\n")
    (tmp_path / "rel.png").write_bytes(b"")
    items = collect_items([], list_file=lst)
    assert [(it.id, it.path) for it in items] == [("first", good[0]), ("second", str(tmp_path / "sub" / "../rel.png"))]
    txt = tmp_path / "list.txt"
    txt.write_text(f"# images\n{good[1]}\t id-b \n\n{good[2]}\n")
    assert [it.id for it in collect_items([], list_file=txt)] == ["id-b", good[2]]
    txt.write_text(f"{good[1]}\tsame\n{good[2]}\tsame\n")
    with pytest.raises(InputError, match="duplicate image ids .*'same'"):
        collect_items([], list_file=txt)
    with pytest.raises(InputError, match="no images found in folder"):
        collect_items([str(tmp_path / "sub")])


# -- the pipeline -----------------------------------------------------------------------------------
def test_one_process_workers_and_torchrun_agree(dataset, tmp_path, capsys):
    root, good, bad = dataset
    outs = {name: tmp_path / name for name in ("single", "workers", "ranks")}
    common = ["features", str(root), *RUN_ARGS, "--shard-size", "16", "--batch-size", "8", "--seed", "3"]
    assert cli.main([*common, "--workers", "0", "--out", str(outs["single"])]) == 0
    assert f"done: 198 images ({len(good)} with features, {len(bad)} failed)" in capsys.readouterr().out
    assert cli.main([*common, "--workers", "2", "--out", str(outs["workers"])]) == 0
    proc = _torchrun([*common, "--workers", "0", "--out", str(outs["ranks"])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert len(good) + len(bad) == 198 and len(bad) == 21

    sets = {k: flashdino.read_features(v) for k, v in outs.items()}
    ref = sets["single"]
    assert ref.ids == good and len(ref) == len(good)  # each good image exactly once, in input order
    assert {i: r for i, r in ref.failed}.keys() == bad.keys()
    for ident, reason in ref.failed:
        assert bad[ident] in reason, (ident, reason)
    for name, fs in sets.items():
        assert fs.ids == ref.ids and fs.failed == ref.failed, name
        assert (outs[name] / "manifest.jsonl").read_text() == (outs["single"] / "manifest.jsonl").read_text()
        assert _rel(fs.cls, ref.cls) <= 1e-5 and _rel(fs.pooled, ref.pooled) <= 1e-5, name
        for i in range(0, len(fs), 7):
            assert _rel(fs.patch(i), ref.patch(i)) <= 1e-5, (name, i)

    torch.manual_seed(3)
    model = flashdino.create_model("dinov3_vits16", **TINY).eval()
    plain = [i for i, g in enumerate(good) if g.endswith(".png") and "img" in g and int(g[-7:-4]) % 10 == 7][:5]
    assert len(plain) == 5
    for i in plain:
        out = _reference(model, Path(good[i]))
        assert _rel(ref.cls[i], out["x_norm_clstoken"][0]) <= 1e-5
        assert _rel(ref.patch(i), out["x_norm_patchtokens"][0]) <= 1e-5
        torch.testing.assert_close(ref.pooled[i], out["x_norm_patchtokens"][0].mean(0), rtol=1e-5, atol=1e-6)
    shards = list(ref.shards())
    assert len(shards) == 13 and [i for s in shards for i in s["ids"]] == ref.ids
    assert shards[0]["storage"].shape == (len(shards[0]["ids"]), 4, 32)

    assert cli.main(["features-info", str(outs["ranks"])]) == 0
    info = capsys.readouterr().out
    assert "finished" in info and "177 with features, 21 failed" in info and "empty file (0 bytes)" in info


# the CLI with the decoding of any image named blocker.png held while the file $GATE exists
_GATED_CLI = """
import os, sys, time
import flashdino.extract.dataset as d
orig = d.decode_image
def gated(src, *, name=None, **kwargs):
    while str(name).endswith("blocker.png") and os.path.exists(os.environ["GATE"]):
        time.sleep(0.05)
    return orig(src, name=name, **kwargs)
d.decode_image = gated
from flashdino import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_matches_uninterrupted(dataset, tmp_path, capsys):
    """A run stalled on one image in its 4th shard is killed with SIGKILL, the rerun finishes: the
    folder is byte-identical in content to one uninterrupted run."""
    root, good, _ = dataset
    plain = [g for g in good if "shard.tar" not in g][:60]
    blocker = tmp_path / "blocker.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(blocker)
    data = blocker.read_bytes()
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(plain[:35] + [str(blocker)] + plain[35:]) + "\n")
    args = [sys.executable, "-m", "flashdino", "features", "--list", str(lst), *RUN_ARGS, "--shard-size", "10",
            "--batch-size", "5", "--workers", "0"]
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    gate = tmp_path / "gate"
    gate.write_text("held")  # while it exists, decoding blocker.png waits: the run stalls inside shard 3
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _GATED_CLI, *args[3:], "--out", str(out)],
                            env=dict(ENV, GATE=str(gate)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while len(list((out / "shards").glob("*.safetensors"))) < 3 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        time.sleep(0.5)
        done = sorted(p.name for p in (out / "shards").glob("*.safetensors"))
        assert done == ["000000.safetensors", "000001.safetensors", "000002.safetensors"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.jsonl").exists()
    assert len((out / "manifest.rank0.jsonl").read_text().splitlines()) == 30  # the committed shards' records
    assert cli.main(["features-info", str(out)]) == 0
    assert "NOT finished (3 of 7 shards" in capsys.readouterr().out
    (out / "shards" / ".000003.safetensors.x1y2.tmp.safetensors").write_bytes(b"half a shard")  # a writer's leftover
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("0*.safetensors")}

    gate.unlink()
    assert blocker.read_bytes() == data
    rerun = subprocess.run([*args, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr and "3 of 7 shards already done (30 images)" in rerun.stderr
    assert "done: 31 images (31 with features, 0 failed, 30 already done)" in rerun.stdout
    for name, st in before.items():  # finished shards were not redone
        p = out / "shards" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == st
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        f"{k:06d}.{ext}" for k in range(7) for ext in ("safetensors", "check.json"))
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "ref" / "manifest.jsonl").read_text()
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 61
    for k in range(7):
        a = load_file(str(out / "shards" / f"{k:06d}.safetensors"))
        b = load_file(str(tmp_path / "ref" / "shards" / f"{k:06d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    fa, fb = flashdino.read_features(out), flashdino.read_features(tmp_path / "ref")
    assert torch.equal(fa.cls, fb.cls) and torch.equal(fa.pooled, fb.pooled) and fa.ids == fb.ids


def test_changed_settings_refused_and_overwrite(dataset, tmp_path, capsys):
    root, good, _ = dataset
    out = tmp_path / "o"
    base = ["features", *good[:6], *TINY_ARGS, "--quiet", "--workers", "0", "--out", str(out)]
    assert cli.main([*base, "--size", "32"]) == 0
    first = (out / "manifest.jsonl").read_text()
    for extra, what in ([["--size", "48"], "preprocess.size: 32 -> 48"], [["--size", "32", "--store", "cls"], "store"],
                        [["--size", "32", "--seed", "1"], "weights"],
                        [["--size", "32", "--override", "num_heads=4"], "architecture.num_heads"]):
        capsys.readouterr()
        args = [*base, *extra]
        if "--override" in extra:
            args = [a if a != "num_heads=2" else "num_heads=4" for a in args[:-2]]
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "holds features made with other settings" in err and what in err and "--overwrite" in err, err
    assert (out / "manifest.jsonl").read_text() == first  # nothing touched
    assert cli.main([*base, "--size", "32"]) == 0  # same settings: a finished folder, nothing to redo
    assert "done: 0 images (0 with features, 0 failed, 6 already done)" in capsys.readouterr().out
    from flashdino.extract.writer import locked

    with locked(out):  # another run holds the folder: refused at once, not raced
        assert cli.main([*base, "--size", "32"]) == 2
    assert "is being written by another run (pid" in capsys.readouterr().err
    assert cli.main([*base, "--size", "48", "--overwrite"]) == 0
    assert flashdino.read_features(out).settings["preprocess"]["size"] == 48
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["grid"] == [3, 3]


def test_failures_limits_and_sizes(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        if i < 8:
            (folder / f"b{i:02d}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(_rgb(rng, 40, 40)).save(folder / f"g{i:02d}.png")
    base = ["features", str(folder), *TINY_ARGS, "--size", "32", "--quiet", "--workers", "0", "--shard-size", "4"]
    assert cli.main([*base, "--max-failures", "3", "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert "stopped: 4 of 4 images failed (--max-failures 3)" in err
    assert cli.main([*base, "--max-failures", "200%", "--out", str(tmp_path / "x")]) == 2
    assert "--max-failures expects" in capsys.readouterr().err
    assert cli.main([*base, "--max-failures", "70%", "--out", str(tmp_path / "ok")]) == 0
    fs = flashdino.read_features(tmp_path / "ok")
    assert len(fs) == 4 and len(fs.failed) == 8

    # native sizes: too small for one patch, over --max-pixels; equal sizes batched together
    Image.fromarray(_rgb(rng, 10, 40)).save(folder / "tiny.png")
    Image.fromarray(_rgb(rng, 64, 80)).save(folder / "large.png")
    (folder / "g08.png").unlink()
    for i in range(8):
        (folder / f"b{i:02d}.png").unlink()
    out = tmp_path / "native"
    assert cli.main(["features", str(folder), *TINY_ARGS, "--size", "0", "--quiet", "--workers", "0",
                     "--max-pixels", "3000", "--out", str(out)]) == 0
    fs = flashdino.read_features(out)
    reasons = dict(fs.failed)
    assert "less than one 16x16 patch" in reasons[str(folder / "tiny.png")]
    large = reasons[str(folder / "large.png")]
    assert "over --max-pixels 3000" in large and "--size" in large
    assert [fs.grid(i) for i in range(len(fs))] == [(2, 2)] * 3 and fs.patch(0).shape == (4, 32)


def test_layers_store_and_single_file(dataset, tmp_path):
    root, good, _ = dataset
    imgs = [g for g in good if g.endswith(".png") and "shard" not in g][:3]
    f = tmp_path / "one.safetensors"
    args = ["features", *imgs, "--override", "depth=3", "--override", "embed_dim=32", "--override", "num_heads=2",
            "--size", "32", "--quiet", "--workers", "0", "--store", "cls,pooled,patch", "--layers", "0,2"]
    assert cli.main([*args, "--out", str(f)]) == 0
    t = load_file(str(f))
    assert sorted(t) == sorted(["cls", "pooled", "patch_tokens", *(f"layer{L}.{k}" for L in (0, 2)
                                                                  for k in ("cls", "pooled", "patch_tokens"))])
    torch.manual_seed(0)
    model = flashdino.create_model("dinov3_vits16", depth=3, embed_dim=32, num_heads=2).eval()
    pre = flashdino.preprocess.Preprocessor.from_variant(model.cfg, size=32)
    x = torch.cat([pre(pre.resize_uint8(load_image(p))) for p in imgs])  # resized as uint8, as the pipeline does
    with torch.no_grad():
        (p0, c0), (p2, c2) = model.get_intermediate_layers(x, n=[0, 2], return_class_token=True)
        final = model.forward_features(x)
    torch.testing.assert_close(t["layer0.cls"], c0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["layer0.patch_tokens"], p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["layer2.cls"], final["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["cls"], final["x_norm_clstoken"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["pooled"], final["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-6)
    d = tmp_path / "dir"
    assert cli.main([*args, "--patch-dtype", "float16", "--out", str(d)]) == 0
    fs = flashdino.read_features(d)
    assert fs.patch(1, layer=0).dtype == torch.float16
    torch.testing.assert_close(fs.patch(1, layer=0).float(), p0[1], rtol=1e-3, atol=1e-3)
    with pytest.raises(KeyError, match="no layer1.patch"):
        fs.patch(0, layer=1)
    assert cli.main([*args[:-2], "--layers", "5", "--out", str(tmp_path / "bad")]) == 2
    assert cli.main([*args[:-4], "--store", "cls", "--pca", str(tmp_path / "p.png"), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()  # refused before any work


# -- outputs (issue 16) -----------------------------------------------------------------------------
def test_outputs_checked_before_work_and_never_overwritten(dataset, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    import flashdino.cli.features as features_cmd

    root, good, _ = dataset
    img = good[-10]
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in flashdino.create_model("dinov3_vits16", **TINY).state_dict().items()},
              str(w))
    before = w.read_bytes()
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(existing)

    def no_model(args):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(features_cmd, "build_model", no_model)
    base = ["features", img, *TINY_ARGS, "--size", "32", "--quiet", "--workers", "0"]
    for out, match in [(w, "is also an input"), (existing, "already exists; pass --overwrite"),
                       (link, "already exists; pass --overwrite"), (w.with_suffix(".npz"), "must end in .safetensors")]:
        capsys.readouterr()
        assert cli.main([*base, "--weights", str(w), "--out", str(out)]) == 2
        assert "flashdino: error: " in (err := capsys.readouterr().err) and match in err, err
    assert cli.main([*base, "--weights", str(w), "--out", str(w), "--overwrite"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert w.read_bytes() == before and existing.read_bytes() == b"precious"
    (tmp_path / "afile").write_text("x")
    assert cli.main([*base, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.undo()

    assert cli.main([*base, "--out", str(link), "--overwrite"]) == 2  # not a features file: never replaced
    assert "is not a features file written by flashdino" in capsys.readouterr().err
    assert existing.read_bytes() == b"precious"
    existing.unlink()
    assert cli.main([*base, "--out", str(existing)]) == 0  # now a features file flashdino wrote
    assert cli.main([*base, "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and load_file(str(existing))["cls"].shape == (1, 32)  # written through the link
    deep = tmp_path / "no" / "such" / "x.safetensors"
    assert cli.main([*base, "--out", str(deep)]) == 0
    assert f"creating folder {tmp_path / 'no' / 'such'}" in capsys.readouterr().err and deep.is_file()

    def interrupted(fh, *a, **k):
        fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("flashdino.extract.shardfile.write_safetensors", interrupted)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert cli.main([*base, "--out", str(fresh / "f.safetensors")]) == 130
    assert list(fresh.iterdir()) == []  # no temporary file left behind
    assert cli.main([*base, "--out", str(fresh / "d"), "--shard-size", "1"]) == 130
    assert [p.name for p in (fresh / "d" / "shards").iterdir()] == []


def test_list_with_ids_and_missing_files(dataset, tmp_path):
    root, good, _ = dataset
    lst = tmp_path / "images.csv"
    lst.write_text(f"path,id\n{good[3]},cat\n{tmp_path / 'gone.jpg'},dog\n{good[4]},bird\n")
    out = tmp_path / "o"
    assert cli.main(["features", "--list", str(lst), *RUN_ARGS, "--workers", "0", "--out", str(out)]) == 0
    fs = flashdino.read_features(out)
    assert fs.ids == ["cat", "bird"] and fs.failed == [("dog", "file not found")]
    assert fs.index_of("bird") == 1 and fs.cls.shape == (2, 32)
    with pytest.raises(InputError, match="--list .*absent.csv: no such file"):
        collect_items([], list_file=tmp_path / "absent.csv")


def test_native_sizes_wait_for_equal_sizes(tmp_path, monkeypatch):
    from flashdino.extract import runner

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(12):  # alternating 32x48 and 48x32: consecutive batches never hold one size only
        Image.fromarray(_rgb(rng, *((32, 48) if i % 2 == 0 else (48, 32)))).save(folder / f"{i:02d}.png")
    calls = []
    real = runner.run_model
    monkeypatch.setattr(runner, "run_model", lambda m, x, o, *f: calls.append(tuple(x.shape[::2])) or real(m, x, o, *f))
    out = tmp_path / "o"
    assert cli.main(["features", str(folder), *TINY_ARGS, "--size", "0", "--quiet", "--workers", "0",
                     "--batch-size", "4", "--shard-size", "12", "--out", str(out)]) == 0
    assert calls == [(4, 32), (4, 48), (2, 32), (2, 48)]  # full batches of one size, the rest at the shard's end
    fs = flashdino.read_features(out)
    assert fs.ids == [str(folder / f"{i:02d}.png") for i in range(12)]
    torch.manual_seed(0)
    model = flashdino.create_model("dinov3_vits16", **TINY).eval()
    for i in (0, 5, 11):
        ref = _reference(model, folder / f"{i:02d}.png", size=None)
        assert fs.grid(i) == ((2, 3) if i % 2 == 0 else (3, 2))
        assert _rel(fs.patch(i), ref["x_norm_patchtokens"][0]) <= 1e-5


def _seed_images() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


_SEEDS = _seed_images()


@hypothesis.settings(max_examples=300, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.sampled_from(sorted(_SEEDS)),
                  st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
                  st.integers(1, 10**6))
def test_decoder_fuzz_only_decode_errors(fmt, edits, cut):
    """Mutated and cut image files: a [3, H, W] image or a DecodeError naming a reason, nothing else."""
    data = bytearray(_SEEDS[fmt])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: cut % len(data) + 1])
    try:
        x = decode_image(data, name="fuzzed")
    except DecodeError as exc:
        assert exc.reason and "\n" not in exc.reason
    else:
        assert x.dim() == 3 and x.shape[0] == 3 and x.dtype in (torch.uint8, torch.float32)


def test_sigterm_keeps_committed_shards_and_leaves_no_temp_files(dataset, tmp_path):
    root, good, _ = dataset
    plain = [g for g in good if "shard.tar" not in g][:12]
    blocker = tmp_path / "blocker.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(blocker)
    gate = tmp_path / "gate"
    gate.write_text("held")  # the run stalls on the blocker in its second shard
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(plain[:7] + [str(blocker)] + plain[7:]) + "\n")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", _GATED_CLI, "features", "--list", str(lst), *RUN_ARGS,
                             "--shard-size", "5", "--workers", "0", "--out", str(out)],
                            env=dict(ENV, GATE=str(gate)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "shards" / "000000.safetensors").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    assert f"the finished shards in {out} were kept: rerun the same command to resume" in err, err[-2000:]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.check.json", "000000.safetensors"]
    assert not [p for p in out.rglob(".*tmp*")]

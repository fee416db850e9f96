"""The ``flashdino`` command line: features (+ PCA), info, convert; in-process and via ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import flashdino
from flashdino import cli

TINY_ARGS = ["--override", "depth=2", "--override", "embed_dim=64", "--override", "num_heads=4"]
TINY = dict(depth=2, embed_dim=64, num_heads=4)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _write_images(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    paths = []
    for i, (h, w) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _manual(model, path: Path, size) -> dict:
    arr = torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB")).copy())
    x = arr.permute(2, 0, 1)[None]
    if size is not None:  # on the uint8 pixels, as the official DINOv3 transform (v2.Resize) does
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = (x.float() / 255 - MEAN) / STD
    with torch.no_grad():
        return model.forward_features(x)


def test_features_folder_batched_matches_model(tmp_path, capsys):
    paths = _write_images(tmp_path / "imgs", [(40, 60), (50, 50), (33, 47)])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image: skipped in folders")
    out = tmp_path / "feats.safetensors"
    rc = cli.main(["features", str(tmp_path / "imgs"), "--model", "small", *TINY_ARGS, "--size", "32",
                   "--batch-size", "2", "--seed", "123", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "3/3" in err  # the notice and the tqdm progress bar
    tensors = load_file(str(out))
    assert tensors["cls"].shape == (3, 64) and tensors["patch_tokens"].shape == (3, 4, 64)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["files"]) == [str(p) for p in paths]
    assert json.loads(meta["grids"]) == [[2, 2]] * 3
    assert meta["model"] == "dinov3_vits16" and meta["weights"] == "random"
    torch.manual_seed(123)  # random weights come from --seed, so every rank of a torchrun job builds the same model
    model = flashdino.create_model("dinov3_vits16", **TINY).eval()
    for i, p in enumerate(paths):
        ref = _manual(model, p, (32, 32))
        torch.testing.assert_close(tensors["cls"][i], ref["x_norm_clstoken"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors["patch_tokens"][i], ref["x_norm_patchtokens"][0], atol=1e-5, rtol=1e-5)


def test_features_native_sizes_per_image_and_pca(tmp_path):
    paths = _write_images(tmp_path / "imgs", [(32, 48), (40, 33)])
    out, pca = tmp_path / "f.safetensors", tmp_path / "viz" / "pca.png"
    rc = cli.main(["features", *map(str, paths), *TINY_ARGS, "--size", "0", "--out", str(out), "--pca", str(pca),
                   "--quiet"])
    assert rc == 0
    t = load_file(str(out))
    assert "patch_tokens" not in t and t["patch_tokens.0"].shape == (6, 64) and t["patch_tokens.1"].shape == (4, 64)
    with Image.open(pca) as im:  # rows: [input | PCA], widest row 2 * 48, heights 32 + 32
        assert im.size == (96, 64) and im.mode == "RGB"


def test_pca_image_size_and_content(tmp_path):
    out, pca = tmp_path / "f.safetensors", tmp_path / "pca.png"
    rc = cli.main(["features", "--sample", *TINY_ARGS, "--size", "64x96", "--out", str(out), "--pca", str(pca),
                   "--quiet"])
    assert rc == 0
    import numpy as np

    with Image.open(pca) as im:
        assert im.size == (192, 64)
        arr = np.asarray(im)
    assert arr[:, 96:].std() > 10  # the PCA half is not blank


def test_pca_rgb_separates_regions():
    # two groups of patch features: the first component must colour them differently, uniformly inside
    a, b = torch.randn(16), torch.randn(16)
    feats = torch.cat([a.expand(8, 16), b.expand(8, 16)]) + 0.01 * torch.randn(16, 16)
    (rgb,) = cli.pca_rgb([feats], [(4, 4)])
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    top, bottom = rgb[:2].reshape(-1, 3), rgb[2:].reshape(-1, 3)
    assert (top.mean(0) - bottom.mean(0)).abs().max() > 0.5
    assert top.std(0)[0] < 0.2 and bottom.std(0)[0] < 0.2


def test_features_with_weights_file_and_hf_folder(tmp_path, capsys):
    src = flashdino.create_model("dinov3_vits16", **TINY).eval()
    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(wfile))
    (img,) = _write_images(tmp_path / "imgs", [(48, 40)])
    out = tmp_path / "f.safetensors"
    assert cli.main(["features", str(img), *TINY_ARGS, "--weights", str(wfile), "--size", "32", "--out", str(out),
                     "--quiet"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    ref = _manual(src, img, (32, 32))
    torch.testing.assert_close(load_file(str(out))["cls"][0], ref["x_norm_clstoken"][0], atol=1e-5, rtol=1e-5)

    transformers = pytest.importorskip("transformers")
    proc_mod = pytest.importorskip("transformers.models.dinov3_vit.image_processing_dinov3_vit")
    folder = tmp_path / "hf"
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_register_tokens=4, patch_size=16)
    transformers.DINOv3ViTModel(cfg).save_pretrained(folder)
    proc_mod.DINOv3ViTImageProcessor(size={"height": 48, "width": 64}).save_pretrained(folder)
    assert cli.main(["features", str(img), "--model", "dinov3_vits16", "--override", "depth=1", "--override",
                     "embed_dim=64", "--override", "num_heads=4", "--override", "ffn_ratio=2.0",
                     "--weights", str(folder), "--out", str(out), "--overwrite", "--quiet"]) == 0
    # no --size: the folder's preprocessor_config.json (48 x 64) decides
    assert load_file(str(out))["patch_tokens"].shape == (1, 12, 64)


@pytest.mark.parametrize("argv, match", [
    (["features", "{tmp}/empty"], "no images found in folder .*empty"),
    (["features", "{tmp}/absent.png"], "no such file or folder: .*absent.png"),
    (["features", "{tmp}/junk/bad.png"], "cannot read image .*bad.png"),
    (["features", "--sample", "--model", "dinov3_vitb61"], "Unknown model name 'dinov3_vitb61'. Did you mean 'dinov3_vitb16'"),
    (["features", "--sample", "--out", "{tmp}/x.npz"], "--out must end in .safetensors"),
    (["features"], "no input images"),
    (["features", "--sample", "--weights", "{tmp}/missing.pth"], "missing.pth"),
    (["features", "--sample", "--override", "depth"], "--override expects KEY=VALUE"),
    (["features", "--sample", "--override", "dpeth=2"], "dpeth"),
    (["features", "--sample", "--override", "depth=0"],
     r"--override depth=0: depth = 0 is outside the supported range \[1, 256\] \(the number of transformer blocks\); "
     r"set depth"),
    (["features", "--sample", "--override", "patch_size=-16"], "patch_size = -16 is outside the supported range"),
    (["features", "--sample", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["features", "--sample", "--pca", "{tmp}/pca.txt"], "--pca must name an image file"),
])
def test_features_errors(tmp_path, capsys, argv, match):
    import re

    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bad.png").write_bytes(b"\x89PNG garbage")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(argv + ["--quiet"] + (TINY_ARGS if "--override" not in argv else []))
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search("flashdino: error: .*" + match, err), err


@pytest.mark.parametrize("mistake, match", [
    (["--model", "dinov3_vitb61"], "Unknown model name 'dinov3_vitb61'"),
    (["--override", "dpeth=2"], "dpeth"),
    (["--override", "depth=0"], "depth = 0"),
    (["--weights", "missing/dir/w.pth"], "no such file or folder: missing/dir/w.pth"),
])
def test_argument_mistakes_are_reported_before_an_existing_out(capsys, mistake, match):
    # The README's main command leaves features.safetensors behind; a rerun with a typo must name
    # the typo, not "--out features.safetensors already exists".
    earlier = Path("features.safetensors")  # the default --out, in this test's own working folder
    earlier.write_bytes(b"an earlier run's output")
    assert cli.main(["features", "--sample", *mistake, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and "already exists" not in err, err
    assert cli.main(["features", "--sample", *TINY_ARGS, "--quiet"]) == 2  # no mistake: now the --out check speaks
    assert "--out features.safetensors already exists" in capsys.readouterr().err
    assert earlier.read_bytes() == b"an earlier run's output"


def test_unknown_model_suggests_first_and_lists_on_request(capsys):
    assert cli.main(["features", "--sample", "--model", "dinov3_vitb61", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("flashdino: error: Unknown model name 'dinov3_vitb61'. Did you mean 'dinov3_vitb16'")
    assert "dinov2_vitg14_reg" not in err and "`flashdino models`" in err  # no list of every name, a pointer
    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(rows) == set(flashdino.VARIANTS)
    for alias, target in flashdino.ALIASES.items():
        assert alias in rows[target], (alias, target)
    assert rows["dinov3_vitl16"].split()[1:6] == ["dinov3", "1024", "24", "16", "16"]


def test_every_features_option_states_its_default():
    import argparse

    from flashdino.cli import features as features_command

    sub = argparse.ArgumentParser().add_subparsers()
    features_command.add_parser(sub)
    features = sub.choices["features"]
    checked = 0
    for action in features._actions:
        if not action.option_strings or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            continue
        checked += 1
        assert "default" in action.help and str(action.default) in action.help, (action.option_strings, action.help)
    assert checked >= 10  # --model, --out, --batch-size, --dtype, --device, --runtime, --store, ...
    helps = {a.option_strings[0]: a.help for a in features._actions if a.option_strings}
    assert "default 32" in helps["--batch-size"] and "default float32" in helps["--dtype"]


def test_info_dispatches_to_info_module(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("flashdino.info")
    fake.main = lambda argv=None, prog=None: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "flashdino.info", fake)
    monkeypatch.setattr(flashdino, "info", fake, raising=False)
    assert cli.main(["info"]) == 0 and calls == [[]]
    assert cli.main(["info", "--json"]) == 0 and calls[-1] == ["--json"]


def test_info_real_module(capsys):
    pytest.importorskip("flashdino.info")
    assert cli.main(["info", "--json"]) == 0
    json.loads(capsys.readouterr().out)


def test_convert_dispatches_and_converts(monkeypatch, tmp_path, capsys):
    import flashdino.loading as loading

    seen = {}
    monkeypatch.setattr(loading, "convert", lambda src, out, **kw: seen.update(src=src, out=out, **kw) or Path(out))
    assert cli.main(["convert", "a_hub/id", str(tmp_path / "o.safetensors"), "--model", "small"]) == 0
    assert seen == {"src": "a_hub/id", "out": str(tmp_path / "o.safetensors"), "model": "small"}
    monkeypatch.undo()
    # a real conversion of an official-layout state dict
    src = flashdino.create_model("dinov3_vits16", **TINY)
    pth = tmp_path / "official.pth"
    torch.save(src.state_dict(), pth)
    out = tmp_path / "conv.safetensors"
    assert cli.main(["convert", str(pth), str(out), "--override", "depth=2"]) == 2
    assert "--override needs --model" in capsys.readouterr().err
    assert cli.main(["convert", str(pth), str(out), "--model", "dinov3_vits16", *TINY_ARGS]) == 0
    loaded = flashdino.from_pretrained(str(out))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), src.eval()(x))
    assert cli.main(["convert", str(tmp_path / "nope.pth"), str(out)]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_commands_that_need_no_model_do_not_import_torch():
    """`flashdino models` and `--help` answer at once (torch alone takes a second or more to import);
    the error types a command reports are imported only when one is raised."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(flashdino.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    script = ("import sys; from flashdino import cli; rc = cli.main(['models']); "
              "print(rc, 'torch' in sys.modules, cli.main(['features', '--sample', '--size', '7']))")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False 2"  # models without torch; a user error still one line, exit 2
    assert "dinov3_vitl16" in proc.stdout and "flashdino: error:" in proc.stderr


def test_the_script_ends_after_the_steps_of_an_ordinary_exit(tmp_path):
    """console_main skips the interpreter's finalisation (~0.4 s with torch loaded), not what an ordinary
    exit guarantees: non-daemon threads finish, atexit handlers run, buffered output arrives, and the
    command's exit status is the process's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(flashdino.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONUNBUFFERED", None)  # C's stdout fully buffered, as it is for a pipe by default
    script = textwrap.dedent("""
        import atexit, ctypes, sys, threading, time
        import torch
        from flashdino import cli
        folder = sys.argv[1]

        def late_write():
            time.sleep(0.5)
            with open(folder + "/thread.txt", "w") as fh:
                fh.write("finished")

        def command():
            threading.Thread(target=late_write).start()
            atexit.register(lambda: open(folder + "/atexit.txt", "w").write("ran"))
            sys.stdout.write("buffered, no newline")
            sys.stdout.flush()
            ctypes.CDLL(None).printf(b" and C's stdio")  # as a native library writes: buffered in C
            return 3

        cli.main = command
        cli.console_main()
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline and C's stdio"
    assert (tmp_path / "thread.txt").read_text() == "finished"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_python_dash_m_subprocess(tmp_path):
    env = dict(os.environ)
    pkg_root = str(Path(flashdino.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "s.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "flashdino", "features", "--sample", "--override", "depth=1", "--override",
         "embed_dim=32", "--override", "num_heads=2", "--size", "48", "--out", str(out), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr and "wrote" in proc.stdout
    assert load_file(str(out))["patch_tokens"].shape == (1, 9, 32)
    bad = subprocess.run([sys.executable, "-m", "flashdino"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "features" in bad.stderr
    info = subprocess.run([sys.executable, "-m", "flashdino", "info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr

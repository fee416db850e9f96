"""``flashdino convert`` and the CLI's model construction: outputs never clobbered, advice in CLI
words, files described by what they are, URL weights, converted files used with their own config."""

from __future__ import annotations

import argparse
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import flashdino
from flashdino import cli
from flashdino.cli._common import DEFAULT_MODEL, CliError, build_model
from flashdino.outputs import OutputPathError
from _servers import serve

TINY = dict(depth=2, embed_dim=64, num_heads=4)
TINY_ARGS = ["--override", "depth=2", "--override", "embed_dim=64", "--override", "num_heads=4"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_pth(tmp_path):
    model = flashdino.create_model("dinov3_vits16", **TINY)
    path = tmp_path / "official.pth"
    torch.save(model.state_dict(), path)
    return model, path


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".partial")))


def test_existing_output_needs_overwrite(tmp_path, tiny_pth, capsys):
    _, pth = tiny_pth
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    rc, _, err = run_cli(capsys, "convert", pth, out, "--model", "dinov3_vits16", *TINY_ARGS)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    # a misspelt --model or --override is named first, not hidden behind "already exists"
    for mistake, named in ((["--model", "dinov3_vitb61"], "Did you mean 'dinov3_vitb16'"),
                           (["--model", "dinov3_vits16", "--override", "depth=0"], "depth = 0")):
        rc, _, err = run_cli(capsys, "convert", pth, out, *mistake)
        assert rc == 2 and named in err and "already exists" not in err, err
    rc, _, _ = run_cli(capsys, "convert", pth, out, "--model", "dinov3_vits16", *TINY_ARGS, "--overwrite")
    assert rc == 0 and flashdino.from_pretrained(out).n_blocks == 2
    assert leftovers(tmp_path) == []
    # the Python API refuses too unless overwrite=True (documented default)
    with pytest.raises(OutputPathError, match="already exists.*overwrite"):
        flashdino.convert(pth, out, model="dinov3_vits16", **TINY)
    assert flashdino.convert(pth, out, model="dinov3_vits16", overwrite=True, **TINY) == out


def test_output_equal_to_the_input_is_refused_even_with_overwrite(tmp_path, tiny_pth, capsys):
    model, _ = tiny_pth
    src = flashdino.convert(model.state_dict(), tmp_path / "m.safetensors", model=model)
    before = src.read_bytes()
    rc, _, err = run_cli(capsys, "convert", src, src, "--overwrite")
    assert rc == 2 and "is also an input" in err
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(before)
    with pytest.raises(OutputPathError, match="is also an input"):
        flashdino.convert(folder, folder / "model.safetensors", overwrite=True)
    assert src.read_bytes() == before


def test_concurrent_converts_to_one_output_all_succeed(tmp_path, tiny_pth):
    _, pth = tiny_pth
    out = tmp_path / "shared.safetensors"
    errors = []

    def one():
        try:
            flashdino.convert(pth, out, model="dinov3_vits16", overwrite=True, **TINY)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "flashdino"
    assert leftovers(tmp_path) == []


def test_a_failed_convert_leaves_no_temporary_file(tmp_path, tiny_pth, monkeypatch):
    _, pth = tiny_pth
    import flashdino.loading.converter as converter

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        flashdino.convert(pth, tmp_path / "x.safetensors", model="dinov3_vits16", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pth"]


def test_convert_advice_speaks_cli(tmp_path, tiny_pth, capsys):
    _, pth = tiny_pth
    rc, _, err = run_cli(capsys, "convert", pth, tmp_path / "o.safetensors")
    assert rc == 2 and "--model NAME" in err
    assert "create_model(" not in err and "strict=False" not in err
    rc, _, err = run_cli(capsys, "convert", pth, tmp_path / "o.safetensors", "--model", "dinov3_vits16")
    assert rc == 2
    assert "--model dinov3_vits16 --override embed_dim=64 --override depth=2 --override num_heads=4" in err, err
    assert "create_model(" not in err and "strict=False" not in err
    # a released width with fewer blocks: the advice names the variant and the depth
    shallow = tmp_path / "shallow.pth"
    torch.save(flashdino.create_model("dinov3_vits16", depth=2).state_dict(), shallow)
    rc, _, err = run_cli(capsys, "convert", shallow, tmp_path / "o.safetensors")
    assert rc == 2 and "pass --model dinov3_vits16 --override depth=2" in err, err


@pytest.mark.parametrize("content,label", [
    ((REPO / "python" / "flashdino" / "assets" / "sample.png").read_bytes(), "a PNG image"),
    (b"\x80\x04\x95" + bytes(range(200)), "bare Python pickle"),
    (bytes(range(256)) * 8, "truncated or corrupt"),
])
def test_convert_says_what_a_bad_file_is(tmp_path, capsys, content, label):
    bad = tmp_path / "input.pth"
    bad.write_bytes(content)
    rc, _, err = run_cli(capsys, "convert", bad, tmp_path / "o.safetensors", "--model", "dinov3_vits16")
    assert rc == 2 and label in err, err
    assert "weights_only" not in err and "Traceback" not in err


def test_override_errors_name_field_value_and_type(tmp_path, tiny_pth, capsys):
    _, pth = tiny_pth
    rc, _, err = run_cli(capsys, "convert", pth, tmp_path / "o.safetensors", "--model", "dinov3_vits16",
                         "--override", "depth=two")
    assert rc == 2 and "--override depth=two" in err and "'two' (str) must be an integer" in err, err
    with pytest.raises(CliError, match=r"--override qkv_bias=maybe: .*must be true or false"):
        build_model(argparse.Namespace(model=DEFAULT_MODEL, weights=None, override=["qkv_bias=maybe"]))


def test_convert_and_build_model_accept_url_weights(tmp_path, tiny_pth, capsys, monkeypatch):
    model, pth = tiny_pth
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with serve({"/dl/official.pth": (200, pth.read_bytes())}) as (base, _):
        url = f"{base}/dl/official.pth"
        rc, out, err = run_cli(capsys, "convert", url, tmp_path / "u.safetensors", "--model", "dinov3_vits16",
                               *TINY_ARGS)
        assert rc == 0, err
        built, _ = build_model(argparse.Namespace(model="dinov3_vits16", weights=url,
                                                  override=[a for a in TINY_ARGS if a != "--override"]))
    assert torch.equal(built.cls_token, model.cls_token)
    assert torch.equal(flashdino.from_pretrained(tmp_path / "u.safetensors").cls_token, model.cls_token)


def test_cli_uses_the_config_stored_by_convert(tmp_path, tiny_pth, capsys):
    model, pth = tiny_pth
    out = tmp_path / "tiny.safetensors"
    assert run_cli(capsys, "convert", pth, out, "--model", "dinov3_vits16", *TINY_ARGS)[0] == 0
    for requested in (DEFAULT_MODEL, None):
        built, _ = build_model(argparse.Namespace(model=requested, weights=str(out), override=None))
        assert built.cfg.depth == 2 and torch.equal(built.cls_token, model.cls_token)
    # insisting on another variant: refused in CLI words, naming the stored configuration
    with pytest.raises(CliError) as info:
        build_model(argparse.Namespace(model="dinov3_vitb16", weights=str(out), override=None))
    msg = str(info.value)
    assert "leave out --model" in msg and "create_model(" not in msg and ", ," not in msg


def test_cli_wrong_weights_name_the_format(tmp_path, capsys):
    sd = flashdino.create_model("dinov2_vits14", embed_dim=64, depth=1, num_heads=4, img_size=56).state_dict()
    path = tmp_path / "v2.pth"
    torch.save(sd, path)
    with pytest.raises(CliError) as info:
        build_model(argparse.Namespace(model="dinov3_vits16", weights=str(path), override=None))
    msg = str(info.value)
    assert "(official_dinov2)" in msg and "--model" in msg and ", ," not in msg and "create_model(" not in msg


def test_cli_random_weights_notice_once_and_no_python_warning(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(argparse.Namespace(model=DEFAULT_MODEL, weights=None, override=["depth=1"]))
    err = capsys.readouterr().err
    assert err.count("RANDOM") == 1
    assert not [w for w in caught if issubclass(w.category, flashdino.RandomWeightsWarning)]


def test_module_converter_refuses_existing_output(tmp_path, tiny_pth):
    from flashdino.loading.converter import main

    model, _ = tiny_pth
    src = flashdino.convert(model.state_dict(), tmp_path / "a.safetensors", model=model)
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"keep")
    assert main([str(src), str(out)]) == 1 and out.read_bytes() == b"keep"
    assert main([str(src), str(out), "--overwrite"]) == 0


def test_features_command_reads_the_converted_files_config(tmp_path, tiny_pth, capsys):
    from PIL import Image

    _, pth = tiny_pth
    weights = tmp_path / "tiny.safetensors"
    assert run_cli(capsys, "convert", pth, weights, "--model", "dinov3_vits16", *TINY_ARGS)[0] == 0
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    out = tmp_path / "features.safetensors"
    rc, _, err = run_cli(capsys, "features", image, "--weights", weights, "--size", "32", "--out", out, "--quiet")
    assert rc == 0, err
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("cls").shape[-1] == 64  # the stored 64-wide, 2-block model, not the 384-wide default


def test_output_is_checked_before_any_download(tmp_path, capsys, monkeypatch):
    import time

    from _servers import silent_server

    monkeypatch.setenv("FLASHDINO_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    with silent_server() as base:
        start = time.perf_counter()
        rc, _, err = run_cli(capsys, "convert", f"{base}/w.pth", out)
        assert time.perf_counter() - start < 2  # refused without waiting for the (hung) server
    assert rc == 2 and "already exists" in err and out.read_bytes() == b"keep"


@pytest.mark.parametrize("err,fix", [(28, "free space there"), (36, "shorter name"), (30, "read-only")])
def test_convert_write_failure_is_one_line(tmp_path, tiny_pth, capsys, monkeypatch, err, fix):
    """A full disk (ENOSPC), a name the filesystem refuses (ENAMETOOLONG) or a read-only filesystem
    (EROFS) while the file is written: one line naming the cause and the fix, exit 2, nothing left."""
    import errno
    import os

    from flashdino.loading import converter

    assert err in (errno.ENOSPC, errno.ENAMETOOLONG, errno.EROFS)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(converter, "save_file", failing_save)
    _, pth = tiny_pth
    out = tmp_path / "out" / "w.safetensors"
    rc, _, stderr = run_cli(capsys, "convert", pth, out, "--model", "dinov3_vits16", *TINY_ARGS)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and os.strerror(err) in lines[0] and fix in lines[0], stderr
    assert not out.exists()
    if out.parent.exists():
        assert leftovers(out.parent) == [] and not list(out.parent.iterdir())

"""Data safety of ``flashdino features`` at data-set scale (issue 23): only flashdino's own files are
deleted or replaced, nothing read back is trusted unverified, every input is enumerated or failed,
nothing waits forever, every failure is one line, non-finite features are reported."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import flashdino
from flashdino import cli
from flashdino.extract import shardfile, writer
from flashdino.extract.inputs import InputError, collect_items
from flashdino.extract.writer import OutputDirError, locked

TINY = dict(depth=1, embed_dim=32, num_heads=2)
TINY_ARGS = ["--override", "depth=1", "--override", "embed_dim=32", "--override", "num_heads=2"]
RUN = [*TINY_ARGS, "--size", "32", "--quiet", "--workers", "0"]
ENV = dict(os.environ, PYTHONPATH=str(Path(flashdino.__file__).resolve().parents[1]) + os.pathsep
           + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _png(path: Path, seed: int, size=(40, 36)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _images(folder: Path, n: int = 6, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(_png(folder / f"im{i:02d}.png", seed + i)) for i in range(n)]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("flashdino: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. only flashdino's own files are deleted or replaced ------------------------------------------
def test_overwrite_never_touches_files_flashdino_did_not_write(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    # the case: a data set folder whose shards/ holds input tars, --out the data set folder
    ds = tmp_path / "ds"
    (ds / "shards").mkdir(parents=True)
    with tarfile.open(ds / "shards" / "train-000.tar", "w") as tf:
        tf.add(imgs[0], arcname="a.png")
    (ds / "README.txt").write_text("my data set")
    before = _snapshot(ds)
    for extra in ([], ["--overwrite"]):
        assert cli.main(["features", str(ds / "shards"), *RUN, "--out", str(ds), *extra]) == 2
        assert "is also an input" in _err_line(capsys)
    assert _snapshot(ds) == before

    # a folder with the user's own settings.json (no flashdino format marker) is never replaced
    own = tmp_path / "own"
    own.mkdir()
    (own / "settings.json").write_text('{"lr": 0.1}')
    (own / "README.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["features", *imgs, *RUN, "--out", str(own), *extra]) == 2
        line = _err_line(capsys)
        assert "settings.json that flashdino did not write" in line and "choose another --out" in line, line
    assert (own / "settings.json").read_text() == '{"lr": 0.1}' and (own / "README.txt").read_text() == "mine"
    (own / "settings.json").write_text("{not json")  # unreadable: flashdino cannot tell it wrote it
    assert cli.main(["features", *imgs, *RUN, "--out", str(own), "--overwrite"]) == 2
    assert "did not write (unreadable" in _err_line(capsys)
    assert (own / "settings.json").read_text() == "{not json"

    # shards/ with files flashdino did not write (no settings.json): refused, --overwrite too
    other = tmp_path / "other"
    (other / "shards").mkdir(parents=True)
    (other / "shards" / "000000.safetensors").write_bytes(b"someone else's file")
    (other / "shards" / "notes.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["features", *imgs, *RUN, "--out", str(other), *extra]) == 2
        assert "holds files flashdino did not write (e.g. 000000.safetensors)" in _err_line(capsys)
    assert (other / "shards" / "000000.safetensors").read_bytes() == b"someone else's file"

    # a flashdino folder with the user's files beside (and inside shards/): --overwrite with other
    # settings replaces flashdino's files only
    out = tmp_path / "out"
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "2", "--out", str(out)]) == 0
    (out / "README.txt").write_text("notes")
    (out / ".notes.tmpfile").write_text("a hidden file of the user's that looks temporary")
    (out / "manifest.rank7.jsonl.bak").write_text("a backup")
    capsys.readouterr()
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "3", "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.txt").read_text() == "notes" and (out / ".notes.tmpfile").exists()
    assert (out / "manifest.rank7.jsonl.bak").read_text() == "a backup"
    fs = flashdino.read_features(out)
    assert fs.settings["shard_size"] == 3 and len(fs) == 6
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "000000.check.json", "000000.safetensors", "000001.check.json", "000001.safetensors"]
    # a file dropped into shards/ later is not flashdino's: the next --overwrite refuses to clear
    (out / "shards" / "mine.txt").write_text("x")
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "2", "--out", str(out), "--overwrite"]) == 2
    assert "mine.txt" in _err_line(capsys) and (out / "shards" / "000001.safetensors").exists()


def test_no_output_equals_or_lies_inside_an_input(tmp_path, capsys, monkeypatch):
    import flashdino.cli.features as features_cmd

    imgs = _images(tmp_path / "imgs", 3)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in flashdino.create_model("dinov3_vits16", **TINY).state_dict().items()},
              str(hf / "model.safetensors"))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(imgs) + "\n")
    snap = {p: Path(p).read_bytes() for p in [*imgs, str(hf / "model.safetensors"), str(lst)]}

    def no_model(args):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(features_cmd, "build_model", no_model)
    cases = [
        (["--weights", str(hf), "--out", str(hf / "model.safetensors")], "lies inside the input folder"),
        (["--weights", str(hf / "model.safetensors"), "--out", str(hf / "model.safetensors")], "is also an input"),
        (["--weights", str(hf), "--out", str(hf / "feats.safetensors")], "lies inside the input folder"),
        (["--weights", str(hf), "--out", str(hf / "feats")], "lies inside the input folder"),
        (["--out", str(tmp_path / "imgs" / "f.safetensors")], "lies inside the input folder"),
        (["--out", str(tmp_path / "imgs" / "sub")], "lies inside the input folder"),
        (["--out", str(tmp_path / "o.safetensors"), "--pca", imgs[1]], "--pca .*im01.png lies inside the input folder"),
        (["--out", str(tmp_path / "o2"), "--pca", str(tmp_path / "imgs" / "new.png")], "lies inside the input folder"),
        (["--out", str(tmp_path / "imgs")], "is also an input"),
    ]
    for extra, match in cases:
        for ow in ([], ["--overwrite"]):
            assert cli.main(["features", str(tmp_path / "imgs"), *RUN, *extra, *ow]) == 2, extra
            line = _err_line(capsys)
            assert re.search(match, line), (extra, line)
    # a list file and the images it names are inputs too
    assert cli.main(["features", "--list", str(lst), *RUN, "--out", str(tmp_path / "x.safetensors"),
                     "--pca", imgs[2], "--overwrite"]) == 2
    assert "is also an input" in _err_line(capsys)
    assert {p: Path(p).read_bytes() for p in snap} == snap
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["im00.png", "im01.png", "im02.png"]
    assert not (tmp_path / "o2").exists() and not (hf / "feats").exists()


def test_lock_never_follows_links_and_dies_with_its_process(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 2)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for planted in ("symlink", "hardlink", "user file"):
        out = tmp_path / f"o_{planted.replace(' ', '_')}"
        out.mkdir()
        if planted == "symlink":
            (out / ".lock").symlink_to(victim)
        elif planted == "hardlink":
            os.link(victim, out / ".lock")
        else:
            (out / ".lock").write_text("my lock notes")
        assert cli.main(["features", *imgs, *RUN, "--out", str(out)]) == 2
        line = _err_line(capsys)
        assert ".lock" in line and "left alone" in line, line
        assert victim.read_text() == "precious"
    assert (tmp_path / "o_user_file" / ".lock").read_text() == "my lock notes"

    # a lock held by a process killed with SIGKILL while its forked children (DataLoader workers)
    # live on: the lock died with its holder, the children never held it
    out = tmp_path / "o"
    script = f"""
import os, signal, sys, time
from flashdino.extract.writer import locked
with locked({str(out)!r}):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    open({str(tmp_path / 'child')!r}, "w").write(str(pid))
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    child = int((tmp_path / "child").read_text())
    try:
        os.kill(child, 0)  # the orphan is alive
        with locked(out):
            pass
        t0 = time.time()
        assert cli.main(["features", *imgs, *RUN, "--out", str(out)]) == 0
        assert time.time() - t0 < 60
    finally:
        os.kill(child, signal.SIGKILL)

    # a live holder: refused at once, naming it
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from flashdino.extract.writer import locked
with locked({str(out)!r}):
    open({str(ready)!r}, "w").write("1")
    time.sleep(60)
"""], env=ENV)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        capsys.readouterr()
        assert cli.main(["features", *imgs, *RUN, "--out", str(out)]) == 2
        assert f"being written by another run (pid {holder.pid}" in _err_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    with locked(out):  # released when its holder died
        pass

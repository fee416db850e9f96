"""Data safety of ``flashdino features`` at data-set scale (issue 23): only flashdino's own files are
deleted or replaced, nothing read back is trusted unverified, every input is enumerated or failed,
nothing waits forever, every failure is one line, non-finite features are reported."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
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

    # files under the names flashdino writes, in a folder without its settings.json, are someone else's
    for name in ("cls.npy", "manifest.jsonl", "manifest.rank0.jsonl"):
        theirs = tmp_path / f"theirs_{name}"
        theirs.mkdir()
        (theirs / name).write_text("the user's")
        assert cli.main(["features", *imgs, *RUN, "--out", str(theirs), "--overwrite"]) == 2
        assert f"holds {name} but no flashdino settings.json" in _err_line(capsys)
        assert (theirs / name).read_text() == "the user's"
    # a single --out file is replaced only if it is a features file flashdino wrote
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"w": torch.ones(2)}, str(ckpt))
    before = ckpt.read_bytes()
    assert cli.main(["features", *imgs, *RUN, "--out", str(ckpt), "--overwrite"]) == 2
    assert "is not a features file written by flashdino" in _err_line(capsys) and ckpt.read_bytes() == before
    mine = tmp_path / "mine.safetensors"
    assert cli.main(["features", *imgs[:2], *RUN, "--out", str(mine)]) == 0
    assert cli.main(["features", *imgs, *RUN, "--out", str(mine), "--overwrite"]) == 0
    assert load_file(str(mine))["cls"].shape == (6, 32)
    # --pca: an existing picture is replaced only if flashdino drew it (its PNG / JPEG marker)
    for suffix in (".png", ".jpg"):
        photo = tmp_path / f"holiday{suffix}"
        Image.new("RGB", (8, 8), "red").save(photo)
        before = photo.read_bytes()
        assert cli.main(["features", *imgs, *RUN, "--out", str(tmp_path / f"p{suffix}.safetensors"), "--pca",
                         str(photo), "--overwrite"]) == 2
        assert "is not a PCA picture flashdino wrote" in _err_line(capsys) and photo.read_bytes() == before
        drawn = tmp_path / f"pca{suffix}"
        for _ in range(2):  # drawn, then replaced by the second run's --overwrite
            assert cli.main(["features", *imgs, *RUN, "--out", str(tmp_path / f"q{suffix}.safetensors"), "--pca",
                             str(drawn), "--overwrite"]) == 0
        assert Image.open(drawn).size[1] > 8

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
        (["--weights", str(hf), "--out", str(hf / "model.safetensors")], r"is also an input \(a file in the input folder"),
        (["--weights", str(hf / "model.safetensors"), "--out", str(hf / "model.safetensors")], "is also an input"),
        (["--weights", str(hf), "--out", str(hf / "feats.safetensors")], "lies inside the input folder"),
        (["--weights", str(hf), "--out", str(hf / "feats")], "lies inside the input folder"),
        (["--out", str(tmp_path / "imgs" / "f.safetensors")], "lies inside the input folder"),
        (["--out", str(tmp_path / "imgs" / "sub")], "lies inside the input folder"),
        (["--out", str(tmp_path / "o.safetensors"), "--pca", imgs[1]], "--pca .*im01.png is also an input"),
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
    # links planted under the other names flashdino writes are never written through either
    done = tmp_path / "done"
    assert cli.main(["features", *imgs, *RUN, "--out", str(done)]) == 0
    for name in ("manifest.jsonl", "cls.npy", "manifest.rank0.jsonl", "settings.json"):
        d = tmp_path / f"planted_{name}"
        shutil.copytree(done, d)
        (d / name).unlink(missing_ok=True)
        (d / name).symlink_to(victim)
        for extra in ([], ["--overwrite", "--size", "48"]):
            assert cli.main(["features", *imgs, *RUN, "--out", str(d), *extra]) == 2
            line = _err_line(capsys)
            assert f"{name} " in line and ("symbolic link" in line or "did not write" in line), line
        assert victim.read_text() == "precious" and (d / name).is_symlink()

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


# -- 2. nothing read back is trusted unverified -----------------------------------------------------
def _flip_bits(path: Path, n: int = 3) -> None:
    data = bytearray(path.read_bytes())
    for j in range(n):
        data[-1 - 7 * j] ^= 0x40  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


def test_resume_verifies_every_finished_shard_and_redoes_bad_ones(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 8)
    base = ["features", *imgs, *RUN, "--shard-size", "2", "--store", "cls,patch"]
    ref = tmp_path / "ref"
    assert cli.main([*base, "--out", str(ref)]) == 0
    ref_fs = flashdino.read_features(ref, verify=True)
    sp = lambda out, k: writer.shard_path(out, k)  # noqa: E731

    cases = {
        "copy of shard 0 as shard 1": lambda out: shutil.copy(sp(out, 0), sp(out, 1)),
        "shard and check record copied": lambda out: (shutil.copy(sp(out, 0), sp(out, 1)),
                                                      shutil.copy(writer.check_path(out, 0), writer.check_path(out, 1))),
        "flipped bits": lambda out: _flip_bits(sp(out, 1)),
        "truncated": lambda out: sp(out, 1).write_bytes(sp(out, 1).read_bytes()[:-100]),
        "check record removed": lambda out: writer.check_path(out, 1).unlink(),
    }
    for what, damage in cases.items():
        out = tmp_path / what.replace(" ", "_")
        shutil.copytree(ref, out)
        damage(out)
        capsys.readouterr()
        assert cli.main([*base, "--out", str(out)]) == 0, what
        cap = capsys.readouterr()
        assert "shard 1 " in cap.err and "cannot be trusted" in cap.err and "redoing it" in cap.err, (what, cap.err)
        assert "done: 2 images (2 with features, 0 failed, 6 already done)" in cap.out, (what, cap.out)
        fs = flashdino.read_features(out, verify=True)
        assert fs.ids == ref_fs.ids and torch.equal(fs.cls, ref_fs.cls)
        assert all(torch.equal(fs.patch(i), ref_fs.patch(i)) for i in range(len(fs)))

    # the opt-out skips the checksum (not the cheap checks): flipped bits then go unseen, a copy does not
    out = tmp_path / "quick"
    shutil.copytree(ref, out)
    _flip_bits(sp(out, 2))
    shutil.copy(sp(out, 0), sp(out, 3))
    assert cli.main([*base, "--out", str(out), "--skip-checksums"]) == 0
    err = capsys.readouterr().err
    assert "shard 3 " in err and "shard 2 " not in err
    with pytest.raises(OutputDirError, match=r"000002\.safetensors: checksum mismatch"):
        flashdino.read_features(out, verify=True)


def test_read_features_checks_the_data_against_the_manifest(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 6)
    out = tmp_path / "o"
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "2", "--store", "cls,pooled,patch", "--out",
                     str(out)]) == 0
    fs = flashdino.read_features(out, verify=True)
    assert len(fs) == 6 and fs.cls.shape == (6, 32)

    def damaged(edit, match):
        d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, d)
        edit(d)
        with pytest.raises(OutputDirError, match=match):
            f = flashdino.read_features(d)
            [f.patch(i) for i in range(len(f))]
        return d

    lines = (out / "manifest.jsonl").read_text().splitlines()
    damaged(lambda d: (d / "manifest.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n"),
            r"manifest\.jsonl: 5 records for the 6 images")
    damaged(lambda d: (d / "manifest.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n"),
            r"manifest\.jsonl: .*reordered")
    damaged(lambda d: (d / "manifest.jsonl").write_text("\n".join(lines[:-1] + ["{oops"]) + "\n"),
            r"manifest\.jsonl: line 6 is not a JSON record")

    def set_format(d, fmt):
        s = json.loads((d / "settings.json").read_text())
        s["format"] = fmt
        (d / "settings.json").write_text(json.dumps(s))

    damaged(lambda d: set_format(d, "flashdino.features/99"), r"settings\.json: format 'flashdino\.features/99' .*upgrade")
    damaged(lambda d: set_format(d, "something/1"), r"settings\.json was not written by flashdino")

    def drop_key(d, key):
        s = json.loads((d / "settings.json").read_text())
        del s[key]
        (d / "settings.json").write_text(json.dumps(s))

    damaged(lambda d: drop_key(d, "num_images"), r"settings\.json: damaged \(num_images missing or invalid\)")
    no_row = json.loads(lines[3])
    del no_row["row"]
    damaged(lambda d: (d / "manifest.jsonl").write_text("\n".join([*lines[:3], json.dumps(no_row), *lines[4:]]) + "\n"),
            r"manifest\.jsonl: line 4 is not an image record")
    damaged(lambda d: np.save(d / "cls.npy", np.zeros((5, 32), np.float32)), r"cls\.npy: 5 rows .* for the 6 good")
    damaged(lambda d: (d / "pooled.npy").write_bytes((d / "pooled.npy").read_bytes()[:100]), r"pooled\.npy: unreadable")
    damaged(lambda d: writer.shard_path(d, 1).write_bytes(writer.shard_path(d, 1).read_bytes()[:-64]),
            r"000001\.safetensors: unreadable shard")
    damaged(lambda d: shutil.copy(writer.shard_path(d, 0), writer.shard_path(d, 2)),
            r"000002\.safetensors: its records differ")
    # a shard truncated after the folder was opened: the error still names it
    d = tmp_path / "late"
    shutil.copytree(out, d)
    f = flashdino.read_features(d)
    writer.shard_path(d, 2).write_bytes(b"")
    with pytest.raises(OutputDirError, match=r"000002\.safetensors: unreadable"):
        f.patch(5)
    with pytest.raises(OutputDirError, match=r"000001\.safetensors: checksum mismatch"):
        d2 = tmp_path / "flip"
        shutil.copytree(out, d2)
        _flip_bits(writer.shard_path(d2, 1))
        flashdino.read_features(d2, verify=True)
    assert cli.main(["features-info", str(tmp_path / "flip")]) == 0  # cheap checks pass: bits flipped in data
    assert cli.main(["features-info", str(tmp_path / "flip"), "--verify"]) == 1
    assert "DAMAGED shard 1: checksum mismatch" in capsys.readouterr().out
    assert cli.main(["features-info", str(out), "--verify"]) == 0
    assert "verified: every finished shard matches its checksum" in capsys.readouterr().out


def test_shard_writer_matches_safetensors_and_its_check_record(tmp_path):
    """The streamed writer gives a file safetensors reads back exactly, with the digest of its bytes."""
    t = {"cls": torch.randn(3, 8), "patch": torch.randn(12, 8).to(torch.bfloat16), "grid": torch.ones(3, 2).long(),
         "size": torch.zeros(0, 2, dtype=torch.int64), "h": torch.randn(2, 3).half()}
    p = tmp_path / "x.safetensors"
    with open(p, "wb") as fh:
        n, digest = shardfile.write_safetensors(fh, t, {"k": "v"})
    back = load_file(str(p))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    assert n == p.stat().st_size and digest == shardfile.file_digest(p)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"k": "v"}


# -- 3. every input enumerated or failed ------------------------------------------------------------
def test_folder_links_are_followed_once_and_special_files_fail_without_blocking(tmp_path, monkeypatch):
    real = tmp_path / "elsewhere"
    _images(real, 3, seed=10)
    data = tmp_path / "data"
    _images(data, 1)
    (data / "sub").symlink_to(real, target_is_directory=True)  # the issue: skipped without a word
    (real / "loop").symlink_to(data, target_is_directory=True)  # a cycle back to the top
    (data / "again").symlink_to(real, target_is_directory=True)  # a second way to the same folder
    items = collect_items([str(data)])
    assert [it.id for it in items] == [str(data / "again" / f"im{i:02d}.png") for i in range(3)] + [
        str(data / "im00.png")]
    assert all(it.error is None for it in items)

    os.mkfifo(data / "b.jpg")  # opening it for reading would block forever
    lst = tmp_path / "l.txt"
    lst.write_text(f"{data / 'b.jpg'}\tpipe-in-list\n{data / 'im00.png'}\tlisted\n")
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "flashdino", "features", str(data), "--list", str(lst), *RUN[:-2],
                           "--workers", "1", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fs = flashdino.read_features(out)
    why = "is a FIFO (named pipe), not a regular image file"
    assert len(fs) == 5 and fs.failed == [(str(data / "b.jpg"), why), ("pipe-in-list", why)]
    with pytest.raises(InputError, match="is a FIFO"):
        collect_items([str(data / "b.jpg")])
    with pytest.raises(InputError, match="--list .*b.jpg: is a FIFO"):
        collect_items([], list_file=data / "b.jpg")
    # a folder that cannot be listed (no permission; faked, since root may list anything) is a failure
    (real / "private").mkdir()
    scandir = os.scandir

    def no_permission(path="."):
        if str(path).endswith("private"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    bad = [it for it in collect_items([str(data)]) if it.error]
    assert [it.id for it in bad] == [str(data / "again" / "private")] and "cannot list this folder" in bad[0].error


def _tar_of(folder: Path, tar: Path) -> None:
    with tarfile.open(tar, "w") as tf:
        for p in sorted(folder.iterdir()):
            tf.add(p, arcname=p.name)  # tarfile stores a second name of one inode as a hard link


def test_tar_links_resolve_and_broken_tars_are_failures_not_silence(tmp_path, capsys):
    src = tmp_path / "src"
    _images(src, 2)
    os.link(src / "im00.png", src / "im00_copy.png")  # a hard link: stored as a link member
    (src / "rel.png").symlink_to("im01.png")
    (src / "dangling.png").symlink_to("nowhere.png")
    tar = tmp_path / "t.tar"
    _tar_of(src, tar)
    with tarfile.open(tar) as tf:
        kinds = {m.name: (m.islnk(), m.issym()) for m in tf.getmembers()}
    assert kinds["im00_copy.png"] == (True, False) and kinds["rel.png"] == (False, True)
    items = {it.id.rsplit("/", 1)[-1]: it for it in collect_items([str(tar)])}
    assert sorted(items) == ["dangling.png", "im00.png", "im00_copy.png", "im01.png", "rel.png"]
    assert items["im00_copy.png"].read_bytes() == (src / "im00.png").read_bytes()
    assert items["rel.png"].read_bytes() == (src / "im01.png").read_bytes()
    assert "symbolic link to 'nowhere.png'" in items["dangling.png"].error

    out = tmp_path / "o"
    assert cli.main(["features", str(tar), *RUN, "--out", str(out)]) == 0
    fs = flashdino.read_features(out)
    assert len(fs) == 4 and [i.rsplit("/", 1)[-1] for i, _ in fs.failed] == ["dangling.png"]
    assert torch.equal(fs.cls[fs.index_of(f"{tar}/im00_copy.png")], fs.cls[fs.index_of(f"{tar}/im00.png")])

    # truncated in a member's data, and cut at a header boundary: failures that say so, no blame on compression
    whole = tar.read_bytes()
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
        first = next(m for m in tf.getmembers() if m.size > 0)
        first_data_end = first.offset_data + first.size
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: first_data_end - 10])
    bad = [it for it in collect_items([str(cut)]) if it.error and "dangling" not in it.id]
    assert len(bad) == 2 and bad[0].id.endswith("/im00.png") and "<after byte" in bad[1].id  # the cut member, the rest
    assert all("truncated" in it.error and "compress" not in it.error for it in bad), bad
    cut.write_bytes(whole[: last.offset])  # every member before the last complete, no end marker
    items = collect_items([str(cut)])
    assert items[-1].error.startswith("truncated tar: no end-of-archive marker") and len(items) == 5
    assert cli.main(["features", str(cut), *RUN, "--out", str(tmp_path / "c")]) == 0
    assert "no end-of-archive marker" in json.dumps(flashdino.read_features(tmp_path / "c").failed)
    import gzip

    gz = tmp_path / "z.tar"
    gz.write_bytes(gzip.compress(whole))
    with pytest.raises(InputError, match="gzip-compressed"):
        collect_items([str(gz)])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 600)
    with pytest.raises(InputError, match="not a tar file, or damaged") as e:
        collect_items([str(junk)])
    assert "compress" not in str(e.value)


# -- 4. nothing waits forever -----------------------------------------------------------------------
def test_a_decoding_worker_killed_mid_batch_is_survived(tmp_path, monkeypatch, capsys):
    """The OOM killer's work, imitated: decoding killer.png SIGKILLs the worker process. The run goes on,
    the image is named and failed, every other image has the features of a run without workers."""
    import flashdino.extract.dataset as dataset

    imgs = _images(tmp_path / "imgs", 9)
    killer = _png(tmp_path / "imgs" / "im04_killer.png", 99)
    orig = dataset.decode_image

    def deadly(src, *, name=None, **kwargs):
        if str(name).endswith("killer.png") and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(src, name=name, **kwargs)

    base = ["features", str(tmp_path / "imgs"), *RUN[:-2], "--batch-size", "3", "--shard-size", "4"]
    assert cli.main([*base, "--workers", "0", "--out", str(tmp_path / "ref")]) == 0
    monkeypatch.setattr(dataset, "decode_image", deadly)
    t0 = time.time()
    assert cli.main([*base, "--workers", "2", "--out", str(tmp_path / "o")]) == 0
    assert time.time() - t0 < 120
    fs, ref = flashdino.read_features(tmp_path / "o"), flashdino.read_features(tmp_path / "ref")
    assert [i for i, _ in fs.failed] == [str(killer)] and "the decoding process died on this image" in fs.failed[0][1]
    assert fs.ids == [i for i in ref.ids if i != str(killer)] and len(fs) == 9
    for j, ident in enumerate(fs.ids):
        torch.testing.assert_close(fs.cls[j], ref.cls[ref.index_of(ident)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cut", [EOFError, ConnectionResetError, pickle.UnpicklingError])
def test_a_batch_cut_off_mid_message_is_decoded_again(tmp_path, monkeypatch, cut):
    """A worker killed while it was sending its batch leaves a truncated message: the loader's next()
    fails reading it (EOFError, a reset connection, an unpickling error) instead of with its liveness
    check's RuntimeError. The batch is decoded again image by image and the run keeps every image."""
    import flashdino.extract.runner as runner

    _images(tmp_path / "imgs", 6)
    base = ["features", str(tmp_path / "imgs"), *RUN[:-2], "--batch-size", "3", "--shard-size", "6"]
    assert cli.main([*base, "--workers", "0", "--out", str(tmp_path / "ref")]) == 0
    real, cuts = runner.make_loader, []

    class CutOnce:
        def __init__(self, loader):
            self.batches = iter(loader)

        def __iter__(self):
            return self

        def __next__(self):
            if not cuts:
                cuts.append(cut)
                raise cut("a worker died while sending its batch")
            return next(self.batches)

    monkeypatch.setattr(runner, "make_loader", lambda *a, **k: CutOnce(real(*a, **k)))
    assert cli.main([*base, "--workers", "1", "--out", str(tmp_path / "o")]) == 0
    fs, ref = flashdino.read_features(tmp_path / "o"), flashdino.read_features(tmp_path / "ref")
    assert cuts == [cut] and not fs.failed and fs.ids == ref.ids
    torch.testing.assert_close(fs.cls, ref.cls, rtol=1e-5, atol=1e-6)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (the pixel data is a stub): the budget must refuse it unread."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_source_pixel_budget_applies_at_any_size(tmp_path):
    """A 12000 x 12000 PNG (its header; its pixels would be gigabytes) is refused before decoding at a
    fixed --size as at native size: the reason is the budget, not the stub pixel data's corruption."""
    imgs = _images(tmp_path / "imgs", 2)
    big = tmp_path / "imgs" / "huge.png"
    _png_header_only(big, 12000, 12000)
    for size in ("32", "0"):
        out = tmp_path / f"o{size}"
        argv = ["features", str(big), *imgs, *TINY_ARGS, "--size", size, "--quiet", "--workers", "0", "--out", str(out)]
        assert cli.main(argv) == 0
        (reason,) = [r for i, r in flashdino.read_features(out).failed]
        assert "too large to decode: 12000x12000 = 144000000 pixels, over --max-source-pixels 134217728" in reason
    out = tmp_path / "low"
    assert cli.main(["features", *imgs, *RUN, "--max-source-pixels", "1000", "--out", str(out)]) == 2  # all failed
    fs = flashdino.read_features(out)
    assert len(fs.failed) == 2 and "over --max-source-pixels 1000" in fs.failed[0][1]


# -- 5. every CLI failure is one line with a non-zero exit ------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_one_line_at_every_write(tmp_path, capsys, monkeypatch):
    import numpy as np_

    imgs = _images(tmp_path / "imgs", 4)
    base = ["features", *imgs, *RUN, "--shard-size", "2", "--store", "cls,pooled,patch"]

    def full_after(n_bytes):
        """A write_safetensors whose disk fills after n_bytes (the ordinary write raises ENOSPC)."""
        orig = shardfile.write_safetensors

        def write(fh, *a, **k):
            class Full:
                written = 0

                def write(self, b):
                    Full.written += len(memoryview(b).cast("B"))
                    if Full.written > n_bytes:
                        _enospc()
                    return fh.write(b)
            return orig(Full(), *a, **k)
        return write

    out = tmp_path / "o"
    monkeypatch.setattr(shardfile, "write_safetensors", full_after(100))
    assert cli.main([*base, "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert "000000.safetensors: No space left on device: free some space" in line and "finished shards are kept" in line
    assert cli.main(["features", *imgs, *RUN, "--out", str(tmp_path / "f.safetensors")]) == 2
    assert "f.safetensors: No space left on device" in _err_line(capsys)
    assert not list(tmp_path.glob(".f.safetensors*")) and not (tmp_path / "f.safetensors").exists()
    monkeypatch.undo()

    # the final merge: ordinary writes (never a memory map of a file that cannot grow: SIGBUS)
    monkeypatch.setattr(np_.lib.format, "open_memmap", lambda *a, **k: pytest.fail("merge used a memory map"))
    monkeypatch.setattr(writer, "_write_npy", lambda fh, shape, chunks: (fh.write(b"\x93NUMPY"), _enospc()))
    assert cli.main([*base, "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert f"cannot write the merged files in {out}: No space left on device: free some space" in line, line
    assert not list(out.glob(".*tmp*")) and not (out / "cls.npy").exists()
    monkeypatch.undo()
    monkeypatch.setattr(np_.lib.format, "open_memmap", lambda *a, **k: pytest.fail("merge used a memory map"))
    assert cli.main([*base, "--out", str(out)]) == 0  # space again: the rerun finishes from the kept shards
    assert "4 already done" in capsys.readouterr().out
    monkeypatch.undo()  # reading maps the arrays (read-only use)
    fs = flashdino.read_features(out, verify=True)
    assert fs.pooled.shape == (4, 32) and torch.isfinite(fs.cls).all()


def test_bad_arguments_and_all_failed_runs_exit_non_zero(tmp_path, capsys, monkeypatch):
    import flashdino.extract.dataset as dataset

    imgs = _images(tmp_path / "imgs", 3)
    monkeypatch.setattr(dataset, "decode_image", lambda *a, **k: pytest.fail("decoded before refusing"))
    for size in ("7", "15x224"):
        assert cli.main(["features", *imgs, *TINY_ARGS, "--size", size, "--quiet", "--out", str(tmp_path / "s")]) == 2
        assert "less than one 16x16 patch" in _err_line(capsys)
    long = "n" * 300
    for out in (tmp_path / long, tmp_path / f"{long}.safetensors", tmp_path / long / "x.safetensors"):
        assert cli.main(["features", *imgs, *RUN, "--out", str(out)]) == 2
        line = _err_line(capsys)
        assert "over this filesystem's limit of" in line and "shorter name" in line and len(line) < 400, line
    assert cli.main(["features", *imgs, *RUN, "--out", str(tmp_path / "p.safetensors"),
                     "--pca", str(tmp_path / f"{long}.png")]) == 2
    assert "over this filesystem's limit" in _err_line(capsys)
    assert not (tmp_path / "s").exists()
    monkeypatch.undo()

    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"b{i}.png").write_bytes(b"not a png")
    assert cli.main(["features", str(junk), *RUN, "--out", str(tmp_path / "allbad")]) == 2
    line = _err_line(capsys)
    assert "none of the 3 images gave features (all failed)" in line and "features-info" in line
    assert len(flashdino.read_features(tmp_path / "allbad").failed) == 3  # the records are kept to read


def test_ctrl_c_says_finished_shards_are_kept_and_how_to_resume(tmp_path, capsys, monkeypatch):
    imgs = _images(tmp_path / "imgs", 4)
    out = tmp_path / "o"
    orig = writer.write_shard

    def interrupt_second(out_dir, k, *a, **kw):
        if k == 1:
            raise KeyboardInterrupt
        return orig(out_dir, k, *a, **kw)

    monkeypatch.setattr(writer, "write_shard", interrupt_second)
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted (Ctrl-C); the shard in progress was discarded, the finished shards in {out} were kept: " \
           "rerun the same command to resume" in err
    monkeypatch.undo()
    assert cli.main(["features", *imgs, *RUN, "--shard-size", "2", "--out", str(out)]) == 0
    assert "1 of 2 shards already done" in capsys.readouterr().err


def test_resume_recognises_inputs_and_names_the_one_that_changed(tmp_path, capsys, monkeypatch):
    _images(tmp_path / "imgs", 4)
    monkeypatch.chdir(tmp_path)
    base = ["features", *RUN, "--shard-size", "2"]
    assert cli.main([*base, "imgs", "--out", "o"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "imgs", "--out", str(tmp_path / "o")]) == 0  # --out spelled absolutely: same folder
    assert "0 images (0 with features, 0 failed, 4 already done)" in capsys.readouterr().out
    assert cli.main([*base, str(tmp_path / "imgs"), "--out", "o"]) == 2
    line = _err_line(capsys)
    assert f"input 1 is the same folder/file spelled differently: 'imgs' before, '{tmp_path / 'imgs'}' now" in line
    assert "rerun with 'imgs' to resume" in line
    _images(tmp_path / "imgs2", 4, seed=50)
    assert cli.main([*base, "imgs2", "--out", "o"]) == 2
    assert f"input 1 changed: 'imgs' ({tmp_path / 'imgs'}) before, 'imgs2' ({tmp_path / 'imgs2'}) now" in \
        _err_line(capsys)
    _png(tmp_path / "imgs" / "im00b.png", 7)
    assert cli.main([*base, "imgs", "--out", "o"]) == 2
    assert "the images in the inputs changed: image 1 was 'imgs/im01.png', now 'imgs/im00b.png'" in _err_line(capsys)


# -- 6. non-finite features are counted and reported ------------------------------------------------
def test_non_finite_features_are_counted_and_reported(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 3)
    sd = {k: v.contiguous() for k, v in flashdino.create_model("dinov3_vits16", **TINY).state_dict().items()}
    sd["norm.weight"] = sd["norm.weight"].clone()
    sd["norm.weight"][0] = float("inf")  # one inf weight: every output row gets an inf
    w = tmp_path / "w.safetensors"
    save_file(sd, str(w))
    out = tmp_path / "o"
    assert cli.main(["features", *imgs, *RUN, "--weights", str(w), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 3 images have non-finite features (NaN or inf)" in err and "manifest.jsonl" in err
    recs = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite") for r in recs] == [True] * 3
    assert cli.main(["features-info", str(out)]) == 0
    assert "WARNING: 3 images have non-finite features" in capsys.readouterr().out
    f = tmp_path / "f.safetensors"
    assert cli.main(["features", *imgs, *RUN, "--weights", str(w), "--out", str(f)]) == 0
    assert "3 images have non-finite features" in capsys.readouterr().err
    assert cli.main(["features-info", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nonfinite"] == 3 and info["images"] == 3 and info["tensors"]["cls"] == [3, 32]
    # healthy weights: no warning, no flag
    assert cli.main(["features", *imgs, *RUN, "--out", str(tmp_path / "ok")]) == 0
    assert "non-finite" not in capsys.readouterr().err
    assert "nonfinite" not in (tmp_path / "ok" / "manifest.jsonl").read_text()


def test_features_info_reads_a_single_file(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 2)
    f = tmp_path / "f.safetensors"
    assert cli.main(["features", *imgs, *RUN, "--out", str(f)]) == 0
    capsys.readouterr()
    assert cli.main(["features-info", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{f}: 2 images, model dinov3_vits16" in out and "cls: [2, 32]" in out and "patch_tokens: [2, 4, 32]" in out
    other = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    assert cli.main(["features-info", str(other)]) == 2
    assert "is not a features file written by flashdino features" in _err_line(capsys)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    assert cli.main(["features-info", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a readable .safetensors file" in _err_line(capsys)


def test_a_stalled_decoding_worker_is_given_up_on(tmp_path, monkeypatch):
    """A worker stuck on one image (a hung filesystem, a decoder in a loop): the wait is bounded by
    --decode-timeout, the image is recorded as failed, the rest of the run goes on."""
    import flashdino.extract.dataset as dataset

    _images(tmp_path / "imgs", 5)
    stuck = _png(tmp_path / "imgs" / "im02_stuck.png", 98)
    orig = dataset.decode_image

    def stalling(src, *, name=None, **kwargs):
        if str(name).endswith("stuck.png") and torch.utils.data.get_worker_info() is not None:
            time.sleep(600)
        return orig(src, name=name, **kwargs)

    monkeypatch.setattr(dataset, "decode_image", stalling)
    t0 = time.time()
    assert cli.main(["features", str(tmp_path / "imgs"), *RUN[:-2], "--workers", "1", "--batch-size", "2",
                     "--decode-timeout", "2", "--out", str(tmp_path / "o")]) == 0
    assert time.time() - t0 < 120
    fs = flashdino.read_features(tmp_path / "o")
    assert len(fs) == 5 and [i for i, _ in fs.failed] == [str(stuck)]
    assert "decoding it took longer than 2 s" in fs.failed[0][1]

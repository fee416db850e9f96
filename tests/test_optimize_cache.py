"""The ``optimize()`` cache (deploy/cache.py): every file the runtime loads is verified, a cache that
cannot be written is used read-only or bypassed, and the cache stays within its size limit.

The oracle is always the eager model the optimized one was made from (1e-5 relative); a file
"replaced by another model's" is the same file of a model with other weights, which has the same
size and layout and would run silently if it were trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flashdino
from flashdino.deploy import onnx_export
from flashdino.deploy import optimized as optimize_mod
from flashdino.deploy._extras import available

from _oracle import randomise

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

HAS_OPENVINO = available("openvino")
RUNTIMES = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])
TINY = dict(depth=1, embed_dim=64, num_heads=2)


def _model(seed: int, named: bool = True):
    """A tiny model with random weights; ``named``: its weights carry a source, like loaded weights do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flashdino.RandomWeightsWarning)
        model = flashdino.create_model("dinov3_vits16", **TINY).eval()
    randomise(model, seed=seed)
    if named:
        model.weights_source = f"test weights {seed}"
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check(opt, model, shape=(2, 3, 48, 64)):
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model.forward_features(x)
    out = opt.forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert _rel(out[k], ref[k]) <= 1e-5, k


def _optimize(model, runtime, root, **kw):
    return flashdino.optimize(model, runtime=runtime, cache_dir=root, **kw)


# -- every file the runtime loads is verified ---------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_external_weights_replaced_by_another_models_are_detected(tmp_path, monkeypatch, runtime):
    monkeypatch.setattr(onnx_export, "ONNX_2GB", 1000)  # the tiny model's weights go to model.onnx.data
    a, b = _model(1), _model(2)
    opt_a = _optimize(a, runtime, tmp_path)
    opt_b = _optimize(b, runtime, tmp_path)
    folder_a, folder_b = opt_a.cache_entry.folder, opt_b.cache_entry.folder
    record = json.loads((folder_a / "entry.json").read_text())
    assert set(record["files"]) == {"model.onnx", "model.onnx.data"}
    assert record["files"]["model.onnx.data"]["size"] == (folder_a / "model.onnx.data").stat().st_size
    shutil.copyfile(folder_b / "model.onnx.data", folder_a / "model.onnx.data")  # same size, other weights
    with pytest.warns(UserWarning, match="model.onnx.data does not match its recorded hash"):
        again = _optimize(a, runtime, tmp_path)
        _check(again, a)  # OpenVINO hashes the export when it first reads it, to compile
    assert not again.cache_entry.hit
    assert _optimize(a, runtime, tmp_path).cache_entry.hit


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed")
def test_openvino_blobs_are_stored_per_shape_and_verified(tmp_path):
    a, b = _model(1), _model(2)
    shape = (1, 3, 48, 64)
    tag = "x".join(map(str, shape))
    _check(_optimize(a, "openvino", tmp_path), a, shape)
    _check(_optimize(b, "openvino", tmp_path), b, shape)
    warm = _optimize(a, "openvino", tmp_path)
    _check(warm, a, shape)
    assert warm.cache_entry.hit and warm.cache_entry.blobs_loaded == 1, "a warm start imports, it does not compile"
    blob_a = warm.cache_entry.folder / "openvino" / f"{tag}.blob"
    blob_b = _optimize(b, "openvino", tmp_path).cache_entry.folder / "openvino" / f"{tag}.blob"
    assert blob_a.is_file() and blob_a.read_bytes() != blob_b.read_bytes()

    # the blob alone replaced by the other model's: its hash differs from the record
    shutil.copyfile(blob_b, blob_a)
    opt = _optimize(a, "openvino", tmp_path)
    with pytest.warns(UserWarning, match="does not match its record"):
        _check(opt, a, shape)
    assert opt.cache_entry.blobs_loaded == 0
    # blob and record both copied from the other entry: the record names another entry
    shutil.copyfile(blob_b, blob_a)
    shutil.copyfile(blob_b.with_suffix(".json"), blob_a.with_suffix(".json"))
    opt = _optimize(a, "openvino", tmp_path)
    with pytest.warns(UserWarning, match="does not match its record"):
        _check(opt, a, shape)
    # recompiled and stored again: the next start is warm and right
    warm = _optimize(a, "openvino", tmp_path)
    _check(warm, a, shape)
    assert warm.cache_entry.blobs_loaded == 1


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed")
def test_openvino_warm_start_reads_only_the_stored_compiled_model(tmp_path):
    """A warm start with a stored blob for the shape neither reads nor hashes the export (about a second
    per GB); the export is hashed when it is read, for a new shape, and a changed one is rebuilt then."""
    a = _model(1)
    shape = (1, 3, 48, 64)
    cold = _optimize(a, "openvino", tmp_path)
    cold.prepare(shape)  # compiles now, so that the first call does not wait for it
    assert cold.cache_entry.blobs_loaded == 0
    _check(cold, a, shape)
    onnx_file = cold.cache_entry.folder / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-64:] = bytes(64)  # the same size, other bytes: only a hash tells
    onnx_file.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm = _optimize(a, "openvino", tmp_path)
        warm.prepare(shape)
        assert warm.cache_entry.blobs_loaded == 1
        _check(warm, a, shape)
    assert not [w for w in caught if "flashdino.optimize" in str(w.message)]  # nothing rebuilt, nothing hashed
    with pytest.warns(UserWarning, match="model.onnx does not match its recorded hash"):
        _check(warm, a, (2, 3, 32, 48))  # a new shape: the export is read, checked, rebuilt
    assert _optimize(a, "openvino", tmp_path).cache_entry.hit


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed")
def test_openvino_precisions_share_one_export(tmp_path, monkeypatch):
    exports = []
    real = optimize_mod.export_onnx
    monkeypatch.setattr(optimize_mod, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    a = _model(1)
    shape = (1, 3, 48, 64)
    fp32 = _optimize(a, "openvino", tmp_path)
    _check(fp32, a, shape)
    bf16 = _optimize(a, "openvino", tmp_path, precision="bf16")
    assert bf16.cache_entry.hit and bf16.cache_entry.folder == fp32.cache_entry.folder and len(exports) == 1
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = a.forward_features(x)["x_norm_clstoken"]
    assert torch.nn.functional.cosine_similarity(bf16(x), ref).min() >= 0.99
    blobs = sorted(p.name for p in (fp32.cache_entry.folder / "openvino").glob("*.blob"))
    assert blobs == ["1x3x48x64.blob", "bf16-1x3x48x64.blob"]  # one compiled model per precision and shape
    again = _optimize(a, "openvino", tmp_path, precision="bf16")
    again.prepare(shape)
    assert again.cache_entry.blobs_loaded == 1


def test_a_rebuild_removes_only_flashdinos_files(tmp_path):
    a = _model(1)
    folder = _optimize(a, "onnxruntime", tmp_path).cache_entry.folder
    (folder / "notes.txt").write_text("mine")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-100:] = bytes(100)
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding the cache entry"):
        _check(_optimize(a, "onnxruntime", tmp_path), a)
    assert (folder / "notes.txt").read_text() == "mine"
    assert _optimize(a, "onnxruntime", tmp_path).cache_entry.hit


# -- a cache that cannot be written ---------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_unwritable_cache_means_no_cache_with_one_warning(tmp_path, monkeypatch, runtime):
    """A cache path that cannot be created (under a file: refused even for root) falls back to a
    private temporary export, removed once loaded."""
    (tmp_path / "file").write_text("x")
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(private))
    a = _model(1)
    with pytest.warns(UserWarning, match=r"cannot be written .*running without a cache") as record:
        opt = _optimize(a, runtime, tmp_path / "file" / "cache")
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1
    assert opt.cache_entry.temporary
    _check(opt, a)
    _check(opt, a, (1, 3, 32, 80))  # a new shape compiles from the graph in memory
    assert not list(private.iterdir()), "the private export must be removed once loaded"


def _read_only_runner():
    """How to run a command with a read-only folder: chmod for ordinary users; for root (whom chmod
    does not stop) a read-only bind mount in a private mount namespace, where unshare allows it."""
    if os.geteuid() != 0:
        return "chmod"
    if shutil.which("unshare") and shutil.which("mount"):
        probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt 2>/dev/null || true; exit 0"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return "unshare"
    return None


READ_ONLY_SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    import torch, flashdino
    warnings.filterwarnings("error", message="flashdino.optimize")  # no rebuild, no "cannot be written"
    root, weights, shape, runtimes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    model = flashdino.create_model("dinov3_vits16", weights=weights, depth=1, embed_dim=64, num_heads=2).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    for runtime in runtimes:
        opt = flashdino.optimize(model, runtime=runtime, cache_dir=root)
        out = opt(x)
        err = float((out - ref).abs().max() / ref.abs().max())
        assert opt.cache_entry.hit and not opt.cache_entry.temporary and err <= 1e-5, (runtime, err)
        if runtime == "openvino":
            assert opt.cache_entry.blobs_loaded == 1
    print("ok")
''')


def test_a_filled_read_only_cache_is_used(tmp_path):
    how = _read_only_runner()
    if how is None:
        pytest.skip("running as root without unshare: no way to make a folder read-only here")
    model = _model(1)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    model = flashdino.create_model("dinov3_vits16", weights=weights, **TINY).eval()
    root = tmp_path / "cache"
    shape = [1, 3, 48, 64]
    for runtime in RUNTIMES:
        _check(_optimize(model, runtime, root), model, tuple(shape))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}
    script = tmp_path / "run.py"
    script.write_text(READ_ONLY_SCRIPT)
    args = [sys.executable, str(script), str(root), str(weights), json.dumps(shape), json.dumps(RUNTIMES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(flashdino.__file__).parents[1]),
                                                        str(Path(__file__).parent)])}
    if how == "chmod":
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
        finally:
            for p in [root, *root.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
    else:
        mount = f"mount --bind {root} {root} && mount -o remount,ro,bind {root} && exec \"$@\""
        proc = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", *args], capture_output=True, text=True,
                              timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")} == before


# -- the size bound -----------------------------------------------------------------------------------


def _entry_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_least_recently_used_entries_are_evicted(tmp_path, monkeypatch):
    a, b, c = _model(1), _model(2), _model(3)
    root = tmp_path / "cache"
    fa = _optimize(a, "onnxruntime", root).cache_entry.folder
    size = _entry_bytes(fa)
    monkeypatch.setenv("FLASHDINO_CACHE_MAX_GB", str(2.5 * size / 1024**3))  # room for two entries
    foreign = root / "someone-elses-folder"
    foreign.mkdir()
    (foreign / "entry.json").write_text(json.dumps({"key": {"variant": "x"}, "files": {}}))  # no marker
    time.sleep(0.02)
    fb = _optimize(b, "onnxruntime", root).cache_entry.folder
    time.sleep(0.02)
    assert _optimize(a, "onnxruntime", root).cache_entry.hit  # a is now more recent than b
    time.sleep(0.02)
    fc = _optimize(c, "onnxruntime", root).cache_entry.folder
    assert fa.is_dir() and fc.is_dir() and not fb.exists(), "b was the least recently used"
    assert (foreign / "entry.json").is_file(), "a folder without flashdino's marker is never evicted"
    total = sum(_entry_bytes(p) for p in root.iterdir() if p.is_dir() and p != foreign)
    assert total <= 2.5 * size
    _check(_optimize(b, "onnxruntime", root), b)  # an evicted entry is simply built again


def test_unnamed_weights_keep_one_entry_and_go_first(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    named = _model(1)
    _optimize(named, "onnxruntime", root)
    folders = []
    for seed in (5, 6, 7):  # three processes with random weights would add three entries
        m = _model(seed, named=False)
        opt = _optimize(m, "onnxruntime", root)
        _check(opt, m)
        folders.append(opt.cache_entry.folder)
    assert [f.is_dir() for f in folders] == [False, False, True]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2
    record = json.loads((folders[-1] / "entry.json").read_text())
    assert record["unnamed_weights"] is True
    # over the limit, the unnamed entry goes before a more recently used... and an older named one stays
    time.sleep(0.02)
    other = _model(2)
    size = _entry_bytes(folders[-1])
    monkeypatch.setenv("FLASHDINO_CACHE_MAX_GB", str(2.5 * size / 1024**3))
    _optimize(other, "onnxruntime", root)
    assert not folders[-1].exists()
    assert _optimize(named, "onnxruntime", root).cache_entry.hit


def test_bad_cache_size_setting_is_named_before_any_export(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDINO_CACHE_MAX_GB", "lots")
    monkeypatch.setattr(optimize_mod, "export_onnx", lambda *a, **k: pytest.fail("exported before the check"))
    with pytest.raises(ValueError, match="FLASHDINO_CACHE_MAX_GB='lots' is not a finite number"):
        _optimize(_model(1), "onnxruntime", tmp_path)


CONCURRENT_SCRIPT = textwrap.dedent('''
    import sys, torch, flashdino
    root, weights = sys.argv[1], sys.argv[2]
    model = flashdino.create_model("dinov3_vits16", weights=weights, depth=1, embed_dim=64, num_heads=2).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = model(x)
    out = flashdino.optimize(model, runtime="onnxruntime", cache_dir=root)(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    print("ok")
''')


def test_processes_filling_the_same_entry_at_once_all_succeed(tmp_path):
    model = _model(4)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    script = tmp_path / "run.py"
    script.write_text(CONCURRENT_SCRIPT)
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(flashdino.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(weights)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, results)), results
    entries = [p for p in root.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".staging"), entries
    loaded = flashdino.create_model("dinov3_vits16", weights=weights, **TINY).eval()
    assert _optimize(loaded, "onnxruntime", root).cache_entry.hit

"""ONNX export and ``flashdino.optimize``: flashdino eager is the oracle for every exported graph.

The full-depth exports are made once per module (one trace size) and run at other sizes,
batches and aspect ratios: what the dynamic graph must get right is everything that depends on
H and W (DINOv3 RoPE grid and remainder crop, the DINOv2 position-table resize).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino.deploy import optimized as optimize_mod
from flashdino.deploy._extras import MissingExtraError, available
from flashdino.deploy.onnx_export import export_onnx, read_metadata

from _oracle import randomise

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4  # the bound, relative to the largest magnitude of each output
HAS_OPENVINO = available("openvino")


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _eager(model, x, names):
    with torch.no_grad():
        ref = dict(model.forward_features(x))
        layers = [int(n[6:]) for n in names if n.startswith("layer_")]
        if layers:
            ref.update({f"layer_{i}": t for i, t in zip(layers, model.get_intermediate_layers(x, n=layers))})
    return ref


def _model(name, **overrides):
    model = flashdino.create_model(name, **overrides).eval()
    randomise(model)  # layer scales ~0.5 and a large position table: every part of the graph matters
    return model


# name -> (outputs, sizes (B, H, W) other than the trace size)
CASES = {
    "dinov3_vits16": (["x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "layer_4", "x_prenorm"],
                      [(1, 224, 224), (3, 160, 240), (1, 83, 117), (3, 64, 48)]),
    "dinov2_vits14_reg": (["x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "layer_7"],
                          [(1, 224, 224), (3, 140, 252), (3, 56, 42)]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    model = _model(name)
    outputs, sizes = CASES[name]
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{name}.onnx", outputs=outputs)
    return name, model, path, outputs, sizes


def test_onnx_runtime_matches_eager(exported):
    name, model, path, outputs, sizes = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == outputs
    g = torch.Generator().manual_seed(1)
    for B, H, W in sizes:
        x = torch.randn(B, 3, H, W, generator=g)
        got = session.run(None, {"pixel_values": x.numpy()})
        ref = _eager(model, x, outputs)
        for n, arr in zip(outputs, got):
            err = _rel(torch.from_numpy(arr), ref[n])
            assert err <= TOL, f"{name} {B}x3x{H}x{W} {n}: relative error {err:.3g}"


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_matches_eager(exported):
    import openvino as ov

    name, model, path, outputs, sizes = exported
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    g = torch.Generator().manual_seed(2)
    for B, H, W in sizes[:3]:
        x = torch.randn(B, 3, H, W, generator=g)
        result = compiled(x.numpy())
        ref = _eager(model, x, outputs)
        for n in outputs:
            err = _rel(torch.from_numpy(result[compiled.output(n)].copy()), ref[n])
            assert err <= TOL, f"{name} {B}x3x{H}x{W} {n}: OpenVINO relative error {err:.3g}"


def test_file_carries_metadata_and_dynamic_axes(exported):
    name, model, path, outputs, _ = exported
    onnx.checker.check_model(str(path))
    meta = read_metadata(path)
    assert meta["variant"] == name
    assert int(meta["patch_size"]) == model.patch_size
    assert json.loads(meta["image_mean"]) == list(model.cfg.image_mean)
    assert json.loads(meta["image_std"]) == list(model.cfg.image_std)
    assert meta["flashdino_version"] == flashdino.__version__
    assert "random" in meta["weights_source"]
    assert json.loads(meta["outputs"]) == outputs
    proto = onnx.load(str(path), load_external_data=False)
    (inp,) = proto.graph.input
    assert inp.name == "pixel_values"
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3])), "batch, height and width must be symbolic"


@pytest.mark.parametrize("antialias,offset", [(False, 0.1), (True, 0.0)])
def test_in_graph_position_table_equals_the_reference_resize(antialias, offset):
    from flashdino.deploy.onnx_export import pos_embed_in_graph
    from flashdino.models.vision_transformer import interpolate_pos_embed

    pos = torch.randn(1, 1 + 37 * 37, 16)
    for H, W in [(37, 37), (16, 16), (8, 10), (40, 44), (1, 1), (74, 3), (37, 20)]:
        got, ref = pos_embed_in_graph(pos, H, W, offset, antialias), interpolate_pos_embed(pos, H, W, offset, antialias)
        assert _rel(got, ref) <= 1e-5, f"{H}x{W}"
    # the comparison is sensitive to the resize mode: the other mode differs by far more
    other = interpolate_pos_embed(pos, 16, 16, 0.1 if antialias else 0.0, not antialias)
    assert _rel(other, interpolate_pos_embed(pos, 16, 16, offset, antialias)) > 100 * TOL


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_position_table_on_every_runtime(name, tmp_path):
    """Offset resize (plain models), antialiased resize (register models) and the native 37x37 grid
    (no resize in the reference), at sizes other than the trace size, in ONNX Runtime and OpenVINO."""
    model = _model(name, depth=1, embed_dim=64, num_heads=2)
    path = export_onnx(model, tmp_path / "v2.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = None
    if HAS_OPENVINO:
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for B, H, W in [(2, 196, 112), (1, 518, 518), (1, 546, 532)]:
        x = torch.randn(B, 3, H, W)
        ref = _eager(model, x, [])["x_norm_patchtokens"]
        got = session.run(["x_norm_patchtokens"], {"pixel_values": x.numpy()})[0]
        assert _rel(torch.from_numpy(got), ref) <= TOL, f"onnxruntime {H}x{W}"
        if compiled is not None:
            got = compiled(x.numpy())[compiled.output("x_norm_patchtokens")]
            assert _rel(torch.from_numpy(got.copy()), ref) <= TOL, f"openvino {H}x{W}"


def test_external_data_and_fp16(tmp_path):
    model = _model("dinov3_vits16", depth=1, embed_dim=64, num_heads=2)
    path = export_onnx(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 4 * sum(p.numel() for p in model.parameters()) * 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    x = torch.randn(2, 3, 96, 112)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    assert _rel(torch.from_numpy(got[0]), _eager(model, x, [])["x_norm_clstoken"]) <= TOL
    with pytest.warns(UserWarning, match="overflow"):
        half = export_onnx(model, tmp_path / "half.onnx", fp16=True)
    onnx.checker.check_model(str(half))
    assert "float16" in read_metadata(half)["input"]
    assert model.patch_embed.proj.weight.dtype == torch.float32, "fp16 export must not convert the caller's model"


def test_export_rejects_bad_arguments(tmp_path):
    model = _model("dinov3_vits16", depth=1)
    with pytest.raises(ValueError, match="unknown output"):
        export_onnx(model, tmp_path / "a.onnx", outputs=["x_norm_regtokens"])
    with pytest.raises(ValueError, match="blocks 0..0"):
        export_onnx(model, tmp_path / "a.onnx", outputs=["layer_3"])
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        export_onnx(model, tmp_path / "a.onnx", dynamic=False, static_size=(8, 64))
    (tmp_path / "taken.onnx").write_bytes(b"keep")
    with pytest.raises(OSError, match="already exists"):
        export_onnx(model, tmp_path / "taken.onnx", overwrite=False)
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep"


def test_static_export_has_fixed_shape(tmp_path):
    model = _model("dinov3_vits16", depth=1)
    path = export_onnx(model, tmp_path / "s.onnx", dynamic=False, static_size=(64, 80), batch_size=2)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 80]


# -- optimize() ---------------------------------------------------------------------------------------

FAST_RUNTIMES = [r for r in ("eager", "onednn", "onnxruntime", "openvino") if r in optimize_mod.installed_runtimes()]


@pytest.fixture(scope="module")
def tiny():
    return _model("dinov3_vits16", depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: each (runtime, precision) of ``tiny`` is exported once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("runtime", FAST_RUNTIMES)
def test_optimize_matches_eager(tiny, runtime, cache):
    opt = flashdino.optimize(tiny, runtime=runtime, cache_dir=cache)
    assert opt.runtime == runtime and opt.precision == "fp32"
    for shape in [(1, 3, 64, 64), (3, 3, 83, 117)]:
        x = torch.randn(*shape)
        ref = _eager(tiny, x, [])
        out = opt.forward_features(x)
        assert set(out) == set(ref)
        for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert isinstance(out[k], torch.Tensor)
            assert _rel(out[k], ref[k]) <= 1e-5, f"{runtime} {k}"
        assert _rel(opt(x), ref["x_norm_clstoken"]) <= 1e-5


@pytest.mark.parametrize("runtime", FAST_RUNTIMES)
def test_optimize_rejects_bad_input_clearly(tiny, runtime, cache):
    opt = flashdino.optimize(tiny, runtime=runtime, cache_dir=cache)
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        opt(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        opt(torch.randn(1, 4, 64, 64))
    with pytest.raises(TypeError, match="torch.int8 pixels; convert to float"):
        opt(torch.zeros(1, 3, 64, 64, dtype=torch.int8))
    with pytest.raises(TypeError, match="float64 but the weights are torch.float32"):
        opt(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="add a batch dimension"):
        opt(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="masks are not supported"):
        opt.forward_features(torch.randn(1, 3, 64, 64), masks=torch.zeros(1, 16, dtype=torch.bool))


def test_optimize_dinov2_refuses_sizes_the_reference_refuses(tmp_path):
    model = _model("dinov2_vits14", depth=1, embed_dim=64, num_heads=2)
    opt = flashdino.optimize(model, runtime="onnxruntime", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        opt(torch.randn(1, 3, 70, 75))
    x = torch.randn(2, 3, 70, 84)
    out = opt.forward_features(x)
    ref = _eager(model, x, [])
    assert out["x_norm_regtokens"].shape == ref["x_norm_regtokens"].shape == (2, 0, 64)
    assert _rel(out["x_norm_patchtokens"], ref["x_norm_patchtokens"]) <= 1e-5


def _entry_folder(opt) -> Path:
    return opt.cache_entry.folder


def test_cache_is_reused_and_a_corrupt_or_mismatched_entry_is_rebuilt(tiny, tmp_path):
    x = torch.randn(1, 3, 64, 80)
    ref = _eager(tiny, x, [])["x_norm_patchtokens"]
    first = flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)
    assert not first.cache_entry.hit
    folder = _entry_folder(first)
    again = flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)
    assert again.cache_entry.hit and _entry_folder(again) == folder

    # corrupt the graph file: detected by its hash, rebuilt, and the result is right again
    blob = folder / "model.onnx"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    blob.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding the cache entry"):
        rebuilt = flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)
    assert "hash" in rebuilt.cache_entry.rebuilt_because
    assert _rel(rebuilt.forward_features(x)["x_norm_patchtokens"], ref) <= 1e-5

    # an entry recorded for something else (here: another runtime version) is not used
    record = folder / "entry.json"
    meta = json.loads(record.read_text())
    meta["key"]["runtime_version"] = "onnxruntime 0.0.1"
    record.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="rebuilding"):
        mismatched = flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)
    assert "other weights, versions or options" in mismatched.cache_entry.rebuilt_because

    # an unreadable record
    record.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable entry"):
        flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)
    assert json.loads(record.read_text())["key"]["runtime_version"].startswith("onnxruntime ")


def test_other_weights_get_their_own_cache_entry(tiny, cache):
    first = flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=cache)
    other = _model("dinov3_vits16", depth=2, embed_dim=64, num_heads=2)
    randomise(other, seed=5)
    second = flashdino.optimize(other, runtime="onnxruntime", cache_dir=cache)
    assert not second.cache_entry.hit and _entry_folder(second) != _entry_folder(first)
    x = torch.randn(1, 3, 48, 48)
    assert _rel(second(x), _eager(other, x, [])["x_norm_clstoken"]) <= 1e-5


def test_auto_picks_from_the_measurement_table(tiny, cache, monkeypatch):
    from flashdino.deploy import measured

    installed = optimize_mod.installed_runtimes()
    expected = max(installed, key=measured.CPU_SPEEDUP.get)
    assert optimize_mod.choose_runtime() == expected
    assert flashdino.optimize(tiny, cache_dir=cache).runtime == expected
    monkeypatch.setattr(optimize_mod, "installed_runtimes", lambda: ["onednn", "eager"])
    assert optimize_mod.choose_runtime() == "onednn"
    assert optimize_mod.choose_runtime(torch.device("cuda")) == "eager"


@pytest.mark.parametrize("runtime,precision", [("eager", "bf16"), ("eager", "int8"), ("onnxruntime", "int8")]
                         + ([("openvino", "bf16")] if HAS_OPENVINO else []))
def test_reduced_precision_is_opt_in_and_close(tiny, runtime, precision, cache):
    x = torch.randn(2, 3, 64, 96)
    ref = _eager(tiny, x, [])
    out = flashdino.optimize(tiny, runtime=runtime, precision=precision, cache_dir=cache).forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert out[k].dtype == torch.float32
        cos = F.cosine_similarity(out[k].flatten(1), ref[k].flatten(1)).min()
        assert cos > 0.99, f"{runtime} {precision} {k}: cosine {cos:.4f}"
    # reduced precision really changes numbers: it must never be what the default gives
    assert _rel(out["x_norm_patchtokens"], ref["x_norm_patchtokens"]) > 1e-5


def test_optimize_argument_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="does not offer precision 'int8'"):
        flashdino.optimize(tiny, runtime="onednn", precision="int8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        flashdino.optimize(tiny, runtime="tensorrt", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="float32 models on CPU"):
        flashdino.optimize(_model("dinov3_vits16", depth=1, embed_dim=64, num_heads=2).to(torch.bfloat16),
                           runtime="onnxruntime", cache_dir=tmp_path)


def test_missing_runtime_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "flashdino\[openvino\]"'):
        flashdino.optimize(tiny, runtime="openvino", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r'pip install "flashdino\[onnx\]"'):
        flashdino.optimize(tiny, runtime="onnxruntime", cache_dir=tmp_path)


# -- the command line ------------------------------------------------------------------------------

def test_cli_export(tmp_path):
    from flashdino.cli import main

    out = tmp_path / "m.onnx"
    args = ["export", "dinov3_vits16", "--out", str(out), "--override", "depth=1", "--override", "embed_dim=64",
            "--override", "num_heads=2"]
    assert main(args) == 0
    meta = read_metadata(out)
    assert meta["variant"] == "dinov3_vits16" and meta["depth"] == "1"
    assert main(args) == 2, "an existing output must be refused without --overwrite"
    assert main(args + ["--overwrite", "--static", "48x64", "--outputs", "x_norm_clstoken,0"]) == 0
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 64]
    assert [o.name for o in graph.output] == ["x_norm_clstoken", "layer_0"]
    proc = subprocess.run([sys.executable, "-m", "flashdino", "export", "dinov3_vits16", "--out", str(out),
                           "--static", "8x8", "--overwrite", "--override", "depth=1"],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(flashdino.__file__).parents[1])})
    assert proc.returncode == 2 and "smaller than one 16x16 patch" in proc.stderr


def test_vggt_aggregator_exports_with_dynamic_frames(tmp_path):
    agg = flashdino.Aggregator(embed_dim=64, depth=3, num_heads=4, patch_embed="dinov2_vits14_reg",
                               patch_embed_kwargs={"embed_dim": 64, "num_heads": 4, "depth": 1},
                               intermediate_layer_idx=[0, 2]).eval()
    randomise(agg)
    path = export_onnx(agg, tmp_path / "agg.onnx")
    meta = read_metadata(path)
    assert meta["model"] == "vggt_aggregator" and meta["patch_start_idx"] == "5"
    assert json.loads(meta["outputs"]) == ["layer_0", "layer_2"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 3, 70, 84), (2, 1, 3, 56, 42), (1, 5, 3, 42, 70)]:  # frames 3, 1 and 5
        images = torch.rand(*shape)
        with torch.no_grad():
            ref, _ = agg(images)
        got = session.run(None, {"images": images.numpy()})
        for i, arr in zip((0, 2), got):
            assert _rel(torch.from_numpy(arr), ref[i]) <= TOL, f"{shape} layer {i}"


@pytest.mark.parametrize("name", ["dinov3_vits16plus", "dinov3_vit7b16", "dinov2_vitg14_reg"])
def test_other_architectures_export(name, tmp_path):
    """SwiGLU, the 7B's bias-free qkv with local_cls_norm, and DINOv2-g's fused SwiGLU, at one block and
    reduced width (every full-size variant was checked the same way; see the issue 13 report)."""
    heads = 2
    model = _model(name, depth=1, embed_dim=128 * heads if "7b" in name else 32 * heads, num_heads=heads)
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    P = model.patch_size
    x = torch.randn(2, 3, 7 * P, 5 * P)
    ref = _eager(model, x, [])
    for out, arr in zip(session.get_outputs(), session.run(None, {"pixel_values": x.numpy()})):
        assert _rel(torch.from_numpy(arr), ref[out.name]) <= TOL, out.name


def test_features_cli_runtime_matches_eager(tmp_path):
    """`flashdino features --runtime onnxruntime` gives the eager features (≤1e-5 relative)."""
    from safetensors.torch import load_file

    from flashdino import cli

    common = ["features", "--sample", "--model", "dinov3_vits16", "--override", "depth=1", "--override", "embed_dim=64",
              "--override", "num_heads=2", "--size", "64", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "eager.safetensors"), "--runtime", "eager"]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "ort.safetensors"), "--runtime", "onnxruntime"]) == 0
    eager, fast = load_file(str(tmp_path / "eager.safetensors")), load_file(str(tmp_path / "ort.safetensors"))
    assert eager.keys() == fast.keys()
    for key in eager:
        scale = eager[key].abs().max()
        assert ((fast[key] - eager[key]).abs().max() / scale) <= 1e-5, key
    # the shard-folder path (resumable extraction) takes the same runtime
    assert cli.main(common + ["--out", str(tmp_path / "shards"), "--runtime", "onnxruntime"]) == 0
    shards = flashdino.read_features(tmp_path / "shards")
    assert ((shards.cls - eager["cls"]).abs().max() / eager["cls"].abs().max()) <= 1e-5
    # --layers: served by the runtime too (the graph's layer_<i> / layer_<i>_prefix outputs)
    for runtime in ("eager", "onnxruntime"):
        assert cli.main(common + ["--out", str(tmp_path / f"layers_{runtime}.safetensors"), "--runtime", runtime,
                                  "--layers", "0", "--store", "cls,pooled,patch,storage"]) == 0
    eager, fast = (load_file(str(tmp_path / f"layers_{r}.safetensors")) for r in ("eager", "onnxruntime"))
    assert eager.keys() == fast.keys() and "layer0.cls" in eager
    for key in eager:
        assert ((fast[key] - eager[key]).abs().max() / eager[key].abs().max()) <= 1e-5, key


# -- export arguments: checked before any work, one line each -----------------------------------------

TINY_ARGS = ["--override", "depth=1", "--override", "embed_dim=64", "--override", "num_heads=2"]


def _no_model(monkeypatch):
    from flashdino.cli import export as export_cli

    def refuse(args):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(export_cli, "build_model", refuse)


def _cli(args, capsys):
    from flashdino.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("extra,message", [
    (["--static", "100000"], "over the limit of 8192 pixels a side"),
    (["--static", "64", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--static", "64", "--batch-size", "-3"], "--batch-size: expected a positive integer, got -3"),
    (["--static", "64", "--batch-size", "5000"], "over the limit of 1024"),
    (["--batch-size", "4"], "a dynamic export (no --static) runs any batch size"),
    (["--opset", "7"], "--opset 7 is not supported: the exporter writes opsets 18 to"),
    (["--opset", "99"], "--opset 99 is not supported"),
])
def test_cli_export_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    _no_model(monkeypatch)
    code, err = _cli(["export", "dinov3_vits16", "--out", str(tmp_path / "m.onnx"), *TINY_ARGS, *extra], capsys)
    assert code == 2 and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not list(tmp_path.iterdir())


def test_cli_export_out_must_be_an_onnx_file(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    (tmp_path / "folder").mkdir()
    code, err = _cli(["export", "dinov3_vits16", "--out", str(tmp_path / "folder")], capsys)
    assert code == 2 and f"e.g. --out {tmp_path / 'folder' / 'model.onnx'}" in err[-1]
    assert ".safetensors" not in err[-1]
    code, err = _cli(["export", "dinov3_vits16", "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "must end in .onnx" in err[-1] and str(tmp_path / "m.onnx") in err[-1]
    code, err = _cli(["export", "dinov3_vits16", "--out", str(tmp_path / ("x" * 300 + ".onnx"))], capsys)
    assert code == 2 and len(err) == 1 and "shorter" in err[0], err
    # the weights file itself
    weights = tmp_path / "w.onnx"
    weights.write_bytes(b"precious")
    code, err = _cli(["export", "dinov3_vits16", "--weights", str(weights), "--out", str(weights), "--overwrite"],
                     capsys)
    assert code == 2 and "is also an input" in err[-1] and weights.read_bytes() == b"precious"


@pytest.mark.skipif(not hasattr(__import__("flashdino.outputs").outputs, "input_clash"),
                    reason="outputs.input_clash (output inside an input folder) comes from the safety branch")
def test_cli_export_refuses_an_output_inside_the_weights_folder(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, err = _cli(["export", "dinov3_vits16", "--weights", str(folder), "--out", str(folder / "m.onnx")], capsys)
    assert code == 2 and "inside the input folder" in err[-1]


def test_api_export_refuses_bad_arguments(tmp_path):
    model = _model("dinov3_vits16", depth=1, embed_dim=64, num_heads=2)
    for kwargs, message in [(dict(dynamic=False, batch_size=0), "batch_size must be an integer from 1"),
                            (dict(dynamic=False, batch_size=-3), "batch_size must be an integer from 1"),
                            (dict(dynamic=False, static_size=100000), "over the limit of 8192"),
                            (dict(opset=7), "opset 7 is not supported")]:
        with pytest.raises(ValueError, match=message):
            export_onnx(model, tmp_path / "m.onnx", **kwargs)
    with pytest.raises(ValueError, match="is a folder.*model.onnx"):
        export_onnx(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_cli_export_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import onnx_ir

    def full(model, path, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", full)
    code, err = _cli(["export", "dinov3_vits16", "--out", str(tmp_path / "m.onnx"), *TINY_ARGS], capsys)
    assert code == 2 and "No space left on device; free space there" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not list(tmp_path.iterdir()), "no partial or temporary file may stay"


def test_cli_export_honours_the_opset_and_says_random_weights_once(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, err = _cli(["export", "dinov3_vits16", "--out", str(out), "--opset", "20", *TINY_ARGS], capsys)
    assert code == 0, err
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain == ""] == [20]
    notices = [line for line in err if "RANDOM weights" in line]
    assert len(notices) == 1 and "exported model" in notices[0] and "features" not in notices[0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cls = session.run(["x_norm_clstoken"], {"pixel_values": torch.randn(2, 3, 48, 64).numpy()})[0]
    assert cls.shape == (2, 64) and torch.isfinite(torch.from_numpy(cls)).all()

"""`flashdino features` with its defaults: the device, the CPU runtime, --layers on the fast runtimes,
and the features against the loop users write with transformers (AutoImageProcessor + AutoModel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import flashdino
from flashdino import cli
from flashdino.cli import features as features_cli
from flashdino.deploy import optimized as optimize_mod

TINY = ["--model", "dinov3_vits16", "--override", "depth=3", "--override", "embed_dim=64", "--override",
        "num_heads=2", "--size", "48", "--quiet", "--workers", "0"]
RUNTIMES = [r for r in ("onednn", "onnxruntime", "openvino") if r in optimize_mod.installed_runtimes()]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _jpegs(folder, n, size=(96, 72), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(low).astype(np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


@pytest.mark.parametrize("env, cuda, expected", [
    ({}, False, "cpu"),
    ({}, True, "cuda"),
    ({"LOCAL_RANK": "1"}, True, "cuda:1"),  # one process started by a launcher for GPU 1
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, "cuda"),  # torchrun: init_distributed picks cuda:LOCAL_RANK
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, "cpu"),
])
def test_device_auto(monkeypatch, env, cuda, expected):
    for k in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert features_cli.resolve_device("auto") == expected
    assert features_cli.resolve_device("cpu") == "cpu"
    if not cuda:
        with pytest.raises(cli.CliError, match="CUDA is not available; use --device cpu"):
            features_cli.resolve_device("cuda")


def test_defaults_are_auto():
    ns = cli.build_parser().parse_args(["features", "x.jpg"])
    assert ns.device == "auto" and ns.runtime == "auto"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_optimize_serves_intermediate_layers(runtime, tmp_path):
    torch.manual_seed(0)
    model = flashdino.create_model("dinov3_vits16", depth=3, embed_dim=64, num_heads=2).eval()
    opt = flashdino.optimize(model, runtime=runtime, cache_dir=tmp_path, layers=[0, 2])
    x = torch.randn(2, 3, 48, 64)
    with torch.inference_mode():
        ref = model.get_intermediate_layers(x, n=[0, 2], return_class_token=True, return_extra_tokens=True)
        ref_ff = model.forward_features(x)
    got = opt.get_intermediate_layers(x, n=[0, 2], return_class_token=True, return_extra_tokens=True)
    for (p, c, e), (rp, rc, re) in zip(got, ref):
        assert p.shape == rp.shape and e.shape == re.shape == (2, 4, 64)
        assert max(_rel(p, rp), _rel(c, rc), _rel(e, re)) <= 1e-5
    assert _rel(opt.forward_features(x)["x_norm_clstoken"], ref_ff["x_norm_clstoken"]) <= 1e-5
    assert len(opt.get_intermediate_layers(x, n=[2])[0].shape) == 3  # patches alone, as the model gives them
    with pytest.raises(ValueError, match=r"blocks \[1\] were not prepared; pass layers=\[1\]"):
        opt.get_intermediate_layers(x, n=[1])


def test_auto_runtime_small_job_on_a_cold_cache_needs_no_export(tmp_path, monkeypatch):
    """A job under EXPORT_MIN_IMAGES does not export; with the export cached it takes the fastest runtime."""
    monkeypatch.setenv("FLASHDINO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(optimize_mod, "choose_runtime", lambda device=None: "openvino")
    import flashdino.deploy as deploy

    monkeypatch.setattr(deploy, "choose_runtime", lambda device=None: "openvino")
    chosen = []
    real = deploy.optimize

    def spy(model, runtime="auto", **kw):
        chosen.append(runtime)
        return real(model, runtime="onednn", **kw)  # stands in for the export, which is not under test here

    monkeypatch.setattr(deploy, "optimize", spy)
    imgs = _jpegs(tmp_path / "imgs", 2)
    out = tmp_path / "a.safetensors"
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out)]) == 0
    assert chosen == ["onednn"] and not (tmp_path / "cache").exists()
    monkeypatch.setattr(optimize_mod, "is_cached", lambda *a, **k: True)
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out), "--overwrite"]) == 0
    assert chosen == ["onednn", "openvino"]
    monkeypatch.setattr(optimize_mod, "is_cached", lambda *a, **k: False)
    monkeypatch.setattr(features_cli, "EXPORT_MIN_IMAGES", 2)  # a job this large pays for the export
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out), "--overwrite"]) == 0
    assert chosen[-1] == "openvino"
    chosen.clear()
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out), "--overwrite", "--runtime", "eager"]) == 0
    assert chosen == []


def test_auto_falls_back_to_onednn_when_the_runtime_cannot_be_prepared(tmp_path, monkeypatch, capsys):
    import flashdino.deploy as deploy

    monkeypatch.setattr(deploy, "choose_runtime", lambda device=None: "openvino")
    monkeypatch.setattr(optimize_mod, "is_cached", lambda *a, **k: True)
    real = deploy.optimize

    def failing(model, runtime="auto", **kw):
        if runtime == "openvino":
            raise deploy.MissingExtraError("openvino is broken here")
        return real(model, runtime=runtime, **kw)

    monkeypatch.setattr(deploy, "optimize", failing)
    imgs = _jpegs(tmp_path / "imgs", 2)
    out = tmp_path / "a.safetensors"
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out)]) == 0
    assert "runtime openvino could not be prepared (MissingExtraError: openvino is broken here); using onednn" \
        in capsys.readouterr().err
    assert cli.main(["features", *map(str, imgs), *TINY, "--out", str(out), "--overwrite",
                     "--runtime", "openvino"]) == 2  # asked for by name: the error, no silent substitute


def test_default_layers_match_eager(tmp_path):
    imgs = [str(p) for p in _jpegs(tmp_path / "imgs", 3)]
    common = ["features", *imgs, *TINY, "--layers", "0,1", "--store", "cls,pooled,patch,storage"]
    assert cli.main([*common, "--out", str(tmp_path / "auto.safetensors")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "eager.safetensors"), "--runtime", "eager"]) == 0
    auto, eager = load_file(str(tmp_path / "auto.safetensors")), load_file(str(tmp_path / "eager.safetensors"))
    assert auto.keys() == eager.keys() and {"layer0.cls", "layer1.storage_tokens", "patch_tokens"} <= set(auto)
    for k in eager:
        assert _rel(auto[k], eager[k]) <= 1e-5, k


def test_default_features_match_the_hf_loop(tmp_path):
    """The CLS features of `flashdino features DIR --weights HF_DIR` (defaults: fast decoding, the auto
    runtime) against AutoImageProcessor + AutoModel on PIL images, the same HF folder: cosine >= 0.9999."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor

    hf = tmp_path / "hf"
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=2, num_register_tokens=4, patch_size=16, key_bias=False)
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(cfg).eval().save_pretrained(hf)
    DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(hf)
    files = _jpegs(tmp_path / "imgs", 4, size=(160, 120))
    out = tmp_path / "f.safetensors"
    assert cli.main(["features", str(tmp_path / "imgs"), "--model", "dinov3_vits16", "--override", "depth=3",
                     "--override", "embed_dim=64", "--override", "num_heads=2", "--override", "ffn_ratio=4",
                     "--weights", str(hf), "--out", str(out), "--quiet", "--workers", "0"]) == 0
    ours = load_file(str(out))["cls"].double()
    processor = transformers.AutoImageProcessor.from_pretrained(hf)
    model = transformers.AutoModel.from_pretrained(hf).eval()
    with torch.inference_mode():
        inputs = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
        ref = model(**inputs).pooler_output.double()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert ours.shape == ref.shape == (4, 64)
    assert cos.min() >= 0.9999, cos


# -- --dtype bfloat16 on a CPU: OpenVINO's bf16 (opt-in reduced precision) ------------------------------


def test_bfloat16_on_cpu_picks_openvino_bf16_when_its_export_is_there(tmp_path, monkeypatch):
    """auto + --dtype bfloat16: OpenVINO at precision bf16 with the float32 weights when installed and the
    export is cached (or the job is large); else the eager model in bfloat16. Other runtimes refuse it."""
    import flashdino.deploy as deploy

    calls = []
    real = deploy.optimize

    def spy(model, runtime="auto", **kw):
        calls.append((runtime, kw.get("precision"), model.patch_embed.proj.weight.dtype))
        return real(model, runtime="onednn", layers=kw.get("layers", ()))  # stands in for OpenVINO here

    monkeypatch.setattr(deploy, "optimize", spy)
    monkeypatch.setattr(deploy, "installed_runtimes", lambda: ["openvino", "onednn", "eager"])
    imgs = [str(p) for p in _jpegs(tmp_path / "imgs", 2)]
    run = ["features", *imgs, *TINY, "--dtype", "bfloat16", "--overwrite", "--out"]
    monkeypatch.setattr(optimize_mod, "is_cached", lambda *a, **k: False)
    assert cli.main([*run, str(tmp_path / "cold.safetensors")]) == 0
    assert calls == []  # a small job on a cold cache: eager bf16, no export
    monkeypatch.setattr(optimize_mod, "is_cached", lambda *a, **k: True)
    assert cli.main([*run, str(tmp_path / "warm.safetensors")]) == 0
    assert calls == [("openvino", "bf16", torch.float32)]
    assert cli.main([*run, str(tmp_path / "named.safetensors"), "--runtime", "openvino"]) == 0
    assert calls[-1] == ("openvino", "bf16", torch.float32)
    for runtime in ("onednn", "onnxruntime", "inductor"):
        assert cli.main([*run, str(tmp_path / "no.safetensors"), "--runtime", runtime]) == 2
    assert cli.main([*run, str(tmp_path / "fp16.safetensors"), "--dtype", "float16", "--runtime", "openvino"]) == 2
    monkeypatch.setattr(deploy, "installed_runtimes", lambda: ["onednn", "eager"])
    assert cli.main([*run, str(tmp_path / "none.safetensors")]) == 0  # without OpenVINO: eager bf16
    assert len(calls) == 2


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="OpenVINO not installed")
def test_bfloat16_on_cpu_is_close_to_float32_and_shares_the_export(tmp_path, monkeypatch, capsys):
    """`features --dtype bfloat16 --runtime openvino` against the float32 run: bf16-close (not equal), from
    the same ONNX export (one export for both precisions)."""
    from flashdino.deploy import onnx_export

    monkeypatch.setenv("FLASHDINO_CACHE_DIR", str(tmp_path / "cache"))
    exports = []
    real_export = onnx_export.export_onnx
    monkeypatch.setattr(optimize_mod, "export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    imgs = [str(p) for p in _jpegs(tmp_path / "imgs", 3)]
    common = ["features", *imgs, *TINY, "--runtime", "openvino", "--store", "cls,patch"]
    assert cli.main([*common, "--out", str(tmp_path / "f32.safetensors")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "bf16.safetensors"), "--dtype", "bfloat16"]) == 0
    assert len(exports) == 1
    f32, bf16 = load_file(str(tmp_path / "f32.safetensors")), load_file(str(tmp_path / "bf16.safetensors"))
    assert bf16["cls"].dtype == torch.float32 and bf16["patch_tokens"].shape == f32["patch_tokens"].shape
    cos = torch.nn.functional.cosine_similarity(bf16["cls"].double(), f32["cls"].double(), dim=1)
    assert cos.min() >= 0.99, cos  # bf16 matrix products: close, and on bf16 hardware not equal
    assert _rel(bf16["patch_tokens"], f32["patch_tokens"]) <= 0.1


def test_the_runtime_is_prepared_for_the_first_batch_while_workers_decode(tmp_path, monkeypatch):
    """With decoding workers, the runtime compiles (OpenVINO) for the first batch's shape once they have
    started, instead of at the first call; the features are unchanged."""
    shapes = []
    real = optimize_mod.OptimizedModel.prepare
    monkeypatch.setattr(optimize_mod.OptimizedModel, "prepare", lambda self, shape: shapes.append(shape) or
                        real(self, shape))
    imgs = [str(p) for p in _jpegs(tmp_path / "imgs", 3)]
    common = ["features", *imgs, *TINY[:-2], "--batch-size", "2", "--out"]
    assert cli.main([*common, str(tmp_path / "w.safetensors"), "--workers", "1", "--runtime", "onednn"]) == 0
    assert shapes == [(2, 3, 48, 48)]
    assert cli.main([*common, str(tmp_path / "e.safetensors"), "--workers", "0", "--runtime", "eager"]) == 0
    assert shapes == [(2, 3, 48, 48)]
    a, b = load_file(str(tmp_path / "w.safetensors")), load_file(str(tmp_path / "e.safetensors"))
    assert _rel(a["cls"], b["cls"]) <= 1e-5

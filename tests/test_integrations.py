"""flashdino.preprocess and flashdino.integrations: preprocessing, teacher bridge, model selection,
fusion, multi-scale features, IntegratedModel and YAML configs. Tiny models only (CPU)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino.integrations import (DINOV3_CONFIGS, Config, ConfigError, DinoV3Config, DinoV3Teacher,
                                    FeatureFusionAdapter, IntegratedModel, build_from_config, get_dinov3_model,
                                    load_config, load_pretrained_weights, multiscale_feature_maps,
                                    patch_tokens_to_map, select_variant, unify_output)
from flashdino.preprocess import Preprocessor, PreprocessorConfigError, load_image, preprocess, to_bchw
from flashdino.variants import ALIASES, SAT_MEAN, SAT_STD, VARIANTS

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, embed_dim=64, num_heads=4)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tiny(name="dinov3_vits16", **kw):
    return flashdino.create_model(name, **{**TINY, **kw}).eval()


def rand_u8(*shape):
    return (torch.rand(*shape) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(100, 150), (300, 260)])  # up- and down-sampling (antialias matters)
def test_preprocess_matches_hf_dinov3_processor(hw):
    proc_mod = pytest.importorskip("transformers.models.dinov3_vit.image_processing_dinov3_vit")
    proc = proc_mod.DINOv3ViTImageProcessor()
    imgs = rand_u8(2, 3, *hw)
    ref = proc(images=list(imgs), return_tensors="pt")["pixel_values"]
    ours = Preprocessor.from_preprocessor_config(json.loads(proc.to_json_string()))(imgs)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_preprocess_layouts_agree():
    img = rand_u8(3, 40, 56)
    pre = Preprocessor(size=32)
    ref = pre(img)
    hwc = img.permute(1, 2, 0)
    variants = [img[None], hwc, hwc[None], hwc.numpy(), img.float() / 255, [img, img]]
    from PIL import Image

    variants.append(Image.fromarray(hwc.numpy()))
    for v in variants:
        out = pre(v)
        assert out.shape[1:] == (3, 32, 32)
        torch.testing.assert_close(out[:1], ref, atol=1e-5, rtol=0)
    assert pre([img, img]).shape[0] == 2


def test_preprocess_manual_pipeline_and_dtype():
    img = rand_u8(2, 3, 50, 70)
    pre = Preprocessor(size=(48, 64), resample="bicubic", antialias=True)
    manual = F.interpolate(img.float() / 255, size=(48, 64), mode="bicubic", antialias=True, align_corners=False)
    manual = (manual - MEAN) / STD
    torch.testing.assert_close(pre(img), manual, atol=1e-5, rtol=0)
    assert pre(img, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert pre(img).device.type == "cpu"


def test_preprocess_keep_size_crops_to_patch_multiple():
    img = rand_u8(1, 3, 70, 50)
    pre = Preprocessor(size=None, patch_size=16)
    out = pre(img)
    assert out.shape == (1, 3, 64, 48)
    assert pre.output_size(70, 50) == (64, 48)
    manual = (img[:, :, 3:67, 1:49].float() / 255 - MEAN) / STD
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        pre(rand_u8(1, 3, 10, 40))


def test_preprocess_dinov2_style_config():
    cfg = {"do_resize": True, "size": {"shortest_edge": 64}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": 56, "width": 56}, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    img = rand_u8(1, 3, 80, 120)
    out = Preprocessor.from_preprocessor_config(cfg)(img)
    resized = F.interpolate(img.float() / 255, size=(64, 96), mode="bicubic", antialias=True, align_corners=False)
    manual = (resized[:, :, 4:60, 20:76] - 0.5) / 0.25
    assert out.shape == (1, 3, 56, 56)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)


def test_preprocess_from_variant_uses_its_normalisation():
    sat = Preprocessor.from_variant("dinov3_vitl16_sat493m")
    assert sat.image_mean == SAT_MEAN and sat.image_std == SAT_STD and sat.patch_size == 16
    v2 = Preprocessor.from_variant("dinov2_small", size=None)
    assert v2.patch_size == 14 and v2.image_mean == VARIANTS["dinov2_vits14"].image_mean
    x = torch.ones(1, 3, 32, 32)
    torch.testing.assert_close(preprocess(x, variant="dinov3_vitl16_sat493m", size=None),
                               ((x - torch.tensor(SAT_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAT_STD).view(1, 3, 1, 1)))


def test_preprocessor_config_errors(tmp_path):
    with pytest.raises(PreprocessorConfigError, match="not found: .*nope.json"):
        Preprocessor.from_preprocessor_config(tmp_path / "nope.json")
    bad = tmp_path / "preprocessor_config.json"
    bad.write_text("{not json")
    with pytest.raises(PreprocessorConfigError, match="preprocessor_config.json: malformed JSON"):
        Preprocessor.from_preprocessor_config(tmp_path)  # a folder finds its preprocessor_config.json
    bad.write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(PreprocessorConfigError, match="image_mean must have 3 values"):
        Preprocessor.from_preprocessor_config(bad)
    bad.write_text(json.dumps({"resample": 9}))
    with pytest.raises(PreprocessorConfigError, match="unknown resample code 9"):
        Preprocessor.from_preprocessor_config(bad)
    bad.write_text(json.dumps({"size": {"w": 3}}))
    with pytest.raises(PreprocessorConfigError, match="size dict needs"):
        Preprocessor.from_preprocessor_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(PreprocessorConfigError, match="expected a JSON object"):
        Preprocessor.from_preprocessor_config(bad)


def test_image_input_errors(tmp_path):
    with pytest.raises(ValueError, match="channel axis"):
        to_bchw(torch.zeros(5, 7, 9))
    with pytest.raises(ValueError, match="different sizes"):
        to_bchw([torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        load_image(junk)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_sample_image_is_packaged():
    from PIL import Image

    from flashdino.assets import SAMPLE_IMAGE_SIZE, make_sample_image, sample_image_path

    path = sample_image_path()
    assert path.is_file() and path.stat().st_size < 100_000
    with Image.open(path) as im:
        assert im.size == SAMPLE_IMAGE_SIZE and im.mode == "RGB"
        import numpy as np

        assert np.array_equal(np.asarray(im), np.asarray(make_sample_image()))  # regenerable


# ---------------------------------------------------------------------------------------------------
# model selection
# ---------------------------------------------------------------------------------------------------
def test_dinov3_configs_derived_from_variants():
    for size in ("small", "base", "large", "giant", "mega"):
        entry = DINOV3_CONFIGS[size]
        cfg = VARIANTS[ALIASES[size]]
        assert entry["name"] == cfg.name
        assert (entry["embed_dim"], entry["depth"], entry["num_heads"]) == (cfg.embed_dim, cfg.depth, cfg.num_heads)
    assert {n for n, c in VARIANTS.items() if c.family == "dinov3"} <= set(DINOV3_CONFIGS)
    assert DINOV3_CONFIGS["small"]["plus"] == "dinov3_vits16plus"
    assert DINOV3_CONFIGS["large"]["satellite"] == "dinov3_vitl16_sat493m"


def test_select_variant_plus_satellite_and_family():
    assert select_variant("small", prefer_plus=True) == ["dinov3_vits16plus", "dinov3_vits16"]
    assert select_variant("large", prefer_plus=True) == ["dinov3_vitl16plus", "dinov3_vitl16"]
    assert select_variant("base", prefer_plus=True) == ["dinov3_vitb16"]  # no plus: standard
    assert select_variant("giant", prefer_plus=True) == ["dinov3_vith16plus"]
    assert select_variant("small") == ["dinov3_vits16"]
    assert select_variant("large", satellite=True) == ["dinov3_vitl16_sat493m"]
    assert select_variant("dinov2_large") == ["dinov2_vitl14"]
    assert select_variant("dinov3_large") == ["dinov3_vitl16"]
    with pytest.raises(ValueError, match="no SAT-493M.*dinov3_vitl16"):
        select_variant("base", satellite=True)
    with pytest.raises(ValueError, match="Did you mean 'dinov3_vitb16'"):
        select_variant("dinov3_vitb61")


def test_get_dinov3_model_random_init_adds_no_warning_of_its_own(caplog, capsys):
    # The random-weights warning belongs to the factory (one warning, issue 15): integrations add no
    # warning, log record or stderr line on top of what create_model itself emits.
    def record(fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        return out, [(w.category, str(w.message)) for w in rec]

    capsys.readouterr()
    _, direct = record(flashdino.create_model, "dinov2_vitl14", depth=1)
    with caplog.at_level(logging.DEBUG, logger="flashdino"):
        m, via = record(get_dinov3_model, Config(model_name="dinov2_large", overrides={"depth": 1}))
        _, via_model = record(IntegratedModel, "dinov2_large", depth=1)
    assert via == direct and via_model == direct
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert capsys.readouterr().err == ""
    assert isinstance(m, flashdino.DinoV2) and m.cfg.name == "dinov2_vitl14" and m.n_blocks == 1
    m = _quiet(get_dinov3_model, "large", satellite=True, overrides=TINY, freeze=True)
    assert m.cfg.name == "dinov3_vitl16_sat493m" and m.cfg.image_mean == SAT_MEAN
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="allow_random=False"):
        get_dinov3_model(Config(model_name="small", allow_random=False, overrides=TINY))


def test_get_dinov3_model_loads_weights_and_plus_fallback(tmp_path):
    from safetensors.torch import save_file

    src = tiny("dinov3_vits16")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    # prefer_plus: the SwiGLU variant does not fit these (MLP) weights -> falls back to vits16, warning
    with pytest.warns(UserWarning, match="falling back to dinov3_vits16"):
        m = get_dinov3_model(Config(model_name="small", prefer_plus=True, weights=str(path), overrides=TINY))
    assert m.cfg.name == "dinov3_vits16"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    fresh = _quiet(tiny)
    load_pretrained_weights(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), src(x))
    with pytest.raises(Exception, match="nothing_here"):
        get_dinov3_model(Config(model_name="small", weights=str(tmp_path / "nothing_here.pth"), overrides=TINY))


def test_get_dinov3_model_pretrained_unavailable_falls_back(monkeypatch):
    import flashdino.loading as loading

    tried = []

    def unavailable(source, cfg, strict=True, **kwargs):
        tried.append((cfg.name, source))
        raise loading.WeightsUnavailableError(f"offline: cannot download {source}")

    # create_model reads and checks the checkpoint (loading.read_checkpoint) before it builds a model
    monkeypatch.setattr(flashdino.factory, "read_checkpoint", unavailable)
    with pytest.warns(UserWarning) as record:
        m = get_dinov3_model(Config(model_name="small", prefer_plus=True, pretrained=True, overrides=TINY))
    messages = " | ".join(str(r.message) for r in record)
    assert [t[0] for t in tried] == ["dinov3_vits16plus", "dinov3_vits16"]
    assert "trying dinov3_vits16" in messages and "building dinov3_vits16 without them" in messages
    assert "offline" in messages
    assert m.cfg.name == "dinov3_vits16"
    with pytest.raises(loading.WeightsUnavailableError):
        get_dinov3_model(Config(model_name="base", pretrained=True, allow_random=False, overrides=TINY))


def test_unify_output_same_keys_for_both_families():
    x = torch.randn(2, 3, 28, 28)
    v3 = tiny("dinov3_vits16")
    v2 = tiny("dinov2_vits14_reg")
    with torch.no_grad():
        o3, o2 = unify_output(v3.forward_features(x)), unify_output(v2.forward_features(x))
    for o, raw_key in ((o3, "x_storage_tokens"), (o2, "x_norm_regtokens")):
        assert o["x_norm_extratokens"].shape == (2, 4, 64)
        assert o["register_tokens"] is o[raw_key]
        assert o["patch_tokens"] is o["x_norm_patchtokens"] and o["cls_token"] is o["x_norm_clstoken"]
        assert o["x_prenorm"].shape[1] == 1 + 4 + o["patch_tokens"].shape[1]
    plain = tiny("dinov2_vits14")  # no registers: an empty [B, 0, D]
    with torch.no_grad():
        assert unify_output(plain.forward_features(x))["x_norm_extratokens"].shape == (2, 0, 64)
    with pytest.raises(KeyError, match="x_norm_patchtokens"):
        unify_output({"x_norm_clstoken": torch.zeros(1, 4)})


# ---------------------------------------------------------------------------------------------------
# fusion, token maps, multi-scale
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["concat", "add", "weighted_sum"])
def test_fusion_adapter_modes(mode):
    ad = FeatureFusionAdapter(64, 32, 48, fusion_mode=mode)
    d, o = torch.randn(2, 10, 64), torch.randn(2, 10, 32)
    y = ad(d, o)
    assert y.shape == (2, 10, 48)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 10), atol=1e-5, rtol=0)  # final LayerNorm
    ym = ad(torch.randn(2, 64, 4, 5), torch.randn(2, 32, 8, 10))  # maps; the other map is resized
    assert ym.shape == (2, 48, 4, 5)
    y.sum().backward()
    if mode == "weighted_sum":
        assert ad.alpha.grad is not None and ad.alpha.requires_grad
        dn, on = ad.dino_norm(d), ad.other_norm(o)
        with torch.no_grad():
            ad.alpha.fill_(2.0)
            a = torch.sigmoid(torch.tensor(2.0))
            expect = ad.out_norm(a * ad.dino_proj(dn) + (1 - a) * ad.other_proj(on))
            torch.testing.assert_close(ad(d, o), expect)
        assert abs(ad.weight.item() - a.item()) < 1e-6
    else:
        assert ad.alpha is None


def test_fusion_adapter_errors():
    ad = FeatureFusionAdapter(64, 32, 48)
    with pytest.raises(ValueError, match=r"dino_features have 60 channels .*dino_dim=64"):
        ad(torch.randn(2, 10, 60), torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match=r"other_features map has 16 channels .*other_dim=32"):
        ad(torch.randn(2, 64, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="same batch / token layout"):
        ad(torch.randn(2, 10, 64), torch.randn(2, 9, 32))
    with pytest.raises(ValueError, match="unknown fusion_mode 'mul'"):
        FeatureFusionAdapter(64, 32, 48, fusion_mode="mul")


def test_patch_tokens_to_map():
    tokens = torch.randn(2, 12, 8)
    m = patch_tokens_to_map(tokens, 3, 4)
    assert m.shape == (2, 8, 3, 4)
    torch.testing.assert_close(m[:, :, 1, 2], tokens[:, 1 * 4 + 2])  # row-major
    up = patch_tokens_to_map(tokens, 3, 4, target_hw=(6, 8))
    torch.testing.assert_close(up, F.interpolate(m, size=(6, 8), mode="bilinear", align_corners=False))
    assert patch_tokens_to_map(tokens, 3, 4, target_hw=5, mode="nearest").shape == (2, 8, 5, 5)
    with pytest.raises(ValueError, match="5 extra tokens"):
        patch_tokens_to_map(torch.randn(2, 17, 8), 3, 4)


def test_multiscale_feature_maps_one_forward():
    model = tiny("dinov3_vits16", depth=3)
    x = torch.randn(2, 3, 48, 64)
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        maps = multiscale_feature_maps(model, x, layers=(0, 1, -1))
        assert len(calls) == 1
        assert [tuple(m.shape) for m in maps] == [(2, 64, 3, 4)] * 3
        last = model.forward_features(x)["x_norm_patchtokens"]
        torch.testing.assert_close(maps[2], patch_tokens_to_map(last, 3, 4))
        ref = model.get_intermediate_layers(x, n=[1], reshape=True)[0]
        torch.testing.assert_close(maps[1], ref)
    with pytest.raises(ValueError, match="layer 5 is outside the model's 3 blocks"):
        multiscale_feature_maps(model, x)  # default (5, 11, 23) on a 3-block model


# ---------------------------------------------------------------------------------------------------
# teacher bridge (Hugging Face folder)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    proc_mod = pytest.importorskip("transformers.models.dinov3_vit.image_processing_dinov3_vit")
    folder = tmp_path_factory.mktemp("dinov3_tiny_hf")
    torch.manual_seed(1)
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_register_tokens=4, patch_size=16, image_size=64)
    hf = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerScale so that the blocks matter
        layers = hf.model.layer if hasattr(hf, "model") else hf.layer
        for layer in layers:
            layer.layer_scale1.lambda1.fill_(0.5)
            layer.layer_scale2.lambda1.fill_(0.5)
    hf.save_pretrained(folder)
    proc = proc_mod.DINOv3ViTImageProcessor(size={"height": 64, "width": 64})
    proc.save_pretrained(folder)
    return folder, hf, proc


def test_teacher_matches_manual_and_hf(hf_folder):
    folder, hf, proc = hf_folder
    teacher = DinoV3Teacher(DinoV3Config(root=folder), device="cpu")
    assert teacher.hidden_size == 64 and teacher.patch_size == 16 and teacher.num_register_tokens == 4
    imgs = rand_u8(2, 3, 90, 70)
    cls = teacher.extract_features(imgs)
    fmap = teacher.extract_feature_map(imgs)
    assert cls.shape == (2, 64) and fmap.shape == (2, 64, 4, 4)
    # the same model called directly on manually preprocessed input
    x = F.interpolate(imgs.float() / 255, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    x = (x - MEAN) / STD
    with torch.no_grad():
        out = teacher.model.forward_features(x)
    torch.testing.assert_close(cls, out["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fmap, patch_tokens_to_map(out["x_norm_patchtokens"], 4, 4), atol=1e-5, rtol=1e-5)
    # and the transformers model with its own processor (the oracle)
    with torch.no_grad():
        ref = hf(**proc(images=list(imgs), return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(cls, ref[:, 0], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), ref[:, 5:], atol=2e-4, rtol=1e-3)
    # channels-last float input in [0, 1] gives the same
    torch.testing.assert_close(teacher.extract_features(imgs.permute(0, 2, 3, 1).float() / 255), cls, atol=1e-5, rtol=0)


def test_teacher_frozen_and_intermediate(hf_folder):
    folder, _, _ = hf_folder
    teacher = DinoV3Teacher(DinoV3Config(root=str(folder), layers=(0, 1)))
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    imgs = torch.rand(1, 3, 64, 64, requires_grad=True)
    cls = teacher.extract_features(imgs)
    assert not cls.requires_grad
    maps = teacher.extract_intermediate(imgs)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 4, 4)] * 2
    torch.testing.assert_close(maps[-1], teacher.extract_feature_map(imgs), atol=1e-6, rtol=0)
    assert len(teacher.extract_intermediate(imgs, layers=[-1])) == 1
    native = DinoV3Teacher(DinoV3Config(root=folder, image_size=0))  # keep size, crop to /16
    assert native.extract_feature_map(rand_u8(1, 3, 50, 90)).shape == (1, 64, 3, 5)


def test_teacher_bad_folders(tmp_path, hf_folder):
    folder, _, _ = hf_folder
    with pytest.raises(FileNotFoundError, match="teacher folder not found"):
        DinoV3Teacher(DinoV3Config(root=tmp_path / "absent"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing model.safetensors, preprocessor_config.json"):
        DinoV3Teacher(DinoV3Config(root=partial))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((folder / name).read_bytes())
    (broken / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2]')
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        DinoV3Teacher(DinoV3Config(root=broken))
    (broken / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2]}')
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean must have 3 values"):
        DinoV3Teacher(DinoV3Config(root=broken))
    (broken / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="config.json"):
        DinoV3Teacher(DinoV3Config(root=broken))


# ---------------------------------------------------------------------------------------------------
# IntegratedModel
# ---------------------------------------------------------------------------------------------------
def test_integrated_single_frame_matches_backbone():
    model = _quiet(IntegratedModel, "dinov3_vits16", **TINY).eval()
    imgs = rand_u8(2, 3, 40, 72)
    with torch.no_grad():
        out = model(imgs)
        x = (imgs[:, :, 4:36, 4:68].float() / 255 - MEAN) / STD  # kept size, centre-cropped to /16
        ref = model.backbone.forward_features(x)
    assert out["grid"] == (2, 4)
    assert out["cls_token"].shape == (2, 64) and out["patch_features"].shape == (2, 8, 64)
    assert out["feature_map"].shape == (2, 64, 2, 4) and out["register_tokens"].shape == (2, 4, 64)
    torch.testing.assert_close(out["cls_token"], ref["x_norm_clstoken"])
    torch.testing.assert_close(out["feature_map"], patch_tokens_to_map(ref["x_norm_patchtokens"], 2, 4))
    with pytest.raises(ValueError, match="no aggregator"):
        model(torch.rand(1, 2, 3, 32, 32))


@pytest.mark.parametrize("backbone", ["dinov3_vits16", "dinov2_vits14_reg"])
def test_integrated_aggregator(backbone):
    model = _quiet(IntegratedModel, backbone, use_aggregator=True, aa_order=("global", "frame"),
                   aggregator_kwargs={"depth": 2}, **TINY).eval()
    agg = model.aggregator
    assert isinstance(agg, flashdino.Aggregator) and agg.aa_order == ["global", "frame"]
    assert model.backbone is agg.patch_embed
    P = model.patch_size
    frames = torch.rand(1, 3, 3, 2 * P, 3 * P)
    with torch.no_grad():
        out = model(frames)
        direct, start = agg(frames)
    assert out["patch_start_idx"] == start == 5 and len(out["aggregated_tokens_list"]) == 2
    assert out["aggregated_tokens_list"][-1].shape == (1, 3, 5 + 6, 128)
    torch.testing.assert_close(out["aggregated_tokens_list"][-1], direct[-1])
    assert out["camera_tokens"].shape == (1, 3, 128) and out["patch_features"].shape == (1, 3, 6, 128)
    with torch.no_grad():  # single frames still work through the shared backbone
        assert model(torch.rand(2, 3, 2 * P, 2 * P))["feature_map"].shape == (2, 64, 2, 2)


def test_integrated_aggregator_gets_backbone_weights(tmp_path):
    from safetensors.torch import save_file

    src = tiny("dinov3_vits16")
    path = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = IntegratedModel("dinov3_vits16", use_aggregator=True, weights=str(path),
                            aggregator_kwargs={"depth": 1}, **TINY)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.aggregator.patch_embed.state_dict()[k], v)
    with pytest.raises(ValueError, match="aggregator_kwargs\\['aa_order'\\]"):
        _quiet(IntegratedModel, "dinov3_vits16", use_aggregator=True, aggregator_kwargs={"aa_order": ["frame", "global"]},
               **TINY)


# ---------------------------------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------------------------------
def test_example_configs_validate():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f)
        assert cfg["backbone"]["name"] and cfg["_source"] == str(f)


def test_build_from_config_tiny_example():
    model = _quiet(build_from_config, REPO / "configs" / "tiny_dinov3_aggregator.yaml")
    assert not model.training and model.aggregator.aa_order == ["global", "frame"]
    with torch.no_grad():
        single = model(rand_u8(1, 3, 80, 80))
        multi = model(torch.rand(1, 2, 3, 32, 48))
    assert single["feature_map"].shape == (1, 64, 4, 4)  # preprocessing.size 64
    assert multi["aggregated_tokens_list"][-1].shape == (1, 2, 5 + 6, 128)


def test_build_from_config_dtype_and_preprocessing(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backbone:\n  name: dinov2_small\n  overrides: {depth: 1, embed_dim: 64, num_heads: 4}\n"
                 "  dtype: bfloat16\npreprocessing:\n  size: [28, 42]\n  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n")
    model = _quiet(build_from_config, f)
    assert model.backbone.cls_token.dtype == torch.bfloat16
    assert model.preprocessor.image_mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        out = model(rand_u8(1, 3, 50, 50))
    assert out["feature_map"].shape == (1, 64, 2, 3) and out["cls_token"].dtype == torch.bfloat16


@pytest.mark.parametrize("text, match", [
    ("backbone:\n  nmae: dinov3_vitb16\n", r"c\.yaml: backbone\.nmae: unknown key; did you mean 'name'\?"),
    ("backbon:\n  name: x\n", r"c\.yaml: backbon: unknown key; did you mean 'backbone'\?"),
    ("backbone:\n  name: dinov3_vitb16\n  pretrained: 'yes'\n", r"c\.yaml: backbone\.pretrained must be true or false, got 'yes'"),
    ("backbone:\n  name: dinov3_vitb16\naggregator:\n  depth: two\n", r"aggregator\.depth must be a positive int"),
    ("backbone:\n  name: dinov3_vitb16\naggregator:\n  aa_order: [frame, frame]\n", r"aggregator\.aa_order must be"),
    ("backbone:\n  name: dinov3_vitb16\npreprocessing:\n  size: -3\n", r"preprocessing\.size must be"),
    ("backbone:\n  name: dinov3_vitb16\npreprocessing:\n  resample: lanczos\n", r"preprocessing\.resample must be one of"),
    ("backbone:\n  weights: x.pth\n", r"backbone\.name is required"),
    ("backbone:\n  name: dinov3_vitb61\n", r"backbone\.name: Unknown model name 'dinov3_vitb61'\. Did you mean 'dinov3_vitb16'"),
    ("backbone:\n  name: small\n  overrides: {dpeth: 2}\n", r"backbone\.overrides\.dpeth: unknown key; did you mean 'depth'\?"),
    ("backbone: [1, 2]\n", r"c\.yaml: backbone must be a mapping"),
    ("backbone:\n  name: [unclosed\n", r"c\.yaml: malformed YAML"),
    ("- just\n- a list\n", r"top level must be a mapping"),
    # the Spatial-MLLM layout (model: / dinov3_model / architecture fields next to the name)
    ("model: 3\n", r"c\.yaml: model must be a mapping"),
    ("model:\n  backbone:\n    name: small\nbackbone:\n  name: base\n", r"backbone given both at the top level and under model"),
    ("backbone:\n  name: small\n  dinov3_model: base\n", r"backbone\.name \('small'\) and backbone\.dinov3_model \('base'\)"),
    ("model:\n  backbone:\n    dinov3_model: small\n    embed_dm: 64\n", r"backbone\.embed_dm: unknown key; did you mean 'embed_dim'\?"),
    ("model:\n  backbone:\n    dinov3_model: dinov3_vitg16\n", r"backbone\.name: 'dinov3_vitg16' was never released"),
])
def test_load_config_errors_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="absent.yaml"):
        build_from_config(tmp_path / "absent.yaml")

"""The five user documents of shared/seeds (issue 15), their own calls against flashdino.

Each test builds what a document writes (its names, keywords, call order, YAML layout), at tiny
sizes with random weights, and checks the numbers against the reference the document relies on:
Hugging Face ``DINOv3ViTModel`` / ``DINOv3ViTImageProcessor`` / ``Dinov2Model`` with the same
weights, or the document's own formula for the Splatt3R adapter.

RoPE periods: flashdino uses the official bf16-rounded periods, HF recomputes them in fp32 (see the
README). Tight comparisons copy the fp32 periods into flashdino (``use_fp32_periods``), so that any
difference left is a pipeline difference; the out-of-the-box comparison uses a cosine bound.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino.integrations import (DINOV3_CONFIGS, Config, ConfigError, DINOv2FeatureFusionAdapter, DinoV3Config,
                                    DinoV3Teacher, FeatureFusionAdapter, IntegratedModel, build_from_config,
                                    get_dinov3_model, load_config, patch_tokens_to_map, select_variant)

from _oracle import close, randomise, use_fp32_periods

transformers = pytest.importorskip("transformers")
from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor  # noqa: E402

TINY = dict(embed_dim=64, depth=2, num_heads=4)  # ffn_ratio 4 (MLP) / 6 (SwiGLU plus): intermediate 256
HF_TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_register_tokens=4)
REPO = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def rand_u8(*shape):
    return (torch.rand(*shape) * 255).round().to(torch.uint8)


def hf_dinov3(patch_size=16, seed=1, **extra):
    torch.manual_seed(seed)
    hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**HF_TINY, patch_size=patch_size, **extra)).eval()
    randomise(hf, seed=seed)
    return hf


def hf_last(hf, pixel_values):
    with torch.no_grad():
        return hf(pixel_values=pixel_values).last_hidden_state


def cosine_min(a, b):
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min().item()


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A tiny HF DINOv3 and its folder (config.json + model.safetensors, no preprocessor)."""
    hf = hf_dinov3()
    folder = tmp_path_factory.mktemp("hf_dinov3")
    hf.save_pretrained(folder)
    return hf, folder


# ---------------------------------------------------------------------------------------------------
# 000: SAM2 matching baseline, DINOv2 -> DINOv3 by the encoder name, an official-format checkpoint
# ---------------------------------------------------------------------------------------------------
def test_000_encoder_name_switch_and_official_checkpoint(v3, tmp_path):
    hf, folder = v3
    # encoder_cfg.name picks the family by prefix; both names of the document's YAML resolve
    assert select_variant("dinov2_large") == ["dinov2_vitl14"]
    assert select_variant("dinov3_large") == ["dinov3_vitl16"]
    # encoder_ckpt_path: an official-layout .pth (torch.save of the state dict, as Meta ships them)
    ckpt = tmp_path / "dinov3_vitl16_pretrain.pth"
    torch.save(flashdino.from_pretrained(folder).state_dict(), ckpt)
    encoder = get_dinov3_model(Config(model_name="dinov3_large", weights=str(ckpt), overrides=TINY)).eval()
    # the document's _forward_encoder: output keys tried in order, token counts through getattr
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = encoder.forward_features(x)
    key = next(k for k in ("x_norm_patchtokens", "x_prenorm", "x_norm") if k in out)
    assert key == "x_norm_patchtokens"
    assert getattr(encoder, "n_storage_tokens", 0) == getattr(encoder, "num_register_tokens", 0) == 4
    ref = hf_last(hf, x)
    assert cosine_min(out[key], ref[:, 5:]) > 0.9999  # default (bf16) RoPE periods
    use_fp32_periods(encoder)
    with torch.no_grad():
        out = encoder.forward_features(x)
    close(out[key], ref[:, 5:], "000 patch tokens")
    close(out["x_norm_clstoken"], ref[:, 0], "000 cls token")


# ---------------------------------------------------------------------------------------------------
# 001: Spatial-MLLM-style module: Aggregator keywords and names, IntegratedModel, the YAML layout
# ---------------------------------------------------------------------------------------------------
def _tiny_agg(**kw):
    return flashdino.Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed_kwargs={**TINY}, **kw).eval()


def test_001_aggregator_document_call_matches_canonical_spelling_and_hf_backbone(v3):
    hf, folder = v3
    # the document's call, tiny: img_size/patch_size/n_storage_tokens/patch_embed/aa_order as written
    agg = _tiny_agg(img_size=224, patch_size=16, n_storage_tokens=4, patch_embed="dinov3_vitl16_reg",
                    aa_order=["frame", "global"])
    assert agg.patch_size == 16 and agg.num_register_tokens == 4 and agg.patch_embed.cfg.name == "dinov3_vitl16"
    canonical = _tiny_agg(img_size=224, patch_size=16, num_register_tokens=4, patch_embed="dinov3_vitl16")
    canonical.load_state_dict(agg.state_dict())  # the same parameters under the same names
    video_frames = torch.rand(2, 3, 3, 64, 64)   # [batch, frames, channels, height, width]
    with torch.no_grad():
        output_list, patch_start_idx = agg(video_frames)
        ref_list, _ = canonical(video_frames)
    # 1 camera + 4 register tokens + 4x4 patches, frame and global outputs concatenated (2 * 64);
    # the document's "[2, 8, 200, 2048]" forgets the camera token: at 224 it is 201 tokens
    assert patch_start_idx == 5 and output_list[-1].shape == (2, 3, 5 + 16, 128)
    torch.testing.assert_close(output_list[-1], ref_list[-1], rtol=0, atol=0)
    # its patch embedding is the DINOv3 ViT: HF's model with the same weights
    flashdino.load_weights(agg.patch_embed, str(folder))
    use_fp32_periods(agg.patch_embed)
    x = (video_frames[0] - MEAN) / STD
    with torch.no_grad():
        ours = agg.patch_embed.forward_features(x)["x_norm_patchtokens"]
    close(ours, hf_last(hf, x)[:, 5:], "aggregator patch embedding")
    with pytest.raises(ValueError, match="pass only one of them"):
        _tiny_agg(num_register_tokens=2, n_storage_tokens=4, patch_embed="dinov3_vitl16_reg")


def test_001_migration_name_dinov3_vitl14_reg_is_the_patch14_architecture(tmp_path):
    # "patch_embed='dinov2_vitl14_reg' -> 'dinov3_vitl14_reg'" with VGGT's defaults (patch_size 14)
    agg = _tiny_agg(patch_embed="dinov3_vitl14_reg")
    assert agg.patch_size == 14 and agg.patch_embed.cfg.patch_size == 14
    assert isinstance(agg.patch_embed, flashdino.DinoV3)
    with torch.no_grad():
        out, start = agg(torch.rand(1, 2, 3, 42, 56))
    assert out[-1].shape == (1, 2, 5 + 3 * 4, 128)
    # the same architecture as HF's DINOv3 with patch_size=14 (weights copied across)
    hf = hf_dinov3(patch_size=14, seed=3)
    hf.save_pretrained(tmp_path)
    flashdino.load_weights(agg.patch_embed, str(tmp_path))
    use_fp32_periods(agg.patch_embed)
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        close(agg.patch_embed.forward_features(x)["x_norm_patchtokens"], hf_last(hf, x)[:, 5:], "patch-14 DINOv3")
    with pytest.raises(ValueError, match="patch size 14, got patch_size=16"):
        _tiny_agg(patch_embed="dinov3_vitl14_reg", patch_size=16)


def test_001_integrated_model_single_frame_pretrained(v3, monkeypatch):
    hf, folder = v3
    import flashdino.factory as factory

    real = factory.read_checkpoint
    asked = []

    def from_tiny_folder(source, cfg=None, **kwargs):  # stands in for the hub download
        asked.append(source)
        return real(str(folder), cfg, **kwargs)

    # create_model reads and checks the checkpoint (loading.read_checkpoint) before it builds a model
    monkeypatch.setattr(factory, "read_checkpoint", from_tiny_folder)
    model = IntegratedModel(dinov3_model="dinov3_vitb16", use_aggregator=False, pretrained=True, **TINY).eval()
    assert asked == [DINOV3_CONFIGS["dinov3_vitb16"]["weights"]["lvd1689m"]]
    assert model.backbone_name == "dinov3_vitb16" and model.aggregator is None
    images = torch.rand(4, 3, 224, 224)
    use_fp32_periods(model.backbone)
    with torch.no_grad():
        output = model(images)
    ref = hf_last(hf, (images - MEAN) / STD)
    assert output["cls_token"].shape == (4, 64)
    close(output["cls_token"], ref[:, 0], "IntegratedModel cls_token")
    close(output["patch_features"], ref[:, 5:], "IntegratedModel patch_features")
    with pytest.raises(ValueError, match="pass only one of them"):
        IntegratedModel("dinov3_vits16", dinov3_model="dinov3_vitb16", **TINY)


def test_001_integrated_model_multi_frame_features():
    model_multi = quiet(IntegratedModel, dinov3_model="dinov3_vitl16", use_aggregator=True,
                        aa_order=["frame", "global"], aggregator_kwargs={"depth": 2}, **TINY).eval()
    video = torch.rand(2, 3, 3, 64, 64)
    with torch.no_grad():
        output = model_multi(video)
        direct, _ = model_multi.aggregator(video)
    assert output["features"].shape == (2, 3, 5 + 16, 128)
    torch.testing.assert_close(output["features"], direct[-1], rtol=0, atol=0)
    assert output["features"] is output["aggregated_tokens_list"][-1]


DOC_YAML = """model:
  backbone:
    dinov3_model: "dinov3_vitl14"
    img_size: 518
    patch_size: 14
    embed_dim: 1024
    depth: 24
    num_heads: 16
    n_storage_tokens: 4

  aggregator:
    enabled: true
    aa_order: ["frame", "global"]
    rope_freq: 100
"""


def test_001_yaml_layout_and_never_released_names(tmp_path):
    f = tmp_path / "dinov3_config.yaml"
    f.write_text(DOC_YAML)
    with pytest.raises(ConfigError, match=r"'dinov3_vitl14' was never released.*Did you mean 'dinov3_vitl16'\?"
                                          r".*patch_size: 14"):
        load_config(f)
    # the recipe the error gives, at tiny sizes: the same layout, the released name
    tiny_yaml = (DOC_YAML.replace("dinov3_vitl14", "dinov3_vitl16").replace("embed_dim: 1024", "embed_dim: 64")
                 .replace("depth: 24", "depth: 2").replace("num_heads: 16", "num_heads: 4")
                 + "    depth: 2\n")
    f.write_text(tiny_yaml)
    cfg = load_config(f)
    assert cfg["backbone"]["name"] == "dinov3_vitl16"
    assert cfg["backbone"]["overrides"] == dict(img_size=518, patch_size=14, embed_dim=64, depth=2, num_heads=4,
                                                n_storage_tokens=4)
    assert cfg["aggregator"]["enabled"] and cfg["aggregator"]["rope_freq"] == 100
    model = quiet(build_from_config, f)
    assert model.backbone.patch_size == 14 and model.aggregator.patch_size == 14
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 28, 42))
    assert out["features"].shape == (1, 2, 5 + 6, 128)
    # ours and the document's spelling of one config build the same model
    ours = {"backbone": {"name": "dinov3_vitl16", "overrides": cfg["backbone"]["overrides"]},
            "aggregator": {"enabled": True, "depth": 2}}
    assert quiet(build_from_config, ours).state_dict().keys() == model.state_dict().keys()
    f.write_text("model:\n  backbone:\n    dinov3_model: dinov3_vitl16\n    depth: 2\n    overrides: {depth: 3}\n")
    with pytest.raises(ConfigError, match=r"backbone\.depth \(2\) and backbone\.overrides\.depth \(3\) disagree"):
        load_config(f)
    # the document's giant: never released either; the error says what to use instead
    with pytest.raises(ValueError, match=r"'dinov3_vitg16' was never released.*'dinov3_vith16plus'.*embed_dim=1536, "
                                         r"depth=40, num_heads=24"):
        IntegratedModel(dinov3_model="dinov3_vitg16")
    with pytest.raises(ValueError, match=r"'dinov3_vitl14' was never released"):
        get_dinov3_model(Config(model_name="dinov3_vitl14"))


# ---------------------------------------------------------------------------------------------------
# 002: model catalogue: project names, plus variants, hub ids
# ---------------------------------------------------------------------------------------------------
def test_002_project_names_and_hub_ids():
    table = {"small": "dinov3_vits16", "base": "dinov3_vitb16", "large": "dinov3_vitl16",
             "giant": "dinov3_vith16plus", "mega": "dinov3_vit7b16"}
    for project, variant in table.items():
        assert select_variant(project) == [variant]
        arch = variant.removeprefix("dinov3_")
        assert DINOV3_CONFIGS[project]["weights"]["lvd1689m"] == f"facebook/dinov3-{arch}-pretrain-lvd1689m"
    assert select_variant("small", prefer_plus=True)[0] == "dinov3_vits16plus"
    assert DINOV3_CONFIGS["dinov3_vitl16_sat493m"]["weights"]["sat493m"] == "facebook/dinov3-vitl16-pretrain-sat493m"
    assert DINOV3_CONFIGS["dinov3_vit7b16_sat493m"]["weights"]["sat493m"] == "facebook/dinov3-vit7b16-pretrain-sat493m"


def test_002_plus_variant_matches_hf_gated_mlp(tmp_path):
    hf = hf_dinov3(seed=5, use_gated_mlp=True, hidden_act="silu")
    hf.save_pretrained(tmp_path)
    model = get_dinov3_model(Config(model_name="small", prefer_plus=True, weights=str(tmp_path),
                                    overrides=TINY)).eval()
    assert model.cfg.name == "dinov3_vits16plus" and model.cfg.ffn == "swiglu"
    use_fp32_periods(model)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        out = model.forward_features(x)
    ref = hf_last(hf, x)
    close(out["x_norm_patchtokens"], ref[:, 5:], "plus patch tokens")


# ---------------------------------------------------------------------------------------------------
# 003: frozen distillation teacher over an HF folder
# ---------------------------------------------------------------------------------------------------
def _teacher_folder(hf, root: Path, size: int) -> Path:
    folder = root / f"dinov3_{size}"
    hf.save_pretrained(folder)
    DINOv3ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("size", [224, 512, 518])
def test_003_teacher_reproduces_hf_processor_and_model(v3, tmp_path, size):
    hf, _ = v3
    folder = _teacher_folder(hf, tmp_path, size)
    cfg = DinoV3Config(root=Path(folder))
    teacher = DinoV3Teacher(cfg, device=torch.device("cpu"))
    images = rand_u8(2, 3, 300, 260)
    proc = DINOv3ViTImageProcessor.from_pretrained(folder)
    pixel_values = proc(images=list(images), return_tensors="pt")["pixel_values"]
    ref = hf_last(hf, pixel_values)
    grid = size // 16
    with torch.no_grad():
        cls_features = teacher.extract_features(images)
        feature_map = teacher.extract_feature_map(images)
    assert cls_features.shape == (2, 64) and feature_map.shape == (2, 64, grid, grid)
    tokens = feature_map.flatten(2).transpose(1, 2)
    # out of the box (bf16 periods vs HF's fp32): the same features up to the period rounding
    assert cosine_min(tokens, ref[:, 5:]) > 0.9999 and cosine_min(cls_features, ref[:, 0]) > 0.9999
    # with HF's periods the whole pipeline agrees to float precision
    use_fp32_periods(teacher.model)
    with torch.no_grad():
        close(teacher.extract_feature_map(images).flatten(2).transpose(1, 2), ref[:, 5:], f"teacher map @{size}")
        close(teacher.extract_features(images), ref[:, 0], f"teacher cls @{size}")
        if size % 16:
            # centre-cropping the remainder away (what the teacher used to do) is a different image
            shifted = dataclasses.replace(teacher.preprocessor, patch_crop="center")(images)
            wrong = teacher.model.forward_features(shifted)["x_norm_patchtokens"]
            assert cosine_min(wrong, ref[:, 5:]) < 0.99


DOC_PREPROCESSOR_CONFIG = """{
  "image_mean": [0.485, 0.456, 0.406],
  "image_std": [0.229, 0.224, 0.225],
  "size": {"height": 518, "width": 518},
  "patch_size": 16,
  "num_register_tokens": 4
}"""


def test_003_documents_own_preprocessor_config(v3, tmp_path):
    hf, folder = v3
    root = tmp_path / "dinov3"
    root.mkdir()
    for name in ("config.json", "model.safetensors"):
        (root / name).write_bytes((folder / name).read_bytes())
    (root / "preprocessor_config.json").write_text(DOC_PREPROCESSOR_CONFIG)
    teacher = DinoV3Teacher(DinoV3Config(root=root), device=torch.device("cpu"))
    use_fp32_periods(teacher.model)
    images = rand_u8(1, 3, 200, 330)
    proc = DINOv3ViTImageProcessor.from_pretrained(root)
    ref = hf_last(hf, proc(images=list(images), return_tensors="pt")["pixel_values"])
    feature_map = teacher.extract_feature_map(images)
    assert feature_map.shape == (1, 64, 32, 32)  # 518 px, 16-px patches: 32 x 32, not the document's 14 x 14
    close(feature_map.flatten(2).transpose(1, 2), ref[:, 5:], "teacher, the document's preprocessor_config.json")


def test_003_teacher_is_a_frozen_module_with_plain_outputs(v3, tmp_path):
    hf, _ = v3
    teacher = DinoV3Teacher(DinoV3Config(root=_teacher_folder(hf, tmp_path, 64)), device=torch.device("cpu"))
    assert teacher.eval() is teacher and not teacher.training
    assert teacher.train() is teacher and teacher.training and not teacher.model.training  # frozen by contract
    assert teacher.to("cpu") is teacher and teacher.device.type == "cpu"
    params = list(teacher.parameters())
    assert params and not any(p.requires_grad for p in params)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the trainer's compute_distillation_loss
        teacher_features = teacher.extract_feature_map(images)
    assert not teacher_features.is_inference() and not teacher_features.requires_grad
    student = torch.randn(2, 64, 4, 4, requires_grad=True)
    F.mse_loss(student, teacher_features).backward()  # inference tensors could not be saved for backward
    assert student.grad is not None
    teacher_features.mul_(2.0)  # and in-place edits work
    # float images in [0, 1] are not rescaled again: HF with do_rescale=False on the same floats
    proc = DINOv3ViTImageProcessor(size={"height": 64, "width": 64}, do_rescale=False)
    ref = hf_last(hf, proc(images=list(images), return_tensors="pt")["pixel_values"])
    use_fp32_periods(teacher.model)
    close(teacher.extract_features(images), ref[:, 0], "teacher cls, float input")
    # the document's loss passes 3-D [B, N, C] tensors, which cosine_embedding_loss refuses whatever
    # produced them; the 2-D form [B * N, C] it means works on the teacher's output
    s, t = student.flatten(2).transpose(1, 2), teacher_features.flatten(2).transpose(1, 2)
    with pytest.raises(RuntimeError):
        F.cosine_embedding_loss(s, t, target=torch.ones(s.shape[0], s.shape[1]))
    loss = F.cosine_embedding_loss(s.reshape(-1, 64), t.reshape(-1, 64), target=torch.ones(s.shape[0] * s.shape[1]))
    loss.backward()


# ---------------------------------------------------------------------------------------------------
# 004: DINOv2 features fused into Splatt3R
# ---------------------------------------------------------------------------------------------------
def _document_fusion(ad, mast3r, dinov2):
    """The document's adapter written out with functional ops from its description."""
    d = F.interpolate(dinov2, size=mast3r.shape[-2:], mode="bilinear", align_corners=False)
    m = F.group_norm(F.conv2d(mast3r, ad.mast3r_proj.weight, ad.mast3r_proj.bias), ad.mast3r_norm.num_groups,
                     ad.mast3r_norm.weight, ad.mast3r_norm.bias)
    d = F.group_norm(F.conv2d(d, ad.dinov2_proj.weight, ad.dinov2_proj.bias), ad.dinov2_norm.num_groups,
                     ad.dinov2_norm.weight, ad.dinov2_norm.bias)
    if ad.fusion_mode == "concat":
        return F.conv2d(torch.cat([m, d], dim=1), ad.fuse.weight, ad.fuse.bias)
    if ad.fusion_mode == "add":
        return m + d
    return ad.alpha * d + (1 - ad.alpha) * m


@pytest.mark.parametrize("fusion_mode", ["concat", "addition", "weighted_sum"])
def test_004_fusion_adapter_document_signature_order_and_layers(fusion_mode):
    adapter = FeatureFusionAdapter(dinov2_dim=64, mast3r_dim=96, output_dim=48, fusion_mode=fusion_mode)
    assert isinstance(adapter, DINOv2FeatureFusionAdapter)
    assert isinstance(adapter.mast3r_norm, torch.nn.GroupNorm) and adapter.dinov2_proj.kernel_size == (1, 1)
    randomise(adapter, seed=4)
    if adapter.alpha is not None:
        with torch.no_grad():
            adapter.alpha.fill_(0.3)
    mast3r_features = torch.randn(2, 96, 16, 16)
    dinov2_features = torch.randn(2, 64, 8, 12)  # another grid: resized to MASt3R's
    fused = adapter(mast3r_features, dinov2_features)
    assert fused.shape == (2, 48, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused, _document_fusion(adapter, mast3r_features, dinov2_features))
    fused.sum().backward()
    assert adapter.dinov2_proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"mast3r_features has 64 channels.*"
                                         r"adapter\(mast3r_features, dinov2_features\)"):
        adapter(dinov2_features, mast3r_features)


def test_004_equal_channel_counts_keep_each_callers_order():
    # the document's adapter weights DINOv2 by alpha, with the document's call order ...
    doc = FeatureFusionAdapter(dinov2_dim=32, mast3r_dim=32, output_dim=32, fusion_mode="weighted_sum")
    with torch.no_grad():
        doc.alpha.fill_(1.0)
    mast3r, dino = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(doc(mast3r, dino), doc.dinov2_norm(doc.dinov2_proj(dino)))
    # ... and the generic adapter still takes DINO first (its meaning for existing callers is unchanged)
    generic = FeatureFusionAdapter(32, 32, 32, fusion_mode="weighted_sum")
    assert type(generic) is FeatureFusionAdapter
    with torch.no_grad():
        generic.alpha.fill_(30.0)  # weight sigmoid(30) ~ 1 on the DINO stream
        tok_d, tok_o = dino.flatten(2).transpose(1, 2), mast3r.flatten(2).transpose(1, 2)
        torch.testing.assert_close(generic(tok_d, tok_o), generic.out_norm(generic.dino_proj(generic.dino_norm(tok_d))))
    assert FeatureFusionAdapter(32, 32, 32, fusion_mode="addition").fusion_mode == "add"


def test_004_dinov2_stream_matches_hf_and_document_bug_is_caught(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                            image_size=56, patch_size=14, mlp_ratio=4,
                                                            layerscale_value=1.0)).eval()
    randomise(hf, seed=6)
    hf.save_pretrained(tmp_path)
    # the document's torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14'), from flashdino's hubconf
    dinov2 = torch.hub.load(str(REPO), "dinov2_vits14", source="local", weights=str(tmp_path), embed_dim=64, depth=2,
                            num_heads=4, img_size=56).eval()
    dinov2.requires_grad_(False)
    image_pair = torch.rand(2, 3, 56, 56)
    torchvision = pytest.importorskip("torchvision")
    dino_normalize = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    norm_images = dino_normalize(image_pair)
    dinov2_features = dinov2.forward_features(norm_images)
    ref = hf_last(hf, norm_images)
    close(dinov2_features["x_norm_patchtokens"], ref[:, 1:], "DINOv2 patch tokens")
    # the document projects the dict itself; a projection of the patch tokens is what it means
    dinov2_proj = torch.nn.Linear(64, 48)
    with pytest.raises(TypeError):
        dinov2_proj(dinov2_features)
    adapter = DINOv2FeatureFusionAdapter(dinov2_dim=64, mast3r_dim=96, output_dim=48, fusion_mode="addition")
    mast3r_features = torch.randn(2, 96, 8, 8)
    with pytest.raises(TypeError, match="x_norm_patchtokens"):
        adapter(mast3r_features, dinov2_features)
    fmap = patch_tokens_to_map(dinov2_features["x_norm_patchtokens"], 4, 4)
    assert adapter(mast3r_features, fmap).shape == (2, 48, 8, 8)


def test_never_released_names_get_the_recipe_at_every_entry_point():
    for call in (lambda: flashdino.create_model("dinov3_vitg16"), lambda: flashdino.get_config("dinov3_vitl14")):
        with pytest.raises(ValueError, match="was never released.*override"):
            call()

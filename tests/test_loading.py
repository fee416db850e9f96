"""Checkpoint loading: every source kind, format conversion, the converter, hubconf, and every bad input.

All tests are offline: downloads are monkeypatched.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flashdino
from flashdino.layers import dinov3_periods
from flashdino.loading import (CheckpointError, WeightsUnavailableError, detect_format, load_weights, read_hf_folder,
                               to_canonical)
from flashdino.models import build_model

REPO = Path(__file__).resolve().parents[1]
SMALL_V3 = dict(embed_dim=64, depth=2, num_heads=2)
SMALL_V2 = dict(embed_dim=64, depth=2, num_heads=2, img_size=56)


def randomised(name: str, seed: int = 0, **overrides):
    model = flashdino.create_model(name, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and "token" not in pname and "pos_embed" not in pname:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif pname.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) + (0.5 if "gamma" in pname else 0.0))
        # DINOv3 has no k bias: the official model zeroes it through bias_mask.
        if model.cfg.family == "dinov3" and model.cfg.qkv_bias:
            D = model.embed_dim
            for blk in model.blocks:
                blk.attn.qkv.bias[D:2 * D] = 0
    return model


def official_v3_state_dict(model, periods_dtype=torch.bfloat16) -> dict:
    """What Meta's dinov3 .pth files hold: bias_mask buffers, non-zero k bias in storage, bf16 periods."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    D = model.embed_dim
    for i in range(model.n_blocks):
        mask = torch.ones(3 * D)
        mask[D:2 * D] = 0
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask
        sd[f"blocks.{i}.attn.qkv.bias"][D:2 * D] = 7.0  # garbage that the mask must remove
    sd["rope_embed.periods"] = sd["rope_embed.periods"].to(periods_dtype)
    return sd


def same_outputs(a, b, x):
    with torch.no_grad():
        oa, ob = a.forward_features(x), b.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(oa[key], ob[key]), key


def meta_model(name, **overrides):
    with torch.device("meta"):
        return build_model(flashdino.get_config(name, **overrides))


# ----------------------------------------------------------------------------------------- round trips


def test_official_dinov3_pth_round_trip(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official_v3_state_dict(src), path)
    dst = flashdino.create_model("dinov3_vits16", **SMALL_V3).eval()
    report = load_weights(dst, path)
    assert report.format == "official_dinov3" and report.ok
    assert any("bias_mask" in n for n in report.notes)
    D = dst.embed_dim
    for blk in dst.blocks:
        assert not blk.attn.qkv.bias[D:2 * D].any()  # the mask was folded in
    assert torch.equal(dst.rope_embed.periods, src.rope_embed.periods)
    same_outputs(src, dst, torch.randn(1, 3, 48, 32))


def test_official_checkpoint_periods_are_kept(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    sd = official_v3_state_dict(src, periods_dtype=torch.float32)
    custom = dinov3_periods(32, round_to_bf16=False) * 1.01
    sd["rope_embed.periods"] = custom
    dst = flashdino.create_model("dinov3_vits16", weights=sd, **SMALL_V3)
    assert torch.equal(dst.rope_embed.periods, custom)


def test_nan_bias_mask_is_an_error():
    src = randomised("dinov3_vits16", **SMALL_V3)
    sd = official_v3_state_dict(src)
    sd["blocks.1.attn.qkv.bias_mask"] = torch.full_like(sd["blocks.1.attn.qkv.bias_mask"], float("nan"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.bias_mask holds NaN"):
        flashdino.create_model("dinov3_vits16", weights=sd, **SMALL_V3)


def test_official_dinov2_pth_round_trip_with_wrappers(tmp_path):
    src = randomised("dinov2_vits14_reg", **SMALL_V2)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    # training checkpoints wrap the state dict and prefix keys
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "iteration": 5}, path)
    dst = flashdino.create_model("dinov2_vits14_reg", weights=str(path), **SMALL_V2).eval()
    same_outputs(src, dst, torch.randn(1, 3, 56, 42))


def test_canonical_safetensors_round_trip(tmp_path):
    src = randomised("dinov3_vits16plus", **SMALL_V3)
    path = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(path))
    dst = flashdino.create_model("dinov3_vits16plus", **SMALL_V3).eval()
    assert load_weights(dst, path).ok
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_weights_into_bf16_model_keep_exact_periods(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    dst = flashdino.create_model("dinov3_vits16", **SMALL_V3).to(torch.bfloat16)
    load_weights(dst, official_v3_state_dict(src))
    assert torch.equal(dst.rope_embed.periods.float(), src.rope_embed.periods)
    assert torch.equal(dst.norm.weight, src.norm.weight.to(torch.bfloat16))


def test_convert_then_load_and_from_pretrained(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    pth = tmp_path / "official.pth"
    torch.save(official_v3_state_dict(src), pth)
    out = flashdino.convert(pth, tmp_path / "out.safetensors", model="dinov3_vits16", **SMALL_V3)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "flashdino" and meta["variant"] == "dinov3_vits16"
    assert meta["source_format"] == "official_dinov3"
    assert json.loads(meta["config"])["embed_dim"] == 64
    assert keys == set(src.state_dict())  # canonical: no bias_mask
    dst = flashdino.create_model("dinov3_vits16", weights=out, **SMALL_V3).eval()
    same_outputs(src, dst, torch.randn(2, 3, 32, 32))
    # the metadata is enough to rebuild the model
    rebuilt = flashdino.from_pretrained(out).eval()
    assert rebuilt.cfg == dst.cfg
    same_outputs(src, rebuilt, torch.randn(1, 3, 32, 48))


def test_convert_bf16_and_model_instance(tmp_path):
    src = randomised("dinov2_vits14", **SMALL_V2)
    target = flashdino.create_model("dinov2_vits14", **SMALL_V2)
    out = flashdino.convert(src.state_dict(), tmp_path / "bf16.safetensors", model=target, dtype="bf16")
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("cls_token").dtype == torch.bfloat16
    load_weights(target, out)
    assert torch.equal(target.cls_token, src.cls_token.to(torch.bfloat16).float())


def test_convert_cli(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                       num_attention_heads=2, num_register_tokens=4, image_size=32)
    hf = transformers.DINOv3ViTModel(cfg)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "flashdino.loading.convert", str(tmp_path / "hf"), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "hf_dinov3" in res.stdout
    a = flashdino.from_pretrained(tmp_path / "hf").eval()
    b = flashdino.from_pretrained(out).eval()
    same_outputs(a, b, torch.randn(1, 3, 32, 32))
    # errors give exit status 1 and a message, not a traceback
    from flashdino.loading.converter import main

    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 1


def test_converter_needs_a_name_for_unknown_dims(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    with pytest.raises(CheckpointError, match=r"cannot tell which model.*create_model\(NAME, weights=\.\.\.\)"):
        flashdino.convert(src.state_dict(), tmp_path / "x.safetensors")


def test_hubconf_local():
    model = torch.hub.load(str(REPO), "dinov3_vits16", source="local", pretrained=False, depth=1, trust_repo=True)
    assert isinstance(model, flashdino.DinoV3) and model.n_blocks == 1 and model.embed_dim == 384
    model = torch.hub.load(str(REPO), "dinov2_vitb14_reg", source="local", pretrained=False, depth=1,
                           trust_repo=True)
    assert isinstance(model, flashdino.DinoV2) and model.num_register_tokens == 4
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fd_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert entries == set(flashdino.factory.ENTRY_POINTS)


def test_hubconf_defaults_to_pretrained_like_the_official_hubconf(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsUnavailableError, match="facebook/dinov3-vitb16-pretrain-lvd1689m"):
        torch.hub.load(str(REPO), "dinov3_vitb16", source="local", depth=1, trust_repo=True, check_hash=True)
    # from_pretrained with a model name (or alias) means the variant's default weights too
    with pytest.raises(WeightsUnavailableError, match="facebook/dinov3-vitl16-pretrain-lvd1689m"):
        flashdino.from_pretrained("large", depth=1)


def test_hubconf_with_weights_file(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    torch.save(official_v3_state_dict(src), tmp_path / "w.pth")
    model = torch.hub.load(str(REPO), "dinov3_vits16", source="local", weights=str(tmp_path / "w.pth"),
                           trust_repo=True, **SMALL_V3).eval()
    same_outputs(src, model, torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------- formats


def test_detect_formats_and_hf_conversion():
    D = 8
    hf = {
        "embeddings.cls_token": torch.randn(1, 1, D), "embeddings.mask_token": torch.randn(1, 1, D),
        "embeddings.register_tokens": torch.randn(1, 4, D), "embeddings.patch_embeddings.weight": torch.randn(D, 3, 16, 16),
        "embeddings.patch_embeddings.bias": torch.randn(D),
        "layer.0.attention.q_proj.weight": torch.randn(D, D), "layer.0.attention.q_proj.bias": torch.randn(D),
        "layer.0.attention.k_proj.weight": torch.randn(D, D),
        "layer.0.attention.v_proj.weight": torch.randn(D, D), "layer.0.attention.v_proj.bias": torch.randn(D),
        "norm.weight": torch.randn(D), "norm.bias": torch.randn(D),
    }
    assert detect_format(hf) == "hf_dinov3"
    cfg = flashdino.get_config("dinov3_vits16", embed_dim=D, depth=1, num_heads=2)
    sd = to_canonical(hf, cfg)
    assert sd["mask_token"].shape == (1, D)
    assert torch.equal(sd["storage_tokens"], hf["embeddings.register_tokens"])
    qkv_w, qkv_b = sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.bias"]
    assert torch.equal(qkv_w[:D], hf["layer.0.attention.q_proj.weight"])
    assert torch.equal(qkv_w[D:2 * D], hf["layer.0.attention.k_proj.weight"])
    assert torch.equal(qkv_b[2 * D:], hf["layer.0.attention.v_proj.bias"])
    assert not qkv_b[D:2 * D].any()  # missing k bias -> zeros
    assert torch.equal(sd["rope_embed.periods"], dinov3_periods(4))
    # transformers 5 in-memory names (model.layer.*) are accepted too
    mem = {("model." + k if k.startswith("layer.") else k): v for k, v in hf.items()}
    assert torch.equal(to_canonical(mem, cfg)["blocks.0.attn.qkv.weight"], qkv_w)
    assert detect_format({"cls_token": 0, "reg_token": 0, "blocks.0.gamma_1": 0}) == "timm_dinov3"
    assert detect_format({"cls_token": 0, "pos_embed": 0, "mask_token": 0}) == "official_dinov2"
    assert detect_format({"cls_token": 0, "pos_embed": 0, "reg_token": 0}) == "timm_dinov2"


def test_unknown_layout_is_reported():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_weights(meta_model("dinov3_vits16"), {"foo.weight": torch.zeros(2)})


# ----------------------------------------------------------------------------------------- mismatches


def test_wrong_variant_names_the_guess():
    shapes = flashdino.loading.expected_shapes(flashdino.get_config("dinov3_vitb16"))
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(meta_model("dinov3_vits16"), sd)
    msg = str(info.value)
    assert "looks like dinov3_vitb16 (embed 768, 12 blocks" in msg
    assert "flashdino.create_model('dinov3_vitb16', weights=...)" in msg
    assert "keys with a different shape" in msg and "cls_token: checkpoint [1, 1, 768] vs model [1, 1, 384]" in msg


def test_wrong_depth_reports_missing_keys_and_guess():
    shapes = flashdino.loading.expected_shapes(flashdino.get_config("dinov3_vitl16"))
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(meta_model("dinov3_vitl16", depth=12), sd)
    msg = str(info.value)
    assert "looks like dinov3_vitl16 (embed 1024, 24 blocks" in msg
    assert "unexpected keys: blocks.12." in msg and "(+" in msg


def test_custom_dims_without_named_variant():
    src = randomised("dinov3_vits16", **SMALL_V3)
    with pytest.raises(CheckpointError, match="(?s)matches no named variant.*embed_dim=64.*depth=2"):
        load_weights(meta_model("dinov3_vits16"), src.state_dict())


def test_missing_and_unexpected_keys(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    sd = src.state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd.pop("norm.weight")
    sd["head.weight"] = torch.zeros(3, 64)
    dst = flashdino.create_model("dinov3_vits16", **SMALL_V3)
    with pytest.raises(CheckpointError) as info:
        load_weights(dst, sd)
    msg = str(info.value)
    assert "2 missing keys: blocks.1.mlp.fc2.bias, norm.weight" in msg
    assert "1 unexpected keys: head.weight" in msg and "strict=False" in msg
    report = load_weights(dst, sd, strict=False)
    assert report.missing == ["blocks.1.mlp.fc2.bias", "norm.weight"] and report.unexpected == ["head.weight"]
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_loading_skips_only_the_random_draws_it_overwrites():
    """A checkpoint that provides every tensor is loaded without drawing random initial values first;
    one that leaves a tensor out (strict=False) gets the ordinary initialisation for it, and models
    built outside the load (the same thread, before and after) are drawn as usual."""
    src = randomised("dinov3_vits16", **SMALL_V3)
    sd = src.state_dict()
    torch.manual_seed(7)
    before = torch.nn.Linear(8, 8).weight.detach().clone()
    full = flashdino.create_model("dinov3_vits16", weights=sd, **SMALL_V3)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), sd.values()))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(full(x), src(x))
    torch.manual_seed(7)
    assert torch.equal(torch.nn.Linear(8, 8).weight, before)  # no draw skipped outside the load
    partial = dict(sd)
    partial.pop("blocks.1.mlp.fc2.bias")
    torch.manual_seed(3)
    reference = build_model(full.cfg)  # what the constructors draw under that seed
    torch.manual_seed(3)
    loaded = flashdino.create_model("dinov3_vits16", weights=partial, strict=False, **SMALL_V3)
    assert torch.equal(loaded.blocks[1].mlp.fc2.bias, reference.blocks[1].mlp.fc2.bias)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_wrong_shape_fails_even_when_not_strict():
    src = randomised("dinov3_vits16", **SMALL_V3)
    sd = src.state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(65)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma: checkpoint \[65\] vs model \[64\]"):
        load_weights(flashdino.create_model("dinov3_vits16", **SMALL_V3), sd, strict=False)


def test_dinov2_position_table_size_hint():
    src = randomised("dinov2_vits14", **SMALL_V2)
    with pytest.raises(CheckpointError, match="(?s)4x4 patch grid.*img_size=56"):
        load_weights(meta_model("dinov2_vits14", embed_dim=64, depth=2, num_heads=2), src.state_dict())


def test_hf_config_fields_not_visible_in_shapes_are_checked(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                       num_attention_heads=2, num_register_tokens=4, rope_theta=1000.0)
    transformers.DINOv3ViTModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="rope_theta = 1000.0 but dinov3_vits16 has rope_base = 100.0"):
        flashdino.create_model("dinov3_vits16", embed_dim=64, depth=1, num_heads=2, weights=tmp_path)
    assert flashdino.from_pretrained(tmp_path).cfg.rope_base == 1000.0


# ----------------------------------------------------------------------------------------- bad files


@pytest.fixture
def small_files(tmp_path):
    src = randomised("dinov3_vits16", **SMALL_V3)
    st = tmp_path / "good.safetensors"
    save_file(src.state_dict(), str(st))
    pth = tmp_path / "good.pth"
    torch.save(src.state_dict(), pth)
    return tmp_path, st, pth


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_truncated_file(small_files, kind):
    tmp, st, pth = small_files
    good = st if kind == "safetensors" else pth
    bad = tmp / f"truncated.{kind}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        flashdino.create_model("dinov3_vits16", weights=bad, **SMALL_V3)


@pytest.mark.parametrize("kind", ["safetensors", "pth", "bin"])
def test_corrupt_bytes(tmp_path, kind):
    bad = tmp_path / f"corrupt.{kind}"
    bad.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt|cannot read"):
        flashdino.create_model("dinov3_vits16", weights=bad, **SMALL_V3)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        flashdino.create_model("dinov3_vits16", weights=empty, **SMALL_V3)


class NotATensor:  # pickled by reference: unpickling would import and build this class
    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickle_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"model": NotATensor(), "cls_token": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="needs code execution"):
        flashdino.create_model("dinov3_vits16", weights=path, **SMALL_V3)


def test_missing_path_lists_tags():
    with pytest.raises(CheckpointError, match="checkpoint not found.*lvd1689m"):
        flashdino.create_model("dinov3_vits16", weights="no/such/dir/file.pth", **SMALL_V3)


def test_malformed_hf_folders(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_hf_folder(folder)
    (folder / "config.json").write_text('{"model_type": "dinov3_vit", "hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON: .* line 1"):
        read_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        read_hf_folder(folder)
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"config.json: missing key 'hidden_size'"):
        read_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "hidden_size": "64"}))
    with pytest.raises(CheckpointError, match=r"'hidden_size' must be int, got '64'"):
        read_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="model_type 'vit' is not a DINOv2/DINOv3 ViT"):
        flashdino.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        flashdino.from_pretrained(folder)


def test_read_hf_folder_returns_config_weights_and_preprocessing(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=56, patch_size=14)
    hf = transformers.Dinov2WithRegistersModel(cfg)
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2], "size": {"shortest_edge": 256}}))
    vit_cfg, sd, pre = read_hf_folder(tmp_path)
    assert vit_cfg.family == "dinov2" and vit_cfg.n_storage_tokens == 4 and vit_cfg.img_size == 56
    assert vit_cfg.interpolate_antialias and vit_cfg.interpolate_offset == 0.0 and vit_cfg.layer_norm_eps == 1e-6
    assert vit_cfg.image_mean == (0.5, 0.4, 0.3) and pre["size"] == {"shortest_edge": 256}
    model = build_model(vit_cfg)
    model.load_state_dict(sd)  # canonical keys, strict
    assert torch.equal(model.pos_embed, hf.embeddings.position_embeddings.detach())
    assert flashdino.from_pretrained(tmp_path).preprocessor_config["image_mean"] == [0.5, 0.4, 0.3]


def test_hf_config_matches_named_variant():
    from flashdino.loading import config_from_hf

    base = dict(model_type="dinov3_vit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                intermediate_size=1536, num_register_tokens=4, patch_size=16, layer_norm_eps=1e-5,
                rope_theta=100.0, image_size=224)
    assert config_from_hf(base).name == "dinov3_vits16"
    assert config_from_hf(dict(base, use_gated_mlp=True, hidden_act="silu")).name == "dinov3_vits16plus"
    large = dict(base, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    assert config_from_hf(large).name == "dinov3_vitl16"
    sat = config_from_hf(large, {"image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]})
    assert sat.name == "dinov3_vitl16_sat493m" and not sat.local_cls_norm
    seven = dict(base, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, intermediate_size=8192,
                 use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False)
    assert config_from_hf(seven).name == "dinov3_vit7b16"
    v2 = dict(model_type="dinov2", hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
              use_swiglu_ffn=True, image_size=518, patch_size=14, layer_norm_eps=1e-6)
    assert config_from_hf(v2).name == "dinov2_vitg14"
    assert config_from_hf(dict(v2, model_type="dinov2_with_registers", num_register_tokens=4)).name == \
        "dinov2_vitg14_reg"


# ----------------------------------------------------------------------------------------- downloads (mocked)


def _http_error(cls_name, status, repo):
    import httpx2
    from huggingface_hub import errors

    response = httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/{repo}/resolve/main/x"))
    return getattr(errors, cls_name)(f"{cls_name} for {repo}", response=response)


HUB_FAILURES = {
    "gated": (lambda r: _http_error("GatedRepoError", 403, r), ["gated", "request access", "hf auth login"]),
    "unauthorised": (lambda r: _http_error("RepositoryNotFoundError", 401, r), ["HTTP 401", "hf auth login"]),
    "forbidden": (lambda r: _http_error("HfHubHTTPError", 403, r), ["HTTP 403", "request access"]),
    "not_found": (lambda r: _http_error("RepositoryNotFoundError", 404, r), ["not found", "check the id"]),
    "offline_cache": (lambda r: __import__("huggingface_hub").errors.LocalEntryNotFoundError("offline"),
                      ["not in the local Hugging Face cache", "hf download"]),
    "connection": (lambda r: __import__("httpx2").ConnectError("connection refused"), ["cannot reach"]),
    "offline_mode": (lambda r: __import__("huggingface_hub").errors.OfflineModeIsEnabled("HF_HUB_OFFLINE"),
                     ["cannot reach"]),
}


@pytest.mark.parametrize("failure", sorted(HUB_FAILURES))
def test_pretrained_hub_failures_become_weights_unavailable(monkeypatch, failure):
    import huggingface_hub

    make, phrases = HUB_FAILURES[failure]
    repo = "facebook/dinov3-vits16-pretrain-lvd1689m"
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise make(repo_id)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(flashdino.loading.sources, "probe", lambda url, timeout: None)  # the hub answers
    with pytest.raises(WeightsUnavailableError) as info:
        flashdino.create_model("dinov3_vits16", pretrained=True, depth=1)
    msg = str(info.value)
    assert calls and calls[0][0] == repo
    assert repo in msg and "weights=PATH" in msg
    for phrase in phrases:
        assert phrase in msg, (phrase, msg)
    if failure in ("gated", "unauthorised", "forbidden"):
        assert f"https://huggingface.co/{repo}" in msg


def test_hub_download_success_and_weights_tag(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    import huggingface_hub

    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=2, num_register_tokens=4)
    hf = transformers.DINOv3ViTModel(cfg)
    snapshot = tmp_path / "snapshot"
    hf.save_pretrained(snapshot)
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        path = snapshot / filename
        if not path.exists():
            raise _http_error("RemoteEntryNotFoundError", 404, repo_id)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(flashdino.loading.sources, "probe", lambda url, timeout: None)
    # the "lvd1689m" tag (any case, as the official hub's Weights enum) resolves to the variant's hub id
    model = flashdino.create_model("dinov3_vits16", weights="LVD1689M", embed_dim=64, depth=2, num_heads=2)
    assert requested[0] == ("facebook/dinov3-vits16-pretrain-lvd1689m", "config.json")
    assert ("facebook/dinov3-vits16-pretrain-lvd1689m", "model.safetensors") in requested
    assert torch.equal(model.cls_token, hf.embeddings.cls_token.detach())
    assert torch.equal(model.rope_embed.periods, dinov3_periods(32))  # official bf16 periods, not HF's fp32
    built = flashdino.from_pretrained("facebook/dinov3-vits16-pretrain-lvd1689m")
    assert built.cfg.embed_dim == 64 and torch.equal(built.norm.bias, hf.norm.bias.detach())


def _meta_state_dict(name, drop=()):
    shapes = flashdino.loading.expected_shapes(flashdino.get_config(name))
    return {k: torch.empty(s, device="meta") for k, s in shapes.items() if not k.startswith(drop)}


@pytest.mark.parametrize("name,drop,hint,expected", [
    ("dinov3_vits16", (), "", "dinov3_vits16"),
    ("dinov3_vith16plus", (), "", "dinov3_vith16plus"),
    ("dinov3_vitl16", (), "", "dinov3_vitl16"),
    ("dinov3_vitl16_sat493m", (), "", "dinov3_vitl16_sat493m"),  # told apart by local_cls_norm
    ("dinov3_vit7b16", (), "", "dinov3_vit7b16"),
    ("dinov3_vit7b16", (), "dinov3_vit7b16_pretrain_sat493m-a6675841.pth", "dinov3_vit7b16_sat493m"),
    ("dinov2_vitg14_reg", (), "", "dinov2_vitg14_reg"),
    ("dinov2_vitb14", (), "", "dinov2_vitb14"),
])
def test_architecture_inferred_from_official_keys(name, drop, hint, expected):
    from flashdino.loading.load import config_for_source
    from flashdino.loading.sources import Source

    cfg = config_for_source(Source(_meta_state_dict(name, drop), hint or "ckpt.pth"), hint=hint)
    assert cfg.name == expected

"""flashdino against Hugging Face transformers (DINOv3ViTModel, Dinov2Model, Dinov2WithRegistersModel).

Small randomised HF models are saved with ``save_pretrained`` and loaded through flashdino's
loaders (``from_pretrained`` and ``create_model(..., weights=folder)``); every output token and the
intermediate hidden states must agree at fp32 to ~1e-5 of the output scale.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino.layers import dinov3_periods

from _oracle import all_tokens, close, randomise, use_fp32_periods

transformers = pytest.importorskip("transformers")

def raw_layers(model, x, layers):
    """Block outputs (no final norm) as full token sequences [CLS, extra, patches]."""
    outs = model.get_intermediate_layers(x, n=layers, norm=False, return_class_token=True, return_extra_tokens=True)
    return [torch.cat([cls[:, None], extra, patches], dim=1) for patches, cls, extra in outs]


# --------------------------------------------------------------------------------------------------- DINOv3

V3_CONFIGS = {
    "mlp": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                num_register_tokens=4, patch_size=16, image_size=64, use_gated_mlp=False, hidden_act="gelu",
                layerscale_value=1e-5),
    "swiglu": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_register_tokens=4, patch_size=16, image_size=64, use_gated_mlp=True, hidden_act="silu",
                   layerscale_value=1e-5),
}


@pytest.fixture(scope="module", params=sorted(V3_CONFIGS))
def hf_v3(request, tmp_path_factory):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    hf = DINOv3ViTModel(DINOv3ViTConfig(**V3_CONFIGS[request.param])).eval()
    randomise(hf, seed=1)
    folder = tmp_path_factory.mktemp(f"hf_dinov3_{request.param}")
    hf.save_pretrained(folder)
    return request.param, hf, folder


def hf_v3_outputs(hf, x, masks=None):
    with torch.no_grad():
        out = hf(pixel_values=x, bool_masked_pos=masks, output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (70, 37)])
def test_dinov3_matches_hf(hf_v3, size):
    kind, hf, folder = hf_v3
    model = flashdino.from_pretrained(folder).eval()
    cfg = V3_CONFIGS[kind]
    assert model.cfg.embed_dim == cfg["hidden_size"] and model.cfg.depth == cfg["num_hidden_layers"]
    assert model.cfg.ffn == ("swiglu" if cfg["use_gated_mlp"] else "mlp")
    assert model.cfg.ffn_hidden == cfg["intermediate_size"]
    use_fp32_periods(model)
    x = torch.randn(2, 3, *size)
    ref_last, ref_hidden = hf_v3_outputs(hf, x)
    with torch.no_grad():
        out = model.forward_features(x)
        layers = raw_layers(model, x, list(range(model.n_blocks)))
    close(all_tokens(out, "x_storage_tokens"), ref_last, "last_hidden_state")
    close(out["x_norm_clstoken"], ref_last[:, 0], "CLS")
    assert len(ref_hidden) == model.n_blocks + 1
    for i, mine in enumerate(layers):
        close(mine, ref_hidden[i + 1], f"hidden state of block {i}")
    close(out["x_prenorm"], ref_hidden[-1], "x_prenorm")


def test_dinov3_masks_match_hf(hf_v3):
    kind, hf, folder = hf_v3
    model = flashdino.from_pretrained(folder).eval()
    use_fp32_periods(model)
    x = torch.randn(2, 3, 64, 48)
    masks = torch.rand(2, 12, generator=torch.Generator().manual_seed(3)) < 0.5
    masks[0, 0] = True
    ref_last, _ = hf_v3_outputs(hf, x, masks)
    unmasked, _ = hf_v3_outputs(hf, x)
    assert (ref_last - unmasked).abs().max() > 1e-3  # the mask token really changes the output
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
    close(all_tokens(out, "x_storage_tokens"), ref_last, "masked last_hidden_state")


def test_dinov3_create_model_with_overrides_loads_folder(hf_v3):
    kind, hf, folder = hf_v3
    cfg = V3_CONFIGS[kind]
    name = "dinov3_vits16plus" if cfg["use_gated_mlp"] else "dinov3_vits16"
    overrides = dict(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                     num_heads=cfg["num_attention_heads"])
    if not cfg["use_gated_mlp"]:
        overrides["ffn_ratio"] = cfg["intermediate_size"] / cfg["hidden_size"]
    model = flashdino.create_model(name, weights=str(folder), **overrides).eval()
    use_fp32_periods(model)
    x = torch.randn(1, 3, 32, 64)
    ref_last, _ = hf_v3_outputs(hf, x)
    with torch.no_grad():
        close(all_tokens(model.forward_features(x), "x_storage_tokens"), ref_last, "create_model(weights=folder)")
    # and the name-as-folder form of create_model
    model2 = flashdino.create_model(str(folder)).eval()
    use_fp32_periods(model2)
    with torch.no_grad():
        close(model2(x), ref_last[:, 0], "create_model(folder)")


def test_dinov3_default_periods_are_bf16_and_differ_slightly_from_hf(hf_v3):
    kind, hf, folder = hf_v3
    model = flashdino.from_pretrained(folder).eval()
    d = model.cfg.head_dim
    periods = model.rope_embed.periods
    expected = torch.tensor([100 ** (2 * i / (d // 2)) for i in range(d // 4)], dtype=torch.float64)
    assert torch.equal(periods, expected.to(torch.bfloat16).float())
    if d == 32:
        assert periods[:3].tolist() == [1.0, 1.78125, 3.15625]
    if d == 64:
        assert periods[:3].tolist() == [1.0, 1.3359375, 1.78125]
    assert not torch.equal(periods, dinov3_periods(d, 100.0, round_to_bf16=False))
    x = torch.randn(1, 3, 64, 64)
    ref_last, _ = hf_v3_outputs(hf, x)
    with torch.no_grad():
        official = all_tokens(model.forward_features(x), "x_storage_tokens")
    diff = (official - ref_last).abs().max().item()
    # bf16-rounded periods move the rotation angles by up to ~0.4 %: visible, but small.
    assert 1e-5 < diff < 0.1 * ref_last.abs().max().item()


def test_dinov3_bf16_table_for_head_dim_64():
    assert dinov3_periods(64)[:4].tolist() == [1.0, 1.3359375, 1.78125, 2.375]


# --------------------------------------------------------------------------------------------------- DINOv2

V2_CONFIGS = {
    "dinov2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                   mlp_ratio=4, layerscale_value=1.0),
    "dinov2_swiglu": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                          mlp_ratio=4, use_swiglu_ffn=True, layerscale_value=1.0),
    "dinov2_reg": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=70, patch_size=14,
                       mlp_ratio=4, num_register_tokens=4, layerscale_value=1.0),
}


@pytest.fixture(scope="module", params=sorted(V2_CONFIGS))
def hf_v2(request, tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = V2_CONFIGS[request.param]
    if request.param == "dinov2_reg":
        hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**cfg))
    else:
        hf = Dinov2Model(Dinov2Config(**cfg))
    hf.eval()
    randomise(hf, seed=2)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(folder)
    return request.param, hf, folder


def hf_v2_outputs(hf, x, masks=None):
    with torch.no_grad():
        out = hf(pixel_values=x, bool_masked_pos=masks, output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def test_dinov2_matches_hf_at_native_size(hf_v2):
    kind, hf, folder = hf_v2
    model = flashdino.from_pretrained(folder).eval()
    assert model.cfg.family == "dinov2"
    assert model.cfg.ffn == ("swiglu_fused" if kind == "dinov2_swiglu" else "mlp")
    assert model.n_storage_tokens == (4 if kind == "dinov2_reg" else 0)
    side = V2_CONFIGS[kind]["image_size"]
    x = torch.randn(2, 3, side, side)
    ref_last, ref_hidden = hf_v2_outputs(hf, x)
    with torch.no_grad():
        out = model.forward_features(x)
        layers = raw_layers(model, x, list(range(model.n_blocks)))
    close(all_tokens(out, "x_norm_regtokens"), ref_last, "last_hidden_state")
    for i, mine in enumerate(layers):
        close(mine, ref_hidden[i + 1], f"hidden state of block {i}")


def test_dinov2_masks_match_hf(hf_v2):
    kind, hf, folder = hf_v2
    model = flashdino.from_pretrained(folder).eval()
    side = V2_CONFIGS[kind]["image_size"]
    n = (side // 14) ** 2
    x = torch.randn(2, 3, side, side)
    masks = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) < 0.4
    ref_last, _ = hf_v2_outputs(hf, x, masks)
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
    close(all_tokens(out, "x_norm_regtokens"), ref_last, "masked last_hidden_state")


def official_interpolation(pos_embed, H, W, reg: bool):
    """The official DINOv2 resize, written out independently of flashdino."""
    M = int(math.sqrt(pos_embed.shape[1] - 1))
    grid = pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
    if reg:
        grid = F.interpolate(grid, size=(H, W), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((H + 0.1) / M, (W + 0.1) / M), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, H * W, -1)], dim=1)


@pytest.mark.parametrize("grid", [(5, 3), (6, 6), (2, 7)])
def test_dinov2_interpolation_is_the_official_one(hf_v2, grid):
    kind, hf, folder = hf_v2
    model = flashdino.from_pretrained(folder).eval()
    reg = kind == "dinov2_reg"
    H, W = grid
    table = model.interpolated_pos_embed(H, W, torch.float32)
    expected = official_interpolation(model.pos_embed.detach(), H, W, reg)
    close(table, expected, "interpolated position table", tol=1e-6)
    if reg:
        # HF Dinov2WithRegisters resizes like the official register models: full outputs agree.
        x = torch.randn(1, 3, 14 * H, 14 * W)
        ref_last, _ = hf_v2_outputs(hf, x)
        with torch.no_grad():
            close(all_tokens(model.forward_features(x), "x_norm_regtokens"), ref_last, "interpolated forward")
    else:
        # HF Dinov2 uses size=(H, W) without the official 0.1 offset: its table differs.
        M = int(math.sqrt(model.pos_embed.shape[1] - 1))
        if (H, W) != (M, M):
            hf_table = F.interpolate(model.pos_embed.detach()[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2),
                                     size=(H, W), mode="bicubic", align_corners=False)
            hf_table = hf_table.permute(0, 2, 3, 1).reshape(1, H * W, -1)
            assert (hf_table - table[:, 1:]).abs().max() > 1e-4
            x = torch.randn(1, 3, 14 * H, 14 * W)
            ref_last, _ = hf_v2_outputs(hf, x)
            with torch.no_grad():
                mine = all_tokens(model.forward_features(x), "x_norm_regtokens")
            assert (mine - ref_last).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------- in-memory state dicts


def check_in_memory_state_dict(hf, folder):
    """transformers 5 renames modules in memory (model.layer.*, q_proj, gate/up/down_proj): same weights."""
    from_folder = flashdino.from_pretrained(folder)
    model = build_like(from_folder)
    report = flashdino.load_weights(model, hf.state_dict())
    assert report.ok and report.format.startswith("hf_")
    for k, v in from_folder.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_in_memory_hf_dinov3_state_dict(hf_v3):
    check_in_memory_state_dict(hf_v3[1], hf_v3[2])


def test_in_memory_hf_dinov2_state_dict(hf_v2):
    check_in_memory_state_dict(hf_v2[1], hf_v2[2])


def build_like(model):
    from flashdino.models import build_model

    return build_model(model.cfg)


def test_classifier_checkpoint_backbone_loads_non_strict(hf_v2):
    kind, hf, folder = hf_v2
    from_folder = flashdino.from_pretrained(folder)
    sd = {f"dinov2.{k}": v for k, v in hf.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(10, 128)
    model = build_like(from_folder)
    with pytest.raises(flashdino.CheckpointError, match="1 unexpected keys: classifier.weight"):
        flashdino.load_weights(model, sd)
    report = flashdino.load_weights(model, sd, strict=False)
    assert report.unexpected == ["classifier.weight"] and not report.missing
    assert torch.equal(model.pos_embed, from_folder.pos_embed)

"""The official backbone API on the reference (pure-PyTorch) path.

The HF / timm oracle comparisons live in test_oracle_*.py; here the model is checked against
its own contract and against independent computations from shared/SPEC.md.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino.ops.rope_attention.grid import RopeGrid, dinov3_rope_tables
from flashdino.ops.rope_attention.reference import apply_rope
from flashdino.layers import dinov3_periods
from flashdino.models import build_model


def _randomize(model):
    """Random non-trivial weights (LayerScale and norms far from identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gamma" in name or "norm" in name else 0.1))
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def v3():
    return _randomize(flashdino.dinov3_vits16(depth=3))


@pytest.fixture(scope="module")
def v2():
    return _randomize(flashdino.dinov2_vits14_reg(depth=3, img_size=56))


def test_variant_table_matches_spec():
    spec = {  # name: (D, depth, heads, ffn hidden)
        "dinov3_vits16": (384, 12, 6, 1536), "dinov3_vits16plus": (384, 12, 6, 1536),
        "dinov3_vitb16": (768, 12, 12, 3072), "dinov3_vitl16": (1024, 24, 16, 4096),
        "dinov3_vitl16plus": (1024, 24, 16, 4096), "dinov3_vith16plus": (1280, 32, 20, 5120),
        "dinov3_vit7b16": (4096, 40, 32, 8192), "dinov2_vitg14": (1536, 40, 24, 4096),
    }
    for name, (D, depth, heads, hidden) in spec.items():
        cfg = flashdino.get_config(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_hidden) == (D, depth, heads, hidden), name
    assert flashdino.get_config("dinov3_vit7b16").head_dim == 128
    assert not flashdino.get_config("dinov3_vit7b16").qkv_bias


@pytest.mark.parametrize("name,params_m", [
    ("dinov3_vits16", 21.6), ("dinov3_vitb16", 85.7), ("dinov3_vitl16", 303.1),
    ("dinov3_vith16plus", 840.6), ("dinov3_vit7b16", 6716.0),
    ("dinov2_vits14", 22.1), ("dinov2_vitg14", 1136.5),
])
def test_parameter_counts(name, params_m):
    with torch.device("meta"):
        model = build_model(flashdino.get_config(name))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(total - params_m) / params_m < 0.01, (name, total)


def test_official_state_dict_keys():
    with torch.device("meta"):
        model = build_model(flashdino.get_config("dinov3_vits16"))
    keys = set(model.state_dict())
    # 188 official keys minus the 12 qkv.bias_mask buffers the loader folds into the bias.
    assert len(keys) == 176
    for k in ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "rope_embed.periods",
              "blocks.0.attn.qkv.weight", "blocks.11.ls2.gamma", "blocks.3.mlp.fc1.bias", "norm.bias"]:
        assert k in keys
    with torch.device("meta"):
        plus = build_model(flashdino.get_config("dinov3_vits16plus"))
        g = build_model(flashdino.get_config("dinov2_vitg14_reg"))
    assert "blocks.0.mlp.w3.weight" in plus.state_dict()
    assert tuple(g.state_dict()["blocks.0.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(g.state_dict()["pos_embed"].shape) == (1, 1 + 37 * 37, 1536)


def test_periods_are_the_bf16_rounded_table():
    periods = dinov3_periods(64)
    assert periods[:4].tolist() == [1.0, 1.3359375, 1.78125, 2.375]
    exact = 100.0 ** (2 * torch.arange(16, dtype=torch.float64) / 32)
    assert torch.equal(periods, exact.to(torch.bfloat16).float())
    assert not torch.equal(periods, exact.float())


def test_rope_tables_match_independent_formula():
    H, W, d = 3, 5, 16
    periods = dinov3_periods(d)
    cos, sin = dinov3_rope_tables(H, W, periods, "separate")
    for t in range(H * W):
        y, x = divmod(t, W)
        cy, cx = 2 * (y + 0.5) / H - 1, 2 * (x + 0.5) / W - 1
        for j in range(d):
            block, f = divmod(j, d // 4)
            coord = cy if block % 2 == 0 else cx
            angle = 2 * math.pi * coord / periods[f].item()
            assert abs(cos[t, j].item() - math.cos(angle)) < 1e-5
            assert abs(sin[t, j].item() - math.sin(angle)) < 1e-5


def test_prefix_tokens_are_not_rotated_and_rotation_is_rotate_half():
    grid = RopeGrid("dinov3", 2, 3, n_prefix=5, periods=dinov3_periods(8))
    q = torch.randn(1, 2, 11, 8)
    k = torch.randn(1, 2, 11, 8)
    q_rot, k_rot = apply_rope(q, k, grid)
    assert torch.equal(q_rot[:, :, :5], q[:, :, :5]) and torch.equal(k_rot[:, :, :5], k[:, :, :5])
    cos, sin = dinov3_rope_tables(2, 3, dinov3_periods(8))
    x1, x2 = q[..., 5:, :4], q[..., 5:, 4:]
    expected = torch.cat([x1 * cos[:, :4] - x2 * sin[:, :4], x2 * cos[:, 4:] + x1 * sin[:, 4:]], dim=-1)
    torch.testing.assert_close(q_rot[:, :, 5:], expected)
    # Rotations preserve norms per (y, x) pair.
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (70, 50)])
def test_dinov3_forward_features_contract(v3, hw):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = v3.forward_features(x)
    H, W = hw[0] // 16, hw[1] // 16
    assert out["x_norm_clstoken"].shape == (2, 384)
    assert out["x_storage_tokens"].shape == (2, 4, 384)
    assert out["x_norm_patchtokens"].shape == (2, H * W, 384)
    assert out["x_prenorm"].shape == (2, 5 + H * W, 384)
    assert out["masks"] is None
    normed = F.layer_norm(out["x_prenorm"], (384,), v3.norm.weight, v3.norm.bias, 1e-5)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_storage_tokens"], normed[:, 1:5])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 5:])
    with torch.no_grad():
        torch.testing.assert_close(v3(x), out["x_norm_clstoken"])
        assert isinstance(v3(x, is_training=True), dict)


def test_dinov3_drops_the_remainder_like_the_reference(v3):
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        a = v3.forward_features(x)["x_prenorm"]
        b = v3.forward_features(x[:, :, :64, :48].contiguous())["x_prenorm"]
    torch.testing.assert_close(a, b)


def test_dinov2_contract_and_registers(v2):
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        out = v2.forward_features(x)
    assert out["x_norm_regtokens"].shape == (2, 4, 384)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 5, 384)
    assert v2.num_register_tokens == v2.n_storage_tokens == 4


def test_dinov2_rejects_non_multiples(v2):
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        v2(torch.randn(1, 3, 57, 56))


def test_dinov2_token_order_and_position_embedding():
    """[CLS + pos0, registers (no pos), patches + pos] computed by hand: the tokens the first block gets."""
    model = _randomize(flashdino.dinov2_vits14_reg(depth=1, img_size=28))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        tokens, _, grid = model.prepare_tokens_with_masks(x)
        patches = model.patch_embed(x)
    assert grid == (2, 2)
    pos = model.pos_embed
    torch.testing.assert_close(tokens[:, 0], model.cls_token[:, 0] + pos[:, 0])
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(1, -1, -1))
    torch.testing.assert_close(tokens[:, 5:], patches + pos[:, 1:])


@pytest.mark.parametrize("reg", [False, True])
def test_dinov2_interpolation_follows_the_official_parameters(reg):
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    model = _randomize(flashdino.create_model(name, depth=1, img_size=56))
    H, W = 3, 6
    table = model.interpolated_pos_embed(H, W, torch.float32)
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2).float()
    if reg:
        expected = F.interpolate(grid, size=(H, W), mode="bicubic", antialias=True)
    else:
        expected = F.interpolate(grid, scale_factor=((H + 0.1) / 4, (W + 0.1) / 4), mode="bicubic")
    torch.testing.assert_close(table[:, 1:], expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(table[:, :1], model.pos_embed[:, :1])
    # Cached for inference: the same object comes back, and a weight change invalidates it.
    with torch.no_grad():
        assert model.interpolated_pos_embed(H, W, torch.float32) is model.interpolated_pos_embed(H, W, torch.float32)
        before = model.interpolated_pos_embed(H, W, torch.float32).clone()
        model.pos_embed.mul_(2)
        torch.testing.assert_close(model.interpolated_pos_embed(H, W, torch.float32), before * 2)


@pytest.mark.parametrize("family", ["v3", "v2"])
def test_get_intermediate_layers_all_arguments(family, v3, v2):
    model = v3 if family == "v3" else v2
    P = model.patch_size
    x = torch.randn(2, 3, 4 * P, 3 * P)
    with torch.no_grad():
        ff = model.forward_features(x)
        last = model.get_intermediate_layers(x, n=1)
        torch.testing.assert_close(last[0], ff["x_norm_patchtokens"])
        raw = model.get_intermediate_layers(x, n=1, norm=False)
        torch.testing.assert_close(raw[0], ff["x_prenorm"][:, 5:])
        by_index = model.get_intermediate_layers(x, n=[0, 2])
        by_count = model.get_intermediate_layers(x, n=3)
        torch.testing.assert_close(by_index[0], by_count[0])
        torch.testing.assert_close(by_index[1], by_count[2])
        assert not torch.allclose(by_count[0], by_count[1])
        maps = model.get_intermediate_layers(x, n=2, reshape=True)
        assert maps[0].shape == (2, model.embed_dim, 4, 3)
        torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), last[0])
        raw_maps = model.get_intermediate_layers(x, n=1, reshape=True, norm=False, return_class_token=True)
        torch.testing.assert_close(raw_maps[0][0].flatten(2).transpose(1, 2), raw[0])
        torch.testing.assert_close(raw_maps[0][1], ff["x_prenorm"][:, 0])
        with_cls = model.get_intermediate_layers(x, n=1, return_class_token=True)
        torch.testing.assert_close(with_cls[0][1], ff["x_norm_clstoken"])
        if family == "v3":
            extra = model.get_intermediate_layers(x, n=1, return_extra_tokens=True)
            torch.testing.assert_close(extra[0][1], ff["x_storage_tokens"])
            both = model.get_intermediate_layers(x, n=1, return_class_token=True, return_extra_tokens=True)
            assert len(both[0]) == 3
        with pytest.raises(ValueError, match="block indices must lie in"):
            model.get_intermediate_layers(x, n=[5])
        # negative indices count from the end, as in Python
        torch.testing.assert_close(model.get_intermediate_layers(x, n=[-1])[0], last[0])


@pytest.mark.parametrize("n, error, match", [
    ([], ValueError, "selects no block"),
    ((), ValueError, "selects no block"),
    ([0.7], ValueError, "must be integers, got 0.7"),
    ([1, 2.0], ValueError, "must be integers"),
    ([True], ValueError, "must be integers"),
    ([-4], ValueError, r"must lie in \[-3, 2\]"),
    ([3], ValueError, r"must lie in \[-3, 2\]"),
    (0, ValueError, "between 1 and the number of blocks \\(3\\)"),
    (4, ValueError, "between 1 and the number of blocks"),
    (-1, ValueError, "between 1 and the number of blocks"),
    (True, TypeError, "block count"),
    (0.7, TypeError, "block count"),
    ("2", TypeError, "block count"),
    (None, TypeError, "block count"),
])
def test_get_intermediate_layers_rejects_bad_n(v3, n, error, match):
    x = torch.randn(1, 3, 2 * v3.patch_size, 2 * v3.patch_size)
    with pytest.raises(error, match=match):
        v3.get_intermediate_layers(x, n=n)


@pytest.mark.parametrize("family", ["v3", "v2"])
def test_masks_replace_patches_with_the_mask_token(family, v3, v2):
    model = v3 if family == "v3" else v2
    P = model.patch_size
    x = torch.randn(2, 3, 3 * P, 3 * P)
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[1, 8] = True
    y = x.clone()
    y[0, :, 0:P, P:2 * P] += 5  # patch 1 of image 0 is masked: its pixels must not matter
    with torch.no_grad():
        a = model.forward_features(x, masks=masks)
        b = model.forward_features(y, masks=masks)
        c = model.forward_features(x)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])
    assert a["masks"] is masks
    assert not torch.allclose(a["x_prenorm"], c["x_prenorm"])


def test_list_input_gives_a_list_of_dicts(v3):
    xs = [torch.randn(1, 3, 32, 48), torch.randn(2, 3, 64, 32)]
    masks = [None, torch.zeros(2, 8, dtype=torch.bool)]
    with torch.no_grad():
        outs = v3.forward_features(xs, masks)
        single = v3.forward_features(xs[1])
        cls = v3(xs)
    assert isinstance(outs, list) and len(outs) == 2
    torch.testing.assert_close(outs[1]["x_norm_patchtokens"], single["x_norm_patchtokens"])
    assert cls[0].shape == (1, 384)


def test_low_precision_paths(v3):
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = v3(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = v3.forward_features(x)
        model_bf16 = flashdino.dinov3_vits16(depth=3)
        model_bf16.load_state_dict(v3.state_dict())
        model_bf16 = model_bf16.to(torch.bfloat16).eval()
        pure = model_bf16(x.bfloat16())
    # Like the reference, the residual stream stays fp32 under autocast.
    assert auto["x_prenorm"].dtype == torch.float32
    for out in (auto["x_norm_clstoken"], pure):
        assert F.cosine_similarity(out.float(), ref, dim=-1).min() > 0.99
    with pytest.warns(UserWarning, match="fp16"):
        flashdino.dinov3_vits16(depth=1).half().eval()(x.half())


def test_attribute_names(v3, v2):
    for model in (v3, v2):
        for attr in ("embed_dim", "num_features", "n_blocks", "num_heads", "patch_size", "n_storage_tokens",
                     "num_register_tokens"):
            assert isinstance(getattr(model, attr), int)
    assert v3.n_blocks == 3 and v3.patch_size == 16 and v2.patch_size == 14


def test_training_backward_and_drop_path():
    model = flashdino.dinov3_vits16(depth=2, drop_path_rate=0.2).train()
    out = model(torch.randn(2, 3, 32, 32), is_training=True)
    (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].pow(2).mean()).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[1].ls2.gamma.grad.abs().sum() > 0


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 32, 32), "4-D"),
    (torch.randn(1, 4, 32, 32), "3 input channels"),
    (torch.randn(1, 32, 32, 3), "channels-last"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "convert to float"),
    (torch.randn(1, 3, 8, 32), "smaller than one 16x16 patch"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float64), "cast the input"),
    ("not a tensor", "expected an image tensor"),
])
def test_bad_input_errors(v3, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        v3(bad)


def test_bad_masks(v3):
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        v3.forward_features(torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 5, dtype=torch.bool))


def test_create_model_names_and_overrides():
    assert flashdino.create_model("large", depth=1).cfg.name == "dinov3_vitl16"
    assert flashdino.create_model("mega", depth=1, embed_dim=256, num_heads=2).cfg.family == "dinov3"
    with pytest.raises(ValueError, match="Did you mean 'dinov3_vitl16'"):
        flashdino.create_model("dinov3_vitl61")
    with pytest.raises(TypeError, match="unknown configuration field"):
        flashdino.create_model("small", depht=2)


def test_torch_compile_fullgraph_matches_eager():
    model = _randomize(flashdino.dinov3_vits16(depth=2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_layer_norm_module_keeps_the_plain_forward_and_fuses_on_request():
    from flashdino.layers import LayerNorm

    norm = LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert isinstance(norm, torch.nn.LayerNorm) and set(norm.state_dict()) == {"weight", "bias"}
    x, branch, gamma = torch.randn(2, 7, 8), torch.randn(2, 7, 8), torch.rand(8)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.weight, norm.bias, 1e-6))
    x_new, normed = norm.add_and_norm(x, branch, gamma)
    torch.testing.assert_close(x_new, x + gamma * branch)
    torch.testing.assert_close(normed, F.layer_norm(x + gamma * branch, (8,), norm.weight, norm.bias, 1e-6))
    cls_norm = LayerNorm(8, eps=1e-6)
    prefix, fmap = norm.split_norm(x[:, :7], 1, cls_norm, patch_grid=(2, 3))
    torch.testing.assert_close(prefix, cls_norm(x[:, :1]))
    torch.testing.assert_close(fmap, norm(x[:, 1:7]).reshape(2, 2, 3, 8).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="eps"):
        norm.split_norm(x, 1, LayerNorm(8, eps=1e-5))

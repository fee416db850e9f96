"""flashdino against timm (Eva DINOv3 models, VisionTransformer DINOv2 models).

Small randomised timm models; their ``state_dict()`` is loaded through flashdino's converter and
all tokens (``forward_features``) and the raw block outputs (``forward_intermediates``) must
agree at fp32 to ~1e-5 of the output scale. timm recomputes fp32 RoPE periods, so the flashdino
model gets the same fp32 periods for the tight comparison.
"""

import pytest
import torch

import flashdino
from flashdino.layers import dinov3_periods

from _oracle import all_tokens, close, compare_intermediates, randomise

timm = pytest.importorskip("timm")

# --------------------------------------------------------------------------------------------------- DINOv3

# timm name -> (flashdino variant, dims for a small fast model)
V3 = {
    "vit_small_patch16_dinov3": ("dinov3_vits16", dict(embed_dim=64, num_heads=2)),
    "vit_small_patch16_dinov3_qkvb": ("dinov3_vits16", dict(embed_dim=96, num_heads=3)),
    "vit_small_plus_patch16_dinov3": ("dinov3_vits16plus", dict(embed_dim=64, num_heads=2)),
    # 7B layout: no qkv bias, SwiGLU hidden aligned to 64, local_cls_norm absent from timm (filled as identity)
    "vit_7b_patch16_dinov3": ("dinov3_vit7b16", dict(embed_dim=128, num_heads=2)),
}


@pytest.fixture(scope="module", params=sorted(V3))
def timm_v3(request):
    torch.manual_seed(0)
    name = request.param
    variant, dims = V3[name]
    tm = timm.create_model(name, pretrained=False, depth=2, img_size=64, num_classes=0, **dims).eval()
    randomise(tm, seed=5)
    model = flashdino.create_model(variant, depth=2, **dims).eval()
    report = flashdino.load_weights(model, tm.state_dict())
    assert report.format == "timm_dinov3" and report.ok
    return name, tm, model


@pytest.mark.parametrize("size", [(64, 64), (32, 80)])
def test_dinov3_matches_timm(timm_v3, size):
    name, tm, model = timm_v3
    with torch.no_grad():
        model.rope_embed.periods.copy_(dinov3_periods(model.cfg.head_dim, 100.0, round_to_bf16=False))
    compare_intermediates(model, torch.randn(2, 3, *size), tm, "x_storage_tokens", name)


def test_dinov3_timm_default_periods_are_official(timm_v3):
    name, tm, _ = timm_v3
    variant, dims = V3[name]
    model = flashdino.create_model(variant, depth=2, weights=tm.state_dict(), **dims).eval()
    assert torch.equal(model.rope_embed.periods, dinov3_periods(model.cfg.head_dim))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = (all_tokens(model.forward_features(x), "x_storage_tokens") - tm.forward_features(x)).abs().max()
    assert diff > 1e-5  # the bf16 periods are the official ones, not timm's fp32 ones


def test_timm_qkv_bias_layout(timm_v3):
    name, tm, model = timm_v3
    sd = tm.state_dict()
    if not model.cfg.qkv_bias:
        assert model.blocks[0].attn.qkv.bias is None and "blocks.0.attn.q_bias" not in sd
        return
    bias = model.blocks[0].attn.qkv.bias.detach()
    D = model.embed_dim
    if name.endswith("_qkvb"):
        assert torch.equal(bias[:D], sd["blocks.0.attn.q_bias"])
        assert torch.equal(bias[2 * D:], sd["blocks.0.attn.v_bias"])
    else:
        assert not bias[:D].any() and not bias[2 * D:].any()
    assert not bias[D:2 * D].any()  # DINOv3 never has a k bias


# --------------------------------------------------------------------------------------------------- DINOv2

V2 = {
    "vit_small_patch14_dinov2": "dinov2_vits14",
    "vit_small_patch14_reg4_dinov2": "dinov2_vits14_reg",
}


@pytest.mark.parametrize("timm_name", sorted(V2))
def test_dinov2_matches_timm_at_native_size(timm_name):
    torch.manual_seed(0)
    dims = dict(embed_dim=64, num_heads=2)
    tm = timm.create_model(timm_name, pretrained=False, depth=2, img_size=56, num_classes=0, **dims).eval()
    randomise(tm, seed=6)
    model = flashdino.create_model(V2[timm_name], depth=2, img_size=56, weights=tm.state_dict(), **dims).eval()
    compare_intermediates(model, torch.randn(2, 3, 56, 56), tm, "x_norm_regtokens", timm_name)


def test_dinov2_giant_style_packed_swiglu_from_timm():
    """timm keeps the DINOv2-g packed SwiGLU as mlp.fc1 (= w12) / mlp.fc2 (= w3)."""
    torch.manual_seed(0)
    from timm.layers import SwiGLUPacked

    tm = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56, num_classes=0,
                           embed_dim=64, num_heads=2, mlp_ratio=5.0, mlp_layer=SwiGLUPacked,
                           act_layer=torch.nn.SiLU).eval()
    randomise(tm, seed=7)
    sd = tm.state_dict()
    hidden = sd["blocks.0.mlp.fc2.weight"].shape[1]
    model = flashdino.create_model("dinov2_vitg14", depth=2, img_size=56, embed_dim=64, num_heads=2,
                                   ffn_ratio=hidden * 1.5 / 64, weights=sd).eval()
    assert model.cfg.ffn_hidden == hidden
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        close(all_tokens(model.forward_features(x), "x_norm_regtokens"), tm.forward_features(x), "packed SwiGLU")

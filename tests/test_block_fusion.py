"""One ``residual_layernorm`` call per block boundary (``layers.run_blocks``).

A block's last residual add (``x + gamma * mlp(...)``) and the next block's ``norm1`` run as one
op call, so a depth-D stack makes 2D - 1 calls (D for ``norm2``, D - 1 boundaries). Checked
against the plain unfused stack written here from the block's definition (x += ls1 * attn(norm1 x);
x += ls2 * mlp(norm2 x), nn.LayerNorm semantics): outputs, the hidden states of intermediate
layers (the un-normalised residual stream after each block), masks, and the gradient of every
parameter, in fp32 and fp64, for DINOv2, DINOv3 and the VGGT aggregator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashdino
import flashdino.models.aggregator as agg_mod
import flashdino.models.vision_transformer as vit_mod
from flashdino import Aggregator, dispatch, ops


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gamma" in name or "norm" in name else 0.1))
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.add_(1.0)
    return model.eval()


def _plain_block(block, x, rope):
    """The block from its definition, without any fused op for the norms / residual adds."""
    n1, n2 = block.norm1, block.norm2
    h = F.layer_norm(x, (x.shape[-1],), n1.weight, n1.bias, n1.eps)
    x = x + block.ls1(block.attn(h, rope))
    h = F.layer_norm(x, (x.shape[-1],), n2.weight, n2.bias, n2.eps)
    return x + block.ls2(block.mlp(h))


def _plain_run_blocks(blocks, x, rope=None, *, shapes=None, each=None):
    for i, block in enumerate(blocks):
        if shapes is not None and shapes[i] is not None:
            x = x.reshape(shapes[i])
        x = _plain_block(block, x, rope)
        if each is not None:
            each(i, x)
    return x


@pytest.fixture
def count_calls(monkeypatch):
    """Counts ``ops.residual_layernorm`` calls (the layers call it through ``flashdino.ops``)."""
    calls = []
    real = ops.residual_layernorm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "residual_layernorm", counting)
    return calls


def _models(depth, dtype=torch.float32):
    v3 = flashdino.dinov3_vits16(depth=depth, embed_dim=64, num_heads=4)
    v2 = flashdino.dinov2_vits14_reg(depth=depth, img_size=28, embed_dim=64, num_heads=4)
    return {"dinov3": (_randomize(v3).to(dtype), (32, 48)), "dinov2": (_randomize(v2).to(dtype), (28, 42))}


def _unfused(monkeypatch):
    monkeypatch.setattr(vit_mod, "run_blocks", _plain_run_blocks)
    monkeypatch.setattr(agg_mod, "run_blocks", _plain_run_blocks)


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_depth_d_model_calls_residual_layernorm_2d_minus_1_times(count_calls, monkeypatch, family, depth):
    model, (H, W) = _models(depth)[family]
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        fused = model.forward_features(x)
    assert len(count_calls) == 2 * depth - 1
    count_calls.clear()
    with torch.no_grad(), dispatch.use("torch"):
        also_fused = model.forward_features(x)
    assert len(count_calls) == 2 * depth - 1
    _unfused(monkeypatch)
    with torch.no_grad():
        plain = model.forward_features(x)
    assert fused.keys() == plain.keys()
    for key in ("x_norm_clstoken", model.extra_tokens_key, "x_norm_patchtokens", "x_prenorm"):
        # the same elementwise ops and LayerNorms in the same order: bit for bit on the CPU
        assert torch.equal(fused[key], plain[key]), key
        assert torch.equal(also_fused[key], plain[key]), key


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_intermediate_layers_and_masks_unchanged(monkeypatch, family):
    depth = 4
    model, (H, W) = _models(depth)[family]
    x = torch.randn(2, 3, H, W)
    n_patches = (H // model.patch_size) * (W // model.patch_size)
    masks = torch.rand(2, n_patches) < 0.4

    def run():
        with torch.no_grad():
            return (model.get_intermediate_layers(x, n=depth, norm=False, return_class_token=True,
                                                  return_extra_tokens=True),
                    model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True),
                    model.get_intermediate_layers(x, n=1),
                    model.forward_features(x, masks=masks),
                    model.forward_features([x, x[:1]]))

    fused = run()
    _unfused(monkeypatch)
    plain = run()
    def leaves(obj):  # every tensor of nested tuples / lists / dicts, in order
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):
            return [t for v in obj for t in leaves(v)]
        return [] if obj is None else [obj]

    a, b = leaves(fused), leaves(plain)
    assert len(a) == len(b) > 20
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    # norm=False hidden states are the un-normalised stream after each block: block i's output
    tokens, rope, _ = model.prepare_tokens_with_masks(x)
    with torch.no_grad():
        stream = tokens
        p = model.n_prefix_tokens
        for i, block in enumerate(model.blocks):
            stream = _plain_block(block, stream, rope)
            patches, cls, extra = fused[0][i]
            assert torch.equal(patches, stream[:, p:]) and torch.equal(cls, stream[:, 0])
            assert torch.equal(extra, stream[:, 1:p])


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_backward_matches_unfused_blocks_fp64(monkeypatch, family):
    """Gradients of every parameter (and of the input) through the fused chain equal the plain
    stack's in fp64."""
    depth = 3
    model, (H, W) = _models(depth, torch.float64)[family]
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    weights = None

    def grads():
        nonlocal weights
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = model.forward_features(xi)
        inter = model.get_intermediate_layers(xi, n=[0, 1], norm=False)
        parts = [out["x_norm_clstoken"], out["x_norm_patchtokens"], out["x_prenorm"], *inter]
        if weights is None:
            weights = [torch.randn_like(t) for t in parts]
        sum((t * w).sum() for t, w in zip(parts, weights)).backward()
        return {"input": xi.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}}

    fused = grads()
    _unfused(monkeypatch)
    plain = grads()
    assert fused.keys() == plain.keys()
    assert sum(n.endswith("norm1.weight") for n in fused) == depth and sum("ls2" in n for n in fused) == depth
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_backward_fp32_training_mode(monkeypatch):
    """fp32, train() (DropPath at p=0 still in the graph): the same gradients, within fp32 rounding."""
    model, (H, W) = _models(2)["dinov3"]
    model.train()
    x = torch.randn(2, 3, H, W)
    w = torch.randn(2, 64)

    def grads():
        model.zero_grad()
        (model(x) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = grads()
    _unfused(monkeypatch)
    plain = grads()
    assert fused.keys() == plain.keys() and len(fused) > 20
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


TINY = dict(embed_dim=64, num_heads=4, patch_embed="conv")


@pytest.mark.parametrize("depth,bs,order", [(1, 1, ("frame", "global")), (2, 1, ("frame", "global")),
                                            (4, 2, ("global", "frame"))])
def test_aggregator_fuses_every_boundary_between_frame_and_global_blocks(count_calls, monkeypatch, depth, bs, order):
    """VGGT: 2*depth blocks (frame + global, alternating shapes) make 4*depth - 1 calls; every
    layer's output and the intermediate subset are unchanged."""
    torch.manual_seed(0)
    model = _randomize(Aggregator(depth=depth, aa_block_size=bs, aa_order=list(order), **TINY))
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        fused, _ = model(images)
        assert len(count_calls) == 2 * (2 * depth) - 1
        subset, _ = model(images, intermediate_layer_idx=[0])
    _unfused(monkeypatch)
    with torch.no_grad():
        plain, _ = model(images)
        plain_subset, _ = model(images, intermediate_layer_idx=[0])
    assert len(fused) == len(plain) == depth
    for a, b in zip(fused + subset, plain + plain_subset):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_aggregator_backward_fp64(monkeypatch):
    model = _randomize(Aggregator(depth=2, gradient_checkpointing=False, **TINY)).double().train()
    images = torch.rand(1, 2, 3, 28, 28, dtype=torch.float64)

    def grads():
        model.zero_grad()
        outs, _ = model(images)
        sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = grads()
    _unfused(monkeypatch)
    plain = grads()
    assert fused.keys() == plain.keys() and "frame_blocks.1.norm1.weight" in fused
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_torch_compile_fullgraph_fused_chain(count_calls):
    model, (H, W) = _models(3)["dinov3"]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        eager = model(x)
        count_calls.clear()
        torch.testing.assert_close(compiled(x), eager)
    assert len(count_calls) == 2 * 3 - 1  # traced through the same fused chain


def test_hooks_on_blocks_still_fire(count_calls, monkeypatch):
    """A forward hook on a block (feature extraction's usual way) sees the block's output, the
    residual stream; that block then runs unfused, the rest stay fused; outputs are unchanged."""
    depth = 4
    model, (H, W) = _models(depth)["dinov3"]
    x = torch.randn(2, 3, H, W)
    seen = {}
    handle = model.blocks[1].register_forward_hook(lambda mod, args, out: seen.setdefault(1, out))
    with torch.no_grad():
        hooked = model.forward_features(x)
    assert 2 * depth - 1 - 2 == len(count_calls)  # the hooked block's two boundaries are not fused
    handle.remove()
    count_calls.clear()
    with torch.no_grad():
        fused = model.forward_features(x)
    assert len(count_calls) == 2 * depth - 1
    with torch.no_grad():
        stream, rope = model.prepare_tokens_with_masks(x)[:2]
        for block in model.blocks[:2]:
            stream = _plain_block(block, stream, rope)
    assert torch.equal(seen[1], stream)
    for key in fused:
        if fused[key] is not None:
            assert torch.equal(hooked[key], fused[key]), key
    # hooks on the modules the fused path does not call (norm1, ls2), and global module hooks
    for module in (model.blocks[2].norm1, model.blocks[0].ls2):
        fired = []
        handle = module.register_forward_hook(lambda *a: fired.append(1))
        with torch.no_grad():
            model(x)
        handle.remove()
        assert fired == [1]
    fired = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: fired.append(type(mod).__name__))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert fired.count("Block") == depth


def test_backward_hook_on_a_block_fires():
    model, (H, W) = _models(2)["dinov2"]
    fired = []
    model.blocks[0].register_full_backward_hook(lambda mod, gin, gout: fired.append(gout[0].shape))
    x = torch.randn(1, 3, H, W)
    model(x).sum().backward()
    assert len(fired) == 1

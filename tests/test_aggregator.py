"""flashdino.Aggregator against an independent pure-PyTorch reference of VGGT's aggregator.

The reference below is written from shared/SPEC.md section 3 (and section 2 / 1 for the DINOv2 /
DINOv3 patch embeddings). It only reads weights from the flashdino model's state dict; it calls
no flashdino code: its own attention with qk-norm, VGGT RoPE from integer positions through
F.embedding tables, its own blocks, token assembly and frame / global alternation.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino import Aggregator
from flashdino.loading import CheckpointError
from flashdino.loading.vggt import infer_aggregator_kwargs, load_vggt_state_dict

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up and contention on a shared CPU cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(embed_dim=64, num_heads=4, patch_embed_kwargs=dict(embed_dim=64, depth=1, num_heads=4))


# ------------------------------------------------------------------------------------------------
# Independent reference (SPEC section 3)
# ------------------------------------------------------------------------------------------------
def ref_vggt_rope(t, positions, base):
    """t [B, h, N, d]; positions [B, N, 2] integer (y, x). First half of d rotated by y, second by x."""
    d = t.shape[-1]
    quarter_dim = d // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, quarter_dim, 2).float() / quarter_dim))
    n_pos = int(positions.max()) + 1
    angles = torch.einsum("i,j->ij", torch.arange(n_pos, dtype=torch.float32), inv_freq).to(t.dtype)
    angles = torch.cat([angles, angles], dim=-1)
    cos_table, sin_table = angles.cos().to(t.dtype), angles.sin().to(t.dtype)

    def rotate_1d(part, pos):
        cos = F.embedding(pos, cos_table)[:, None]
        sin = F.embedding(pos, sin_table)[:, None]
        a, b = part[..., : part.shape[-1] // 2], part[..., part.shape[-1] // 2:]
        return part * cos + torch.cat([-b, a], dim=-1) * sin

    y_part, x_part = t.chunk(2, dim=-1)
    return torch.cat([rotate_1d(y_part, positions[..., 0]), rotate_1d(x_part, positions[..., 1])], dim=-1)


def ref_dinov3_rope(t, H, W, periods, n_prefix):
    """DINOv3 RoPE on the patch tokens of t [B, h, N, d] (prefix tokens untouched), in fp32."""
    d = t.shape[-1]
    ys = (torch.arange(H, dtype=torch.float32) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    ang = 2 * math.pi * coords[:, :, None] / periods.float()[None, None]
    ang = ang.reshape(H * W, d // 2)
    ang = torch.cat([ang, ang], dim=-1)
    pre, pat = t[:, :, :n_prefix], t[:, :, n_prefix:].float()
    a, b = pat[..., : d // 2], pat[..., d // 2:]
    pat = pat * ang.cos() + torch.cat([-b, a], -1) * ang.sin()
    return torch.cat([pre, pat.to(t.dtype)], dim=2)


def ref_block(x, sd, pre, heads, eps, qk_norm, rope_fn):
    """Pre-norm block: x + ls1 * attn(norm1 x), then + ls2 * mlp(norm2 x)."""
    def ln(v, name, e=eps):
        return F.layer_norm(v, (v.shape[-1],), sd[pre + name + ".weight"], sd[pre + name + ".bias"], e)

    B, N, C = x.shape
    d = C // heads
    h = ln(x, "norm1")
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"], sd.get(pre + "attn.qkv.bias"))
    q, k, v = qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    if qk_norm:
        q = ln(q, "attn.q_norm")
        k = ln(k, "attn.k_norm")
    if rope_fn is not None:
        q, k = rope_fn(q), rope_fn(k)
    attn = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * d**-0.5, dim=-1)
    a = (attn @ v.float()).to(v.dtype).transpose(1, 2).reshape(B, N, C)
    a = F.linear(a, sd[pre + "attn.proj.weight"], sd.get(pre + "attn.proj.bias"))
    x = x + a * sd[pre + "ls1.gamma"]
    h = ln(x, "norm2")
    m = F.linear(F.gelu(F.linear(h, sd[pre + "mlp.fc1.weight"], sd.get(pre + "mlp.fc1.bias"))),
                 sd[pre + "mlp.fc2.weight"], sd.get(pre + "mlp.fc2.bias"))
    return x + m * sd[pre + "ls2.gamma"]


def _n_blocks(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def ref_patch_tokens(x, sd, kind, P, bb_heads):
    """Normalised images [N, 3, H, W] -> patch tokens [N, H/P * W/P, C]."""
    H, W = x.shape[-2] // P, x.shape[-1] // P
    p = "patch_embed."
    if kind == "conv":
        return F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=P).flatten(2).transpose(1, 2)
    t = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=P)
    t = t.flatten(2).transpose(1, 2)
    N, C = t.shape[0], t.shape[-1]
    depth = _n_blocks(sd, p + "blocks.")
    if kind == "dinov2":
        eps = 1e-6
        t = torch.cat([sd[p + "cls_token"].expand(N, -1, -1), t], dim=1)
        pos = sd[p + "pos_embed"].float()
        M = int(math.isqrt(pos.shape[1] - 1))
        if not (H == W == M):
            grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(H, W), mode="bicubic", antialias=True)
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, H * W, C)], dim=1)
        t = t + pos.to(t.dtype)
        regs = sd[p + "register_tokens"]
        t = torch.cat([t[:, :1], regs.expand(N, -1, -1), t[:, 1:]], dim=1)
        n_prefix = 1 + regs.shape[1]
        rope_fn = None
    else:  # dinov3
        eps = 1e-5
        st = sd[p + "storage_tokens"]
        t = torch.cat([sd[p + "cls_token"].expand(N, -1, -1), st.expand(N, -1, -1), t], dim=1)
        n_prefix = 1 + st.shape[1]
        periods = sd[p + "rope_embed.periods"]

        def rope_fn(v):
            return ref_dinov3_rope(v, H, W, periods, n_prefix)
    for i in range(depth):
        t = ref_block(t, sd, f"{p}blocks.{i}.", bb_heads, eps, False, rope_fn)
    t = F.layer_norm(t, (C,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
    return t[:, n_prefix:]


def ref_aggregator(images, sd, *, heads, kind, P=14, bb_heads=4, aa_order=("frame", "global"), aa_block_size=1,
                   rope_base=100.0, keep=None):
    """SPEC section 3, step by step. Returns the list of [B, S, P_tok, 2C] outputs."""
    if images.dim() == 4:
        images = images[:, None]
    B, S, _, Hi, Wi = images.shape
    x = ((images - MEAN) / STD).reshape(B * S, 3, Hi, Wi)
    patches = ref_patch_tokens(x, sd, kind, P, bb_heads)
    H, W = Hi // P, Wi // P
    cam, reg = sd["camera_token"], sd["register_token"]
    C = cam.shape[-1]
    R = reg.shape[2]
    # slot 0 for the first frame, slot 1 for all others
    cam_f = torch.cat([cam[:, :1].expand(B, 1, 1, C), cam[:, 1:].expand(B, S - 1, 1, C)], 1).reshape(B * S, 1, C)
    reg_f = torch.cat([reg[:, :1].expand(B, 1, R, C), reg[:, 1:].expand(B, S - 1, R, C)], 1).reshape(B * S, R, C)
    tokens = torch.cat([cam_f, reg_f, patches], dim=1)
    Ntok = tokens.shape[1]
    # positions: (row + 1, col + 1) for patches, (0, 0) for the 1 + R special tokens
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1) + 1
    pos = torch.cat([torch.zeros(1 + R, 2, dtype=torch.long), pos], 0)
    pos_frame = pos[None].expand(B * S, -1, -1)
    pos_global = pos[None].expand(B, S, -1, -1).reshape(B, S * Ntok, 2)
    depth = _n_blocks(sd, "frame_blocks.")
    outputs = []
    f_i = g_i = 0
    for _ in range(depth // aa_block_size):
        inter = {"frame": [], "global": []}
        for kind_ in aa_order:
            if kind_ == "frame":
                tokens = tokens.reshape(B * S, Ntok, C)
                for _ in range(aa_block_size):
                    tokens = ref_block(tokens, sd, f"frame_blocks.{f_i}.", heads, 1e-5, True,
                                       lambda v: ref_vggt_rope(v, pos_frame, rope_base))
                    inter["frame"].append(tokens.reshape(B, S, Ntok, C))
                    f_i += 1
            else:
                tokens = tokens.reshape(B, S * Ntok, C)
                for _ in range(aa_block_size):
                    tokens = ref_block(tokens, sd, f"global_blocks.{g_i}.", heads, 1e-5, True,
                                       lambda v: ref_vggt_rope(v, pos_global, rope_base))
                    inter["global"].append(tokens.reshape(B, S, Ntok, C))
                    g_i += 1
        for fo, go in zip(inter["frame"], inter["global"]):
            outputs.append(torch.cat([fo, go], dim=-1))
    if keep is not None:
        outputs = [o if i in keep else None for i, o in enumerate(outputs)]
    return outputs


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def randomize_(model, seed=0):
    """Weights with non-trivial values everywhere (the defaults are near-identity, e.g. tokens ~1e-6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.2 * r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.dim() >= 2 and not name.endswith(("token", "tokens", "pos_embed")):
                fan_in = p[0].numel()
                p.copy_(r / math.sqrt(fan_in))
            else:
                p.copy_(r)
    return model


def build(depth=2, kind="dinov2", seed=0, **kw):
    args = dict(TINY)
    if kind == "conv":
        args.pop("patch_embed_kwargs")
        args["patch_embed"] = "conv"
    elif kind == "dinov3":
        args["patch_embed"] = "dinov3_vits16"
    args.update(kw)
    return randomize_(Aggregator(depth=depth, **args), seed).eval()


def ref_of(model, images, kind, **kw):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        bb_heads = getattr(model.patch_embed, "num_heads", None)
        return ref_aggregator(images, sd, heads=model.num_heads, kind=kind, P=model.patch_size, bb_heads=bb_heads,
                              aa_order=model.aa_order, aa_block_size=model.aa_block_size, **kw)


def max_rel_dev(outs, refs):
    worst = 0.0
    for o, r in zip(outs, refs):
        worst = max(worst, ((o.float() - r.float()).abs().max() / r.float().abs().max()).item())
    return worst


def assert_outputs_close(outs, refs, rtol=1e-4):
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if r is None:
            assert o is None, f"layer {i}: expected None"
            continue
        assert o is not None, f"layer {i}: missing output"
        assert o.shape == r.shape, f"layer {i}: {tuple(o.shape)} vs {tuple(r.shape)}"
        scale = r.abs().max().item()
        err = (o.float() - r.float()).abs().max().item()
        assert err <= rtol * scale, f"layer {i}: max abs err {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# Numerics against the reference
# ------------------------------------------------------------------------------------------------
CASES = [
    # kind, B, S, H, W, depth, aa_block_size, aa_order
    ("dinov2", 1, 1, 28, 42, 2, 1, ("frame", "global")),
    ("dinov2", 1, 2, 42, 28, 4, 2, ("frame", "global")),
    ("dinov2", 2, 3, 28, 42, 2, 1, ("global", "frame")),
    ("dinov2", 1, 2, 28, 28, 4, 2, ("global", "frame")),
    ("conv", 2, 2, 28, 42, 2, 1, ("frame", "global")),
    ("dinov3", 1, 3, 32, 48, 2, 1, ("frame", "global")),
]


@pytest.mark.parametrize("kind,B,S,H,W,depth,bs,order", CASES,
                         ids=[f"{c[0]}-B{c[1]}S{c[2]}-{c[3]}x{c[4]}-d{c[5]}bs{c[6]}-{c[7][0]}" for c in CASES])
def test_matches_reference(kind, B, S, H, W, depth, bs, order):
    model = build(depth, kind, aa_block_size=bs, aa_order=list(order))
    images = torch.rand(B, S, 3, H, W)
    with torch.no_grad():
        outs, start = model(images)
    assert start == 5 == model.patch_start_idx
    n_tok = 5 + (H // model.patch_size) * (W // model.patch_size)
    assert all(o.shape == (B, S, n_tok, 128) and o.dtype == torch.float32 for o in outs)
    refs = ref_of(model, images, kind)
    assert_outputs_close(outs, refs, rtol=1e-4)


def test_reference_is_sensitive():
    """The comparison can fail: a wrong RoPE base, swapped token slots or wrong order are caught."""
    model = build(2)
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        outs, _ = model(images)
    assert max_rel_dev(outs, ref_of(model, images, "dinov2", rope_base=10.0)) > 1e-3
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["camera_token"] = sd["camera_token"].flip(1)
    with torch.no_grad():
        swapped = ref_aggregator(images, sd, heads=4, kind="dinov2")
    assert max_rel_dev(outs, swapped) > 1e-3
    with torch.no_grad():
        other_order = ref_aggregator(images, model.state_dict(), heads=4, kind="dinov2", aa_order=("global", "frame"))
    assert max_rel_dev(outs, other_order) > 1e-3


def test_four_d_input_is_one_frame():
    model = build(2)
    images = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        outs4, _ = model(images)
        outs5, _ = model(images[:, None])
    for a, b in zip(outs4, outs5):
        assert a.shape == (2, 1, 5 + 6, 128)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_first_frame_is_special_others_equivariant():
    """Frames 1..S-1 are permutation-equivariant; frame 0 is not (its own token slot)."""
    model = build(2)
    images = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        a, _ = model(images)
        b, _ = model(images[:, [0, 2, 1]])
    torch.testing.assert_close(a[-1][:, [0, 2, 1]], b[-1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Keeping only requested layers
# ------------------------------------------------------------------------------------------------
def test_keep_layers_equal_full_outputs():
    model = build(4, aa_block_size=2)
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        full, _ = model(images)
        part, _ = model(images, intermediate_layer_idx=[0, 2])
        last, _ = model(images, intermediate_layer_idx=[-1])
    assert len(part) == len(last) == 4
    assert [o is None for o in part] == [False, True, False, True]
    assert [o is None for o in last] == [True, True, True, False]
    torch.testing.assert_close(part[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(part[2], full[2], rtol=0, atol=0)
    torch.testing.assert_close(last[3], full[3], rtol=0, atol=0)
    assert_outputs_close(part, ref_of(model, images, "dinov2", keep={0, 2}))


def test_keep_layers_constructor_argument():
    model = build(4, intermediate_layer_idx=[1, 3])
    assert model.intermediate_layer_idx == [1, 3]
    with torch.no_grad():
        outs, _ = model(torch.rand(1, 2, 3, 28, 28))
        all_outs, _ = model(torch.rand(1, 2, 3, 28, 28), intermediate_layer_idx=None)
    assert [o is None for o in outs] == [True, False, True, False]
    assert all(o is not None for o in all_outs)
    with pytest.raises(ValueError, match="outside"):
        build(4, intermediate_layer_idx=[4])


def test_keep_layers_builds_only_requested_outputs():
    """Unrequested layers are never concatenated, and nothing else of that size stays alive."""
    import weakref

    model = build(4)
    images = torch.rand(1, 2, 3, 28, 28)
    made = []
    orig_cat = torch.cat

    def spy_cat(tensors, dim=0, **kw):
        out = orig_cat(tensors, dim=dim, **kw)
        if out.dim() == 4 and out.shape[-1] == 128:
            made.append(weakref.ref(out))
        return out

    torch.cat = spy_cat
    try:
        with torch.no_grad():
            outs, _ = model(images, intermediate_layer_idx=[3])
            n_keep_last = len(made)
            made.clear()
            model(images)
            n_keep_all = len(made)
    finally:
        torch.cat = orig_cat
    assert n_keep_last == 1 and n_keep_all == 4
    assert outs[3] is not None and sum(o is not None for o in outs) == 1


# ------------------------------------------------------------------------------------------------
# Precision, chunking, checkpointing
# ------------------------------------------------------------------------------------------------
def test_bf16_autocast_keeps_fp32_stream():
    model = build(2)
    images = torch.rand(1, 2, 3, 28, 42)
    ref = ref_of(model, images, "dinov2")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs, _ = model(images)
    for o, r in zip(outs, ref):
        assert o.dtype == torch.float32
        cos = F.cosine_similarity(o.flatten(), r.flatten(), dim=0).item()
        assert cos > 0.999, cos
        assert (o - r).norm() / r.norm() < 3e-2


def test_pure_bf16_model():
    model = build(2)
    images = torch.rand(1, 2, 3, 28, 42)
    ref = ref_of(model, images, "dinov2")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        outs, _ = model(images)  # fp32 images are accepted and cast
        outs_b, _ = model(images.to(torch.bfloat16))
    for o, r in zip(outs, ref):
        assert o.dtype == torch.bfloat16
        assert F.cosine_similarity(o.float().flatten(), r.flatten(), dim=0).item() > 0.995
    assert all(o.dtype == torch.bfloat16 for o in outs_b)


def test_patch_embed_chunking():
    model = build(2)
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        full, _ = model(images)
        model.patch_embed_chunk_size = 2
        chunked, _ = model(images)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    m2 = build(2, patch_embed_chunk_size=4)
    assert m2.patch_embed_chunk_size == 4


def test_gradient_checkpointing(monkeypatch):
    import flashdino.models.aggregator as agg_mod

    images = torch.rand(1, 2, 3, 28, 28)
    grads = {}
    calls = []
    real = agg_mod.checkpoint

    def counting(*a, **k):
        calls.append(k.get("use_reentrant"))
        return real(*a, **k)

    monkeypatch.setattr(agg_mod, "checkpoint", counting)
    for flag in (False, True):
        model = build(2).train()
        model.use_checkpoint = flag
        assert model.gradient_checkpointing is flag
        outs, _ = model(images)
        sum(o.square().mean() for o in outs).backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == [False] * 4  # 2 frame + 2 global blocks, non-reentrant, only with the flag on
    assert grads[True].keys() == grads[False].keys()
    assert "camera_token" in grads[True] and "patch_embed.pos_embed" in grads[True]
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6)
    # no checkpointing in eval mode
    calls.clear()
    with torch.no_grad():
        build(2).eval()(images)
    assert calls == []


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------
def test_default_construction_matches_vggt_1b_shapes():
    with torch.device("meta"):
        model = Aggregator()
    sd = model.state_dict()
    assert model.patch_start_idx == 5 and model.patch_size == 14 and model.depth == 24
    assert model.aa_order == ["frame", "global"] and model.aa_block_size == 1
    assert sd["camera_token"].shape == (1, 2, 1, 1024)
    assert sd["register_token"].shape == (1, 2, 4, 1024)
    assert sd["patch_embed.pos_embed"].shape == (1, 1370, 1024)
    assert sd["patch_embed.register_tokens"].shape == (1, 4, 1024)
    assert sd["patch_embed.mask_token"].shape == (1, 1024)
    assert sd["frame_blocks.23.attn.q_norm.weight"].shape == (64,)
    assert sd["global_blocks.0.attn.k_norm.bias"].shape == (64,)
    assert sd["global_blocks.0.ls1.gamma"].shape == (1024,)
    assert "frame_blocks.24.norm1.weight" not in sd
    assert _n_blocks(sd, "patch_embed.blocks.") == 24
    assert model.frame_blocks[0].norm1.eps == 1e-5 and model.patch_embed.norm.eps == 1e-6
    assert model.frame_blocks[0].attn.q_norm.eps == 1e-5
    assert not model.patch_embed.mask_token.requires_grad
    n_params = sum(p.numel() for p in model.parameters())
    assert 900e6 < n_params < 920e6, n_params  # DINOv2-L (304M) + 48 blocks of 12.6M


def test_constructor_variants():
    with torch.device("meta"):
        g = Aggregator(embed_dim=1536, num_heads=24, depth=1, patch_embed="dinov2_vitg2_reg")
        v3 = Aggregator(embed_dim=1024, depth=1, patch_embed="dinov3_vitl16")
        conv = Aggregator(depth=1, patch_embed="conv")
    assert g.patch_embed.cfg.ffn == "mlp" and g.patch_embed.blocks[0].mlp.fc1.out_features == 6144
    assert isinstance(v3.patch_embed, flashdino.DinoV3) and v3.patch_size == 16
    assert v3.patch_embed.norm.eps == 1e-5
    assert "patch_embed.proj.weight" in conv.state_dict()
    # the backbone ViT of a VGGT model interpolates like VGGT's builder: antialias, no offset
    assert g.patch_embed.cfg.interpolate_antialias and g.patch_embed.cfg.interpolate_offset == 0.0
    Aggregator(embed_dim=64, depth=2, num_heads=4, block_fn=object, patch_embed="conv")  # block_fn accepted


def test_constructor_dinov3_spellings():
    # n_storage_tokens is DINOv3's name for num_register_tokens; "_reg" DINOv3 names are the plain
    # variants (4 storage tokens always); a 14 in a DINOv3 name is that architecture with 14-pixel patches
    with torch.device("meta"):
        reg = Aggregator(img_size=224, patch_size=16, embed_dim=1024, depth=1, n_storage_tokens=2,
                         patch_embed="dinov3_vitl16_reg")
        plain = Aggregator(img_size=224, patch_size=16, embed_dim=1024, depth=1, num_register_tokens=2,
                           patch_embed="dinov3_vitl16")
        p14 = Aggregator(embed_dim=1024, depth=1, patch_embed="dinov3_vitl14_reg")
        b14 = Aggregator(embed_dim=768, num_heads=12, depth=1, patch_embed="dinov3_vitb14")
    assert reg.num_register_tokens == 2 and reg.patch_start_idx == 3
    assert {k: v.shape for k, v in reg.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert reg.patch_embed.cfg == plain.patch_embed.cfg
    assert p14.patch_size == 14 and p14.patch_embed.cfg.name == "dinov3_vitl16"
    assert p14.state_dict()["patch_embed.patch_embed.proj.weight"].shape == (1024, 3, 14, 14)
    assert b14.patch_size == 14 and b14.patch_embed.cfg.embed_dim == 768


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_register_tokens=2, n_storage_tokens=3), "pass only one of them"),
    (dict(patch_embed="dinov3_vitl14_reg", patch_size=16), "patch size 14, got patch_size=16"),
    (dict(patch_embed="dinov3_vitq14_reg"), "unknown patch_embed 'dinov3_vitq14_reg'"),
])
def test_bad_dinov3_spellings(kwargs, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        Aggregator(embed_dim=1024, depth=1, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(aa_order=["frame"]), "aa_order"),
    (dict(depth=3, aa_block_size=2), "multiple"),
    (dict(num_heads=5), "divisible"),
    (dict(patch_embed="dinov2_vitq14"), "unknown patch_embed"),
    (dict(patch_embed="dinov2_vitl14_reg", patch_embed_kwargs=None), "embed_dim"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(TINY, depth=2)
    args.update(kwargs)
    if args.get("patch_embed_kwargs") is None:
        args.pop("patch_embed_kwargs")
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        Aggregator(**args)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_inputs():
    model = build(2)
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        model(torch.rand(3, 28, 42))
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        model(torch.rand(1, 1, 1, 3, 28, 42))
    with pytest.raises(ValueError, match="expected 3 channels"):
        model(torch.rand(1, 2, 4, 28, 42))
    with pytest.raises(ValueError, match="channels-last"):
        model(torch.rand(1, 2, 28, 42, 3))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.rand(1, 2, 3, 30, 42))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 2, 3, 28, 42, dtype=torch.uint8))
    with pytest.raises(TypeError):
        model([torch.rand(3, 28, 42)])


def test_warns_once_on_normalised_input():
    model = build(2)
    images = (torch.rand(1, 2, 3, 28, 42) - 0.45) / 0.225
    with pytest.warns(UserWarning, match="looks ImageNet-normalised"), torch.no_grad():
        model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(images)  # only once
            build(2)(torch.rand(1, 1, 3, 28, 28))  # [0, 1] input: no warning


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def vggt_state_dict(model):
    """A whole-VGGT-style state dict: the aggregator under 'aggregator.' plus head keys."""
    sd = {"aggregator." + k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["camera_head.trunk.0.attn.qkv.weight"] = torch.randn(6, 2)
    sd["depth_head.projects.0.weight"] = torch.randn(3, 2, 1, 1)
    sd["point_head.scratch.output_conv2.2.bias"] = torch.randn(4)
    sd["track_head.feature_extractor.norm.weight"] = torch.randn(2)
    return sd


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    model = build(2, seed=3)
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        expected, _ = model(images)
    sd = vggt_state_dict(model)
    path = tmp_path / f"model.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    # architecture given explicitly
    loaded = Aggregator.from_vggt_checkpoint(path, depth=2, **TINY).eval()
    # architecture read from the checkpoint
    inferred = Aggregator.from_vggt_checkpoint(str(path)).eval()
    assert inferred.embed_dim == 64 and inferred.depth == 2 and inferred.num_heads == 4
    for m in (loaded, inferred):
        with torch.no_grad():
            outs, _ = m(images)
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv", "dinov3"])
def test_architecture_inferred_from_state_dict(kind):
    model = build(2, kind, seed=4, aa_block_size=1)
    H, W = (28, 42) if kind == "conv" else (32, 48)
    images = torch.rand(1, 2, 3, H, W)
    with torch.no_grad():
        expected, _ = model(images)
    loaded = Aggregator.from_vggt_checkpoint(vggt_state_dict(model)).eval()
    assert type(loaded.patch_embed) is type(model.patch_embed) and loaded.patch_size == model.patch_size
    with torch.no_grad():
        outs, _ = loaded(images)
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hub_id_and_folder(tmp_path, monkeypatch):
    """'facebook/VGGT-1B'-style ids download model.safetensors (mocked here); folders are searched."""
    from safetensors.torch import save_file

    model = build(2, seed=5)
    save_file({k: v.contiguous() for k, v in vggt_state_dict(model).items()}, str(tmp_path / "model.safetensors"))
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from_hub = Aggregator.from_vggt_checkpoint("someone/VGGT-tiny")
    from_folder = Aggregator.from_vggt_checkpoint(tmp_path)
    assert asked == [("someone/VGGT-tiny", "model.safetensors")]
    for m in (from_hub, from_folder):
        for k, v in model.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


def test_load_without_prefix_and_report():
    model = build(2, seed=1)
    fresh = build(2, seed=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_vggt_state_dict(fresh, sd)
    assert report.ok and report.loaded == len(sd) and report.ignored == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    report = fresh.load_vggt_state_dict(vggt_state_dict(model))
    assert report.prefix == "aggregator." and len(report.ignored) == 4
    assert "camera_head" in str(report) and "depth_head" in str(report)


def test_infer_kwargs_for_vggt_1b_shapes():
    with torch.device("meta"):
        sd = vggt_state_dict(Aggregator())
    kw = infer_aggregator_kwargs(sd)
    assert kw == dict(embed_dim=1024, num_register_tokens=4, depth=24, qk_norm=True, num_heads=16, mlp_ratio=4.0,
                      ffn_bias=True, qkv_bias=True, proj_bias=True, patch_size=14, img_size=518,
                      patch_embed="dinov2_vitl14_reg")


def test_strict_loading_reports_problems():
    model = build(2)
    sd = vggt_state_dict(model)
    del sd["aggregator.frame_blocks.1.attn.q_norm.weight"]
    sd["aggregator.frame_blocks.7.norm1.weight"] = torch.ones(64)
    sd["aggregator.camera_token"] = torch.zeros(1, 2, 1, 32)
    with pytest.raises(CheckpointError) as info:
        load_vggt_state_dict(build(2), sd)
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "frame_blocks.1.attn.q_norm.weight" in msg and "frame_blocks.7.norm1.weight" in msg
    assert "camera_token: checkpoint [1, 2, 1, 32] vs model [1, 2, 1, 64]" in msg
    report = load_vggt_state_dict(build(2), sd, strict=False)
    assert not report.ok and len(report.missing) == 1 and len(report.mismatched) == 1


def test_depth_mismatch_suggests_from_checkpoint():
    sd = vggt_state_dict(build(4))
    with pytest.raises(CheckpointError, match="from_vggt_checkpoint") as info:
        load_vggt_state_dict(build(2), sd)
    assert "'depth': 4" in str(info.value)


def test_not_a_vggt_checkpoint(tmp_path):
    dino = flashdino.create_model("dinov2_vits14_reg", depth=1)
    with pytest.raises(CheckpointError, match="not a VGGT aggregator.*DINOv2 backbone"):
        load_vggt_state_dict(build(2), dino.state_dict())
    path = tmp_path / "dino.pth"
    torch.save(dino.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a VGGT aggregator"):
        Aggregator.from_vggt_checkpoint(path)
    with pytest.raises(CheckpointError, match="head weights but no aggregator"):
        load_vggt_state_dict(build(2), {"camera_head.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not found"):
        Aggregator.from_vggt_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------
# Fast path vs PyTorch path
# ------------------------------------------------------------------------------------------------
def _triton_rope_attention_registered() -> bool:
    from flashdino import dispatch

    return "triton" in dispatch.backends("rope_attention")


def test_fast_path_matches_torch_path(monkeypatch):
    if not _triton_rope_attention_registered():
        pytest.skip("no Triton rope_attention backend registered yet")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    # head dim 64: a size the fast kernels cover
    model = build(2, embed_dim=128, num_heads=2, patch_embed_kwargs=dict(embed_dim=128, depth=1, num_heads=2))
    images = torch.rand(1, 2, 3, 28, 28)
    monkeypatch.setenv("FLASHDINO_BACKEND", "torch")
    with torch.no_grad():
        slow, _ = model(images)
    monkeypatch.setenv("FLASHDINO_BACKEND", "triton")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to torch would make this test vacuous
        fast, _ = model(images)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert_outputs_close(fast, ref_of(model, images, "dinov2"), rtol=1e-4)

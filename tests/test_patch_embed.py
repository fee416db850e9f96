"""Patch embedding into the token buffer (``ops.patch_embed_tokens``): Triton vs the reference,
input validation, and the models' CPU path (bit for bit what it was before the op)."""

import pytest
import torch
import torch.nn.functional as F

import flashdino
from flashdino import dispatch, ops
from flashdino.ops.patch_embed import PatchEmbedCall
from flashdino.ops.patch_embed.reference import patch_embed_tokens as reference

from _backends import backend_params

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _params(D, C=3, P=4, R=3, dtype=torch.float32, device=DEV):
    g = torch.Generator("cpu").manual_seed(D * 31 + P)
    t = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(weight=t(D, C, P, P) * 0.2, bias=t(D), cls=t(1, 1, D), extra=t(1, R, D) if R else None,
                mask_token=t(1, D))


def _image(B, C, h, w, uint8=False, channels_last=False, device=DEV):
    shape = (B, h, w, C) if channels_last else (B, C, h, w)
    if uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return torch.randn(shape, device=device)


def _run(x, p, backend, masks=None, pos=None, **kw):
    args = (x, p["weight"], p["bias"], p["cls"])
    kwargs = dict(extra_tokens=p["extra"], masks=masks, mask_token=p["mask_token"], pos_embed=pos, **kw)
    if backend == "reference":
        return reference(*args, kwargs["extra_tokens"], masks, p["mask_token"], pos, kw.get("channels_last", False),
                         kw.get("mean"), kw.get("std"))
    return ops.patch_embed_tokens(*args, backend=backend, **kwargs)


CASES = [  # B, C, h, w, P, D, R
    (1, 3, 8, 8, 4, 16, 0), (2, 3, 13, 18, 4, 48, 3), (3, 3, 17, 9, 4, 33, 1), (2, 1, 12, 20, 4, 64, 4),
    (1, 3, 28, 42, 14, 40, 4), (2, 3, 16, 35, 16, 24, 0),
]


@pytest.mark.parametrize("B,C,h,w,P,D,R", CASES)
@pytest.mark.parametrize("with_masks,with_pos", [(False, False), (True, False), (True, True)])
def test_float_nchw_matches_reference(B, C, h, w, P, D, R, with_masks, with_pos):
    p = _params(D, C, P, R)
    x = _image(B, C, h, w)
    HW = (h // P) * (w // P)
    masks = (torch.rand(B, HW, device=DEV) > 0.5) if with_masks else None
    pos = torch.randn(1, 1 + HW, D, device=DEV) if with_pos else None
    got = _run(x, p, "triton", masks, pos)
    want = _run(x, p, "reference", masks, pos)
    assert got.shape == want.shape == (B, 1 + R + HW, D) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if with_masks and masks.any():  # mask-token rows are exact copies (+ pos)
        b, t = masks.nonzero()[0].tolist()
        expect = p["mask_token"][0] + (pos[0, 1 + t] if with_pos else 0)
        assert torch.equal(got[b, 1 + R + t], expect)


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_input_formats_fold_into_weights(uint8, channels_last, normalize):
    p = _params(40, 3, 4, 2)
    x = _image(2, 3, 13, 18, uint8=uint8, channels_last=channels_last)
    kw = dict(channels_last=channels_last)
    if normalize:
        kw.update(mean=MEAN, std=STD)
    got = _run(x, p, "triton", **kw)
    want = _run(x, p, "reference", **kw)
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(scale))


def test_mean_std_as_tensors_and_non_contiguous_input():
    p = _params(24, 3, 4, 1)
    big = torch.randn(2, 5, 12, 2 * 16, device=DEV)
    x = big[:, 1:4, :, ::2]  # channel slice + strided width
    assert not x.is_contiguous()
    kw = dict(mean=torch.tensor(MEAN), std=torch.tensor(STD))
    got = ops.patch_embed_tokens(x, p["weight"], p["bias"], p["cls"], extra_tokens=p["extra"], backend="triton", **kw)
    want = reference(x, p["weight"], p["bias"], p["cls"], p["extra"], mean=MEAN, std=STD)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    nhwc = x.permute(0, 2, 3, 1)  # a channels-last view of the same pixels
    got2 = ops.patch_embed_tokens(nhwc, p["weight"], p["bias"], p["cls"], extra_tokens=p["extra"],
                                  channels_last=True, backend="triton", **kw)
    torch.testing.assert_close(got2, want, rtol=1e-4, atol=1e-4)


def test_no_cls_no_bias_and_fp16():
    p = _params(32, 3, 4, 0, dtype=torch.float16)
    x = _image(2, 3, 12, 16).half()
    got = ops.patch_embed_tokens(x, p["weight"], None, None, backend="triton")
    want = reference(x.float(), p["weight"].float(), None, None)
    assert got.dtype == torch.float16 and got.shape == (2, 12, 32)
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_remainder_dropped_unless_strict():
    p = _params(16, 3, 4, 0)
    x = _image(1, 3, 10, 9)
    got = ops.patch_embed_tokens(x, p["weight"], p["bias"], p["cls"], backend="triton")
    assert got.shape == (1, 1 + 2 * 2, 16)
    torch.testing.assert_close(got, reference(x, p["weight"], p["bias"], p["cls"]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        ops.patch_embed_tokens(x, p["weight"], p["bias"], p["cls"], strict=True)


def test_bad_inputs():
    p = _params(16, 3, 4, 0, device="cpu")
    w, b, cls = p["weight"], p["bias"], p["cls"]
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="expected 3 input channels, got 8 .*channels_last=True"):
        ops.patch_embed_tokens(x.permute(0, 2, 3, 1), w, b, cls)
    with pytest.raises(ValueError, match="expected 3 input channels, got 8 .*channels_last=False"):
        ops.patch_embed_tokens(x, w, b, cls, channels_last=True)
    with pytest.raises(TypeError, match="floating point or uint8"):
        ops.patch_embed_tokens(x.int(), w, b, cls)
    with pytest.raises(ValueError, match="4-D image batch.*x\\[None\\]"):
        ops.patch_embed_tokens(x[0], w, b, cls)
    with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
        ops.patch_embed_tokens(x[..., :3], w, b, cls)
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        ops.patch_embed_tokens(x, w, b, cls, masks=torch.zeros(2, 4, dtype=torch.int64), mask_token=p["mask_token"])
    with pytest.raises(ValueError, match="masks need a mask_token"):
        ops.patch_embed_tokens(x, w, b, cls, masks=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pos_embed must be \\[1, 5, 16\\]"):
        ops.patch_embed_tokens(x, w, b, cls, pos_embed=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        ops.patch_embed_tokens(x, w, b, cls, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="std must be non-zero"):
        ops.patch_embed_tokens(x, w, b, cls, mean=MEAN, std=(1, 0, 1))
    with pytest.raises(ValueError, match="both mean and std"):
        ops.patch_embed_tokens(x, w, b, cls, mean=MEAN)
    with pytest.raises(TypeError, match="weights are torch.float32"):
        ops.patch_embed_tokens(x.double(), w, b, cls)
    with pytest.raises(ValueError, match="conv kernel"):
        ops.patch_embed_tokens(x, w[..., :2], b, cls)


def test_dispatch_cpu_reference_and_training_fallback():
    call = PatchEmbedCall(dtype=torch.float32, weight_dtype=torch.float32, patch_size=4, needs_grad=False)
    fn, name, _ = dispatch.select("patch_embed", call, torch.device("cpu"))
    assert name == "torch" and fn is reference
    p = _params(16, 3, 4, 0)
    w = p["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        ops.patch_embed_tokens(_image(1, 3, 8, 8), w, p["bias"], p["cls"], backend="triton")


# -- models: the CPU path is unchanged ----------------------------------------------------------


def _tiny(name, **kw):
    torch.manual_seed(0)
    return flashdino.create_model(name, depth=2, embed_dim=64, num_heads=2, **kw).eval()


def _old_prepare_tokens(m, x, masks):
    """What the models computed before ops.patch_embed_tokens (copied from the previous code)."""
    H, W = x.shape[-2] // m.patch_size, x.shape[-1] // m.patch_size
    patches = m.patch_embed(x)
    if masks is not None:
        patches = torch.where(masks.unsqueeze(-1), m.mask_token.to(patches.dtype).unsqueeze(0), patches)
    B = patches.shape[0]
    if isinstance(m, flashdino.DinoV3):
        prefix = [m.cls_token.expand(B, -1, -1)]
        if m.storage_tokens is not None:
            prefix.append(m.storage_tokens.expand(B, -1, -1))
        return torch.cat(prefix + [patches], dim=1)
    tokens = torch.cat([m.cls_token.expand(B, -1, -1), patches], dim=1)
    tokens = tokens + m.interpolated_pos_embed(H, W, tokens.dtype)
    if m.register_tokens is not None:
        tokens = torch.cat([tokens[:, :1], m.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
    return tokens


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov2_vits14_reg", "dinov2_vits14"])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_tokens_cpu_bitwise_unchanged(name, autocast):
    m = _tiny(name)
    with torch.no_grad():
        m.mask_token.normal_()
    P = m.patch_size
    x = torch.randn(2, 3, 3 * P + (5 if name.startswith("dinov3") else 0), 2 * P)
    masks = torch.rand(2, 6) > 0.5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        new = m.prepare_tokens_with_masks(x, masks)[0]
        old = _old_prepare_tokens(m, x, masks)
    assert new.dtype == old.dtype
    assert torch.equal(new, old)


def test_dinov2_still_raises_for_non_multiples():
    m = _tiny("dinov2_vits14")
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        m(torch.randn(1, 3, 30, 28))


@pytest.mark.slow
def test_compile_fullgraph_cpu_reference_path():
    m = _tiny("dinov2_vits14_reg")
    x = torch.randn(1, 3, 28, 42)

    def prep_and_norm(img):
        tokens = m.prepare_tokens_with_masks(img)[0]
        return m._final_norm(tokens, patch_grid=(2, 3))

    with torch.no_grad():
        eager = prep_and_norm(x)
        compiled = torch.compile(prep_and_norm, fullgraph=True)(x)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name,size", [("dinov3_vitl16", 224), ("dinov2_vitb14_reg", 518), ("dinov3_vits16", 500)])
def test_gpu_bf16_model_sizes(name, size):
    m = flashdino.create_model(name, depth=1).cuda().eval()
    x = torch.randn(4, 3, size, size, device="cuda")
    masks = torch.rand(4, (size // m.patch_size) ** 2, device="cuda") > 0.7
    with torch.no_grad():
        with dispatch.use("torch"):
            want = m.prepare_tokens_with_masks(x, masks)[0]  # fp32 reference (TF32 conv allowed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = m.prepare_tokens_with_masks(x, masks)[0]
    assert got.dtype == want.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999
    assert (got - want).norm() / want.norm() < 1e-2


@pytest.mark.gpu
def test_gpu_uint8_nhwc_normalised():
    p = _params(1024, 3, 16, 4, dtype=torch.bfloat16, device="cuda")
    x = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, device="cuda")
    got = ops.patch_embed_tokens(x, p["weight"], p["bias"], p["cls"], extra_tokens=p["extra"], channels_last=True,
                                 mean=MEAN, std=STD)
    p32 = {k: (v.float() if v is not None else None) for k, v in p.items()}
    want = reference(x, p32["weight"], p32["bias"], p32["cls"], p32["extra"], channels_last=True, mean=MEAN, std=STD)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 1e-2


def test_opcheck_custom_op():
    from flashdino.ops.patch_embed import triton as tp

    p = _params(16, 3, 4, 2)
    x = _image(2, 3, 9, 12)
    masks = torch.rand(2, 6, device=DEV) > 0.5
    pos = torch.randn(1, 7, 16, device=DEV)
    args = (x, p["weight"], p["bias"], p["cls"], p["extra"], masks, p["mask_token"], pos, False, [0.5] * 3,
            [0.25] * 3, torch.float32, torch.float32, torch.float32)
    torch.library.opcheck(tp.patch_embed_tokens_op, args, test_utils=("test_schema", "test_faketensor"))


def test_weight_cache_follows_in_place_updates():
    """The Triton path caches the folded weights / prefix rows; in-place edits must invalidate them."""
    p = _params(24, 3, 4, 2)
    pos = torch.randn(1, 1 + 6, 24, device=DEV)
    x = _image(2, 3, 8, 12)
    for step in range(3):
        got = _run(x, p, "triton", pos=pos, mean=MEAN, std=STD)
        want = _run(x, p, "reference", pos=pos, mean=MEAN, std=STD)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            p["weight"].mul_(1.5)
            p["bias"].add_(1)
            p["cls"].add_(1)
            p["extra"].sub_(1)
            pos.add_(0.5)


def test_rows_beyond_the_grid_limit_are_launched_in_chunks(monkeypatch):
    # Regression: the patch rows sit on grid axis 1 (CUDA cap 65535), so a batch of more than
    # 65535 * BLOCK_M patches failed to launch; the op now launches in chunks of rows.
    tpe = pytest.importorskip("flashdino.ops.patch_embed.triton")
    monkeypatch.setattr(tpe, "_MAX_GRID_Y", 1)  # one row block per launch
    p = _params(24)
    x = _image(3, 3, 20, 28)  # 3 x 5 x 7 = 105 patches: several launches
    masks = torch.rand(3, 35, device=DEV) < 0.3
    out = _run(x, p, "triton", masks=masks)
    ref = _run(x, p, "torch", masks=masks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- every backend against an independent fp64 oracle ----------------------------------------------


def _oracle(x, p, masks=None, pos=None, channels_last=False, mean=None, std=None):
    """Each patch flattened (c, i, j) times the conv kernel, then the SPEC token order."""
    img = x.double()
    if x.dtype == torch.uint8:
        img = img / 255
    if channels_last:
        img = img.permute(0, 3, 1, 2)
    if mean is not None:
        img = (img - torch.tensor(mean, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)) \
            / torch.tensor(std, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)
    w = p["weight"].double()
    D, C, P, _ = w.shape
    B, Hp, Wp = img.shape[0], img.shape[2] // P, img.shape[3] // P
    tokens = img.new_empty(B, Hp * Wp, D)
    for t in range(Hp * Wp):  # row-major patches; a bottom/right remainder is dropped
        y, xx = divmod(t, Wp)
        patch = img[:, :, y * P:(y + 1) * P, xx * P:(xx + 1) * P].reshape(B, -1)
        tokens[:, t] = patch @ w.reshape(D, -1).T + p["bias"].double()
    if masks is not None:
        tokens = torch.where(masks[..., None], p["mask_token"].double().reshape(1, 1, D), tokens)
    cls = p["cls"].double().expand(B, 1, D)
    if pos is not None:  # DINOv2: the table covers CLS + patches; registers follow CLS unpositioned
        cls, tokens = cls + pos[:, :1].double(), tokens + pos[:, 1:].double()
    extra = [] if p["extra"] is None else [p["extra"].double().expand(B, -1, -1)]
    return torch.cat([cls] + extra + [tokens], dim=1)


@pytest.mark.parametrize("backend", backend_params("patch_embed"))
@pytest.mark.parametrize("B,C,h,w,P,D,R", [(2, 3, 13, 18, 4, 48, 3), (1, 1, 12, 8, 4, 16, 0)])
@pytest.mark.parametrize("inputs", ["float", "masks+pos", "uint8-nhwc-meanstd"])
def test_every_backend_matches_the_oracle(backend, B, C, h, w, P, D, R, inputs):
    p = _params(D, C, P, R)
    HW = (h // P) * (w // P)
    kw, masks, pos = {}, None, None
    if inputs == "uint8-nhwc-meanstd":
        x = _image(B, C, h, w, uint8=True, channels_last=True)
        kw = dict(channels_last=True, mean=MEAN[:C], std=STD[:C])
    else:
        x = _image(B, C, h, w)
    if inputs == "masks+pos":
        masks = torch.rand(B, HW, device=DEV) > 0.5
        pos = torch.randn(1, 1 + HW, D, device=DEV)
    got = _run(x, p, backend, masks, pos, **kw)
    assert dispatch.last_backend("patch_embed") == backend
    want = _oracle(x, p, masks, pos, **kw)
    assert got.shape == want.shape == (B, 1 + R + HW, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

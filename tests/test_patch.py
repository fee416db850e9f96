"""flashdino.patch on Hugging Face and timm DINO models, against the unpatched models as oracles.

Every model is tiny and built from a config with random weights (no downloads); every comparison
runs the same model object (or a deep copy taken before patching) unpatched and patched.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import flashdino
from flashdino import dispatch, ops
from flashdino.patching import PatchError, is_patched

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from transformers import (DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel, Dinov2Backbone,  # noqa: E402
                          Dinov2Config, Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersBackbone, Dinov2WithRegistersModel)

TOL = 1e-5  # relative (to the largest magnitude) in fp32 on CPU


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _randomise(model, std=0.2):
    """Non-trivial weights everywhere (LayerNorm affines, LayerScales, biases), so that a parameter
    the patch read wrongly or skipped changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def _hf(kind: str, **over):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=32)
    common.update(over)
    if kind == "dinov3":
        model = DINOv3ViTModel(DINOv3ViTConfig(intermediate_size=128, num_register_tokens=2, **common))
    elif kind == "dinov3_backbone":
        model = DINOv3ViTBackbone(DINOv3ViTConfig(intermediate_size=128, num_register_tokens=2,
                                                  out_features=["stage1", "stage2"], **common))
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
    elif kind == "dinov2_swiglu":
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, use_swiglu_ffn=True, **common))
    elif kind == "dinov2_backbone":
        model = Dinov2Backbone(Dinov2Config(mlp_ratio=2, out_features=["stage1", "stage2"], **common))
    elif kind == "dinov2_reg":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **common))
    elif kind == "dinov2_reg_backbone":
        model = Dinov2WithRegistersBackbone(Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4,
                                                                      out_features=["stage1", "stage2"], **common))
    else:
        raise ValueError(kind)
    return _randomise(model).eval()


def _timm(name: str, **over):
    kw = dict(embed_dim=64, depth=2, num_heads=4, num_classes=0)
    kw.update(over)
    if "dinov2" in name:
        kw.setdefault("img_size", 28)
        kw.setdefault("dynamic_img_size", True)  # position embeddings interpolated to the input size
    else:
        kw.setdefault("img_size", 32)
        kw.setdefault("patch_size", 8)
    return _randomise(timm.create_model(name, pretrained=False, **kw)).eval()


def _image(model, rows: int, cols: int, batch: int = 2):
    """Pixels for a rows x cols patch grid of ``model`` (HF or timm)."""
    config = getattr(model, "config", None)
    patch = config.patch_size if config is not None else model.patch_embed.patch_size[0]
    return torch.randn(batch, 3, rows * patch, cols * patch)


class _OpCalls:
    """Counts the calls of flashdino's public ops (the patched forwards call them through ``flashdino.ops``)."""

    def __init__(self, monkeypatch):
        self.counts = {"rope_attention": 0, "residual_layernorm": 0, "final_norm": 0}
        for name in self.counts:
            real = getattr(ops, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                self.counts[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(ops, name, spy)


def _fields(out):
    """The tensors of an HF output (nested tuples flattened) or a plain tensor, by name."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    flat = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                flat[f"{key}.{i}"] = v
    return flat


def _assert_same_outputs(ref, out, tol=TOL):
    assert type(out) is type(ref)
    ref_f, out_f = _fields(ref), _fields(out)
    assert ref_f.keys() == out_f.keys() and ref_f
    for key in ref_f:
        assert out_f[key].shape == ref_f[key].shape, key
        assert _rel(out_f[key], ref_f[key]) < tol, (key, _rel(out_f[key], ref_f[key]))


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

HF_KINDS = ["dinov3", "dinov3_backbone", "dinov2", "dinov2_swiglu", "dinov2_backbone", "dinov2_reg",
            "dinov2_reg_backbone"]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_outputs_and_hidden_states_match(kind, monkeypatch):
    model = _hf(kind)
    x = torch.randn(2, 3, 40, 24)  # 5x3 patches: non-square, and not the config's 4x4 (DINOv2 interpolates)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        ref_tuple = model(x, return_dict=False)
    assert flashdino.patch(model) is model
    calls = _OpCalls(monkeypatch)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        out_tuple = model(x, return_dict=False)
    _assert_same_outputs(ref, out)
    assert len(out.hidden_states) == 3
    assert isinstance(out_tuple, tuple) and len(out_tuple) == len(ref_tuple)
    for a, b in zip(out_tuple, ref_tuple):
        if isinstance(b, torch.Tensor):
            assert _rel(a, b) < TOL
    layers = model.config.num_hidden_layers
    assert calls.counts["rope_attention"] == 2 * layers and calls.counts["residual_layernorm"] == 2 * layers
    assert calls.counts["final_norm"] >= 2


TIMM_NAMES = ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_patch14_dinov2",
              "vit_small_patch14_reg4_dinov2"]


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_outputs_match(name, monkeypatch):
    model = _timm(name)
    x = _image(model, 5, 3)  # non-square, not the default grid
    with torch.no_grad():
        ref = model.forward_features(x)
        ref_pooled = model(x)
        ref_inter = model.forward_intermediates(x, indices=[0, 1], norm=True)
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    with torch.no_grad():
        out = model.forward_features(x)
        pooled = model(x)
        inter = model.forward_intermediates(x, indices=[0, 1], norm=True)
    assert _rel(out, ref) < TOL and _rel(pooled, ref_pooled) < TOL
    assert _rel(inter[0], ref_inter[0]) < TOL
    assert all(_rel(a, b) < TOL for a, b in zip(inter[1], ref_inter[1]))
    assert calls.counts["rope_attention"] == 3 * 2 and calls.counts["residual_layernorm"] == 3 * 2
    assert calls.counts["final_norm"] >= 3


def test_dinov3_rope_uses_the_models_own_frequencies():
    """HF's and timm's fp32 periods stay theirs: a change of the model's frequency buffer changes the
    patched output exactly as it changes the unpatched one."""
    hf, tm = _hf("dinov3"), _timm("vit_small_patch16_dinov3")
    with torch.no_grad():
        hf.rope_embeddings.inv_freq.mul_(1.37)
        tm.rope.periods.mul_(0.61)
    x = _image(hf, 3, 5, 1)
    with torch.no_grad():
        refs = hf(x).last_hidden_state, tm.forward_features(x)
        flashdino.patch(hf), flashdino.patch(tm)
        outs = hf(x).last_hidden_state, tm.forward_features(x)
    assert all(_rel(o, r) < TOL for o, r in zip(outs, refs))


def test_rope_tables_for_the_original_path_are_the_libraries_own():
    """The grids rebuild exactly what the libraries' RoPE modules return (used when a call runs the
    original attention)."""
    hf = _hf("dinov3")
    x = torch.randn(1, 3, 40, 24)
    ref_cos, ref_sin = hf.rope_embeddings(x)
    flashdino.patch(hf)
    grid = hf.rope_embeddings(x)
    assert isinstance(grid, ops.RopeGrid) and (grid.height, grid.width, grid.n_prefix) == (5, 3, 3)
    cos, sin = grid.hf_tables()
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

    for dynamic in (True, False):
        tm = _timm("vit_small_patch16_dinov3", dynamic_img_size=dynamic)
        ref = tm.rope.get_embed(shape=[5, 3]) if dynamic else tm.rope.get_embed()
        flashdino.patch(tm)
        grid = tm.rope.get_embed(shape=[5, 3]) if dynamic else tm.rope.get_embed()
        assert torch.equal(grid.timm_embed(), ref)


# ---------------------------------------------------------------------------------------------
# training: gradients, stochastic depth, LoRA, gradient checkpointing
# ---------------------------------------------------------------------------------------------

def _grads(model, x, call):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = call(model, x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_tokens(m, x):
    return m(x).last_hidden_state


def _timm_tokens(m, x):
    return m.forward_features(x)


@pytest.mark.parametrize("build,call", [(lambda: _hf("dinov3"), _hf_tokens),
                                        (lambda: _timm("vit_small_patch16_dinov3"), _timm_tokens)], ids=["hf", "timm"])
def test_bf16_autocast_stays_close(build, call):
    """Under bf16 autocast (the GPU setting) the patched model keeps the unpatched one's dtypes and
    rounding (bf16 projections and attention, fp32 LayerNorm outputs and residual stream)."""
    model = build()
    x = _image(model, 3, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = call(model, x)
        flashdino.patch(model)
        out = call(model, x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # bf16 autocast itself moves these outputs by ~1e-2 from fp32; patched vs unpatched agree far closer
    assert _rel(out.float(), ref.float()) < 1e-3


@pytest.mark.parametrize("build,call", [
    # pos_embed_rescale=None: HF's default (2.0) draws RoPE augmentations in training, which run
    # HF's attention code (test_hf_gradient_checkpointing_and_training_rope_augmentation)
    (lambda: _hf("dinov3", drop_path_rate=0.3, pos_embed_rescale=None), _hf_tokens),
    (lambda: _hf("dinov2_reg", drop_path_rate=0.3), _hf_tokens),
    (lambda: _timm("vit_small_patch16_dinov3", drop_path_rate=0.3), _timm_tokens),
    (lambda: _timm("vit_small_patch14_dinov2", drop_path_rate=0.3), _timm_tokens),
], ids=["hf-dinov3", "hf-dinov2-reg", "timm-dinov3", "timm-dinov2"])
def test_gradients_of_every_parameter_match(build, call, monkeypatch):
    """Training mode with stochastic depth: the same random draws, the same loss, the same gradient
    for every parameter that gets one."""
    model = build().train()
    x = _image(model, 3, 5)
    ref_loss, ref = _grads(model, x, call)
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    loss, got = _grads(model, x, call)
    assert calls.counts["rope_attention"] == calls.counts["residual_layernorm"] == 2  # the flashdino path ran
    assert _rel(loss, ref_loss) < TOL
    assert got.keys() == ref.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # every trainable parameter gets a gradient, except the mask token (no mask in these calls)
    assert {n.rsplit(".", 1)[-1] for n in trainable - got.keys()} <= {"mask_token"}
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-4, name  # gradients: a few fp32 roundings more


@pytest.mark.parametrize("augment", [False, True])
def test_hf_gradient_checkpointing_and_training_rope_augmentation(augment, monkeypatch):
    """Gradient checkpointing re-runs the patched layers; HF's RoPE coordinate augmentation
    (training) runs HF's own attention and tables with the same random draws."""
    rope = dict(pos_embed_jitter=1.5, pos_embed_shift=0.1) if augment else dict(pos_embed_rescale=None)
    model = _hf("dinov3", **rope).train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    x = torch.randn(2, 3, 24, 40)
    ref_loss, ref = _grads(model, x, _hf_tokens)
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    loss, got = _grads(model, x, _hf_tokens)
    # two layers, each run again in the backward pass by the checkpointing
    assert calls.counts["rope_attention"] == (0 if augment else 4) and calls.counts["residual_layernorm"] == 4
    assert _rel(loss, ref_loss) < TOL
    assert all(_rel(got[n], ref[n]) < 1e-4 for n in ref)


def test_timm_gradient_checkpointing_reruns_the_patched_blocks(monkeypatch):
    model = _timm("vit_small_patch16_dinov3").train()
    model.set_grad_checkpointing(True)
    x = _image(model, 3, 2)
    ref_loss, ref = _grads(model, x, _timm_tokens)
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    loss, got = _grads(model, x, _timm_tokens)
    assert calls.counts["rope_attention"] == calls.counts["residual_layernorm"] == 4
    assert _rel(loss, ref_loss) < TOL
    assert all(_rel(got[n], ref[n]) < 1e-4 for n in ref)


def _lora_step(model, x, call, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = call(model, x)
        loss = out.square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("library,patch_after_peft", [("hf", False), ("timm", True)])
def test_peft_lora_training_step_matches(library, patch_after_peft, monkeypatch):
    peft = pytest.importorskip("peft")
    if library == "hf":
        base, targets, x = _hf("dinov3", pos_embed_rescale=None), ["q_proj", "v_proj"], torch.randn(2, 3, 24, 40)
        call = lambda m, x: m(pixel_values=x).last_hidden_state  # noqa: E731
    else:
        base, targets, x = _timm("vit_small_patch16_dinov3"), ["qkv"], torch.randn(2, 3, 24, 40)
        call = lambda m, x: m.forward_features(x)  # noqa: E731

    def lora(model):
        torch.manual_seed(3)  # the same adapter weights for both copies
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        return peft.get_peft_model(model, config)

    base.train()
    ref_losses, ref_params = _lora_step(lora(copy.deepcopy(base)), x, call)
    if patch_after_peft:
        model = flashdino.patch(lora(base))  # the PEFT wrapper holds the supported model
    else:
        model = lora(flashdino.patch(base))
    assert is_patched(model)
    calls = _OpCalls(monkeypatch)
    losses, params = _lora_step(model, x, call)
    assert calls.counts["rope_attention"] == 2 * 2  # two steps, two layers: the flashdino path ran
    assert ref_params.keys() == params.keys() and any("lora_" in n for n in params)
    assert losses == pytest.approx(ref_losses, rel=TOL)
    assert losses[1] != losses[0]  # the step changed the adapters, and the patched forward saw it
    for name in params:
        assert _rel(params[name], ref_params[name]) < 1e-4, name


# ---------------------------------------------------------------------------------------------
# weights, idempotence, unpatch
# ---------------------------------------------------------------------------------------------

def test_weights_shared_and_saved_files_identical(tmp_path):
    model = _hf("dinov3")
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    model.save_pretrained(tmp_path / "before")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.save(model.state_dict(), tmp_path / "a" / "weights.pt")  # same file name: torch.save records it
    flashdino.patch(model)
    after = model.state_dict()
    assert list(after) == list(before) and [n for n, _ in model.named_parameters()] == names
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value)  # the same storage, not a copy
    model.save_pretrained(tmp_path / "after")
    torch.save(model.state_dict(), tmp_path / "b" / "weights.pt")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    assert (tmp_path / "a" / "weights.pt").read_bytes() == (tmp_path / "b" / "weights.pt").read_bytes()

    tm = _timm("vit_small_patch14_reg4_dinov2")
    torch.save(tm.state_dict(), tmp_path / "a" / "timm.pt")
    flashdino.patch(tm)
    torch.save(tm.state_dict(), tmp_path / "b" / "timm.pt")
    assert (tmp_path / "a" / "timm.pt").read_bytes() == (tmp_path / "b" / "timm.pt").read_bytes()


def _instance_state(model):
    return {name: sorted(k for k in m.__dict__ if k in ("forward", "get_embed") or k.startswith("_flashdino_"))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("build", [lambda: _hf("dinov3"), lambda: _timm("vit_small_patch16_dinov3")],
                         ids=["hf", "timm"])
def test_patch_is_idempotent_and_unpatch_restores(build, monkeypatch):
    model = build()
    x = _image(model, 4, 6, 1)
    clean = _instance_state(model)
    with torch.no_grad():
        ref = _fields(model(x))
    flashdino.patch(model)
    state = _instance_state(model)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    flashdino.patch(model)  # again: nothing changes
    assert _instance_state(model) == state
    assert all(m.__dict__.get("forward") is forwards[n] or m.__dict__.get("forward") == forwards[n]
               for n, m in model.named_modules())
    assert flashdino.unpatch(model) is model and not is_patched(model)
    assert _instance_state(model) == clean
    calls = _OpCalls(monkeypatch)
    with torch.no_grad():
        out = _fields(model(x))
    assert sum(calls.counts.values()) == 0
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_deepcopy_of_a_patched_model_is_patched_and_independent():
    model = flashdino.patch(_hf("dinov2"))
    twin = copy.deepcopy(model)
    assert is_patched(twin)
    layer = twin.encoder.layer[0]
    assert layer.forward.__self__ is layer  # bound to the copy, not to the original
    flashdino.unpatch(twin)
    assert is_patched(model) and not is_patched(twin)


def test_instance_forward_set_before_patch_is_restored():
    model = _hf("dinov2")
    norm = model.layernorm
    custom = norm.forward  # e.g. another library's instance-level patch
    norm.forward = lambda x: custom(x) * 1.0
    mine = norm.forward
    flashdino.patch(model)
    assert norm.forward is not mine
    flashdino.unpatch(model)
    assert norm.forward is mine


# ---------------------------------------------------------------------------------------------
# calls without a flashdino op run the original code
# ---------------------------------------------------------------------------------------------

def test_hf_attention_weights_run_the_original_attention(monkeypatch):
    model = _hf("dinov3")
    model.set_attn_implementation("eager")
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        ref = model(x, output_attentions=True, output_hidden_states=True)
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 18, 18)
    _assert_same_outputs(ref, out)
    assert calls.counts["rope_attention"] == 0 and calls.counts["residual_layernorm"] == 2


def test_masks_and_attention_dropout_run_the_original_code():
    model = _hf("dinov2")
    x = torch.randn(1, 3, 32, 32)
    mask = torch.ones(1, 17, dtype=torch.long)
    mask[:, -3:] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=mask).last_hidden_state
    flashdino.patch(model)
    with torch.no_grad():
        assert _rel(model(x, attention_mask=mask).last_hidden_state, ref) < TOL

    tm = _timm("vit_small_patch16_dinov3")
    x = _image(tm, 2, 3, 1)
    n = tm.num_prefix_tokens + 6
    attn_mask = torch.zeros(n, n)
    attn_mask[:, -2:] = float("-inf")
    with torch.no_grad():
        ref = tm.forward_features(x, attn_mask=attn_mask)
    flashdino.patch(tm)
    with torch.no_grad():
        assert _rel(tm.forward_features(x, attn_mask=attn_mask), ref) < TOL

    drop = _timm("vit_small_patch14_dinov2", attn_drop_rate=0.3).train()
    x = torch.randn(2, 3, 28, 42)
    torch.manual_seed(5)
    ref = drop.forward_features(x)
    flashdino.patch(drop)
    torch.manual_seed(5)
    assert _rel(drop.forward_features(x), ref) < TOL


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

def test_unknown_models_are_refused_naming_what_is_supported():
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=16, patch_size=8))
    for model in (vit, torch.nn.Sequential(torch.nn.Linear(2, 2)),
                  timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28)):
        with pytest.raises(PatchError, match="Dinov2Model|DINOv3") as info:
            flashdino.patch(model)
        assert "\n" not in str(info.value)
        assert not is_patched(model)
    with pytest.raises(PatchError, match="nn.Module"):
        flashdino.patch("facebook/dinov2-small")


def test_a_model_failing_validation_is_left_untouched():
    """Validation of every module comes first: a mismatch in the last layer patches nothing."""
    model = _hf("dinov2")
    model.encoder.layer[-1].norm2 = torch.nn.Identity()
    with pytest.raises(PatchError, match="layer 1 norm2"):
        flashdino.patch(model)
    assert not is_patched(model)

    tm = _timm("vit_small_patch14_dinov2", qk_norm=True)
    with pytest.raises(PatchError, match="q_norm"):
        flashdino.patch(tm)
    assert not is_patched(tm)


@pytest.mark.parametrize("library,version", [("transformers", "4.56.2"), ("transformers", "6.0.0"),
                                             ("transformers", "5.24.9"), ("timm", "1.0.30"), ("timm", "2.0.0")])
def test_unsupported_library_versions_are_refused(library, version, monkeypatch):
    from flashdino.patching import hf, timm_models

    # the library module as the patch module imported it (transformers' lazy module may be re-created)
    module = hf.transformers if library == "transformers" else timm_models.timm
    model = _hf("dinov2") if library == "transformers" else _timm("vit_small_patch14_dinov2")
    monkeypatch.setattr(module, "__version__", version)
    with pytest.raises(PatchError, match=rf"supports {library} >=.*this is {library} {version}"):
        flashdino.patch(model)
    assert not is_patched(model)


def test_classification_model_holding_a_backbone_is_patched(monkeypatch):
    model = _randomise(Dinov2ForImageClassification(Dinov2Config(hidden_size=64, num_hidden_layers=2,
                                                                 num_attention_heads=4, patch_size=8, image_size=32,
                                                                 mlp_ratio=2, num_labels=3))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
    flashdino.patch(model)
    calls = _OpCalls(monkeypatch)
    with torch.no_grad():
        assert _rel(model(x).logits, ref) < TOL
    assert calls.counts["rope_attention"] == 2


# ---------------------------------------------------------------------------------------------
# torch.compile, the pipeline, the Triton path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,call", [
    (lambda: _hf("dinov3", pos_embed_rescale=None), _hf_tokens),
    (lambda: _timm("vit_small_patch16_dinov3"), _timm_tokens),
], ids=["hf-dinov3", "timm-dinov3"])
def test_torch_compile_fullgraph_forward_and_backward(build, call):
    """The patched model compiles without graph breaks; output and gradients match eager unpatched."""
    model = build().train()
    x = torch.randn(2, 3, 24, 16)
    ref_loss, ref = _grads(model, x, call)
    flashdino.patch(model)
    compiled = torch.compile(lambda m, t: call(m, t), backend="aot_eager", fullgraph=True)
    loss, got = _grads(model, x, compiled)
    assert _rel(loss, ref_loss) < TOL
    assert got.keys() == ref.keys() and all(_rel(got[n], ref[n]) < 1e-4 for n in ref)


def test_image_feature_extraction_pipeline():
    from PIL import Image
    from transformers import BitImageProcessor, pipeline

    model = _hf("dinov2_reg")
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy())
    extract = pipeline("image-feature-extraction", model=model, image_processor=processor, device="cpu")
    ref = torch.tensor(extract(image))
    flashdino.patch(model)
    out = torch.tensor(extract(image))
    assert out.shape == ref.shape == (1, 1 + 4 + 16, 64)
    assert _rel(out, ref) < TOL


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("library", ["hf", "timm"])
def test_triton_backend_path(library):
    """The patched models through the Triton kernels (the interpreter on CPU), forward and backward."""
    if "triton" not in dispatch.backends("rope_attention"):
        pytest.skip("the Triton backend did not load")
    if library == "hf":
        model = _hf("dinov3", hidden_size=64, num_attention_heads=2, num_hidden_layers=1)
        x, call = torch.randn(1, 3, 16, 24), _hf_tokens
    else:
        model = _timm("vit_small_patch16_dinov3", embed_dim=64, num_heads=2, depth=1)
        x, call = _image(model, 2, 3, 1), _timm_tokens
    ref_loss, ref = _grads(model, x, call)
    flashdino.patch(model)
    with dispatch.use("triton"):
        loss, got = _grads(model, x, call)
        for op in ("rope_attention", "residual_layernorm", "final_norm"):
            assert dispatch.last_backend(op) == "triton"
    assert _rel(loss, ref_loss) < 1e-4
    assert all(_rel(got[n], ref[n]) < 1e-3 for n in ref)


def test_whole_module_pickle_loads_as_the_unpatched_model(tmp_path):
    """torch.save(model) of a patched model loads (weights_only=False, a trusted file) as the
    library's unpatched model, which can be patched again; nothing of flashdino is left on it."""
    model = flashdino.patch(_timm("vit_small_patch16_dinov3"))
    x = _image(model, 2, 3, 1)
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not is_patched(loaded)
    with torch.no_grad():
        assert _rel(loaded.forward_features(x), ref) < TOL
        assert _rel(flashdino.patch(loaded).forward_features(x), ref) < TOL
    flashdino.unpatch(loaded)
    assert not any(k.startswith("_flashdino_") or k in ("forward", "get_embed")
                   for m in loaded.modules() for k in m.__dict__)

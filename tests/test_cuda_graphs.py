"""flashdino.cuda_graphs: the CPU pass-through (exact eager results, any shape) and, on a GPU, capture and
replay equal to eager, the fallbacks (shape / dtype change, training, autograd) and recapture after the
weights move."""

from __future__ import annotations

import pytest
import torch

import flashdino
from flashdino.cuda_graphs import CudaGraphRunner, _caches_disabled, capture, graphs_available


def _model(name="dinov3_vits16", **kw):
    return flashdino.create_model(name, depth=2, **kw).eval()


# -- CPU: a no-op wrapper ---------------------------------------------------------------------------------
def test_cpu_runner_is_exact_passthrough():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    runner = capture(model, x)
    with torch.inference_mode():
        ref = model(x)
        out = runner(x)
    assert torch.equal(out, ref)
    assert runner.stats["replays"] == 0 and runner.stats["captures"] == 0 and runner.stats["eager"] == 1
    assert runner.captured == []
    reason = runner.explain(x)
    assert reason is not None and ("CUDA" in reason or "cpu" in reason)
    assert runner.last_reason == reason


def test_cpu_shape_and_dtype_change_and_forward_features():
    model = _model("dinov2_vits14")
    runner = capture(model, torch.randn(1, 3, 56, 56), method="forward_features")
    for shape in [(1, 3, 56, 56), (3, 3, 84, 70), (1, 3, 28, 42)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model.forward_features(x)
            out = runner(x)
        assert set(out) == set(ref)
        for k, v in ref.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(out[k], v), k
            else:
                assert out[k] is v
    with torch.no_grad():
        xb = torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)
        mb = _model("dinov2_vits14").to(torch.bfloat16)
        rb = capture(mb, xb, method="forward_features")
        assert torch.equal(rb(xb)["x_norm_clstoken"], mb.forward_features(xb)["x_norm_clstoken"])
    assert runner.stats["eager"] == 3


def test_cpu_runner_with_grad_and_extra_arguments():
    model = _model()
    runner = capture(model)
    x = torch.randn(1, 3, 32, 32)
    out = runner(x)  # autograd on: eager, and the graph of autograd is kept
    assert out.requires_grad
    out.sum().backward()
    assert model.cls_token.grad is not None
    masks = torch.zeros(1, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(runner(x, masks=masks), model(x, masks=masks))


def test_runner_arguments_are_checked():
    model = _model()
    with pytest.raises(AttributeError):
        CudaGraphRunner(model, method="no_such_method")
    with pytest.raises(ValueError):
        CudaGraphRunner(model, max_graphs=-1)
    runner = CudaGraphRunner(model, max_graphs=0)
    assert runner.explain("not a tensor") == "input is not a tensor"


def test_position_cache_is_disabled_while_capturing():
    model = _model("dinov2_vits14")
    with torch.no_grad():
        model(torch.randn(1, 3, 28, 28))  # fills the interpolated-position cache
    cache = model._pos_cache
    assert len(cache) == 1
    with _caches_disabled(model):
        assert model._pos_cache is not cache
        with torch.no_grad():
            model(torch.randn(1, 3, 42, 42))
        assert len(model._pos_cache) == 0  # nothing stored while capturing
    assert model._pos_cache is cache and len(cache) == 1


def test_graphs_available_reports_why():
    if not torch.cuda.is_available():
        assert "CUDA" in graphs_available()
    assert graphs_available(torch.device("cpu")) is not None


# -- GPU: capture and replay ------------------------------------------------------------------------------
def _close(a, b):
    if isinstance(a, dict):
        for k in a:
            if isinstance(a[k], torch.Tensor):
                _close(a[k], b[k])
        return
    # The replay runs the same kernels as the eager call: expect bitwise equality; allow float noise
    # in case an autotuned kernel differs between the two.
    torch.testing.assert_close(a, b, rtol=1e-5 if a.dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name,size", [("dinov3_vits16", 224), ("dinov2_vits14", 224), ("dinov2_vits14_reg", 518)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_capture_replay_equals_eager(name, size, dtype):
    model = _model(name).cuda().to(dtype)
    x = torch.randn(2, 3, size, size, device="cuda", dtype=dtype)
    runner = capture(model, x, method="forward_features")
    assert runner.stats["captures"] == 1 and runner.explain(x) is None
    with torch.inference_mode():
        for _ in range(2):
            x2 = torch.randn_like(x)  # new contents each call: the static input is refreshed
            out = runner(x2)
            ref = model.forward_features(x2)
            _close(out, ref)
    assert runner.stats["replays"] == 2 and runner.stats["eager"] == 0


@pytest.mark.gpu
def test_gpu_shape_dtype_change_fall_back_to_eager():
    model = _model().cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    runner = capture(model, x)
    with torch.no_grad():
        _close(runner(x), model(x))
        y = torch.randn(2, 3, 160, 192, device="cuda")  # another shape: max_graphs=1 -> capture, evict
        _close(runner(y), model(y))
        assert runner.stats["captures"] == 2 and len(runner.captured) == 1
        with torch.autocast("cuda", dtype=torch.bfloat16):  # autocast is part of the signature
            _close(runner(y).float(), model(y).float())
        model.train()
        _close(runner(y), model(y))
        assert "training" in runner.last_reason
        model.eval()
    out = runner(y)  # autograd on and parameters require grad: eager
    assert out.requires_grad and "autograd" in runner.last_reason


@pytest.mark.gpu
def test_gpu_weights_in_place_and_moved():
    model = _model().cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    runner = capture(model, x, clone_outputs=False)
    with torch.no_grad():
        first = runner(x)
        again = runner(x)
        assert first.data_ptr() == again.data_ptr()  # static output buffer
        model.norm.weight.mul_(2.0)  # in place: the captured graph sees it
        _close(runner(x).clone(), model(x))
        assert runner.stats["recaptures"] == 0
        model.norm.weight.data = model.norm.weight.data.clone()  # moved: recaptured
        _close(runner(x).clone(), model(x))
        assert runner.stats["recaptures"] == 1


@pytest.mark.gpu
def test_gpu_max_graphs_keeps_several_shapes():
    model = _model().cuda()
    runner = CudaGraphRunner(model, max_graphs=2)
    xs = [torch.randn(1, 3, 224, 224, device="cuda"), torch.randn(1, 3, 256, 256, device="cuda")]
    with torch.inference_mode():
        for _ in range(2):
            for x in xs:
                _close(runner(x), model(x))
    assert runner.stats["captures"] == 2 and runner.stats["replays"] == 4 and runner.stats["eager"] == 0
    assert len(runner.captured) == 2

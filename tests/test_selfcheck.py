"""First-use self-check (flashdino.check.selfcheck), on CPU under TRITON_INTERPRET=1.

The self-check normally runs on CUDA tensors only; ``selfcheck.checking_device_type("cpu")`` (a
test-only hook) enables it for CPU tensors, where the Triton backend runs in the interpreter and
the dispatch reaches it through ``FLASHDINO_BACKEND_<OP>=triton``. A deliberately broken backend
(the real Triton kernel plus noise) must be disabled with one warning, and the user's call must
get the reference's numbers.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import flashdino.ops  # noqa: F401
from flashdino import dispatch, ops
from flashdino.check import selfcheck
from flashdino.ops.residual_layernorm import ResidualLayerNormCall
from flashdino.ops.residual_layernorm import reference as rln_reference

OP = "residual_layernorm"
pytestmark = pytest.mark.skipif("triton" not in dispatch.backends(OP), reason="Triton is not importable here")


@pytest.fixture
def cpu_selfcheck(monkeypatch, tmp_path):
    if not __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) to run Triton on CPU tensors")
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "1")
    monkeypatch.setenv("FLASHDINO_SELFCHECK_CACHE", str(tmp_path / "selfcheck.json"))
    monkeypatch.setenv(f"FLASHDINO_BACKEND_{OP.upper()}", "triton")
    with selfcheck.checking_device_type("cpu"):
        yield tmp_path / "selfcheck.json"


def _replace_triton(monkeypatch, fn):
    impls = dict(dispatch._REGISTRY[OP])
    impls["triton"] = dispatch.Impl(fn, impls["triton"].supports)
    monkeypatch.setitem(dispatch._REGISTRY, OP, impls)


def _inputs():
    x, branch = torch.randn(2, 9, 48), torch.randn(2, 9, 48)
    gamma, weight, bias = torch.rand(48), torch.randn(48), torch.randn(48)
    return x, branch, gamma, weight, bias


def _selfcheck_warnings(record):
    return [w for w in record if "failed its self-check" in str(w.message)]


def test_broken_backend_is_disabled_with_one_warning_and_outputs_are_correct(monkeypatch, cpu_selfcheck):
    real = dispatch.implementation(OP, "triton")
    calls = []

    def broken(*args):
        calls.append(1)
        x_new, normed = real(*args)
        return x_new, normed + 0.05 * torch.randn_like(normed)  # a miscompiled kernel, say

    _replace_triton(monkeypatch, broken)
    inputs = _inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = ops.residual_layernorm(*inputs, 1e-6)
        out2 = ops.residual_layernorm(*inputs, 1e-6)  # second call: no new self-check, no new warning
    ref = rln_reference.residual_layernorm(*inputs, 1e-6)
    for a, b in zip(out + out2, ref + ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert dispatch.last_backend(OP) == "torch"
    assert len(calls) == 1  # only the probe ever ran the broken kernel
    found = _selfcheck_warnings(record)
    assert len(found) == 1
    message = str(found[0].message)
    assert OP in message and "FLASHDINO_BACKEND=torch" in message and selfcheck.device_name(torch.device("cpu")) in message
    assert "max error" in message
    # the failure is cached for this machine: a new process (simulated by reset) does not re-run it
    data = json.loads(cpu_selfcheck.read_text())
    entries = data[selfcheck.fingerprint(torch.device("cpu"))]
    assert any(v.startswith("output") for v in entries.values())
    selfcheck.reset()
    calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = ops.residual_layernorm(*inputs, 1e-6)
    assert not calls and len(_selfcheck_warnings(record)) == 1  # still disabled, still one warning
    torch.testing.assert_close(again[1], ref[1], rtol=0, atol=0)


def test_exception_disables_but_is_not_cached(monkeypatch, cpu_selfcheck):
    def crashing(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _replace_triton(monkeypatch, crashing)
    inputs = _inputs()
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        out = ops.residual_layernorm(*inputs, 1e-6)
    torch.testing.assert_close(out[1], rln_reference.residual_layernorm(*inputs, 1e-6)[1], rtol=0, atol=0)
    assert dispatch.last_backend(OP) == "torch"
    assert not cpu_selfcheck.exists() or not json.loads(cpu_selfcheck.read_text())  # transient: not stored


def test_healthy_backend_passes_once_per_machine(monkeypatch, cpu_selfcheck):
    inputs = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        out = ops.residual_layernorm(*inputs, 1e-6)
    assert dispatch.last_backend(OP) == "triton"
    torch.testing.assert_close(out[1], rln_reference.residual_layernorm(*inputs, 1e-6)[1], rtol=1e-5, atol=1e-5)
    data = json.loads(cpu_selfcheck.read_text())
    assert list(data[selfcheck.fingerprint(torch.device("cpu"))].values()) == ["ok"]
    # a new process on the same machine reads the cache instead of probing
    selfcheck.reset()
    monkeypatch.setattr(selfcheck, "run_probe", lambda *a, **k: pytest.fail("the probe ran again"))
    ops.residual_layernorm(*inputs, 1e-6)
    assert dispatch.last_backend(OP) == "triton"
    # another GPU / driver / version: a different fingerprint, so the probe runs there
    selfcheck.reset()
    monkeypatch.setattr(selfcheck, "fingerprint", lambda device: "another GPU | driver 1 | versions")
    with pytest.raises(pytest.fail.Exception, match="the probe ran again"):
        ops.residual_layernorm(*inputs, 1e-6)


def test_switched_off(monkeypatch, cpu_selfcheck):
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "0")
    monkeypatch.setattr(selfcheck, "run_probe", lambda *a, **k: pytest.fail("probe ran with FLASHDINO_SELFCHECK=0"))
    call = ResidualLayerNormCall(torch.float32, torch.float32, 48)
    assert selfcheck.verify(OP, "triton", torch.device("cpu"), call) is None


def test_never_inside_compile_tracing(monkeypatch, cpu_selfcheck):
    call = ResidualLayerNormCall(torch.float32, torch.float32, 48)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(selfcheck, "run_probe", lambda *a, **k: pytest.fail("probe ran while tracing"))
    assert selfcheck.verify(OP, "triton", torch.device("cpu"), call) is None
    # a backend that already failed stays refused while tracing
    monkeypatch.setitem(selfcheck._DISABLED_OPS, (OP, "triton"), "output 1: max error 1e-01")
    assert "disabled by the self-check" in selfcheck.verify(OP, "triton", torch.device("cpu"), call)


def test_corrupt_cache_file_is_ignored(monkeypatch, cpu_selfcheck):
    cpu_selfcheck.write_text("{not json")
    out = ops.residual_layernorm(*_inputs(), 1e-6)
    assert dispatch.last_backend(OP) == "triton" and out[1].isfinite().all()
    assert json.loads(cpu_selfcheck.read_text())  # rewritten with the new result


def test_probes_exist_for_every_op_and_pass_on_the_interpreter(monkeypatch):
    """Every op with a fast backend has a probe; the real Triton backends pass their probes."""
    if not __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs the Triton interpreter")
    fast_ops = [op for op in dispatch.ops() if set(dispatch.backends(op)) - {"torch"}]
    assert set(fast_ops) <= set(selfcheck.PROBES)
    cpu = torch.device("cpu")
    seen = set()
    for op, call in selfcheck.probe_calls(cpu):
        # one small case per op keeps the interpreter fast
        if op in seen or getattr(call, "dtype", None) != torch.float32:
            continue
        if getattr(call, "head_dim", 64) != 64 or getattr(call, "dim", 384) != 384:
            continue
        seen.add(op)
        reason, err, variant = selfcheck.run_probe(op, "triton", cpu, call)
        assert reason is None and err < 1e-4, (op, variant, reason)
    assert seen == set(fast_ops)


@pytest.mark.gpu
def test_gpu_full_probe_set_passes():
    """``flashdino check`` on a real GPU: every fast backend agrees with the reference."""
    import time

    device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    rows = selfcheck.run_all(device)
    failed = [r for r in rows if r["result"].startswith("FAIL")]
    assert not failed, failed
    assert any(r["result"] == "ok" for r in rows)
    assert time.perf_counter() - start < 120  # cold Triton cache included; the target is < 60 s


@pytest.mark.gpu
def test_gpu_first_use_check_runs_once_and_passes(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "1")
    monkeypatch.setenv("FLASHDINO_SELFCHECK_CACHE", str(tmp_path / "selfcheck.json"))
    selfcheck.reset()
    x = torch.randn(2, 9, 1024, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ops.residual_layernorm(x, x, None, None, None, 1e-6)
    assert dispatch.last_backend(OP) == "triton"
    assert "ok" in json.loads((tmp_path / "selfcheck.json").read_text())[selfcheck.fingerprint(x.device)].values()

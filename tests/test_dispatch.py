"""The dispatch registry: typed calls, dispatch.use(), last_backend(), the environment switches,
backends registered lazily (loaded at the first need, never in a CPU-only process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

from flashdino import dispatch, ops
from flashdino.ops.final_norm import FinalNormCall
from flashdino.ops.residual_layernorm import ResidualLayerNormCall
from flashdino.triton_support import triton_status

from _backends import runnable

CPU = torch.device("cpu")
CALL = ResidualLayerNormCall(dtype=torch.float32, branch_dtype=torch.float32, dim=8)
needs_triton = pytest.mark.skipif("triton" not in runnable("residual_layernorm"), reason="no runnable Triton backend")


def _norm_inputs():
    x, branch = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    return x, branch, None, torch.ones(8), torch.zeros(8), 1e-6


def test_every_op_is_declared_with_a_torch_reference():
    assert set(dispatch.ops()) == {"rope_attention", "residual_layernorm", "final_norm", "patch_embed"}
    for op in dispatch.ops():
        assert "torch" in dispatch.backends(op), op


def test_misspelt_fact_is_an_error():
    with pytest.raises(TypeError, match="dimension"):
        ResidualLayerNormCall(dtype=torch.float32, branch_dtype=torch.float32, dimension=8)


def test_call_of_another_op_is_an_error():
    with pytest.raises(TypeError, match="ResidualLayerNormCall"):
        dispatch.select("residual_layernorm", FinalNormCall(torch.float32, 8, False), CPU)
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.select("layer_norm", CALL, CPU)


def test_cpu_runs_the_reference_and_records_it():
    fn, name, reason = dispatch.select("residual_layernorm", CALL, CPU)
    assert name == "torch" and "cpu" in reason
    ops.residual_layernorm(*_norm_inputs())
    assert dispatch.last_backend("residual_layernorm") == "torch"
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.last_backend("fused_norms")


@needs_triton
def test_use_forces_a_backend_for_the_block_only():
    with dispatch.use("triton"):
        ops.residual_layernorm(*_norm_inputs())
        assert dispatch.last_backend("residual_layernorm") == "triton"
        with dispatch.use("torch", "residual_layernorm"):  # the innermost block wins
            ops.residual_layernorm(*_norm_inputs())
            assert dispatch.last_backend("residual_layernorm") == "torch"
        ops.residual_layernorm(*_norm_inputs())
        assert dispatch.last_backend("residual_layernorm") == "triton"
    ops.residual_layernorm(*_norm_inputs())
    assert dispatch.last_backend("residual_layernorm") == ("triton" if torch.cuda.is_available() else "torch")


@needs_triton
def test_use_for_one_op_leaves_the_others():
    x = torch.randn(2, 5, 8)
    with dispatch.use("triton", "final_norm"):
        ops.final_norm(x, 1, None, None, 1e-6)
        ops.residual_layernorm(*_norm_inputs())
    assert dispatch.last_backend("final_norm") == "triton"
    assert dispatch.last_backend("residual_layernorm") == ("triton" if torch.cuda.is_available() else "torch")


@needs_triton
def test_use_raises_when_the_forced_backend_cannot_run_the_call():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with dispatch.use("triton"), pytest.raises(ValueError, match="forced by dispatch.use.*dtype"):
        ops.residual_layernorm(x, x, None, None, None, 1e-6)


def test_use_for_every_op_skips_ops_without_that_backend():
    # only rope_attention has a "cuda" backend; the other ops keep their default order
    if "cuda" in dispatch.backends("rope_attention"):
        pytest.skip("the CUDA backend is built here")
    with dispatch.use("cuda"):
        ops.residual_layernorm(*_norm_inputs())
        assert dispatch.last_backend("residual_layernorm") == "torch"
    with dispatch.use("cuda", "rope_attention"), pytest.raises(ValueError, match="flashdino._C"):
        ops.rope_attention(torch.randn(1, 4, 3 * 16), 1)


def test_use_rejects_unknown_names():
    with pytest.raises(ValueError, match="is not one of"):
        with dispatch.use("cudnn"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with dispatch.use("torch", "fused_norms"):
            pass


@needs_triton
def test_use_is_per_thread():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["forced"] = dispatch._forced("residual_layernorm")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with dispatch.use("triton"):
        inside.set()
        done.wait()
    t.join()
    assert seen["forced"] is None


@needs_triton
def test_env_switch_forces_and_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setenv("FLASHDINO_BACKEND_RESIDUAL_LAYERNORM", "triton")
    ops.residual_layernorm(*_norm_inputs())
    assert dispatch.last_backend("residual_layernorm") == "triton"
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot run this call"):
        ops.residual_layernorm(x, x, None, None, None, 1e-6)
    assert dispatch.last_backend("residual_layernorm") == "torch"
    monkeypatch.setenv("FLASHDINO_BACKEND_RESIDUAL_LAYERNORM", "auto")
    monkeypatch.setenv("FLASHDINO_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.residual_layernorm(*_norm_inputs())
    assert dispatch.last_backend("residual_layernorm") == "torch"


def test_env_switch_with_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FLASHDINO_BACKEND", "fast")
    with pytest.raises(ValueError, match="FLASHDINO_BACKEND='fast'"):
        ops.residual_layernorm(*_norm_inputs())


def test_env_switch_for_an_unknown_op_warns_and_never_breaks_the_import(monkeypatch):
    monkeypatch.setenv("FLASHDINO_BACKEND_PATCH_EMBED_TOKENS", "torch")  # the op's name before 0.2
    message = "FLASHDINO_BACKEND_PATCH_EMBED_TOKENS names no flashdino op.*FLASHDINO_BACKEND_PATCH_EMBED"
    monkeypatch.setattr(dispatch, "_WARNED_ENV", set())
    with pytest.warns(UserWarning, match=message):
        dispatch.check_environment()
    assert any(re.search(message, m) for m in dispatch.environment_problems())
    with warnings.catch_warnings():  # once per variable and process, not at every explain()
        warnings.simplefilter("error")
        dispatch.explain()
    # set before the process starts (the usual case): `import flashdino` and the ops still import,
    # with one warning naming the variable and the real switches, and the ops run
    env = dict(os.environ, FLASHDINO_BACKEND_PATCH_EMBED_TOKENS="torch", PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import flashdino, flashdino.ops, torch; x = torch.randn(1, 2, 8); "
            "print(flashdino.ops.residual_layernorm(x, x, None, None, None, 1e-6)[0].shape)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([1, 2, 8])" in run.stdout
    assert len(re.findall(message, run.stderr)) == 1, run.stderr


def test_explicit_backend_beats_use():
    with dispatch.use("triton"):
        ops.residual_layernorm(*_norm_inputs(), backend="torch")
    assert dispatch.last_backend("residual_layernorm") == "torch"


@needs_triton
def test_fullgraph_compile_under_use_records_nothing_while_tracing():
    x, branch, gamma, w, b, eps = _norm_inputs()
    dispatch._LAST.pop("residual_layernorm", None)
    f = torch.compile(lambda x, br: ops.residual_layernorm(x, br, gamma, w, b, eps)[1], fullgraph=True,
                      backend="eager")
    with dispatch.use("triton"):
        out = f(x, branch)
    assert dispatch.last_backend("residual_layernorm") is None  # traced, not run eagerly
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + branch, (8,), w, b, eps))


def test_define_and_register_check_their_arguments():
    with pytest.raises(TypeError, match="dataclass"):
        dispatch.define("x", dict, ("torch",), lambda device: {})
    with pytest.raises(ValueError, match="unknown backends"):
        dispatch.define("x", ResidualLayerNormCall, ("rocm", "torch"), lambda device: None)
    with pytest.raises(ValueError, match="not defined"):
        dispatch.register("not_an_op", "torch", lambda: None)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("residual_layernorm", "mps", lambda: None)


def test_explain_names_a_backend_and_reason_per_op():
    table = dispatch.explain(CPU)
    assert set(table) == set(dispatch.ops())
    for op, (name, reason) in table.items():
        assert name == "torch" and reason, op


def _python(code: str, **env) -> str:
    """stdout of ``code`` in a fresh interpreter (nothing loaded yet), without the tests'
    TRITON_INTERPRET unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**environ, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_cpu_process_never_imports_triton():
    code = ("import sys, torch, flashdino, flashdino.layers, flashdino.models\n"
            "assert 'triton' not in sys.modules, 'import'\n"
            "model = flashdino.create_model('dinov3_vits16', depth=2).eval()\n"
            "with torch.no_grad():\n"
            "    model(torch.randn(1, 3, 32, 32))\n"
            "from flashdino import dispatch\n"
            "print(sorted({dispatch.last_backend(op) for op in dispatch.ops()}), 'triton' in sys.modules)")
    assert _python(code).split() == ["['torch']", "False"]


@dataclass(frozen=True)
class DemoCall:
    n: int


@pytest.fixture
def demo_op(monkeypatch):
    """A throwaway op "demo" with a "torch" reference, in copies of the dispatch tables."""
    for table in ("_OPS", "_REGISTRY", "_VARIANTS", "_PENDING", "_UNAVAILABLE"):
        monkeypatch.setattr(dispatch, table, dict(getattr(dispatch, table)))
    monkeypatch.setattr(dispatch, "_GPU_RULES", {"device_rule": None, "first_use_check": None})
    monkeypatch.setattr(dispatch, "_TUNER", [None])
    dispatch.define("demo", DemoCall, ("triton", "torch"), lambda device: DemoCall(8))
    dispatch.register("demo", "torch", lambda x: x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return "demo"


def _fast(x):
    return x + 1


def test_a_lazy_backend_loads_at_the_first_call_that_can_use_it_and_once(demo_op):
    loads = []

    def load():
        loads.append(threading.get_ident())
        time.sleep(0.05)  # long enough for the other threads to ask while the load is under way
        dispatch.register(demo_op, "triton", _fast)
        dispatch.register_variant(demo_op, "triton", "wide", _fast)

    dispatch.register_lazy(demo_op, "triton", load)
    assert dispatch.select(demo_op, DemoCall(8), CPU)[1] == "torch"
    with pytest.raises(ValueError, match="need CUDA"):
        dispatch.select(demo_op, DemoCall(8), CPU, backend="triton")
    assert loads == []  # CPU tensors cannot run the kernels: nothing to import for them

    found = []
    threads = [threading.Thread(target=lambda: found.append(dispatch.implementation(demo_op, "triton")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [_fast] * 4 and len(loads) == 1
    assert dispatch.select(demo_op, DemoCall(8), torch.device("cuda"))[1] == "triton"
    assert dispatch.backends(demo_op) == ("triton", "torch")
    assert dispatch.variants(demo_op, "triton") == ("", "wide")
    assert len(loads) == 1


@pytest.mark.parametrize("need", ["cuda call", "interpreter", "use", "backends", "unavailable", "explain"])
def test_each_need_loads_a_lazy_backend(demo_op, monkeypatch, need):
    dispatch.register_lazy(demo_op, "triton", lambda: dispatch.register(demo_op, "triton", _fast))
    if need == "cuda call":
        dispatch.select(demo_op, DemoCall(8), torch.device("cuda"))
    elif need == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        dispatch.select(demo_op, DemoCall(8), CPU, backend="triton")
    elif need == "use":  # a block for every op applies to the ops that have the backend
        with dispatch.use("triton"), pytest.raises(ValueError, match="need CUDA"):
            dispatch.select(demo_op, DemoCall(8), CPU)
    elif need == "backends":
        dispatch.backends(demo_op)
    else:
        getattr(dispatch, need)()
    assert "triton" in dispatch._REGISTRY[demo_op] and not dispatch._PENDING[demo_op]


def test_a_first_load_inside_a_fullgraph_trace(demo_op, monkeypatch):
    # The loader runs as plain Python beside the trace (a lock and imports cannot be traced), and
    # the trace reads the registry it filled.
    loads = []

    def load():
        loads.append(1)
        dispatch.register(demo_op, "triton", _fast)

    dispatch.register_lazy(demo_op, "triton", load)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run(x):
        fn, _, _ = dispatch.select(demo_op, DemoCall(x.shape[0]), x.device, backend="triton")
        return fn(x)

    out = torch.compile(run, fullgraph=True, backend="eager")(torch.zeros(3))
    torch.testing.assert_close(out, torch.ones(3))
    assert loads == [1]


def test_a_loader_that_raises_is_an_unavailable_backend_and_the_reference_runs(demo_op, monkeypatch):
    loads = []

    def broken():
        loads.append(1)
        dispatch.register(demo_op, "triton", _fast)  # half-way, then the import fails
        raise ImportError("triton is not importable (ImportError: libcuda.so.1)")

    dispatch.register_lazy(demo_op, "triton", broken)
    monkeypatch.setenv("FLASHDINO_BACKEND_DEMO", "triton")
    with pytest.warns(UserWarning, match="Triton backend did not load: triton is not importable"):
        fn, name, _ = dispatch.select(demo_op, DemoCall(8), torch.device("cuda"))
    assert name == "torch" and fn(1) == 1
    assert dispatch.backends(demo_op) == ("torch",) and dispatch.variants(demo_op, "triton") == ()
    assert dispatch.unavailable()["triton"].startswith("Triton backend did not load: triton is not importable")
    with pytest.raises(ValueError, match="Triton backend did not load"):
        dispatch.select(demo_op, DemoCall(8), CPU, backend="triton")
    assert len(loads) == 1


def test_register_lazy_checks_its_arguments(demo_op):
    with pytest.raises(ValueError, match="not defined"):
        dispatch.register_lazy("not_an_op", "triton", lambda: None)
    with pytest.raises(ValueError, match="not an optional backend"):
        dispatch.register_lazy(demo_op, "torch", lambda: None)


def test_a_loader_that_registers_nothing_is_reported(demo_op):
    dispatch.register_lazy(demo_op, "triton", lambda: None)
    assert dispatch.backends(demo_op) == ("torch",)
    assert "registered no triton implementation of demo" in dispatch.unavailable()["triton"]


@pytest.mark.skipif(not triton_status()[0], reason="Triton is not usable here")
def test_info_reporting_lists_triton_when_it_imports():
    # A fresh process, as `flashdino info` runs: the reports load the pending backends themselves.
    # Importing a backend module directly (the audit, the benchmarks) registers nothing twice.
    code = ("import sys, torch, flashdino.ops\n"
            "from flashdino import dispatch\n"
            "from flashdino.ops.rope_attention import triton as kernels\n"
            "assert 'triton' not in dispatch._REGISTRY['rope_attention']\n"
            "print(dispatch.unavailable().get('triton'))\n"
            "print(sorted(op for op in dispatch.ops() if 'triton' in dispatch.backends(op)))\n"
            "print(dispatch.implementation('rope_attention', 'triton') is kernels.rope_attention)\n"
            "print(sorted(dispatch.explain(torch.device('cpu')).items())[0])")
    lines = _python(code).splitlines()
    assert lines[0] == "None"
    assert lines[1] == str(sorted(dispatch.ops()))
    assert lines[2] == "True"
    assert lines[3] == "('final_norm', ('torch', 'tensors on cpu'))"


def test_info_reporting_names_why_triton_did_not_load(tmp_path):
    broken = tmp_path / "triton"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('a broken Triton install')\n")
    code = ("import flashdino.ops\n"
            "from flashdino import dispatch, info\n"
            "facts = info.collect()\n"
            "print(facts['unavailable_backends']['triton'])\n"
            "print(sorted({name for name, _ in dispatch.explain().values()}), dispatch.backends('final_norm'))")
    lines = _python(code, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path])).splitlines()
    assert lines[0].startswith("Triton backend did not load: ") and "a broken Triton install" in lines[0]
    assert lines[1] == "['torch'] ('torch',)"

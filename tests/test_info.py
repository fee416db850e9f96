"""`python -m flashdino.info` runs on any install and explains the backend choice per op."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashdino
from flashdino import dispatch, info, ops  # noqa: F401  (importing ops registers every op in dispatch)

PYTHON_DIR = str(Path(flashdino.__file__).resolve().parents[1])


def _run(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "flashdino.info", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def report():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def facts():
    proc = _run("--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_versions_are_reported(report, facts):
    assert f"flashdino {flashdino.__version__}" in report
    assert torch.__version__ in report
    assert facts["torch"] == torch.__version__
    assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
    assert isinstance(facts["native"]["built"], bool)
    assert isinstance(facts["native"]["has_cuda"], bool)


def test_every_op_names_its_backend_and_reason(report, facts):
    ops = facts["ops"]
    assert "rope_attention" in ops
    assert set(ops) == set(dispatch.explain())
    for op, row in ops.items():
        assert row["backend"] in dispatch.BACKENDS, (op, row)
        assert row["reason"], op
        line = next(line for line in report.splitlines() if line.strip().startswith(op + " "))
        assert row["backend"] in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback report")
def test_cpu_fallback_reason(facts, report):
    for op, row in facts["ops"].items():
        assert row["backend"] == "torch", (op, row)
        assert "cpu" in row["reason"], (op, row)
    assert "gpu       none" in report


def test_missing_cuda_backend_is_explained(facts):
    native = facts["native"]
    if native["has_cuda"]:
        assert native["cuda_architectures"], native
        assert "cuda" not in facts["unavailable_backends"]
    else:
        # Without CUDA kernels the cuda backend must say why it is missing.
        assert "cuda" in facts["unavailable_backends"]
        assert "flashdino._C" in facts["unavailable_backends"]["cuda"]


def test_collect_matches_cli(facts):
    local = info.collect()
    assert local["ops"] == facts["ops"]
    assert local["native"]["built"] == facts["native"]["built"]


@pytest.mark.parametrize("arch,cap,ok", [
    ("80", "8.0", True), ("80", "8.6", True), ("86", "8.0", False), ("86", "8.9", True),
    ("90a", "9.0", True), ("90a", "10.0", False), ("90", "9.0", True), ("100", "12.0", False),
    ("120", "12.0", True), ("120", "10.0", False),
])
def test_arch_compatibility(arch, cap, ok):
    assert info.arch_runs_on(arch, cap) is ok


def test_environment_switches_are_reported(monkeypatch):
    monkeypatch.setenv("FLASHDINO_BACKEND_FINAL_NORM", "torch")
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    facts = info.collect()
    assert facts["environment"]["FLASHDINO_BACKEND_FINAL_NORM"] == "torch"
    assert "UNRELATED_VARIABLE" not in facts["environment"]
    assert "env       FLASHDINO_BACKEND_FINAL_NORM=torch" in info.format_report(facts)
    assert facts["ops"]["final_norm"]["backend"] == "torch"


def test_triton_is_listed_once(facts, report):
    assert sum(line.lower().startswith("triton") for line in report.splitlines()) == 1, report
    # without a usable Triton, its one line says why (not also a "backend triton unavailable" line)
    broken = json.loads(json.dumps(facts))
    broken.update(triton=None, triton_backend={"available": False, "status": "triton is not importable (No module)"})
    broken["unavailable_backends"]["triton"] = "Triton backend did not load: triton is not importable (No module)"
    lines = [line for line in info.format_report(broken).splitlines()
             if line.lower().startswith(("triton", "backend   triton"))]
    assert lines == ["triton    not installed; the Triton backend is unavailable: triton is not importable (No module)"]

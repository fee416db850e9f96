"""Which CUDA architectures `pip install .` compiles (cmake/FlashdinoCudaArchs.cmake).

The policy runs as a CMake script, with nvidia-smi replaced by a small shell script, so these
tests need neither a CUDA compiler nor a GPU; they skip without a `cmake` executable.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "cmake" / "FlashdinoCudaArchs.cmake"
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None or not SCRIPT.is_file(), reason="needs cmake and a source checkout")

SHIPPED_NEW = ["80-real", "86-real", "89-real", "90a-real", "100-real", "120"]
SUPPORTED_13 = "75;80;86;87;89;90;100;103;110;120;121"


def _fake_smi(tmp_path, caps_output=None, lists_gpu=True, rc=0):
    """An nvidia-smi stand-in: prints `caps_output` for --query-gpu, a GPU line for -L."""
    body = ["#!/bin/sh"]
    if caps_output is None:  # a driver older than the compute_cap field
        body.append('[ "$1" = -L ] && { %s; }' % ('echo "GPU 0: Tesla V100 (UUID: GPU-0)"; exit 0' if lists_gpu else "exit 6"))
        body.append('echo "Field \\"compute_cap\\" is not a valid field to query." >&2; exit 2')
    else:
        body.append(f"printf '{caps_output}'; exit {rc}")
    path = tmp_path / "nvidia-smi"
    path.write_text("\n".join(body) + "\n")
    path.chmod(0o755)
    return path


def _select(**defs):
    cmd = [CMAKE] + [f"-D{k}={v}" for k, v in defs.items()] + ["-P", str(SCRIPT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stderr.splitlines() if "=" in line)
    archs = out.get("archs")
    return out["want_cuda"] == "ON", (archs.split(";") if archs else []), out.get("note", out["want_note"])


def test_auto_without_a_gpu_builds_no_kernels(tmp_path):
    assert _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="none")[0] is False
    missing = tmp_path / "no-nvidia-smi"
    want, _, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_NVIDIA_SMI=missing)
    assert want is False
    # nvidia-smi present but no driver / no GPU: it fails for both queries.
    smi = _fake_smi(tmp_path, "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver\\n", rc=9)
    want, _, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_NVIDIA_SMI=smi)
    assert want is False and "no GPU" in note


def test_auto_with_a_gpu_builds_its_architecture_only(tmp_path):
    smi = _fake_smi(tmp_path, "8.6\\n8.6\\n")
    want, archs, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_NVIDIA_SMI=smi, CUDA_VERSION="13.0",
                                CUDA_SUPPORTED=SUPPORTED_13)
    assert want and archs == ["86-real"] and "8.6" in note
    want, archs, _ = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="9.0;12.0", CUDA_VERSION="13.0",
                             CUDA_SUPPORTED=SUPPORTED_13)
    assert archs == ["90-real", "120-real"]


def test_auto_with_a_gpu_of_unknown_capability_builds_everything(tmp_path):
    smi = _fake_smi(tmp_path, caps_output=None, lists_gpu=True)
    want, archs, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_NVIDIA_SMI=smi, CUDA_VERSION="13.0")
    assert want and archs == SHIPPED_NEW and "not" in note
    smi = _fake_smi(tmp_path, caps_output=None, lists_gpu=False)
    assert _select(FLASHDINO_CUDA="AUTO", FLASHDINO_NVIDIA_SMI=smi)[0] is False


def test_on_builds_every_shipped_architecture_whatever_the_gpu(tmp_path):
    smi = _fake_smi(tmp_path, "8.6\\n")
    assert _select(FLASHDINO_CUDA="ON", FLASHDINO_NVIDIA_SMI=smi, CUDA_VERSION="13.0")[1] == SHIPPED_NEW
    old = _select(FLASHDINO_CUDA="ON", FLASHDINO_GPU_CAPS="none", CUDA_VERSION="12.4")[1]
    assert old == ["80-real", "86-real", "89-real", "90a-real", "90-virtual"]  # PTX for newer GPUs


def test_explicit_architectures_override_everything(tmp_path):
    for mode in ("AUTO", "ON"):
        want, archs, _ = _select(FLASHDINO_CUDA=mode, FLASHDINO_GPU_CAPS="8.6", FLASHDINO_CUDA_ARCHITECTURES="90a, 80",
                                 CUDA_VERSION="13.0")
        assert want and archs == ["90a", "80"]
    # Without a GPU, an explicit list still builds (how CI compiles the CUDA sources).
    want, archs, _ = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="none", FLASHDINO_CUDA_ARCHITECTURES="90a")
    assert want and archs == ["90a"]
    assert _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="none", FLASHDINO_CUDA_ARCHITECTURES="all",
                   CUDA_VERSION="13.0")[1] == SHIPPED_NEW
    assert _select(FLASHDINO_CUDA="OFF", FLASHDINO_GPU_CAPS="9.0")[0] is False


def test_gpus_the_kernels_or_the_compiler_cannot_serve():
    # Older than sm_80: nothing to build, and the note says why.
    want, archs, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="7.5", CUDA_VERSION="13.0",
                                CUDA_SUPPORTED=SUPPORTED_13)
    assert archs == [] and "sm_75" in note and "sm_80" in note
    # Newer than the toolkit: PTX of the newest architecture it knows, for the driver to JIT-compile.
    want, archs, note = _select(FLASHDINO_CUDA="AUTO", FLASHDINO_GPU_CAPS="12.0", CUDA_VERSION="12.4",
                                CUDA_SUPPORTED="75;80;86;87;89;90")
    assert archs == ["90-virtual"] and "sm_120" in note and "PTX" in note

"""``python -m flashdino.info``: what this install can run, and which backend each op will use.

``collect()`` returns the facts as a dict (JSON-serialisable); ``main()`` prints them (``--json``
for the raw dict). It never raises on a partial install: a missing piece is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

from . import __version__

# torch, the dispatch table and the native module are imported by the functions that report on
# them, so that `flashdino info --help` answers at once.


def _gpu_facts() -> dict:
    import torch

    facts: dict = {"available": False}
    try:
        if not torch.cuda.is_available():
            return facts
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        facts.update(available=True, count=torch.cuda.device_count(), index=index,
                     name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}")
    except Exception as exc:  # pragma: no cover - broken driver
        facts["error"] = f"{exc.__class__.__name__}: {exc}"
    return facts


def arch_runs_on(arch: str, capability: str) -> bool:
    """Whether SASS built for ``arch`` (e.g. '86', '90a') runs on a GPU of ``capability`` ('8.9')."""
    major, minor = (int(x) for x in capability.split("."))
    specific = arch.endswith(("a", "f"))
    digits = arch.rstrip("af")
    a_major, a_minor = int(digits[:-1]), int(digits[-1])
    if specific:
        return (a_major, a_minor) == (major, minor)
    return a_major == major and a_minor <= minor


def _native_facts(gpu: dict) -> dict:
    from . import _native

    module, why = _native.native_status()
    facts = {"built": module is not None, "status": why, "has_cuda": False, "cuda_architectures": [],
             "cuda_version": None}
    if module is None:
        return facts
    facts["version"] = getattr(module, "version", lambda: None)()
    facts["has_cuda"] = bool(getattr(module, "has_cuda", lambda: False)())
    facts["cuda_architectures"] = _native.cuda_architectures(module)
    facts["cuda_version"] = getattr(module, "cuda_version", lambda: None)()
    facts["path"] = getattr(module, "__file__", None)
    if facts["has_cuda"] and gpu.get("capability"):
        facts["kernels_for_this_gpu"] = any(arch_runs_on(a, gpu["capability"]) for a in facts["cuda_architectures"])
    return facts


def _environment() -> dict:
    """The flashdino switches set in the environment (the list is in ARCHITECTURE.md)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLASHDINO_") or k == "TRITON_INTERPRET"}


def collect() -> dict:
    import torch

    from . import dispatch, ops  # noqa: F401  (importing ops registers every op and its backends)
    from .triton_support import triton_status

    """Versions, native / Triton availability, GPU, the environment switches set, and the backend +
    reason per op."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception:
        triton_version = None
    gpu = _gpu_facts()
    triton_ok, triton_why = triton_status()
    ops = {op: {"backend": name, "reason": reason} for op, (name, reason) in dispatch.explain().items()}
    from .check import tune
    return {
        "flashdino": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "native": _native_facts(gpu),
        "triton_backend": {"available": triton_ok, "status": triton_why},
        "unavailable_backends": dispatch.unavailable(),
        "environment": _environment(),
        "environment_problems": dispatch.environment_problems(),
        "ops": ops,
        "tuning": {"enabled": tune.enabled(), "store": str(tune.store_path()), "choices": tune.stored_choices()},
    }


def _triton_line(info: dict) -> str:
    """Triton once: its version, and whether flashdino's Triton backend can use it (and why not)."""
    backend = info["triton_backend"]
    if backend["available"]:
        return f"triton    {backend['status'].removeprefix('triton ')} (the Triton backend is available)"
    version = info["triton"] or "not installed"
    return f"triton    {version}; the Triton backend is unavailable: {backend['status']}"


def format_report(info: dict) -> str:
    gpu = info["gpu"]
    native = info["native"]
    lines = [
        f"flashdino {info['flashdino']}",
        f"python    {info['python']} ({info['platform']})",
        f"torch     {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        _triton_line(info),
    ]
    if gpu.get("available"):
        lines.append(f"gpu       {gpu['name']} (sm {gpu['capability']}, {gpu['count']} device(s))")
    else:
        lines.append(f"gpu       none{' (' + gpu['error'] + ')' if 'error' in gpu else ''}")
    lines.append(f"native    {native['status']}")
    if native.get("has_cuda"):
        archs = ", ".join(native["cuda_architectures"]) or "-"
        lines.append(f"          built with CUDA {native['cuda_version']} for {archs}")
        if "kernels_for_this_gpu" in native and not native["kernels_for_this_gpu"]:
            lines.append(f"          WARNING: no kernel in flashdino._C runs on sm {gpu['capability']} "
                         "(rebuild with FLASHDINO_CUDA_ARCHITECTURES)")
    for backend, why in sorted(info["unavailable_backends"].items()):
        if backend != "triton" or info["triton_backend"]["available"]:  # else the triton line says why
            lines.append(f"backend   {backend} unavailable: {why}")
    for name, value in info["environment"].items():
        lines.append(f"env       {name}={value}")
    for problem in info.get("environment_problems", []):
        lines.append(f"WARNING   {problem}")
    lines.append("ops (backend that runs a typical call on this machine, and why):")
    for op, row in sorted(info["ops"].items()):
        lines.append(f"  {op:<22} {row['backend']:<7} {row['reason']}")
    tuning = info.get("tuning")
    if tuning is not None:
        state = "on" if tuning["enabled"] else "off (FLASHDINO_TUNE=0: the fixed order)"
        lines.append(f"tuning    {state}; {len(tuning['choices'])} stored choice(s) in {tuning['store']}")
        for gpu in dict.fromkeys(c["gpu"] for c in tuning["choices"]):
            lines.append(f"  on {gpu}:")
            for c in (c for c in tuning["choices"] if c["gpu"] == gpu):
                ratio = (f" (PyTorch {c['pytorch_ms']:.3f} ms, {c['pytorch_ms'] / c['ms']:.2f}x)"
                         if c["ms"] and c["pytorch_ms"] else "")
                ms = f" {c['ms']:.3f} ms" if c["ms"] else ""
                lines.append(f"    {c['op']:<16} {c['bucket']}: {c['choice']}{ms}{ratio}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, prog: str = "python -m flashdino.info") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The measurement ``optimize(runtime="auto")`` chooses from: runtimes ordered by measured speed.

Source: ``benchmarks/bench_cpu_runtimes.py`` -> ``benchmarks/results/cpu_runtimes.json``, case
``vitb16@224xb1`` (float32, one process, calls interleaved, median of 5 rounds), the run with the
steadiest per-round times (1-minute load average 2.0 -> 1.6 on a machine shared with other jobs). The ViT-S/16
batch-8 runs, noisier, give the same first choice (OpenVINO, then ONNX Runtime ~ oneDNN eager).
Re-run the benchmark on new hardware and update this table from its output; "auto" takes the
first runtime of the list that is installed. Only runtimes whose numbers match flashdino eager to
float rounding (<= 1e-5 relative) are listed; reduced precision is never chosen automatically.
"""

from __future__ import annotations

# speed relative to flashdino eager (higher is faster)
CPU_SPEEDUP = {
    "openvino": 2.48,  # optimize(runtime="openvino"); OpenVINO direct on a static export: 2.47
    "onednn": 2.20,
    "onnxruntime": 2.00,
    "inductor": 1.07,  # freezing packs fp32 weights for MKL's GEMM (slow on this AMD CPU), not oneDNN's
    "eager": 1.0,
}
MEASURED_ON = "AMD EPYC, 2 cores, AVX-512 (avx512_bf16, no AMX); torch 2.14.1, onnxruntime 1.32.0, openvino 2026.4.1"
MEASURED_DATE = "2026-12-02"


def ranked() -> list[str]:
    return sorted(CPU_SPEEDUP, key=CPU_SPEEDUP.get, reverse=True)

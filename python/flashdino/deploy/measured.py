"""The measurement ``optimize(runtime="auto")`` chooses from: runtimes ordered by measured speed.

Source: ``benchmarks/bench_cpu_runtimes.py`` -> ``benchmarks/results/cpu_runtimes.json``
(ViT-S/16 at 224, batch 8, float32, one process, calls interleaved, median). Re-run the benchmark
on new hardware and update this table from its output; "auto" takes the first runtime of the
list that is installed. Only runtimes whose numbers match flashdino eager to float rounding
(<= 1e-5 relative) are listed; reduced precision is never chosen automatically.
"""

from __future__ import annotations

# speed relative to flashdino eager (higher is faster), ViT-S/16 @ 224, batch 8, fp32, median of 7
# rounds on a shared machine. OpenVINO > ONNX Runtime > the PyTorch runtimes held in every run; the
# order of "inductor" and "onednn" changed between runs (within the noise of the loaded machine).
CPU_SPEEDUP = {
    "openvino": 5.49,  # optimize(runtime="openvino"); OpenVINO direct on a static export: 5.59
    "onnxruntime": 4.64,
    "inductor": 1.69,  # freezing packs fp32 weights for MKL's GEMM (slow on this AMD CPU), not oneDNN's
    "onednn": 1.40,
    "eager": 1.0,
}
MEASURED_ON = "AMD EPYC, 2 cores, AVX-512 (avx512_bf16, no AMX); torch 2.14.1, onnxruntime 1.32.0, openvino 2026.4.1"
MEASURED_DATE = "2026-12-02"


def ranked() -> list[str]:
    return sorted(CPU_SPEEDUP, key=CPU_SPEEDUP.get, reverse=True)

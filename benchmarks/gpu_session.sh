#!/usr/bin/env bash
# One GPU lease in one command: build, check every kernel on the GPU (correctness first), then
# measure. Results and logs go to $OUT (the device tool's output folder; default
# benchmarks/results/gpu-<date>) as at most 8 files, so they can be fetched and committed under
# benchmarks/results/. Usage on the GPU machine, from the repository root:
#     bash benchmarks/gpu_session.sh            # everything (about 25 minutes on an H100)
#     STAGES="build tests" bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
STAGES=${STAGES:-"build tests kernels e2e aggregator"}
mkdir -p "$OUT" "$OUT/logs"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/logs/session.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
    log "build (editable, no isolation: the GPU machine has no network)"
    FLASHDINO_CUDA=ON FLASHDINO_CUDA_ARCHITECTURES=${FLASHDINO_CUDA_ARCHITECTURES:-90a} \
        pip install --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1 || log "BUILD FAILED"
    python -m flashdino.info > "$OUT/logs/info.txt" 2>&1
    nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1
fi
if has tests; then
    log "GPU tests (correctness of every kernel against the PyTorch reference)"
    timeout 900 python -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/logs/gpu_tests.log" 2>&1
    log "gpu tests exit $?"
    timeout 600 python -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_aggregator.py \
        > "$OUT/logs/cpu_suite_on_gpu_machine.log" 2>&1
    log "model tests exit $?"
fi
if has kernels; then
    log "kernel benchmarks (pytest-benchmark)"
    timeout 1200 python -m pytest -q -p no:cacheprovider benchmarks --benchmark-enable \
        --benchmark-json="$OUT/kernels.json" > "$OUT/logs/kernels.log" 2>&1
    log "kernel benchmarks exit $?"
fi
if has e2e; then
    log "end-to-end targets"
    timeout 1500 python benchmarks/e2e.py --targets --out-dir "$OUT" --name e2e_targets \
        > "$OUT/logs/e2e.log" 2>&1
    log "e2e exit $?"
fi
if has aggregator; then
    log "VGGT aggregator"
    timeout 900 python benchmarks/bench_aggregator.py --out "$OUT" > "$OUT/logs/aggregator.log" 2>&1
    log "aggregator exit $?"
fi
log "packing logs"
# The device tool returns at most 8 files: pack the logs into one archive.
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "done: $(ls "$OUT" | tr '\n' ' ')"

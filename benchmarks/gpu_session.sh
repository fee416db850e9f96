#!/usr/bin/env bash
# flashdino on a GPU in stages, each one command that fits a 10-minute slot on an H100 / H200 with
# torch >= 2.4, triton >= 3.2, nvcc, transformers and timm preinstalled and no network.
#
#     bash benchmarks/gpu_session.sh smoke|tests|kernels|e2e|aggregator|all
#
# stage       hard limit  expected  what
# smoke       6 min       ~5 min    build _C for sm_90a only; `flashdino check` when the command
#                                   exists; the GPU tests of the default paths; one end-to-end row:
#                                   ViT-L/16 @ 512, batch 64, bf16: flashdino vs HF eager vs
#                                   flashdino's PyTorch (SDPA) path; `flashdino check --tune`: every
#                                   tuning candidate's time per attention bucket and the chosen one's
#                                   ratio to PyTorch's path (log + tune_smoke.json)
# tests       8 min       ~6 min    every GPU test (pytest -m gpu), then the model tests on the GPU machine
# kernels     8 min       ~7 min    the pytest-benchmark kernel suites, one JSON per suite
# e2e         8 min       ~7 min    the end-to-end target cases: ViT-L/16 512 b64, ViT-B/16 latency and
#                                   training, ViT-S/16 224 b256, ViT-7B/16 512 b8
# aggregator  8 min       ~6 min    the VGGT-1B aggregator, S = 1, 10, 50, then S = 100
# all         the five in order (~30 min: more than one slot)
#
# Every stage other than smoke reuses the build when flashdino._C imports, else builds first
# (about 2 minutes of its budget). Each step runs under `timeout`, with what is left of the stage's
# budget, so a stage never overruns: a step that is cut short is logged as such and the stage goes
# on. Results go to $OUT (default benchmarks/results/gpu_<date>): a log per stage and a few
# JSON / markdown files, ready to be committed under benchmarks/results/.
#
# No network: wheels that are not on the machine must be carried, and WHEELS pointed at their
# folder (pip installs every *.whl there with --no-index before the build):
# - the build (`pip install --no-build-isolation --no-deps -e .`): scikit-build-core >= 0.10 (with
#   packaging, pathspec), pybind11 >= 2.12, cmake >= 3.24, ninja; without them the session runs
#   the Triton and PyTorch paths from the source tree (no _C) and says so in the log;
# - the tests: pytest; the kernels stage: pytest-benchmark (with py-cpuinfo). Without
#   pytest-benchmark the tests still run (its options are dropped) and the kernels stage is skipped.
set -uo pipefail

STAGE=${1:-}
case "$STAGE" in
    smoke|tests|kernels|e2e|aggregator|all) ;;
    *) echo "usage: bash benchmarks/gpu_session.sh smoke|tests|kernels|e2e|aggregator|all" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d)}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
PY=${PYTHON:-python}
ARCH=${FLASHDINO_CUDA_ARCHITECTURES:-90a}
export PYTHONUNBUFFERED=1
LOG=/dev/null
DEADLINE=0

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS CMD...: runs CMD under the smaller of MAX_SECONDS and what is left of the
# stage (less 10 s to finish the log); skips it when under 20 s are left.
step() {
    local name=$1 max=$2 left
    shift 2
    left=$((DEADLINE - SECONDS - 10))
    ((left < max)) && max=$left
    if ((max < 20)); then
        log "SKIPPED $name: the stage's time is used up"
        return 0
    fi
    log "$name (at most ${max}s): $*"
    timeout -k 10 "$max" "$@" >> "$LOG" 2>&1
    local rc=$?
    case $rc in
        0) log "$name: ok" ;;
        124|137) log "$name: CUT SHORT after ${max}s" ;;
        *) log "$name: exit $rc" ;;
    esac
    return 0
}

build() {
    if has flashdino._C; then
        log "flashdino._C already builds and imports: reusing it"
        return
    fi
    if [[ -n "${WHEELS:-}" ]]; then
        step "carried wheels from $WHEELS" 60 "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
    fi
    if ! has scikit_build_core || ! has pybind11; then
        log "BUILD SKIPPED: scikit-build-core / pybind11 are not installed (carry their wheels, set WHEELS)"
    else
        export FLASHDINO_CUDA=ON FLASHDINO_CUDA_ARCHITECTURES=$ARCH
        step "build _C for sm_$ARCH" 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    fi
    if ! has flashdino; then
        log "flashdino is not installed: using the source tree (Triton and PyTorch paths, no _C)"
        export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
    fi
    timeout 60 "$PY" -m flashdino info >> "$LOG" 2>&1
    set_pytest
}

begin() {  # begin STAGE BUDGET_SECONDS
    LOG="$OUT/$1.log"
    DEADLINE=$((SECONDS + $2))
    log "== stage $1 (budget $2 s), output in $OUT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
        >> "$LOG" 2>&1
}

has() { "$PY" -c "import $1" > /dev/null 2>&1; }

set_pytest() {  # PYTEST: the project's pytest settings, less pytest-benchmark's options when it is absent
    PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
    has pytest_benchmark || PYTEST+=(-o "addopts=-ra")
}

bench() {  # bench NAME MAX_SECONDS HARNESS_ARGS...: one end-to-end table as $OUT/NAME.{json,md}
    local name=$1 max=$2
    shift 2
    step "$name" "$max" "$PY" -m flashdino.bench --device cuda --out-dir "$OUT" --name "$name" "$@"
}

# The GPU tests of the default paths: not torch.compile, opcheck or the opt-in K-rotation variants.
DEFAULT_PATHS="not torch_compile and not opcheck and not k_rotation"

stage_smoke() {
    begin smoke 360
    build
    if "$PY" -m flashdino --help 2>/dev/null | grep -qw check; then
        step "flashdino check" 45 "$PY" -m flashdino check
    else
        log "SKIPPED flashdino check: this checkout has no 'check' command yet"
    fi
    # On-device tuning first, so that the tests and the end-to-end row run the tuned choices (stored
    # in the self-check's cache folder, read back by every later process on this GPU).
    if "$PY" -m flashdino check --help 2>/dev/null | grep -q -- --tune; then
        step "flashdino check --tune" 75 "$PY" -m flashdino check --tune --json "$OUT/tune_smoke.json"
    else
        log "SKIPPED flashdino check --tune: this checkout has no on-device tuning yet"
    fi
    step "GPU tests, default paths" 60 "${PYTEST[@]}" -m "gpu and not slow" \
        -k "$DEFAULT_PATHS" --junitxml="$OUT/smoke_tests.xml" tests
    bench smoke_e2e 120 --models vitl16 --res 512 --batch 64 --dtypes bf16 --modes inference \
        --peers flashdino,flashdino-torch,hf --warmup 2 --repeats 10
}

stage_tests() {
    begin tests 480
    build
    step "every GPU test" 330 "${PYTEST[@]}" -m gpu --junitxml="$OUT/tests_gpu.xml" tests
    step "model tests" 120 "${PYTEST[@]}" -m "not gpu" --junitxml="$OUT/tests_models.xml" \
        tests/test_models.py tests/test_aggregator.py
}

stage_kernels() {
    begin kernels 480
    build
    local suite
    if ! has pytest_benchmark; then
        log "SKIPPED kernel benchmarks: pytest-benchmark is not installed (carry its wheel, set WHEELS)"
        return
    fi
    # The kernel suites are the files under benchmarks/ that define pytest tests.
    for suite in $(grep -l "^def test_" benchmarks/*.py); do
        step "kernels $(basename "$suite" .py)" 200 "${PYTEST[@]}" "$suite" \
            --benchmark-enable --benchmark-json="$OUT/kernels_$(basename "$suite" .py).json"
    done
}

stage_e2e() {
    begin e2e 480
    build
    bench e2e_vitl16 180 --models vitl16 --res 512 --batch 64 --dtypes bf16 --modes inference \
        --peers flashdino,flashdino-torch,hf,hf-compile
    bench e2e_vitb16 120 --models vitb16 --res 224 --train-batch 128 --dtypes bf16 --modes latency,training \
        --peers flashdino,flashdino-graphs,hf
    bench e2e_vits16 120 --models vits16 --res 224 --batch 256 --dtypes bf16 --modes inference \
        --peers flashdino,flashdino-torch,hf,hf-compile
    bench e2e_vit7b16 90 --models vit7b16 --res 512 --batch 8 --dtypes bf16 --modes inference \
        --peers flashdino,flashdino-torch --repeats 10
}

stage_aggregator() {
    begin aggregator 480
    build
    step "aggregator S=1,10,50" 240 "$PY" benchmarks/bench_aggregator.py --frames 1 10 50 --out "$OUT" \
        --name aggregator_s1-50
    step "aggregator S=100" 200 "$PY" benchmarks/bench_aggregator.py --frames 100 --repeats 2 --out "$OUT" \
        --name aggregator_s100
}

if [[ $STAGE == all ]]; then
    for s in smoke tests kernels e2e aggregator; do "stage_$s"; done
else
    "stage_$STAGE"
fi
log "== done: $(ls "$OUT" | tr '\n' ' ')"

#!/usr/bin/env bash
# Build the flashdino wheel through the normal PEP 517 path, check that flashdino._C links
# neither libtorch / libc10 nor the shared CUDA runtime, install it into a fresh venv and run
# `python -m flashdino.info` there.
#
# Environment:
#   PYTHON                        interpreter that builds / creates the venv (default: python3)
#   FLASHDINO_CUDA                AUTO | ON | OFF (default here: ON when nvcc is found, else OFF).
#                                 CI machines have nvcc and no GPU, where `pip install .` (AUTO)
#                                 compiles no CUDA kernels: this check is where CI compiles them, so
#                                 that the CUDA sources cannot rot unnoticed.
#   FLASHDINO_CUDA_ARCHITECTURES  architectures to build (default here: 90a, one arch keeps this
#                                 check fast; "all" for every architecture a release wheel ships)
#   TORCH_SPEC                    torch requirement for the test venv (default: torch==2.13.0)
#   WHEEL_DIR                     where the wheel goes (default: dist/)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WHEEL_DIR="${WHEEL_DIR:-$ROOT/dist}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [[ -z "${FLASHDINO_CUDA:-}" ]]; then
  if [[ -n "${CUDACXX:-}" ]] || command -v nvcc >/dev/null; then
    FLASHDINO_CUDA=ON
  else
    FLASHDINO_CUDA=OFF
    echo "check_wheel: no nvcc on PATH and no CUDACXX: checking a wheel without CUDA kernels" >&2
  fi
fi
export FLASHDINO_CUDA
export FLASHDINO_CUDA_ARCHITECTURES="${FLASHDINO_CUDA_ARCHITECTURES:-90a}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flashdino-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

# AUTO with an explicit architecture list builds the kernels whenever nvcc is found (GPU or not).
expect_cuda=0
if [[ "$FLASHDINO_CUDA" =~ ^(ON|on|1|TRUE|true)$ ]]; then
  expect_cuda=1
elif [[ ! "$FLASHDINO_CUDA" =~ ^(OFF|off|0|FALSE|false)$ ]] && { [[ -n "${CUDACXX:-}" ]] || command -v nvcc >/dev/null; }; then
  expect_cuda=1
fi
if [[ $expect_cuda == 1 && "$FLASHDINO_CUDA_ARCHITECTURES" != "all" ]]; then
  # What the module must report: the requested numbers, comma-separated, without -real/-virtual.
  EXPECT_ARCHS="$(echo "$FLASHDINO_CUDA_ARCHITECTURES" | tr ' ;' ',,' | sed -E 's/-(real|virtual)//g; s/,+/,/g; s/^,|,$//g')"
else
  EXPECT_ARCHS=""
fi

step "build the wheel (FLASHDINO_CUDA=$FLASHDINO_CUDA, archs='${FLASHDINO_CUDA_ARCHITECTURES:-default}')"
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/flashdino-*.whl
# A private build dir: a clean build, and no clash with an editable install's build/ in the tree.
"$PYTHON" -m pip wheel -v . --no-deps -w "$WHEEL_DIR" --config-settings=build-dir="$WORK/build" \
  >"$WORK/build.log" 2>&1 || { tail -n 60 "$WORK/build.log"; fail "the wheel did not build (log above)"; }
tail -n 15 "$WORK/build.log"
# The one-line summary the build prints is what a user sees with `pip install -v .`: it must be there.
SUMMARY="$(grep -o 'flashdino: building .*' "$WORK/build.log" | tail -n 1)"
[[ -n "$SUMMARY" ]] || fail "the build log has no 'flashdino: building ...' summary line"
echo "build summary: $SUMMARY"
WHEEL="$(ls -t "$WHEEL_DIR"/flashdino-*.whl | head -n 1)"
[[ -f "$WHEEL" ]] || fail "no wheel in $WHEEL_DIR"
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1))"

step "inspect flashdino._C"
"$PYTHON" - "$WHEEL" "$WORK/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
SO="$(find "$WORK/unpacked/flashdino" -maxdepth 1 -name '_C*.so' | head -n 1)"
[[ -n "$SO" ]] || fail "the wheel holds no flashdino/_C*.so"
if command -v readelf >/dev/null; then
  NEEDED="$(readelf -d "$SO" | sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p')"
elif command -v objdump >/dev/null; then
  NEEDED="$(objdump -p "$SO" | awk '$1 == "NEEDED" {print $2}')"
else
  fail "neither readelf nor objdump is installed"
fi
echo "DT_NEEDED of $(basename "$SO"):"
echo "$NEEDED" | sed 's/^/  /'
if echo "$NEEDED" | grep -E '^(libtorch|libc10|libcudart)' >/dev/null; then
  fail "_C links $(echo "$NEEDED" | grep -E '^(libtorch|libc10|libcudart)' | tr '\n' ' ')"
fi

step "fresh venv + $TORCH_SPEC + the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --no-compile "$TORCH_SPEC"
"$VPY" -m pip install -q --no-compile "$WHEEL"

step "import flashdino from the installed wheel"
cd "$WORK"  # away from the source tree
"$VPY" - "$expect_cuda" "$EXPECT_ARCHS" <<'PY'
import sys
import flashdino
from flashdino import _native
module, why = _native.native_status()
print("flashdino", flashdino.__version__, "from", flashdino.__file__)
print("native:", why)
assert "site-packages" in flashdino.__file__, flashdino.__file__
assert module is not None, why
if sys.argv[1] == "1":
    assert module.has_cuda(), "expected a CUDA build: " + why
    assert module.cuda_architectures(), why
    if sys.argv[2]:
        want = list(dict.fromkeys(sys.argv[2].split(",")))
        assert module.cuda_architectures() == want, (module.cuda_architectures(), want)
else:
    assert not module.has_cuda(), "expected a build without CUDA kernels: " + why
PY
step "python -m flashdino.info"
"$VPY" -m flashdino.info
step "check_wheel: OK"

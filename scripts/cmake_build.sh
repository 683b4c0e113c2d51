#!/usr/bin/env bash
# Configure and build the CUDA extension with CMake into build/cmake, against the torch of the active
# python (PYTHON=..., else python3 on PATH). See docs/BUILD.md.
#
#   scripts/cmake_build.sh             build build/cmake/_C.cpython-*.so   (PYTHONPATH=build/cmake python -c "import torch, _C")
#   scripts/cmake_build.sh --inplace   ... and copy it to quantkern/ (then `import quantkern._C` uses it)
#   scripts/cmake_build.sh --clean     wipe build/cmake first
#
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;8.6;8.9;9.0a"), CUDA_HOME (default /usr/local/cuda),
# QUANTKERN_PTXAS_VERBOSE=1, MAX_JOBS (parallel compile jobs, default: all cores),
# CMAKE (cmake binary), CMAKE_ARGS (extra configure arguments).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build/cmake"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
CMAKE="${CMAKE:-cmake}"
INPLACE=0
CLEAN=0

# Every argument is read before anything is done: `--clean --help` prints the help and removes nothing.
for arg in "$@"; do
  case "$arg" in
    --inplace) INPLACE=1 ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "cmake_build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [[ "$CLEAN" == 1 ]]; then rm -rf "$BUILD_DIR"; fi

if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cmake_build.sh: no nvcc under CUDA_HOME='${CUDA_HOME:-}'; set CUDA_HOME to the CUDA toolkit root" >&2
  exit 1
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0a}"

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

echo "cmake_build.sh: python $PYTHON, CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
# shellcheck disable=SC2086
"$CMAKE" -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PYTHON" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
  -DQUANTKERN_PTXAS_VERBOSE="${QUANTKERN_PTXAS_VERBOSE:-OFF}" \
  ${CMAKE_ARGS:-}

JOBS="${MAX_JOBS:-$(nproc)}"
"$CMAKE" --build "$BUILD_DIR" --parallel "$JOBS"

SO="$(ls "$BUILD_DIR"/_C*.so)"
echo "cmake_build.sh: built $SO"
if [[ "$INPLACE" == 1 ]]; then
  cp -f "$SO" "$ROOT/quantkern/"
  echo "cmake_build.sh: copied to $ROOT/quantkern/$(basename "$SO")"
fi

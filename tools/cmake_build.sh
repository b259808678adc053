#!/usr/bin/env bash
# Standalone build of liballmem_ops.so against the libtorch of the active Python's torch, with no
# Python package involved at run time:   tools/cmake_build.sh [build-dir] [extra cmake args...]
# then, from any framework:  torch.ops.load_library("<build-dir>/liballmem_ops.so")
# Wires the hints a pip-installed CUDA torch needs: the toolkit root, an explicit arch list (no
# GPU probing), and libnvrtc from torch's nvidia wheels when the toolkit lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUILD=${1:-build-cmake}; shift || true
CMAKE=${CMAKE:-$(command -v cmake)}
PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$PREFIX" -DPython3_EXECUTABLE="$(command -v $PY)")
if $PY -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc"
         -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}")
  nvidia_lib=$($PY -c 'import nvidia, os; print(next(iter(nvidia.__path__)))' 2>/dev/null || true)
  if ! ls "$CUDA_ROOT"/lib64/libnvrtc.so* >/dev/null 2>&1 && [ -n "$nvidia_lib" ]; then
    nvrtc=$(ls "$nvidia_lib"/cu*/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | grep -v alt | head -1)
    [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  fi
fi
"$CMAKE" -S . -B "$BUILD" -G Ninja "${args[@]}" "$@"
"$CMAKE" --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
echo "built $BUILD/liballmem_ops.so"

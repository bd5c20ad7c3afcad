#!/usr/bin/env bash
# Compiles every CUDA source with nvcc, without a GPU and without linking, so a kernel that no
# longer compiles cannot land on a machine that has no GPU to build the real extension:
#
#   1. each csrc/core/src/*.cu into an object file (C++17, as CMake builds latro::core),
#      warnings as errors, and no kernel may spill or use local memory;
#   2. each csrc/torch/*.cu (the torch bindings of the kernels) against the torch headers of
#      the project's Python (C++20, as torch.utils.cpp_extension builds them).
#
# One architecture (sm_90 unless LATRO_CHECK_ARCH says otherwise) keeps it to a few minutes
# on two cores. Skips with a message when nvcc is absent; step 2 also when torch is not
# importable. Environment: NVCC, PYTHON (default .venv/bin/python), JOBS (default 2),
# BUILD_DIR (default build/cuda-check), LATRO_CHECK_ARCH (default sm_90).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "cuda_compile_check: nvcc not found (no CUDA toolkit): the CUDA sources were NOT compiled"
  exit 0
fi

ARCH="${LATRO_CHECK_ARCH:-sm_90}"
JOBS="${JOBS:-2}"
BUILD_DIR="${BUILD_DIR:-build/cuda-check}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$BUILD_DIR"
echo "cuda_compile_check: $("$NVCC" --version | tail -n 2 | head -n 1), arch $ARCH, $JOBS jobs"

# -- 1. the torch-free core --------------------------------------------------------------------
# ptxas fails a kernel that spills registers or puts anything in local memory: a dynamically
# indexed array (the sampler's Philox words once: a local load per token) or a register budget
# the kernel outgrew, regressions that compile silently and only a GPU profile would show.
CORE_FLAGS=(-std=c++17 -O3 -arch="$ARCH" -Werror all-warnings
            -Xptxas -warn-spills,-warn-lmem-usage,-Werror
            -Xcompiler -Wall,-Wextra,-Werror -Icsrc/core/include)
mapfile -t CORE_SOURCES < <(ls csrc/core/src/*.cu 2>/dev/null || true)
if [[ ${#CORE_SOURCES[@]} -eq 0 ]]; then
  echo "cuda_compile_check: no csrc/core/src/*.cu files" >&2
  exit 1
fi
compile() {  # compile SOURCE FLAGS...
  local src="$1"
  shift
  local obj="$BUILD_DIR/$(echo "$src" | tr '/' '_').o"
  local start=$SECONDS
  if ! "$NVCC" "$@" -c "$src" -o "$obj" >"$obj.log" 2>&1; then
    cat "$obj.log" >&2
    echo "cuda_compile_check: FAILED $src" >&2
    return 1
  fi
  echo "  ok  $src ($((SECONDS - start)) s)"
}
export -f compile
export NVCC BUILD_DIR
echo "== core kernels (csrc/core/src/*.cu)"
printf '%s\n' "${CORE_SOURCES[@]}" |
  xargs -P "$JOBS" -I{} bash -c 'compile "$@"' _ {} "${CORE_FLAGS[@]}"

# -- 2. the torch bindings ---------------------------------------------------------------------
mapfile -t GLUE_SOURCES < <(ls csrc/torch/*.cu 2>/dev/null || true)
if [[ ${#GLUE_SOURCES[@]} -eq 0 ]]; then
  echo "cuda_compile_check: no csrc/torch/*.cu files: done"
  exit 0
fi
if ! TORCH_INFO="$("$PYTHON" - <<'EOF' 2>/dev/null
import torch
from torch.utils.cpp_extension import include_paths
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(" ".join(COMMON_NVCC_FLAGS))
print("\n".join(include_paths()))
EOF
)"; then
  echo "cuda_compile_check: torch is not importable with $PYTHON: the bindings were NOT compiled"
  exit 0
fi
mapfile -t TORCH_LINES <<< "$TORCH_INFO"
# The flags torch.utils.cpp_extension gives nvcc (setup.py builds with them), plus the
# project's own from setup.py.
read -r -a TORCH_NVCC_FLAGS <<< "${TORCH_LINES[1]}"
GLUE_FLAGS=(-std=c++20 -O3 -arch="$ARCH" -Xcompiler -fPIC "${TORCH_NVCC_FLAGS[@]}"
            -DLATRO_WITH_CUDA=1 "-D_GLIBCXX_USE_CXX11_ABI=${TORCH_LINES[0]}"
            -Icsrc/core/include -Icsrc/torch)
for dir in "${TORCH_LINES[@]:2}"; do GLUE_FLAGS+=("-I$dir"); done
# A CPU-only torch wheel ships c10/cuda without the header CMake generates for CUDA builds
# (it only sets Windows export macros); tell c10 not to look for it.
if [[ ! -f "${TORCH_LINES[2]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  GLUE_FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
echo "== torch bindings (csrc/torch/*.cu, torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
printf '%s\n' "${GLUE_SOURCES[@]}" |
  xargs -P "$JOBS" -I{} bash -c 'compile "$@"' _ {} "${GLUE_FLAGS[@]}"
echo "cuda_compile_check: all CUDA sources compiled"

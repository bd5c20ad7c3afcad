#!/usr/bin/env bash
# Everything CI checks, from a fresh clone: set-up, lint, the Python tests, the C++ core's
# build + ctest + install + embedding example, an nvcc compile check of the CUDA sources, and a
# smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

echo "== ruff"
ruff check latro_engine python_tests benchmarks setup.py

echo "== pytest"
python -m pytest -q -p no:cacheprovider python_tests

# With nvcc on the machine CMake compiles the CUDA kernels into latro::core too; one
# architecture (sm_90) is enough to catch a kernel that no longer builds.
echo "== C++ core (CMake, ctest, install, embedding example)"
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_ARGS:-}" bash scripts/cpp_check.sh

# The CPU core built for a wider baseline than the portable one, as a user's -march=native
# build is (GCC 12 stopped with an internal compiler error on the AVX2 clones there; see
# cpu_common.h): x86-64-v4 (AVX-512) objects, compiled only, so any x86-64 machine checks it.
echo "== CPU core compiles with -march=x86-64-v4"
if [[ "$(uname -m)" == x86_64 ]]; then
  objects="$(mktemp -d)"
  for source in csrc/core/src/*.cpp; do
    "${CXX:-c++}" -std=c++17 -O2 -march=x86-64-v4 -fopenmp -Wall -Werror -Icsrc/core/include \
      -Icsrc/core/src -c "$source" -o "$objects/$(basename "$source").o"
  done
  rm -rf "$objects"
  echo "ok"
else
  echo "skipped: not an x86-64 machine"
fi

# The CUDA sources through nvcc without a GPU: the kernels as objects, and the torch bindings
# against this torch's headers (skipped, with a message, where nvcc is absent).
echo "== CUDA compile check"
bash scripts/cuda_compile_check.sh

# The same suite once more under AddressSanitizer + UndefinedBehaviorSanitizer (a build of its
# own, CPU code only: the sanitizers do not see device code, and ASan and the CUDA runtime
# fight over the address space). The 32000-vocabulary cases are left out here: they run the
# code paths of the 1025 ones (several blocks per row) and take most of the sanitized time.
echo "== C++ core under ASan + UBSan"
LATRO_SANITIZE=ON BUILD_DIR=build/cpp-asan CTEST_ARGS="-E vocab32000" \
  CMAKE_ARGS="-DLATRO_ENABLE_CUDA=OFF" bash scripts/cpp_check.sh

echo "== benchmark smoke run"
python benchmarks/bench_ops.py --quick
# The GPU benchmark's code paths at toy sizes on the CPU (its numbers mean nothing here).
python benchmarks/bench_gpu.py --cpu-smoke
# The profile stage's calls (gpu_check.sh runs them under Nsight Compute), on the CPU.
python benchmarks/profile_sample.py

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

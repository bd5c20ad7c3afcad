#!/usr/bin/env bash
# Everything CI checks, from a fresh clone: set-up, lint, the Python tests, the C++ core's
# build + ctest + install + embedding example, and a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

echo "== ruff"
ruff check latro_engine python_tests benchmarks setup.py

echo "== pytest"
python -m pytest -q -p no:cacheprovider python_tests

echo "== C++ core (CMake, ctest, install, embedding example)"
bash scripts/cpp_check.sh

# The same suite once more under AddressSanitizer + UndefinedBehaviorSanitizer (a build of its
# own, CPU code only: the sanitizers do not see device code, and ASan and the CUDA runtime
# fight over the address space). The 32000-vocabulary cases are left out here: they run the
# code paths of the 1025 ones (several blocks per row) and take most of the sanitized time.
echo "== C++ core under ASan + UBSan"
LATRO_SANITIZE=ON BUILD_DIR=build/cpp-asan CTEST_ARGS="-E vocab32000" \
  CMAKE_ARGS="-DLATRO_ENABLE_CUDA=OFF" bash scripts/cpp_check.sh

echo "== benchmark smoke run"
python benchmarks/bench_ops.py --quick

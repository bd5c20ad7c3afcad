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

echo "== benchmark smoke run"
python benchmarks/bench_ops.py --quick

#!/usr/bin/env bash
# Sets up a fresh machine for latro_engine: a virtual environment in .venv with torch and the
# Python dependencies, the native extension built in place, and GoogleTest for the C++ tests.
#
#   LATRO_TORCH_SPEC   the torch requirement (default torch==2.13.0, the CPU build on our machines)
#   PYTHON             the interpreter that makes the venv (default python3)
#   LATRO_SKIP_CUDA / LATRO_FORCE_CUDA / TORCH_CUDA_ARCH_LIST   see setup.py
#
# The extension is built with --no-build-isolation so the build uses the torch installed here
# instead of pulling a second one into an isolated build environment.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
pip_quiet() { python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }

pip_quiet "${LATRO_TORCH_SPEC:-torch==2.13.0}"
pip_quiet numpy pytest hypothesis ruff ninja setuptools wheel transformers sentencepiece safetensors pyyaml tqdm matplotlib peft
python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }

echo "setup: building the native extension (a few minutes on 2 cores)"
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "is ignored" || true
python - <<'PY'
import latro_engine
if not latro_engine.native_available():
    raise SystemExit("setup: the native extension did not build; see the pip output above")
print(f"setup: latro_engine {latro_engine.__version__}, native extension loaded, "
      f"CUDA kernels: {latro_engine.native_has_cuda()}")
PY

# GoogleTest for ctest (Debian's package; CMake finds it with find_package(GTest)).
if [ ! -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake ] && \
   [ ! -f /usr/lib/cmake/GTest/GTestConfig.cmake ] && ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing GoogleTest (libgtest-dev)"
    apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "setup: GoogleTest not found and no apt-get; the C++ tests will not build" >&2
  fi
fi

#!/usr/bin/env bash
# The repeatable C++ job: build the torch-free core and its GoogleTest suite, run ctest, install
# the package, build and run an outside consumer (examples/embed_scorer) against the installed
# prefix, and refuse torch headers under csrc/core.
#
#   scripts/cpp_check.sh                 # Release build in build/cpp
#   LATRO_SANITIZE=ON scripts/cpp_check.sh   # address + undefined behaviour sanitizers
#   CMAKE_ARGS="-DLATRO_ENABLE_CUDA=OFF" scripts/cpp_check.sh
#
# Environment: JOBS (default 2), BUILD_DIR (default build/cpp), CMAKE_ARGS (extra configure
# arguments), LATRO_SANITIZE (ON/OFF, default OFF), CTEST_ARGS (extra ctest arguments, e.g.
# "-E vocab32000" to leave out the largest cases).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

JOBS="${JOBS:-2}"
BUILD_DIR="${BUILD_DIR:-build/cpp}"
INSTALL_DIR="${BUILD_DIR}-install"
EXAMPLE_DIR="${BUILD_DIR}-embed_scorer"
SANITIZE="${LATRO_SANITIZE:-OFF}"
read -r -a EXTRA_ARGS <<< "${CMAKE_ARGS:-}"
read -r -a EXTRA_CTEST_ARGS <<< "${CTEST_ARGS:-}"
if [[ "$SANITIZE" == "ON" ]]; then
  # Any report fails the run: leaks, out-of-bounds access, undefined behaviour.
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
fi

step() { printf '\n== %s\n' "$*"; }

# -- 1. no torch under csrc/core ------------------------------------------------------------
step "checking that csrc/core includes no torch / ATen / c10 headers"
if grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' csrc/core; then
  echo "error: csrc/core must stay torch-free (see STYLE.md, point 1)" >&2
  exit 1
fi
echo "ok"

# -- 2. configure + build ---------------------------------------------------------------------
NINJA_ARGS=()
if command -v ninja >/dev/null 2>&1; then NINJA_ARGS=(-G Ninja); fi
GENERATOR_ARGS=()
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  GENERATOR_ARGS=("${NINJA_ARGS[@]}")  # an existing build dir keeps the generator it was made with
fi
step "configuring $BUILD_DIR"
cmake -S . -B "$BUILD_DIR" "${GENERATOR_ARGS[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DLATRO_BUILD_TESTS=ON -DLATRO_SANITIZE="$SANITIZE" \
  "${EXTRA_ARGS[@]}"
step "building"
cmake --build "$BUILD_DIR" --parallel "$JOBS"

# -- 3. tests ---------------------------------------------------------------------------------
step "ctest"
ctest --test-dir "$BUILD_DIR" --output-on-failure --parallel "$JOBS" "${EXTRA_CTEST_ARGS[@]}"

# -- 4. install + outside consumer ------------------------------------------------------------
step "installing into $INSTALL_DIR"
rm -rf "$INSTALL_DIR" "$EXAMPLE_DIR"
cmake --install "$BUILD_DIR" --prefix "$INSTALL_DIR"

step "building examples/embed_scorer against the installed package"
CONSUMER_ARGS=()
if [[ "$SANITIZE" == "ON" ]]; then
  # The installed static library holds sanitized objects: the consumer must link the runtimes.
  CONSUMER_ARGS=(-DCMAKE_CXX_FLAGS="-fsanitize=address,undefined"
                 -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined")
fi
cmake -S examples/embed_scorer -B "$EXAMPLE_DIR" "${NINJA_ARGS[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$(cd "$INSTALL_DIR" && pwd)" "${CONSUMER_ARGS[@]}"
cmake --build "$EXAMPLE_DIR" --parallel "$JOBS"
"$EXAMPLE_DIR/embed_scorer"

# -- 5. a Debug (-O0) core under the same consumer ------------------------------------------
# Embedders build Debug too. At -O0 nothing is inlined unless forced, and a vector helper left
# out of line is called with another ABI from the AVX2 clone of its caller (target_clones):
# token_logprobs once returned wrong values only there, and no Release build could show it.
if [[ "$SANITIZE" != "ON" ]]; then
  DEBUG_DIR="${BUILD_DIR}-debug"
  step "building the core in Debug ($DEBUG_DIR) and the consumer against it"
  rm -rf "$DEBUG_DIR" "$DEBUG_DIR-install" "$DEBUG_DIR-embed_scorer"
  cmake -S . -B "$DEBUG_DIR" "${NINJA_ARGS[@]}" -DCMAKE_BUILD_TYPE=Debug -DLATRO_BUILD_TESTS=OFF \
    -DLATRO_ENABLE_CUDA=OFF
  cmake --build "$DEBUG_DIR" --parallel "$JOBS"
  cmake --install "$DEBUG_DIR" --prefix "$DEBUG_DIR-install"
  cmake -S examples/embed_scorer -B "$DEBUG_DIR-embed_scorer" "${NINJA_ARGS[@]}" \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH="$(cd "$DEBUG_DIR-install" && pwd)"
  cmake --build "$DEBUG_DIR-embed_scorer" --parallel "$JOBS"
  "$DEBUG_DIR-embed_scorer/embed_scorer"
fi

step "cpp_check: all passed"

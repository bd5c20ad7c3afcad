#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one command on a machine with an NVIDIA GPU:
#
#   1. build   the extension in place with its CUDA kernels (TORCH_CUDA_ARCH_LIST=9.0,
#              LATRO_FORCE_CUDA=1: the build fails rather than silently leaving them out);
#   2. test    the CUDA tests: python_tests/test_cuda_ops.py and every cuda-parametrized case of
#              the rest of the suite (pytest -k cuda);
#   3. bench   benchmarks/bench_gpu.py, every section (tables in markdown, numbers in JSON).
#
#   bash benchmarks/gpu_check.sh                      # all three
#   STAGES="bench" BENCH_ARGS="--only sample" bash benchmarks/gpu_check.sh
#
# Outputs go to $OUT when it is set (the device tool's folder), else build/gpu-check:
# gpu_check.log (everything), nvidia-smi.txt, pytest.log, bench_gpu.md, bench_gpu.json.
# Environment: PYTHON (default: python3 if its torch has CUDA, else .venv/bin/python),
# STAGES (default "build test bench"), MAX_JOBS (default: all cores), BENCH_ARGS.
# Every stage runs even if an earlier one failed (except that nothing runs without a build);
# the exit status is non-zero if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

STAGES="${STAGES:-build test bench}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; }
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then
      PYTHON="$candidate"
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]] || ! has_cuda_torch "$PYTHON"; then
  echo "gpu_check: no Python with a CUDA build of torch (tried python3, .venv/bin/python; set PYTHON)"
  exit 2
fi

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ): stages '$STAGES', $PYTHON"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -n 15
"$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1

failed=()
stage() { [[ " $STAGES " == *" $1 "* ]]; }
run_stage() {  # run_stage NAME COMMAND...
  local name="$1" start=$SECONDS
  shift
  echo
  echo "== $name"
  if "$@"; then
    echo "== $name: ok ($((SECONDS - start)) s)"
  else
    echo "== $name: FAILED ($((SECONDS - start)) s)"
    failed+=("$name")
  fi
}

build() {
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LATRO_FORCE_CUDA=1 \
    "$PYTHON" setup.py build_ext --inplace &&
    "$PYTHON" -c 'import latro_engine, sys; ok = latro_engine.native_has_cuda(); print("native CUDA kernels:", ok); sys.exit(0 if ok else 1)'
}

cuda_tests() {
  # test_cuda_ops.py whole, plus the cuda-parametrized cases elsewhere; -p no:cacheprovider
  # keeps the copied tree clean.
  "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs python_tests/test_cuda_ops.py 2>&1 |
    tee "$OUT/pytest.log"
  local a=${PIPESTATUS[0]}
  "$PYTHON" -m pytest -q -p no:cacheprovider -rfE -k cuda \
    --ignore=python_tests/test_cuda_ops.py python_tests 2>&1 | tee -a "$OUT/pytest.log"
  local b=${PIPESTATUS[0]}
  [[ $a -eq 0 && ($b -eq 0 || $b -eq 5) ]]  # 5: nothing selected
}

bench() {
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  "$PYTHON" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} |
    tee "$OUT/bench_gpu.md"
  return "${PIPESTATUS[0]}"
}

if stage build; then
  run_stage build build
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu_check: the build failed; nothing else can run"
    exit 1
  fi
fi
stage test && run_stage "CUDA tests" cuda_tests
stage bench && run_stage benchmarks bench

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all stages passed"

#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one command on a machine with an NVIDIA GPU:
#
#   1. build   the extension in place with its CUDA kernels (TORCH_CUDA_ARCH_LIST=9.0,
#              LATRO_FORCE_CUDA=1: the build fails rather than silently leaving them out), and
#              copies the built module to $OUT so a later run can carry it instead of rebuilding;
#   2. test    the CUDA tests: python_tests/test_cuda_ops.py and every cuda-named case of the
#              rest of the suite (pytest -k cuda: the static decoder's CUDA graphs among them),
#              going on past a test that crashes the process (scripts/pytest_through_crashes.sh);
#   3. bench   benchmarks/bench_gpu.py, one process per section (scorer, sample, attention, stop,
#              rollout, latro),
#              each under its own time limit so one slow section cannot hide the others;
#   4. profile (only when named in STAGES) Nsight Compute on one call of each sampling case
#              that misses its target (benchmarks/profile_sample.py): occupancy, issue-slot use
#              and warp stall reasons of the sampling kernels, to ncu_sample.txt. Skipped with
#              a note where ncu is not installed or may not read the GPU's counters.
#
#   bash benchmarks/gpu_check.sh                      # all three
#   STAGES="test bench" BENCH_SECTIONS="rollout" bash benchmarks/gpu_check.sh   # prebuilt module
#
# Timings of the last call (H100, 2026-11-27, 528 s in all; the machine's start took about
# a minute more): build 96 s, error probe 11 s, CUDA tests 91 s in six xdist processes (the
# device image has pytest-xdist), sections: latro with stopping rationales and six settings
# 176 s (the reference pattern's warm-up step alone 44 s), rollout 72 s, scorer 19 s, sample,
# stop and attention 1-2 s each. The LaTRO section at full length with four settings took
# 124 s (158 s for the call). On a 15-minute device budget (a start
# costs a minute or two), this one call (about 7 minutes):
#   PYTEST_OPTIONS="-n 6" STAGES="build test bench profile" \
#     BENCH_SECTIONS="scorer sample rollout stop attention latro" SECTION_TIMEOUT=200 \
#     TEST_TIMEOUT=150 BENCH_ARGS="--latro-weights bfloat16 --latro-rationales stop \
#     --latro-settings reference,ours,all-on-host-tokens-4k,all-on-host-tokens-8k" \
#     bash benchmarks/gpu_check.sh
# (profile: under a minute where ncu runs; its report says what the sampling kernels wait on)
# then, at once on the same warm machine (within its 30 idle seconds; it finds the build):
#   STAGES="bench" BENCH_SECTIONS="latro" SECTION_TIMEOUT=250 BENCH_ARGS="--latro-weights \
#     bfloat16 --latro-rationales full --latro-settings \
#     reference,ours,all-on-host-tokens-4k,all-on-host-tokens-8k" \
#     bash benchmarks/gpu_check.sh                                          # about 3 minutes
#
# Outputs go to $OUT when it is set (the device tool's folder), else build/gpu-check:
# gpu_check.log (everything), nvidia-smi.txt, pytest.log, bench_gpu.md, bench_gpu.json and the
# built module (_C.*.so). Environment: PYTHON (default: python3 if its torch has CUDA, else
# .venv/bin/python), STAGES (default "build test bench"), MAX_JOBS (default: all cores),
# BENCH_SECTIONS (default "scorer sample attention stop rollout latro"), BENCH_ARGS (extra options),
# KEEP_COMPILER=1 (build with $CC/$CXX even where /usr/bin/g++ exists),
# TEST_ARGS (pytest selection instead of the default), PYTEST_OPTIONS (options for the test runs,
# e.g. "-x -v"), TEST_TIMEOUT (s for all tests, default 240),
# SECTION_TIMEOUT (s per bench section, default 240).
# Every stage runs even if an earlier one failed (except that nothing runs without a build);
# the exit status is non-zero if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, not an installed copy

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
# The toolchain the extension is built with, against the one torch was built with.
echo "CC=${CC:-} CXX=${CXX:-}; c++: $(command -v c++) $(c++ --version 2>/dev/null | head -n 1)"
"$PYTHON" -c 'import torch; print("\n".join(l for l in torch.__config__.show().splitlines() if "compiler" in l.lower() or "CXX_FLAGS" in l)[:600])'

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
  # The system's compiler where the environment names another: on the H100 machines of
  # 2026-11-25/26, CC/CXX named /opt/gcc, whose modules segfault on any raised error there.
  # setup.py's raise check would find that and rebuild with /usr/bin/g++, a second full build
  # (74 s of a 15-minute budget); building with it at once saves that. KEEP_COMPILER=1 keeps
  # the environment's compiler (and so exercises the raise check's rebuild).
  local compilers=()
  if [[ "${KEEP_COMPILER:-0}" != 1 && -x /usr/bin/g++ && -x /usr/bin/gcc && -n "${CXX:-}" &&
        "$(realpath "$(command -v "$CXX")" 2>/dev/null)" != "$(realpath /usr/bin/g++)" ]]; then
    echo "gpu_check: building with /usr/bin/gcc and /usr/bin/g++ instead of CC=${CC:-} CXX=$CXX"
    compilers=(CC=/usr/bin/gcc CXX=/usr/bin/g++)
  fi
  env "${compilers[@]}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LATRO_FORCE_CUDA=1 \
    "$PYTHON" setup.py build_ext --inplace &&
    has_kernels &&
    cp latro_engine/_C.*.so "$OUT/"
}

has_kernels() {
  "$PYTHON" -c 'import latro_engine, sys; ok = latro_engine.native_has_cuda(); print("native CUDA kernels:", ok); sys.exit(0 if ok else 1)'
}

errors_probe() {
  # An op given bad input must raise ValueError, not crash the process (on the H100 machines of
  # 2026-11-25/26 every C++ exception leaving a module built by /opt/gcc's g++ segfaulted;
  # setup.py's raise check now rebuilds such a module with /usr/bin/g++): one process per
  # device, so a crash is reported with its exit status and the next stages still run.
  local device status=0
  for device in cpu cuda; do
    "$PYTHON" -X faulthandler - "$device" <<'EOF_PROBE' || { echo "errors probe on $device: exit $?"; status=1; }
import sys
import torch
from latro_engine import ops
device = sys.argv[1]
try:
    ops.token_logprobs(torch.randn(2, 5, device=device), torch.tensor([1, 9], device=device))
except ValueError as error:
    print(f"errors probe on {device}: ValueError raised as it should: {error}")
else:
    sys.exit(f"errors probe on {device}: no error for an out-of-range target")
EOF_PROBE
  done
  return $status
}

cuda_tests() {
  # test_cuda_ops.py and the cuda-named cases of the rest of the suite (-k cuda selects both: the
  # module's name has it), or TEST_ARGS instead. Through scripts/pytest_through_crashes.sh: a
  # test that kills the process (the bad-input SIGSEGV of 2026-11-25) is named and the tests
  # after it still run.
  # shellcheck disable=SC2086  # TEST_ARGS is a list of arguments
  PYTHON="$PYTHON" LOG="$OUT/pytest.log" TEST_TIMEOUT="${TEST_TIMEOUT:-240}" \
    bash scripts/pytest_through_crashes.sh ${TEST_ARGS:-python_tests -k cuda}
}

bench() {
  local section status=0
  for section in ${BENCH_SECTIONS:-scorer sample attention stop rollout latro}; do
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "${SECTION_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_gpu.py --only "$section" \
      --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} | tee -a "$OUT/bench_gpu.md"
    local rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 ]] && echo "bench_gpu: section $section ran out of time (${SECTION_TIMEOUT:-240} s)"
    [[ $rc -ne 0 ]] && status=1
  done
  return $status
}

profile() {
  local ncu
  # The toolkit's own ncu first, else the newest Nsight Compute installed.
  ncu="$(command -v /usr/local/cuda/bin/ncu || command -v ncu ||
         ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -n 1)"
  if [[ -z "$ncu" ]]; then
    echo "profile: no ncu (Nsight Compute) on this machine; skipped"
    return 0
  fi
  # Whole sections, not the full set (each section replays the kernel): about 10 replays a
  # kernel, 9 sampling kernels. --print-details all: WarpStateStats' stall reasons are in the
  # section's body, which the default leaves out (an older ncu without the option prints less).
  local details=()
  "$ncu" --help 2>/dev/null | grep -q -- "--print-details" && details=(--print-details all)
  timeout "${PROFILE_TIMEOUT:-180}" "$ncu" --target-processes all --kernel-name regex:sample \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section InstructionStats "${details[@]}" \
    "$PYTHON" benchmarks/profile_sample.py > "$OUT/ncu_sample.txt" 2>&1
  local rc=$?
  # The headline figures of each kernel (the whole report is in the file): the case markers
  # and ncu's "Profiling" lines interleave (which launch is which case); the reports follow,
  # in launch order, each headed by its kernel's name.
  grep -E "profile_sample:|==PROF== Profiling|sample[a-z_]*_kernel.*Context|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Executed Ipc Active|Stall" \
    "$OUT/ncu_sample.txt" | head -n 300
  if grep -q -E "ERR_NVGPUCTRPERM|not supported|No kernels were profiled" "$OUT/ncu_sample.txt"; then
    echo "profile: ncu could not profile the kernels here (see ncu_sample.txt); skipped"
    return 0
  fi
  return $rc
}

if stage build; then
  run_stage build build
else
  run_stage "prebuilt module" has_kernels
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: no extension with CUDA kernels; nothing else can run"
  exit 1
fi
stage test && run_stage "errors probe" errors_probe
stage test && run_stage "CUDA tests" cuda_tests
stage bench && run_stage benchmarks bench
stage profile && run_stage "profile (ncu)" profile

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all stages passed"

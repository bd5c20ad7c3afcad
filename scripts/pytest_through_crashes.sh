#!/usr/bin/env bash
# pytest that goes on after a test kills the process.
#
# On the H100 machine of 2026-11-25 an op given bad input died with SIGSEGV instead of raising
# (see benchmarks/exception_probe.sh): one such test ended the whole pytest run and hid every
# test after it. This runs the selection, and when the process dies of a signal it reports the
# test that was running (python_tests/conftest.py writes each test's id to
# $LATRO_TEST_PROGRESS as it starts and empties the file when it is done), counts it as failed
# and runs the tests after it in a fresh process, until the selection is done or the time is up.
#
#   PYTHON=python3 TEST_TIMEOUT=240 LOG=pytest.log bash scripts/pytest_through_crashes.sh \
#       python_tests -k cuda
#
# Arguments: a pytest selection (paths, -k, -m). Environment: PYTHON (default python3),
# TEST_TIMEOUT (seconds for everything, default 240), LOG (appended to; default: none),
# PYTEST_OPTIONS (options for the runs themselves, e.g. "-x -v"; the selection's arguments only
# pick the tests). Exit status: 0 when every test passed (or none was selected), 1 when any
# failed or crashed, 124 when the time ran out. The last line totals every run (conftest
# appends each outcome to $LATRO_TEST_OUTCOMES): pytest's own summary covers only the last.
set -uo pipefail

PYTHON="${PYTHON:-python3}"
deadline=$((SECONDS + ${TEST_TIMEOUT:-240}))
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { if [[ -n "${LOG:-}" ]]; then tee -a "$LOG"; else cat; fi; }

# The node ids, in the order pytest runs them (no cache plugin: the checkout stays clean).
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only "$@" \
  >"$work/collected" 2>&1
collect_rc=$?
grep -E '^[^[:space:]]+::' "$work/collected" >"$work/todo"
selected=$(wc -l <"$work/todo")
: >"$work/outcomes"
if [[ $collect_rc -eq 5 && ! -s "$work/todo" ]]; then
  log <"$work/collected"
  echo "pytest_through_crashes: in all nothing selected" | log
  exit 0
fi
# A collection that listed its tests and then died of a signal (a crash at exit) still counts.
if [[ ! -s "$work/todo" ]] || ((collect_rc != 0 && collect_rc < 128)); then
  log <"$work/collected"
  echo "pytest_through_crashes: collecting the tests failed (exit $collect_rc)" | log
  exit 1
fi

crashed=()
status=0
while [[ -s "$work/todo" ]]; do
  left=$((deadline - SECONDS))
  if ((left <= 0)); then
    echo "pytest_through_crashes: out of time with $(wc -l <"$work/todo") tests not run" | log
    status=124
    break
  fi
  mapfile -t ids <"$work/todo"
  : >"$work/progress"
  # shellcheck disable=SC2086  # PYTEST_OPTIONS is a list of options
  LATRO_TEST_PROGRESS="$work/progress" LATRO_TEST_OUTCOMES="$work/outcomes" \
    timeout "$left" "$PYTHON" -X faulthandler -m pytest \
    -q -p no:cacheprovider -rfEs ${PYTEST_OPTIONS:-} "${ids[@]}" 2>&1 | log
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 124 ]]; then
    echo "pytest_through_crashes: out of time (${TEST_TIMEOUT:-240} s)" | log
    status=124
    break
  fi
  if ((rc < 128)); then  # pytest's own verdict on what was left
    [[ $rc -ne 0 ]] && status=1
    break
  fi
  # Killed by signal rc - 128: the test in progress is the culprit; go on after it.
  dead="$(cat "$work/progress")"
  if [[ -z "$dead" ]]; then  # conftest clears the file when a test is done
    echo "pytest_through_crashes: pytest died (exit $rc) outside any test" | log
    status=1
    break
  fi
  echo "pytest_through_crashes: CRASHED (exit $rc, signal $((rc - 128))): $dead" | log
  crashed+=("$dead")
  status=1
  awk -v dead="$dead" 'found { print } $0 == dead { found = 1 }' "$work/todo" >"$work/next"
  mv "$work/next" "$work/todo"
done

if [[ ${#crashed[@]} -gt 0 ]]; then
  {
    echo "pytest_through_crashes: ${#crashed[@]} test(s) killed the process:"
    printf '  %s\n' "${crashed[@]}"
  } | log
fi
# Every outcome conftest wrote, then the crashes, then what never ran (time out, -x).
# (Under pytest-xdist the worker that died is replaced and the run goes on: conftest writes its
# test as crashed.)
awk -v crashed="${#crashed[@]}" -v selected="$selected" '{ n[$1]++; done++ } END {
  crashed += n["crashed"]; done -= n["crashed"]
  line = ""
  split("passed failed error skipped xfailed xpassed", kinds, " ")
  for (i = 1; i <= 6; i++) if (n[kinds[i]] > 0 || i <= 2) line = line n[kinds[i]] + 0 " " kinds[i] ", "
  printf "pytest_through_crashes: in all %s%d crashed, %d not run, of %d selected\n",
    line, crashed, selected - done - crashed, selected }' "$work/outcomes" | log
exit "$status"

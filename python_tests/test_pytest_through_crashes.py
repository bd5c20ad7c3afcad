"""scripts/pytest_through_crashes.sh, the GPU check's test runner: a test that kills the process
is reported by name and the tests after it still run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pytest_through_crashes.sh"

CRASHING_TESTS = """
import os
import signal

import pytest


@pytest.mark.parametrize("i", range(6))
def test_numbered(i):
    if i in (1, 2):
        os.kill(os.getpid(), signal.SIGSEGV if i == 1 else signal.SIGABRT)
    assert i != 4


def test_last():
    pass
"""


def run_script(
    tmp_path: Path, test_source: str, *selection: str, options: str = ""
) -> tuple[int, str]:
    # The real conftest, whose progress hook names the test that was running.
    shutil.copy(ROOT / "python_tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_subject.py").write_text(test_source)
    log = tmp_path / "run.log"
    result = subprocess.run(
        ["bash", str(SCRIPT), *selection],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT),
            "LOG": str(log),
            "TEST_TIMEOUT": "120",
            "PYTEST_OPTIONS": options,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    return result.returncode, log.read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_crashes_are_named_and_the_rest_still_runs(tmp_path):
    rc, log = run_script(tmp_path, CRASHING_TESTS, "test_subject.py")
    assert rc == 1
    assert "CRASHED (exit 139, signal 11): test_subject.py::test_numbered[1]" in log
    assert "CRASHED (exit 134, signal 6): test_subject.py::test_numbered[2]" in log
    assert "2 test(s) killed the process" in log
    # After the second crash: [3] passes, [4] fails, [5] and test_last pass.
    assert "FAILED test_subject.py::test_numbered[4]" in log
    assert "1 failed, 3 passed" in log
    # [0] passed before the first crash: the total counts every run.
    assert "in all 4 passed, 1 failed, 2 crashed, 0 not run, of 7 selected" in log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_clean_run_passes_and_an_empty_selection_is_not_an_error(tmp_path):
    rc, log = run_script(tmp_path, "def test_fine():\n    pass\n", "test_subject.py")
    assert (rc, "1 passed" in log, "CRASHED" in log) == (0, True, False)
    assert "in all 1 passed, 0 failed, 0 crashed, 0 not run, of 1 selected" in log
    rc, log = run_script(tmp_path, "def test_fine():\n    pass\n", "test_subject.py", "-k", "nope")
    assert rc == 0 and "in all nothing selected" in log


TEARDOWNS_AND_MARKS = """
import os
import signal

import pytest


@pytest.fixture
def breaks_in_teardown():
    yield
    raise RuntimeError("teardown")


@pytest.fixture
def dies_in_teardown():
    yield
    os.kill(os.getpid(), signal.SIGSEGV)


def test_error_in_teardown(breaks_in_teardown):
    pass


@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False


@pytest.mark.skip(reason="not here")
def test_skipped():
    pass


def test_crash_in_teardown(dies_in_teardown):
    pass


def test_after():
    pass
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_totals_count_each_test_once(tmp_path):
    """A teardown error counts as an error (not a pass), xfail as xfailed, and a test that
    passes but kills the process in its teardown as crashed only."""
    rc, log = run_script(tmp_path, TEARDOWNS_AND_MARKS, "test_subject.py")
    assert rc == 1
    assert ("in all 1 passed, 0 failed, 1 error, 1 skipped, 1 xfailed, 1 crashed, 0 not run, "
            "of 5 selected") in log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_crash_outside_any_test_blames_none_and_options_reach_the_runs(tmp_path):
    at_exit = (
        "import atexit, os, signal\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))\n"
        "def test_fine():\n    pass\n"
    )
    rc, log = run_script(tmp_path, at_exit, "test_subject.py")
    assert rc == 1 and "1 passed" in log
    assert "died (exit 139) outside any test" in log and "CRASHED" not in log
    three = "def test_a():\n    pass\ndef test_b():\n    assert False\ndef test_c():\n    pass\n"
    rc, log = run_script(tmp_path, three, "test_subject.py", options="-x")
    assert rc == 1 and "1 failed, 1 passed" in log  # -x: test_c never ran


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tests_in_xdist_processes_count_once(tmp_path):
    """gpu_check.sh runs the tests in xdist processes (PYTEST_OPTIONS="-n 6"), whose reports
    reach the controller's hooks too: each outcome is still counted once."""
    pytest.importorskip("xdist")
    three = "def test_a():\n    pass\ndef test_b():\n    assert False\ndef test_c():\n    pass\n"
    rc, log = run_script(tmp_path, three, "test_subject.py", options="-n 2")
    assert rc == 1
    assert "in all 2 passed, 1 failed, 0 crashed, 0 not run, of 3 selected" in log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_test_that_kills_its_xdist_worker_counts_as_crashed(tmp_path):
    pytest.importorskip("xdist")
    source = (
        "import os, signal\n"
        "def test_a():\n    pass\n"
        "def test_dies():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def test_c():\n    pass\n"
    )
    rc, log = run_script(tmp_path, source, "test_subject.py", options="-n 2")
    assert rc == 1
    assert "in all 2 passed, 0 failed, 1 crashed, 0 not run, of 3 selected" in log

"""setup.py's raise check: after building, the module must raise ValueError for bad input in a
child process; a module that crashes instead is rebuilt once with the system compiler, and the
build fails if that does not help (see setup.py's docstring for the machine that needed it)."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest

import latro_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    # Imported under another name than __main__, setup.py defines its helpers and builds nothing.
    spec = importlib.util.spec_from_file_location("latro_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not latro_engine.native_available(), reason="native extension not built")
def test_the_built_module_raises_cleanly(setup_module):
    from latro_engine import _extension

    assert setup_module._raise_check(_extension._C.__file__) is None


def test_a_child_killed_by_a_signal_is_reported_with_it(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module, "_RAISE_CHECK",
                        f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    assert setup_module._raise_check("unused") == f"it died of signal {int(signal.SIGSEGV)}"


def test_no_value_error_is_reported_with_the_childs_words(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module, "_RAISE_CHECK", "import sys; sys.exit('raised no ValueError')")
    assert setup_module._raise_check("unused") == "raised no ValueError"


def test_a_module_that_does_not_load_is_not_blamed_on_the_compiler(setup_module, tmp_path, capsys):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared object")
    assert setup_module._raise_check(str(broken)) is None
    assert "could not run the raise check" in capsys.readouterr().out


class _Base:
    """Stands in for torch's BuildExtension: records each build's compiler and force flag."""

    def __init__(self):
        self.compiler = None  # the --compiler option, which a real run replaces
        self.extensions = [object()]
        self.force = False
        self.builds = []

    def run(self):
        assert self.compiler is None, "a run must start from the --compiler option"
        self.builds.append((os.environ.get("CXX"), self.force))
        self.compiler = object()  # as distutils' run: the option becomes a compiler object


def _build(setup_module, monkeypatch, tmp_path, checks, system=("/sys/gcc", "/sys/g++")):
    monkeypatch.setenv("CXX", "/env/g++")
    monkeypatch.setenv("CC", "/env/gcc")
    monkeypatch.delenv("LATRO_SKIP_RAISE_CHECK", raising=False)
    results = iter(checks)
    monkeypatch.setattr(setup_module, "_raise_check", lambda path: next(results))
    monkeypatch.setattr(setup_module, "_system_compilers", lambda: system)

    class Build(setup_module._checked(_Base)):
        def _module_paths(self):
            return [str(tmp_path / "lib" / "built.so"), str(tmp_path / "inplace" / "built.so")]

        def run(self):
            for path in self._module_paths():  # what the real build leaves, for the check
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Path(path).write_bytes(b"module")
            super().run()

    return Build()


def test_a_clean_module_is_built_once(setup_module, monkeypatch, tmp_path):
    build = _build(setup_module, monkeypatch, tmp_path, [None])
    build.run()
    assert build.builds == [("/env/g++", False)]
    assert all(os.path.exists(path) for path in build._module_paths())


def test_a_crashing_module_is_rebuilt_with_the_system_compiler(setup_module, monkeypatch, tmp_path, capsys):
    build = _build(setup_module, monkeypatch, tmp_path, ["it died of signal 11", None])
    build.run()
    assert build.builds == [("/env/g++", False), ("/sys/g++", True)]
    assert os.environ["CC"] == "/sys/gcc"
    err = capsys.readouterr().err
    assert "/env/g++ does not raise a clean error" in err and "signal 11" in err


def test_the_build_fails_when_the_system_compiler_does_not_help(setup_module, monkeypatch, tmp_path):
    build = _build(setup_module, monkeypatch, tmp_path, ["it died of signal 11", "it died of signal 6"])
    with pytest.raises(RuntimeError, match="signal 11.*/sys/g\\+\\+ \\(it died of signal 6\\)"
                       ".*LATRO_SKIP_RAISE_CHECK=1"):
        build.run()
    assert len(build.builds) == 2
    # The crashing module is not left where the next import would load it.
    assert not any(os.path.exists(path) for path in build._module_paths())


def test_the_build_fails_at_once_without_a_system_compiler(setup_module, monkeypatch, tmp_path):
    build = _build(setup_module, monkeypatch, tmp_path, ["it died of signal 11"], system=None)
    with pytest.raises(RuntimeError, match="/env/g\\+\\+ does not raise a clean error"):
        build.run()
    assert build.builds == [("/env/g++", False)]


def test_the_check_can_be_skipped(setup_module, monkeypatch, tmp_path):
    build = _build(setup_module, monkeypatch, tmp_path, [])  # a check would exhaust the iterator
    monkeypatch.setenv("LATRO_SKIP_RAISE_CHECK", "1")
    build.run()
    assert build.builds == [("/env/g++", False)]


@pytest.mark.skipif(not os.access("/usr/bin/g++", os.X_OK), reason="no /usr/bin/g++")
def test_the_system_compiler_is_no_fallback_for_itself(setup_module, monkeypatch):
    monkeypatch.setenv("CXX", "/usr/bin/g++")
    assert setup_module._system_compilers() is None
    monkeypatch.setenv("CXX", "/bin/sh")  # any other compiler
    assert setup_module._system_compilers() == ("/usr/bin/gcc", "/usr/bin/g++")


@pytest.mark.skipif(not (os.access("/usr/bin/gcc", os.X_OK) and os.access("/usr/bin/g++", os.X_OK)),
                    reason="needs /usr/bin/gcc and /usr/bin/g++")
def test_the_rebuild_really_compiles_again_with_the_system_compiler(setup_module, tmp_path,
                                                                    monkeypatch):
    """The fallback through real setuptools and torch's BuildExtension (ninja), on a tiny
    module: the first build goes through a logging compiler wrapper, the check fails it, and
    the second build compiles and links anew with /usr/bin/g++ in the same command object."""
    from setuptools import Distribution, Extension
    from torch.utils.cpp_extension import BuildExtension

    source = tmp_path / "tiny.cpp"
    source.write_text(
        "#include <Python.h>\n"
        'static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};\n'
        "PyMODINIT_FUNC PyInit_tiny(void) { return PyModule_Create(&tiny); }\n"
    )
    calls = tmp_path / "wrapper.log"
    for name, real in (("cc", "/usr/bin/gcc"), ("cxx", "/usr/bin/g++")):
        wrapper = tmp_path / name
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    monkeypatch.setenv("CXX", str(tmp_path / "cxx"))
    monkeypatch.delenv("LATRO_SKIP_RAISE_CHECK", raising=False)
    checked = []

    def fake_check(path):
        checked.append((os.environ["CXX"], os.path.getmtime(path), calls.read_text().count("\n")))
        return "it died of signal 11" if len(checked) == 1 else None

    monkeypatch.setattr(setup_module, "_raise_check", fake_check)
    build_class = setup_module._checked(BuildExtension.with_options(use_ninja=True))
    dist = Distribution({"name": "tiny", "ext_modules": [Extension("tiny", [str(source)],
                                                                   language="c++")],
                         "cmdclass": {"build_ext": build_class}})
    command = dist.get_command_obj("build_ext")
    command.build_lib, command.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    command.ensure_finalized()
    command.run()
    (first_cxx, first_time, first_calls), (second_cxx, second_time, second_calls) = checked
    assert first_cxx == str(tmp_path / "cxx") and second_cxx == "/usr/bin/g++"
    assert first_calls >= 2  # the wrapper compiled and linked the first build
    assert second_calls == first_calls  # the second never went through it
    assert second_time > first_time  # and wrote the module anew

"""Builds latro_engine's native extension (latro_engine._C) with torch's cpp_extension.

CUDA kernels are compiled when a CUDA toolkit and a CUDA-enabled torch are both present
(decided from the toolkit, not from whether a GPU is visible). Environment switches:
  LATRO_SKIP_CUDA=1   never compile CUDA sources
  LATRO_FORCE_CUDA=1  fail unless CUDA sources are compiled
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0")
  LATRO_SKIP_EXTENSION=1  install the pure-Python package only (reference backend)
  LATRO_NO_OPENMP=1   compile without OpenMP (CPU ops then run on one thread)
  LATRO_SKIP_RAISE_CHECK=1  skip the check that the built module raises errors cleanly

After building, the module is loaded in a child process and handed bad input, which must raise
a ValueError (see _raise_check). On the H100 machine of 2026-11-25/26 a module built by the
environment's compiler (CC/CXX=/opt/gcc/bin/gcc|g++, a separate GCC 13.3 install) died with
SIGSEGV on every error it raised, while the same sources built by the system's /usr/bin/g++
raised cleanly (both probed on CPU and CUDA tensors); so a failed check rebuilds once with the
system compiler, and if that does not help either, removes the module and fails the build (a
module that crashes on a typo is worse than none).
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _check_unique_objects(sources: list[str]) -> None:
    """Each source compiles to <folder>/<stem>.o: a.cpp and a.cu beside it would both be a.o
    (ninja: "multiple rules generate a.o"), so CUDA sources carry their own stem (*_kernels.cu)."""
    seen: dict[str, str] = {}
    for source in sources:
        obj = os.path.splitext(source)[0]
        if obj in seen:
            raise RuntimeError(f"{seen[obj]} and {source} would compile to the same object file")
        seen[obj] = source


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LATRO_SKIP_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    skip_cuda = os.environ.get("LATRO_SKIP_CUDA") == "1"
    force_cuda = os.environ.get("LATRO_FORCE_CUDA") == "1"
    toolkit = CUDA_HOME is not None
    cuda_torch = torch.version.cuda is not None
    cuda_sources = _sources("csrc/core/src/*.cu") + _sources("csrc/torch/*.cu")
    # Without .cu kernels there is nothing to compile for CUDA, and registering CUDA entry
    # points would send CUDA tensors to kernels that do not exist.
    use_cuda = not skip_cuda and toolkit and cuda_torch and bool(cuda_sources)
    if force_cuda and not use_cuda:
        raise RuntimeError(
            f"LATRO_FORCE_CUDA=1 but CUDA cannot be built (toolkit found: {toolkit}, "
            f"torch built with CUDA: {cuda_torch}, CUDA sources: {len(cuda_sources)}, "
            f"LATRO_SKIP_CUDA: {skip_cuda})"
        )
    sources = _sources("csrc/core/src/*.cpp") + _sources("csrc/torch/*.cpp")
    _check_unique_objects(sources + cuda_sources)
    include_dirs = [os.path.join(ROOT, "csrc/core/include"), os.path.join(ROOT, "csrc/torch")]
    # The language standard follows torch (C++17 or newer). -Wno-psabi: the core's inline
    # AVX helpers trigger GCC's ABI notes, which do not apply to inlined code.
    # -fopenmp: ATen's at::parallel_for is a header template that runs serially unless the
    # extension itself is compiled with OpenMP.
    openmp = [] if os.environ.get("LATRO_NO_OPENMP") == "1" else ["-fopenmp"]
    cxx_flags = ["-O3", "-Wno-psabi", *openmp]
    link_flags = openmp
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += cuda_sources
        ext = CUDAExtension(
            "latro_engine._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("LATRO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "latro_engine._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"latro_engine: building the native extension with CUDA {'on' if use_cuda else 'off'}")
    return [ext], {"build_ext": _checked(BuildExtension.with_options(use_ninja=True))}


# The child process of the check: loads the built module as latro_engine._C, then imports the
# package from this checkout (so the op is reached the way users reach it: through the Python
# autograd registration), and asks for a log-probability of a target outside the vocabulary.
_RAISE_CHECK = """
import importlib.util, sys
import torch  # first: the module links against torch's libraries
root, path = sys.argv[1:3]
try:
    spec = importlib.util.spec_from_file_location("latro_engine._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
except ImportError as error:
    print(f"the module does not load: {error}")
    sys.exit(4)
sys.modules["latro_engine._C"] = module
sys.path.insert(0, root)
try:
    from latro_engine import ops
except ImportError as error:  # the package's own dependencies: not the module's fault
    print(f"the package does not import: {error}")
    sys.exit(4)
try:
    ops.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 9]))
except ValueError:
    sys.exit(0)
sys.exit("an out-of-range target raised no ValueError")
"""


def _raise_check(path: str) -> str | None:
    """None when the module at ``path`` raises ValueError for bad input; else what went wrong."""
    env = {k: v for k, v in os.environ.items() if k != "LATRO_BACKEND"}
    try:
        done = subprocess.run([sys.executable, "-c", _RAISE_CHECK, ROOT, path], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "it hung for 300 s"
    if done.returncode == 0:
        return None
    if done.returncode == 4:  # not this check's business: the import error shows at use
        print(f"latro_engine: could not run the raise check: {done.stdout.strip()}")
        return None
    if done.returncode < 0:
        return f"it died of signal {-done.returncode}"
    output = (done.stderr or done.stdout).strip()
    return output.splitlines()[-1] if output else f"exit status {done.returncode}"


def _system_compilers() -> tuple[str, str] | None:
    """The system's gcc and g++ when they are not the ones this build used."""
    cc, cxx = "/usr/bin/gcc", "/usr/bin/g++"
    if not (os.access(cc, os.X_OK) and os.access(cxx, os.X_OK)):
        return None
    used = shutil.which(os.environ.get("CXX", "c++"))
    if used and os.path.realpath(used) == os.path.realpath(cxx):
        return None
    return cc, cxx


def _checked(build_ext_class):
    """build_ext followed by the raise check (see the module docstring)."""

    class CheckedBuildExt(build_ext_class):
        def run(self):
            # A build changes both: run() replaces the --compiler option with a compiler object,
            # and torch's build_extensions appends its flags to the extensions.
            compiler_option, pristine = self.compiler, copy.deepcopy(self.extensions)
            super().run()
            if os.environ.get("LATRO_SKIP_RAISE_CHECK") == "1" or not self.extensions:
                return
            problem = _raise_check(self._built_module())
            if problem is None:
                return
            compiler = os.environ.get("CXX", "c++")
            system = _system_compilers()
            message = (f"latro_engine: the module built with {compiler} does not raise a clean "
                       f"error for bad input ({problem})")
            if system is not None:
                print(f"{message}; rebuilding it with {system[1]}", file=sys.stderr)
                os.environ["CC"], os.environ["CXX"] = system
                self.compiler, self.extensions = compiler_option, pristine
                self.force = True
                super().run()
                problem = _raise_check(self._built_module())
                if problem is None:
                    print(f"latro_engine: built with {system[1]}, which raises cleanly",
                          file=sys.stderr)
                    return
                message += f", and so does the one built with {system[1]} ({problem})"
            # setuptools has already copied it in place (--inplace, editable installs), where
            # the next import would load it.
            for path in self._module_paths():
                if os.path.exists(path):
                    os.remove(path)
            raise RuntimeError(
                f"{message}. Build with a compiler that matches torch's (CC=... CXX=...), or "
                "set LATRO_SKIP_RAISE_CHECK=1 to keep it anyway."
            )

        def _module_paths(self) -> list[str]:
            """Where the module is built (build_lib) and where --inplace copies it."""
            inplace = self.inplace
            paths = []
            for self.inplace in (0, 1):
                paths.append(self.get_ext_fullpath(self.extensions[0].name))
            self.inplace = inplace
            return paths

        def _built_module(self) -> str:
            # The newest of the two is the one just built (a copy keeps its time: either).
            paths = self._module_paths()
            existing = [p for p in paths if os.path.exists(p)]
            return max(existing, key=os.path.getmtime) if existing else paths[0]

    return CheckedBuildExt


if __name__ == "__main__":  # as pip and `python setup.py` run it; tests import the helpers
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

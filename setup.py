"""Builds latro_engine's native extension (latro_engine._C) with torch's cpp_extension.

CUDA kernels are compiled when a CUDA toolkit and a CUDA-enabled torch are both present
(decided from the toolkit, not from whether a GPU is visible). Environment switches:
  LATRO_SKIP_CUDA=1   never compile CUDA sources
  LATRO_FORCE_CUDA=1  fail unless CUDA sources are compiled
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0")
  LATRO_SKIP_EXTENSION=1  install the pure-Python package only (reference backend)
  LATRO_NO_OPENMP=1   compile without OpenMP (CPU ops then run on one thread)
"""

from __future__ import annotations

import glob
import os

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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

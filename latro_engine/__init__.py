"""latro_engine: LaTRO (latent reasoning optimization) training with a native C++/CUDA core.

``latro_engine.ops`` holds the tensor ops (native kernels with a pure-torch fallback).
"""

from latro_engine import ops
from latro_engine._extension import native_available, native_has_cuda

__version__ = "0.1.0"

__all__ = ["__version__", "native_available", "native_has_cuda", "ops"]

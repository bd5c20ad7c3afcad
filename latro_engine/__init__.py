"""latro_engine: LaTRO (latent reasoning optimization) training with a native C++/CUDA core.

``latro_engine.ops`` holds the tensor ops (native kernels with a pure-torch fallback);
``LatroTrainer``, ``SFTTrainer`` and ``LatroConfig`` drive training (imported on first use, so
``import latro_engine`` stays light for users of the ops alone).
"""

from latro_engine import ops
from latro_engine._extension import native_available, native_has_cuda

__version__ = "0.1.0"

_LAZY = {
    "LatroConfig": "latro_engine.config",
    "LatroTrainer": "latro_engine.trainer",
    "SFTTrainer": "latro_engine.trainer",
}

__all__ = ["__version__", "native_available", "native_has_cuda", "ops", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latro_engine' has no attribute {name!r}")

"""Loads the native extension and picks the backend for each call.

Backend choice: ``LATRO_BACKEND=torch`` forces the pure-torch reference; ``native`` demands the
extension (an error if it is missing); the default ``auto`` uses the native kernels for CPU
tensors, and for CUDA tensors when the CUDA kernels were compiled, else the reference.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from latro_engine import _C  # noqa: F401  (importing registers torch.ops.latro_engine.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as error:  # built without the extension, or the build failed
    _C = None
    _IMPORT_ERROR = error

_BACKENDS = ("auto", "torch", "native")


def native_available() -> bool:
    """Whether the native extension is importable."""
    return _C is not None


def native_has_cuda() -> bool:
    """Whether the native extension carries CUDA kernels."""
    return _C is not None and bool(_C.has_cuda())


def requested_backend() -> str:
    value = os.environ.get("LATRO_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"LATRO_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}")
    return value


def use_native(device: torch.device) -> bool:
    """True when the op on tensors of ``device`` should run the native kernels."""
    requested = requested_backend()
    if requested == "torch":
        return False
    native = _C is not None and (
        device.type == "cpu" or (device.type == "cuda" and native_has_cuda())
    )
    if requested == "native" and not native:
        reason = (
            f"the extension did not load ({_IMPORT_ERROR})"
            if _C is None
            else (f"it has no kernels for {device.type}")
        )
        raise RuntimeError(f"LATRO_BACKEND=native but {reason}")
    return native


if _C is None and requested_backend() != "torch":
    warnings.warn(
        "latro_engine: the native extension is not built or failed to load "
        f"({_IMPORT_ERROR}); every op runs the pure-torch reference backend. "
        "Build it with `pip install --no-build-isolation -e .` (see scripts/setup.sh).",
        RuntimeWarning,
        stacklevel=2,
    )

"""Shared fixtures: devices, backends, dtypes and the one tolerance table."""

from __future__ import annotations

import pytest
import torch

import latro_engine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [1, 7, 97, 1025]
LLAMA3_VOCAB = 128_256

# Absolute slack added to "at most 2x plain torch's error at the same dtype" (flash-attention's
# rule for reductions), per input dtype.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}

requires_native = pytest.mark.skipif(
    not latro_engine.native_available(), reason="the native extension is not built"
)


def backends_for(device: str) -> list[str]:
    """The backends an op can run on for tensors of ``device``: the reference always, native
    where the extension has kernels for that device."""
    names = ["torch"]
    if latro_engine.native_available() and (device == "cpu" or latro_engine.native_has_cuda()):
        names.append("native")
    return names


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's spinning makes each 32-wide matmul ~10x slower. Modules of tiny-model tests
    take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("torch" | "native") switches LATRO_BACKEND for the rest of the test."""

    def switch(name: str) -> None:
        monkeypatch.setenv("LATRO_BACKEND", name)

    return switch


def device_backend_pairs() -> list[tuple[str, str]]:
    return [(d, b) for d in DEVICES for b in backends_for(d)]


def stop_positions_by_brute_force(
    tokens: list[list[int]], stops: list[list[int]], start: int
) -> list[int]:
    """Per row, where the first stop sequence begins at or after ``start`` (else the length)."""
    out = []
    for row in tokens:
        found = len(row)
        for begin in range(start, len(row)):
            if any(row[begin : begin + len(s)] == s for s in stops):
                found = begin
                break
        out.append(found)
    return out


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, dtype):
    """actual's error against the float64 oracle is at most 2x plain torch's error plus ATOL."""
    actual_err = (actual.double() - oracle).abs()
    plain_err = (plain.double() - oracle).abs()
    bound = 2 * plain_err.max() + ATOL[dtype] * (1 + oracle.abs().max())
    assert actual_err.max() <= bound, f"max error {actual_err.max():.3g} > bound {bound:.3g}"

"""ops.rms_norm: the models' RMSNorm (optionally of a residual sum) on both backends, against
Llama's own LlamaRMSNorm module and a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, backends_for
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from latro_engine import ops

SHAPES = [(3, 1), (5, 37), (2, 3, 257), (7, 2048)]
# One rounding of the normalized value and one of the weighted output, in the storage dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(*shape, generator=g) * 2).to(dtype), torch.randn(*shape, generator=g)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    return x, residual.to(dtype), weight


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_models_rmsnorm(shape, dtype, with_residual, backend, use_backend):
    use_backend(backend)
    x, residual, weight = _inputs(shape, dtype)
    module = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    if with_residual:
        out, total = ops.rms_norm(x, weight, eps=1e-5, residual=residual)
        assert torch.equal(total, x + residual)
        s = x + residual
    else:
        out = ops.rms_norm(x, weight, eps=1e-5)
        s = x
    assert out.dtype == dtype and out.shape == x.shape
    with torch.no_grad():
        theirs = module(s)
    torch.testing.assert_close(out, theirs, atol=TOL[dtype], rtol=TOL[dtype])
    s64 = s.double()
    oracle = weight.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.double(), oracle, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backends_agree_bit_for_bit(dtype, use_backend):
    x, residual, weight = _inputs((9, 300), dtype, seed=3)
    results = []
    for backend in backends_for("cpu"):
        use_backend(backend)
        results.append(ops.rms_norm(x, weight, eps=1e-6, residual=residual))
    for out, total in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(total, results[0][1])


def test_float32_is_llamas_own_forward():
    """In float32 the op is LlamaRMSNorm up to its float32 mean's rounding order."""
    x, _, weight = _inputs((16, 2048), torch.float32, seed=4)
    module = LlamaRMSNorm(2048, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(weight)
        theirs = module(x)
    torch.testing.assert_close(ops.rms_norm(x, weight, eps=1e-6), theirs, atol=1e-6, rtol=1e-6)

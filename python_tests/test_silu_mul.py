"""ops.silu_mul (the gated MLP's silu(gate) * up) on both backends against torch's own ops and a
float64 oracle, and CUDA against the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, backends_for

from latro_engine import ops

# Two roundings (the activation, the product) in the storage dtype.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 4).to(dtype), torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 37), (2, 3, 4099)], ids=str)
def test_matches_torch_and_the_oracle(shape, dtype, backend, use_backend):
    use_backend(backend)
    gate, up = _inputs(shape, dtype)
    out = ops.silu_mul(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    theirs = torch.nn.functional.silu(gate) * up  # the models' MLP
    torch.testing.assert_close(out, theirs, atol=TOL[dtype], rtol=TOL[dtype])
    oracle = torch.nn.functional.silu(gate.double()) * up.double()
    torch.testing.assert_close(out.double(), oracle, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu(dtype, use_backend):
    use_backend("native")
    gate, up = _inputs((64, 8192), dtype, seed=1)
    cpu = ops.silu_mul(gate, up)
    gpu = ops.silu_mul(gate.cuda(), up.cuda()).cpu()
    # The same formula and roundings; expf may differ in its last bit between the two.
    torch.testing.assert_close(gpu, cpu, atol=TOL[dtype], rtol=TOL[dtype])

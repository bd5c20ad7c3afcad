"""linear_token_logprobs: the chunked LM-head scorer equals scoring the full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, device_backend_pairs

from latro_engine import ops, reference


def _case(n, d, v, dtype, device, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g)).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).to(device)
    b = (torch.randn(v, generator=g)).to(dtype).to(device) if bias else None
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    if n > 2:
        targets[n // 2] = -100
    return hidden, weight, b, targets


def _full_logits_oracle(hidden, weight, bias, targets):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return reference.token_logprobs(logits, targets)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize(
    "n,d,v,chunk", [(1, 8, 7, None), (7, 16, 97, 3), (97, 32, 1025, 10), (33, 24, 128_256, 16)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_full_logits(device, backend, n, d, v, chunk, bias, use_backend):
    use_backend(backend)
    hidden, weight, b, targets = _case(n, d, v, torch.float32, device, bias, seed=n + v)
    out = ops.linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=chunk)
    torch.testing.assert_close(
        out.double(), _full_logits_oracle(hidden, weight, b, targets), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_half_precision_equals_token_logprobs_of_matmul(device, backend, dtype, use_backend):
    """Same result as token_logprobs(hidden @ weight.T) computed at the input dtype."""
    use_backend(backend)
    hidden, weight, _, targets = _case(29, 16, 97, dtype, device, seed=9)
    out = ops.linear_token_logprobs(hidden, weight, targets, chunk_size=8)
    expected = reference.token_logprobs((hidden @ weight.t()).double(), targets)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_full_logits(device, backend, bias, use_backend):
    use_backend(backend)
    hidden, weight, b, targets = _case(37, 12, 211, torch.float32, device, bias, seed=4)
    upstream = torch.randn(37, device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    out = ops.linear_token_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2] if bias else None, chunk_size=5
    )
    (out * upstream).sum().backward()
    ref = [t.double().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    expected = _full_logits_oracle(ref[0], ref[1], ref[2] if bias else None, targets)
    (expected * upstream.double()).sum().backward()
    for mine, theirs in zip(leaves, ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_gradcheck_float64_reference_and_native_jacobian(device, backend, use_backend):
    use_backend("torch")
    hidden = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)
    targets = torch.tensor([0, 8, -100, 3, 3], device=device)

    def f(h, w, b):
        return ops.linear_token_logprobs(h, w, targets, bias=b, chunk_size=2)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))
    expected = torch.autograd.functional.jacobian(
        f, (hidden.detach(), weight.detach(), bias.detach())
    )
    use_backend(backend)
    got = torch.autograd.functional.jacobian(
        f, (hidden.detach().float(), weight.detach().float(), bias.detach().float())
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-4)


def test_default_chunk_bounds_logits_memory():
    assert reference.default_chunk_size(16_384, 128_256) * 128_256 <= 1 << 25
    assert reference.default_chunk_size(3, 7) == 3

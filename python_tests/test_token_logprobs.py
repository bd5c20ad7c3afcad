"""token_logprobs against the float64 oracle, both backends, every dtype, odd sizes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    LLAMA3_VOCAB,
    ODD_SIZES,
    assert_close_to_oracle,
    device_backend_pairs,
)

from latro_engine import ops, reference


def _case(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    if rows > 2:
        targets[1] = -100
    return logits, targets


def _oracle(logits, targets, ignore_index=-100):
    return reference.token_logprobs(logits.double(), targets, ignore_index=ignore_index)


def _plain(logits, targets):
    """Plain torch at float32, to size the rounding error we may have."""
    return reference.token_logprobs(logits, targets)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", ODD_SIZES[:3])
@pytest.mark.parametrize("vocab", ODD_SIZES)
def test_matches_float64_oracle(device, backend, dtype, rows, vocab, use_backend):
    use_backend(backend)
    logits, targets = _case(rows, vocab, dtype, device, seed=rows * 31 + vocab)
    out = ops.token_logprobs(logits, targets)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert_close_to_oracle(out, _oracle(logits, targets), _plain(logits, targets), dtype)
    ignored = targets == -100
    assert torch.all(out[ignored] == 0)
    assert torch.all(out[~ignored] <= 0)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_llama3_vocabulary(device, backend, dtype, use_backend):
    use_backend(backend)
    logits, targets = _case(3, LLAMA3_VOCAB, dtype, device, seed=5)
    logits[0, 17] = 40.0  # one dominant token: log-prob near 0, must never exceed it
    targets[0] = 17
    out = ops.token_logprobs(logits, targets)
    assert_close_to_oracle(out, _oracle(logits, targets), _plain(logits, targets), dtype)
    assert out[0] <= 0


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_noncontiguous_and_batched_shapes(device, backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 9, 97, generator=g).to(device)
    targets = torch.randint(0, 97, (3, 9), generator=g).to(device)
    views = {
        "shifted (LM-style [:, :-1])": (full[:, :-1], targets[:, 1:]),
        "transposed batch": (full.transpose(0, 1), targets.t()),
        "strided vocab": (full[..., ::2], targets.clamp(max=48)),
        "expanded rows": (full[:1, :1].expand(3, 4, 97), targets[:, :4]),
        "1-d": (full[0, 0], targets[0, 0]),
    }
    for name, (logits, t) in views.items():
        out = ops.token_logprobs(logits, t)
        expected = _oracle(logits, t)
        assert out.shape == t.shape, name
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_extreme_logits(device, backend, use_backend):
    use_backend(backend)
    inf = float("inf")
    logits = torch.tensor(
        [[0.0, -inf, 1.0], [1e30, 0.0, -1e30], [-inf, -inf, -inf], [0.0, float("nan"), 1.0]],
        device=device,
    )
    targets = torch.tensor([1, 0, 0, 0], device=device)
    out = ops.token_logprobs(logits, targets)
    expected = _oracle(logits, targets)
    assert out[0] == -inf
    assert out[1] == 0
    assert torch.isnan(out[2]) and torch.isnan(expected[2])  # torch's log_softmax agrees
    assert torch.isnan(out[3])


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_any_upstream_gradient(device, backend, dtype, use_backend):
    use_backend(backend)
    logits, targets = _case(7, 1025, dtype, device, seed=3)
    upstream = torch.randn(7, device=device)
    leaf = logits.clone().requires_grad_()
    (ops.token_logprobs(leaf, targets) * upstream).sum().backward()
    ref_leaf = logits.double().requires_grad_()
    (_oracle(ref_leaf, targets) * upstream.double()).sum().backward()
    assert leaf.grad.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_gradcheck_float64_reference_and_native_backward(device, backend, use_backend):
    """gradcheck runs in float64: the reference directly; the native backward (float32 only
    kernels) is checked against the analytic float64 Jacobian it must equal."""
    use_backend("torch")
    logits = torch.randn(4, 11, dtype=torch.float64, device=device, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10], device=device)
    assert torch.autograd.gradcheck(lambda x: ops.token_logprobs(x, targets), (logits,))
    use_backend(backend)
    x32 = logits.detach().float().requires_grad_()
    jac = torch.autograd.functional.jacobian(lambda x: ops.token_logprobs(x, targets), x32)
    use_backend("torch")
    jac64 = torch.autograd.functional.jacobian(
        lambda x: ops.token_logprobs(x, targets), logits.detach()
    )
    torch.testing.assert_close(jac.double(), jac64, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- near float32 max
# Near the float32 maximum, max + log(sum) rounds back to max, even in float64 (an ulp of 3e38 is
# 4e22 there): a kernel that returned x - lse gave two tied logits of 3e38 log-probability 0
# instead of -log 2, and a backward that took exp(x - lse) gave each of them probability 1.
def _huge_rows(dtype: torch.dtype, device: str):
    big = torch.finfo(dtype).max
    logits = torch.tensor(
        [
            [big, big, -2.0, 0.0],  # two tied maxima: -log 2
            [3e38, 3e38, 3e38, -3e38],  # three: -log 3
            [-big, -big, -big, -big],  # all at the negative end: -log 4
            [-3e38, -3e38, -3e38, -3.1e38],  # three tied, one far below: -log 3
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 2, 1, 0], device=device)
    expected = -torch.tensor([2.0, 3.0, 4.0, 3.0], dtype=torch.float64).log()
    return logits.to(dtype).to(device), targets, expected


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_near_the_float32_maximum(device, backend, dtype, use_backend):
    use_backend(backend)
    logits, targets, expected = _huge_rows(dtype, device)
    leaf = logits.clone().requires_grad_()
    out = ops.token_logprobs(leaf, targets)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), _oracle(logits, targets), atol=1e-6, rtol=1e-6)

    upstream = torch.tensor([1.0, -0.5, 2.0, 1.5], device=device)
    (out * upstream).sum().backward()
    ref_leaf = logits.double().requires_grad_()
    (_oracle(ref_leaf, targets) * upstream.double()).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the gradient is stored in dtype
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=tol, rtol=tol)
    assert leaf.grad[0, 0].item() == pytest.approx(0.5, abs=tol)  # 1 - 1/2, not 1 - 1


@pytest.mark.parametrize("device", [d for d, b in device_backend_pairs() if b == "native"])
def test_ties_near_the_float32_maximum_lse(device):
    """The native op's lse output keeps its meaning: the row's log-sum-exp, in float32."""
    logits, targets, _ = _huge_rows(torch.float32, device)
    _, lse = torch.ops.latro_engine.token_logprobs(logits, targets, -100)
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(logits.double(), -1).float().cpu())


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_linear_ties_near_the_float32_maximum(device, backend, use_backend):
    """The fuzz case that found it: a bias at the float32 maximum on two of three tokens."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(torch.float32).max
    hidden = torch.randn(1, 5, generator=g).to(device)
    weight = torch.randn(3, 5, generator=g).to(device)
    bias = torch.tensor([big, big, -2.0], device=device)
    targets = torch.tensor([0], device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = ops.linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2])
    assert out.item() == pytest.approx(-math.log(2), abs=1e-6)
    out.sum().backward()
    # Logits [big, big, ~0]: softmax [1/2, 1/2, 0], so d out / d logits = [1/2, -1/2, 0].
    grad_logits = torch.tensor([[0.5, -0.5, 0.0]], device=device)
    torch.testing.assert_close(leaves[2].grad, grad_logits[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaves[0].grad, grad_logits @ weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaves[1].grad, grad_logits.t() @ hidden, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("shift", [0.0, 1000.0, -1e6])
def test_backward_is_shift_invariant(device, backend, shift, use_backend):
    """Large |lse| (here ~1000 and ~-1e6) takes the backward's recomputing path; the gradient
    must be that of the unshifted row to float32 precision (exp(x - lse) through a float32
    lse of 1000 would be off by up to ulp(1000) / 2 = 3e-5 of each probability)."""
    use_backend(backend)
    logits, targets = _case(5, 1025, torch.float32, device, seed=11)
    shifted = (logits.double() + shift).float()  # exact in float32 up to the ulp at `shift`
    leaf = shifted.clone().requires_grad_()
    upstream = torch.linspace(-2, 2, 5, device=device)
    (ops.token_logprobs(leaf, targets) * upstream).sum().backward()
    ref_leaf = shifted.double().requires_grad_()
    (_oracle(ref_leaf, targets) * upstream.double()).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-6, rtol=1e-5)

"""linear_weighted_logprob_sum: sum_i w_i log p(target_i), its gradient taken in the forward,
equals the weighted sum of linear_token_logprobs and its autograd gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    LINEAR_SHAPES,
    assert_close_to_oracle,
    device_backend_pairs,
    linear_problem,
    requires_native,
)

from latro_engine import ops, reference


def _case(n, d, v, dtype, device, bias=False, seed=0):
    return linear_problem(n, d, v, dtype, device, bias, seed, token_weights=True)


def _oracle(hidden, weight, bias, targets, token_weights, ignore_index=-100):
    """(total, logprobs, grads) in float64 through plain autograd on the full logits."""
    leaves = [t.double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if bias is not None else 0)
    logp = reference.token_logprobs(logits, targets, ignore_index=ignore_index)
    total = (logp * token_weights.double()).sum()
    total.backward()
    return total.detach(), logp.detach(), [t.grad for t in leaves]


def _weighted(hidden, weight, bias, targets, token_weights, *, upstream=1.0, grads=(True, True, True), **kw):
    """(total, logprobs, grads) of the op, backpropagating upstream * total."""
    leaves = [
        t.clone().requires_grad_(want)
        for t, want in zip((hidden, weight) + ((bias,) if bias is not None else ()), grads)
    ]
    total, logp = ops.linear_weighted_logprob_sum(
        leaves[0], leaves[1], targets, token_weights, bias=leaves[2] if bias is not None else None, **kw
    )
    if total.requires_grad:
        (total * upstream).backward()
    return total, logp, [t.grad for t in leaves]


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("n,d,v,chunk", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_total_logprobs_and_gradients_match_float64(device, backend, n, d, v, chunk, bias, use_backend):
    use_backend(backend)
    case = _case(n, d, v, torch.float32, device, bias, seed=n + v)
    total, logp, grads = _weighted(*case, upstream=-2.5, chunk_size=chunk)
    e_total, e_logp, e_grads = _oracle(*case)
    assert total.dtype == logp.dtype == torch.float32 and total.shape == ()
    assert not logp.requires_grad
    torch.testing.assert_close(total.double(), e_total, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logp.double(), e_logp, atol=2e-5, rtol=1e-5)
    for mine, theirs in zip(grads, e_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), -2.5 * theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_the_gradients_asked_for(device, backend, grads, use_backend):
    """A frozen LM head (LoRA on the body) or frozen hidden states: the others still match."""
    use_backend(backend)
    case = _case(19, 8, 211, torch.float32, device, bias=True, seed=2)
    _, _, got = _weighted(*case, grads=grads, chunk_size=4)
    _, _, expected = _oracle(*case)
    for want, mine, theirs in zip(grads, got, expected):
        if want:
            torch.testing.assert_close(mine.double(), theirs, atol=2e-5, rtol=1e-4)
        else:
            assert mine is None


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_without_grad_it_is_the_weighted_forward(device, backend, use_backend):
    use_backend(backend)
    hidden, weight, b, targets, w = _case(29, 16, 300, torch.float32, device, bias=True, seed=3)
    with torch.no_grad():
        total, logp = ops.linear_weighted_logprob_sum(
            hidden.requires_grad_(), weight, targets, w, bias=b, chunk_size=5
        )
    assert total.grad_fn is None
    expected = ops.linear_token_logprobs(hidden.detach(), weight, targets, bias=b, chunk_size=5)
    torch.testing.assert_close(logp, expected, atol=0, rtol=0)
    torch.testing.assert_close(total, (expected.double() * w.double()).sum().float())


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_low_precision_one_chunk_is_one_rounding(device, backend, dtype, use_backend):
    """With every row in one chunk each gradient is one matmul, rounded once: within 2x plain
    torch's error at the same dtype (weighted sum of log_softmax + gather, autograd)."""
    use_backend(backend)
    hidden, weight, b, targets, w = _case(41, 16, 333, dtype, device, bias=True, seed=4)
    _, logp, grads = _weighted(hidden, weight, b, targets, w, chunk_size=41)
    _, e_logp, e_grads = _oracle(hidden, weight, b, targets, w)
    plain = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    logits = torch.addmm(plain[2], plain[0], plain[1].t()).float()
    safe = targets.clamp(min=0)[:, None]
    plain_logp = torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1)
    (torch.where(targets == -100, 0.0, plain_logp) * w).sum().backward()
    assert_close_to_oracle(logp, e_logp, plain_logp.detach(), dtype)
    for mine, theirs, p in zip(grads, e_grads, plain):
        assert mine.dtype == dtype
        assert_close_to_oracle(mine, theirs, p.grad, dtype)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_grad_rounds_once_per_chunk(device, backend, dtype, use_backend):
    """The documented price of the one-pass gradient: the weight gradient is summed over chunks
    of rows in its own dtype, one rounding per chunk (as micro-batch gradients summed in a bf16
    .grad). With 8 chunks its error stays within 8 roundings of the float64 oracle (against
    one for a single chunk); the hidden gradient, one matmul per row, does not change."""
    use_backend(backend)
    n, d, v = 64, 16, 24
    g = torch.Generator().manual_seed(11)
    hidden = (torch.rand(n, d, generator=g) + 0.5).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    w = torch.rand(n, generator=g).to(device) + 0.5
    _, _, (oracle_h, oracle_w) = _oracle(hidden, weight, None, targets, w)
    ulp = torch.finfo(dtype).eps * oracle_w.abs().max().item()
    errors = {}
    for chunk in (n, n // 8):
        _, _, (grad_h, grad_w) = _weighted(hidden, weight, None, targets, w, chunk_size=chunk)
        errors[chunk] = (grad_w.double() - oracle_w).abs().max().item()
        assert errors[chunk] <= (n // chunk) * ulp, (chunk, errors)
        torch.testing.assert_close(grad_h.double(), oracle_h, atol=4 * torch.finfo(dtype).eps, rtol=0)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_rows_with_huge_logits_and_in_vocab_ignore_index(device, backend, use_backend):
    """Whole rows per chunk: logits in the hundreds need no second path; ignore_index may be a
    vocabulary id, whose rows add nothing whatever their weight."""
    use_backend(backend)
    hidden, weight, b, targets, w = _case(29, 8, 700, torch.float32, device, bias=True, seed=8)
    hidden[::3] *= 120
    targets[targets == -100] = 5
    targets[::4] = 3
    w[::4] = float("inf")  # ignored rows: their weight is never multiplied
    total, logp, grads = _weighted(hidden, weight, b, targets, w, chunk_size=3, ignore_index=3)
    e_total, e_logp, e_grads = _oracle(hidden, weight, b, targets, torch.where(targets == 3, 0.0, w),
                                       ignore_index=3)
    assert (logp[::4] == 0).all()
    torch.testing.assert_close(total.double(), e_total, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(logp.double(), e_logp, atol=1e-4, rtol=1e-5)
    for mine, theirs in zip(grads, e_grads):
        torch.testing.assert_close(mine.double(), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=requires_native)])
def test_autocast_float32_leaves_get_float32_gradients(backend, use_backend):
    """Under autocast the op runs at the autocast dtype (as linear_token_logprobs does) and the
    gradients reach float32 leaves in float32; natively, exactly the bf16-input result."""
    use_backend(backend)
    hidden, weight, b, targets, w = _case(37, 24, 211, torch.float32, "cpu", bias=True, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, logp, grads = _weighted(hidden, weight, b, targets, w, chunk_size=37)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    e_total, _, e_grads = _oracle(hidden, weight, b, targets, w)
    torch.testing.assert_close(total.double(), e_total, atol=0.5, rtol=2e-2)
    for mine, theirs in zip(grads, e_grads):
        torch.testing.assert_close(mine.double(), theirs, atol=5e-2, rtol=2e-2)
    if backend == "native":
        low = [t.bfloat16() for t in (hidden, weight, b)]
        total_bf16, logp_bf16, grads_bf16 = _weighted(*low, targets, w, chunk_size=37)
        torch.testing.assert_close(total, total_bf16, atol=0, rtol=0)
        torch.testing.assert_close(logp, logp_bf16, atol=0, rtol=0)
        for mine, theirs in zip(grads, grads_bf16):
            torch.testing.assert_close(mine, theirs.float(), atol=0, rtol=0)


@requires_native
def test_native_backward_hands_the_gradients_out_once(use_backend):
    use_backend("native")
    hidden, weight, _, targets, w = _case(9, 8, 33, torch.float32, "cpu", seed=6)
    total, _ = ops.linear_weighted_logprob_sum(hidden.requires_grad_(), weight, targets, w)
    (2 * total).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        total.backward()


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_bad_input(device, backend, use_backend):
    use_backend(backend)
    hidden, weight, _, targets, w = _case(9, 8, 33, torch.float32, device, seed=7)
    with pytest.raises(TypeError, match="token_weights"):
        ops.linear_weighted_logprob_sum(hidden, weight, targets, targets)
    with pytest.raises(ValueError, match="token_weights must have shape"):
        ops.linear_weighted_logprob_sum(hidden, weight, targets, w[:4])
    with pytest.raises(ValueError, match="token_weights"):
        ops.linear_weighted_logprob_sum(hidden, weight, targets, w[:, None])
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_weighted_logprob_sum(hidden, weight, targets, w, chunk_size=0)
    with pytest.raises(TypeError, match="weight"):
        ops.linear_weighted_logprob_sum(hidden, weight.half(), targets, w)
    for grad in (False, True):
        bad = targets.clone()
        bad[4] = 33
        with pytest.raises(ValueError, match=r"targets\[4\] = 33 is out of range"):
            ops.linear_weighted_logprob_sum(hidden.clone().requires_grad_(grad), weight, bad, w,
                                            chunk_size=2)
    if device != "cpu":
        with pytest.raises(ValueError, match="token_weights is on cpu"):
            ops.linear_weighted_logprob_sum(hidden, weight, targets, w.cpu())


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_no_tokens(device, backend, use_backend):
    """An empty batch: total 0, no log-probabilities, zero gradients (not uninitialized memory)."""
    use_backend(backend)
    hidden, weight, b, targets, w = _case(0, 8, 33, torch.float32, device, bias=True)
    total, logp, grads = _weighted(hidden, weight, b, targets, w)
    assert total.item() == 0 and logp.shape == (0,)
    assert grads[0].shape == (0, 8)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])

"""linear_token_logprobs: the chunked LM-head scorer equals scoring the full logits."""

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


def _full_logits_oracle(hidden, weight, bias, targets):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return reference.token_logprobs(logits, targets)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("n,d,v,chunk", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_full_logits(device, backend, n, d, v, chunk, bias, use_backend):
    use_backend(backend)
    hidden, weight, b, targets = linear_problem(n, d, v, torch.float32, device, bias, seed=n + v)
    out = ops.linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=chunk)
    torch.testing.assert_close(
        out.double(), _full_logits_oracle(hidden, weight, b, targets), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_half_precision_equals_token_logprobs_of_matmul(device, backend, dtype, use_backend):
    """Same result as token_logprobs(hidden @ weight.T) computed at the input dtype."""
    use_backend(backend)
    hidden, weight, _, targets = linear_problem(29, 16, 97, dtype, device, seed=9)
    out = ops.linear_token_logprobs(hidden, weight, targets, chunk_size=8)
    expected = reference.token_logprobs((hidden @ weight.t()).double(), targets)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_full_logits(device, backend, bias, use_backend):
    use_backend(backend)
    hidden, weight, b, targets = linear_problem(37, 12, 211, torch.float32, device, bias, seed=4)
    upstream = torch.randn(37, device=device)
    _assert_grads_match_oracle(hidden, weight, b, targets, upstream, atol=1e-5, rtol=1e-4,
                               chunk_size=5)


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
    # About 512 MiB of logits: 2,092 rows of 128k bf16 logits, half as many in float32.
    assert reference.default_chunk_size(16_384, 128_256, 2) == 2_092
    assert reference.default_chunk_size(16_384, 128_256, 4) == 1_046
    assert reference.default_chunk_size(16_384, 128_256, 2) * 128_256 * 2 <= 1 << 29
    assert reference.default_chunk_size(3, 7, 4) == 3


# ----------------------------------------------------------------------------- autocast
def _autocast_case(bias, seed=5):
    hidden, weight, b, targets = linear_problem(37, 24, 211, torch.float32, "cpu", bias, seed=seed)
    return hidden, weight, b, targets, torch.randn(37, generator=torch.Generator().manual_seed(1))


def _scored_grads(hidden, weight, b, targets, upstream, autocast=False, chunk_size=5, **kw):
    """(out, grads) of sum(upstream * linear_token_logprobs), optionally under CPU autocast;
    kw (ignore_index) goes to the op."""
    leaves = [
        t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ops.linear_token_logprobs(
            leaves[0],
            leaves[1],
            targets,
            bias=leaves[2] if b is not None else None,
            chunk_size=chunk_size,
            **kw,
        )
        # The backward runs inside the autocast region too: the case that used to fail with
        # "Expected out tensor to have dtype BFloat16".
        (out * upstream).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_cpu_bf16_forward_and_backward(backend, bias, use_backend):
    """Under autocast the scorer runs its matmuls at the autocast dtype (as F.linear would) and
    hands back float32 log-probabilities and float32 gradients for float32 leaves, within
    bf16-rounding distance of the float32 oracle."""
    use_backend(backend)
    hidden, weight, b, targets, upstream = _autocast_case(bias)
    out, grads = _scored_grads(hidden, weight, b, targets, upstream, autocast=True)
    assert out.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)

    ref = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    expected = _full_logits_oracle(ref[0], ref[1], ref[2] if bias else None, targets)
    (expected * upstream.double()).sum().backward()
    # bf16 keeps 8 significant bits: logits of size ~3 are off by ~1e-2 after the inputs are
    # rounded, and so are the log-probabilities and the gradients (which are O(1) here).
    torch.testing.assert_close(out.double(), expected.detach(), atol=5e-2, rtol=2e-2)
    for mine, theirs in zip(grads, ref):
        torch.testing.assert_close(mine.double(), theirs.grad.double(), atol=5e-2, rtol=2e-2)


@requires_native
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_native_equals_explicit_bf16_inputs(bias, use_backend):
    """The op's autocast rule is exactly "cast hidden, weight and bias to the autocast dtype":
    the result equals running it on bf16 copies of the inputs, and mixed-dtype inputs (bf16
    activations, float32 master weight) are accepted under autocast."""
    use_backend("native")
    hidden, weight, b, targets, upstream = _autocast_case(bias, seed=6)
    out, grads = _scored_grads(hidden, weight, b, targets, upstream, autocast=True)
    low = [t.bfloat16() for t in (hidden, weight) + ((b,) if bias else ())]
    out_bf16, grads_bf16 = _scored_grads(
        low[0], low[1], low[2] if bias else None, targets, upstream, autocast=False
    )
    torch.testing.assert_close(out, out_bf16, atol=0, rtol=0)
    for mine, theirs in zip(grads, grads_bf16):
        torch.testing.assert_close(mine, theirs.float(), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ops.linear_token_logprobs(hidden.bfloat16(), weight, targets, bias=b, chunk_size=5)
    torch.testing.assert_close(mixed, out, atol=0, rtol=0)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_grad_does_not_degrade_with_chunks(
    device, backend, dtype, use_backend
):
    """The weight gradient sums one product per chunk. With 512 one-row chunks its error against
    a float64 oracle stays at one rounding to the weight dtype (at most 2x plain torch's single
    matmul, the suite's rule), the same as with one chunk: the sum is kept in float32 and rounded
    once, not rounded into a bf16 buffer after every chunk."""
    use_backend(backend)
    n, d, v = 512, 16, 24
    g = torch.Generator().manual_seed(11)
    hidden = (torch.rand(n, d, generator=g) + 0.5).to(dtype).to(device)  # one sign: no cancelling
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.rand(n, generator=g).to(device) + 0.5

    ref_w = weight.double().requires_grad_()
    oracle = _full_logits_oracle(hidden.double(), ref_w, None, targets)
    (oracle * upstream.double()).sum().backward()
    plain_w = weight.clone().requires_grad_()  # plain torch at the same dtype: one matmul
    plain = torch.log_softmax((hidden @ plain_w.t()).float(), -1).gather(-1, targets[:, None])
    (plain.squeeze(-1) * upstream).sum().backward()

    errors = {}
    for chunk in (n, 1):
        w = weight.clone().requires_grad_()
        (
            ops.linear_token_logprobs(hidden, w, targets, chunk_size=chunk) * upstream
        ).sum().backward()
        assert w.grad.dtype == dtype
        assert_close_to_oracle(w.grad, ref_w.grad, plain_w.grad, dtype)
        errors[chunk] = (w.grad.double() - ref_w.grad).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref_w.grad.abs().max().item()
    assert errors[1] <= 2 * errors[n] + ulp, errors


# ----------------------------------------------------------------------------- backward blocks
def _oracle_grads(hidden, weight, bias, targets, upstream, ignore_index=-100):
    ref = [t.double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = ref[0] @ ref[1].t() + (ref[2] if bias is not None else 0)
    (reference.token_logprobs(logits, targets, ignore_index=ignore_index) * upstream.double()).sum().backward()
    return [t.grad for t in ref]


def _assert_grads_match_oracle(hidden, weight, bias, targets, upstream, *, atol, rtol, **kw):
    """Gradients of linear_token_logprobs (kw: chunk_size, ignore_index) against float64."""
    oracle_kw = {"ignore_index": kw["ignore_index"]} if "ignore_index" in kw else {}
    _, got = _scored_grads(hidden, weight, bias, targets, upstream, **kw)
    expected = _oracle_grads(hidden, weight, bias, targets, upstream, **oracle_kw)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine.double(), theirs, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_backward_vocabulary_blocks_with_bias_and_in_vocab_ignore_index(device, backend, use_backend):
    """chunk_size=1 cuts V=1000 into 8 vocabulary blocks (the last one narrower); targets fall in
    every block, and ignore_index is itself a vocabulary id (3) that must still mean "ignored"."""
    use_backend(backend)
    hidden, weight, b, targets = linear_problem(19, 16, 1000, torch.float32, device, bias=True, seed=21)
    targets[targets == -100] = 7  # -100 is not the ignore_index here
    targets[::4] = 3
    targets[1] = 999  # the last column of the last block
    targets[2] = 0
    upstream = torch.randn(19, device=device)
    _assert_grads_match_oracle(hidden, weight, b, targets, upstream, atol=1e-5, rtol=1e-4,
                               chunk_size=1, ignore_index=3)


@requires_native
def test_vocabulary_blocks_are_multiples_of_128_columns():
    """chunk_size=3 of 10 rows asks for blocks of 300 columns; the native op rounds them up to
    384, an aligned width (an H100 ran the odd-width default blocks at 6.6x the matmul), in the
    forward and in the backward's recomputed logits. The last block takes what is left."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, _, targets = linear_problem(10, 16, 1000, torch.float32, "cpu", False, seed=3)
    hidden.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        ops.linear_token_logprobs(hidden, weight, targets, chunk_size=3).sum().backward()
    widths = [e.input_shapes[1][1] for e in prof.events()
              if e.name == "aten::mm" and e.input_shapes[0] == [10, 16]]
    assert widths == [384, 384, 232] * 2


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden_grad_does_not_degrade_with_blocks(device, backend, dtype, use_backend):
    """grad_hidden sums one product per vocabulary block; kept in float32 and rounded once, its
    error with 8 blocks stays within 2x that of one block (plus one ulp)."""
    use_backend(backend)
    n, d, v = 8, 16, 4096
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    weight = (torch.rand(v, d, generator=g) + 0.5).to(dtype).to(device)  # one sign: no cancelling
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.rand(n, generator=g).to(device) + 0.5
    [oracle_h, _] = _oracle_grads(hidden, weight, None, targets, upstream)
    errors = {}
    for chunk in (n, 1):  # one block of V columns; 8 blocks of 512
        _, (grad_h, grad_w) = _scored_grads(hidden, weight, None, targets, upstream, chunk_size=chunk)
        assert grad_h.dtype == grad_w.dtype == dtype
        errors[chunk] = (grad_h.double() - oracle_h).abs().max().item()
    ulp = torch.finfo(dtype).eps * oracle_h.abs().max().item()
    assert errors[1] <= 2 * errors[n] + ulp, errors


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_backward_with_logits_in_the_hundreds(device, backend, use_backend):
    """Rows whose log-sum-exp is large take the row-chunked backward (the kernel recomputes
    their log-sum-exp over the whole row); the gradient still matches the oracle."""
    use_backend(backend)
    hidden, weight, _, targets = linear_problem(23, 8, 300, torch.float32, device, seed=5)
    hidden = hidden * 150  # logits of several hundred
    upstream = torch.randn(23, device=device)
    _assert_grads_match_oracle(hidden, weight, None, targets, upstream, atol=1e-4, rtol=1e-4,
                               chunk_size=4)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_rows_with_huge_logits_next_to_ordinary_rows(device, backend, use_backend):
    """One call, both kinds of rows: ordinary ones go through the vocabulary blocks, rows with
    logits in the hundreds are redone over whole rows; forward and backward match the oracle."""
    use_backend(backend)
    hidden, weight, b, targets = linear_problem(29, 8, 700, torch.float32, device, bias=True, seed=8)
    hidden[::3] *= 120  # every third row: logits of several hundred
    upstream = torch.randn(29, device=device)
    out = ops.linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=2)
    torch.testing.assert_close(
        out.double(), _full_logits_oracle(hidden, weight, b, targets), atol=1e-4, rtol=1e-5
    )
    _assert_grads_match_oracle(hidden, weight, b, targets, upstream, atol=1e-4, rtol=1e-4,
                               chunk_size=2)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_masked_vocabulary_block(device, backend, use_backend):
    """A bias of -inf over whole vocabulary blocks: targets there get -inf, the others their
    log-probability over the unmasked vocabulary."""
    use_backend(backend)
    hidden, weight, b, targets = linear_problem(13, 8, 600, torch.float32, device, bias=True, seed=3)
    b[300:] = -float("inf")
    targets[:4] = torch.tensor([450, 599, 300, 299], device=device)
    out = ops.linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=1)
    expected = _full_logits_oracle(hidden, weight, b, targets)
    assert torch.isneginf(out[:3]).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@requires_native
def test_a_frozen_lm_head_gets_no_weight_gradient(monkeypatch):
    """Only the gradients autograd asks for are computed: with the LM head frozen (LoRA) the
    backward makes neither its [V, D] gradient nor that matmul; the hidden gradient is the
    oracle's, with rows redone over whole rows (logits in the hundreds) and an lse upstream."""
    hidden, weight, b, targets = linear_problem(17, 8, 500, torch.float32, "cpu", bias=True, seed=6)
    hidden[::4] *= 120
    asked = []
    real = torch.ops.latro_engine.linear_token_logprobs_backward

    def spy(*args):
        asked.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(torch.ops.latro_engine, "linear_token_logprobs_backward", spy)
    h = hidden.clone().requires_grad_(True)
    logp, lse = torch.ops.latro_engine.linear_token_logprobs(h, weight, b, targets, 3, -100)
    upstream, lse_upstream = torch.randn(17), torch.randn(17)
    ((logp * upstream).sum() + (lse * lse_upstream).sum()).backward()
    hd, wd, bd = (t.double().requires_grad_(t is hidden) for t in (hidden, weight, b))
    logits = hd @ wd.T + bd
    kept = (targets != -100).double()  # ignored rows: log-prob and lse 0
    want_logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    ((want_logp * upstream.double() * kept).sum()
     + (logits.logsumexp(-1) * lse_upstream.double() * kept).sum()).backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, atol=1e-4, rtol=1e-4)
    assert asked == [(True, False, False)]

"""Every bad input gives a clear error naming the argument, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import device_backend_pairs, requires_native

from latro_engine import ops

PAIRS = device_backend_pairs()


def _raises(exc, match):
    return pytest.raises(exc, match=match)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_token_logprobs_errors(device, backend, use_backend):
    use_backend(backend)
    logits = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    with _raises(TypeError, "logits"):
        ops.token_logprobs(logits.long(), t)
    with _raises(TypeError, "targets"):
        ops.token_logprobs(logits, t.int())
    with _raises(ValueError, "targets must have shape"):
        ops.token_logprobs(logits, t[:2])
    with _raises(ValueError, r"targets\[1\] = 5 is out of range"):
        ops.token_logprobs(logits, torch.tensor([0, 5, 1], device=device))
    with _raises(ValueError, "out of range"):
        ops.token_logprobs(logits, torch.tensor([0, -1, 1], device=device))
    with _raises(ValueError, "empty vocabulary"):
        ops.token_logprobs(torch.randn(3, 0, device=device), t)
    if torch.cuda.is_available():
        with _raises(ValueError, "targets is on"):
            ops.token_logprobs(logits.cuda() if device == "cpu" else logits.cpu(), t)
    assert ops.token_logprobs(torch.randn(0, 5, device=device), t[:0]).shape == (0,)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_linear_token_logprobs_errors(device, backend, use_backend):
    use_backend(backend)
    h, w, t = (
        torch.randn(4, 3, device=device),
        torch.randn(7, 3, device=device),
        torch.zeros(4, dtype=torch.long, device=device),
    )
    with _raises(ValueError, "weight must have shape"):
        ops.linear_token_logprobs(h, torch.randn(7, 2, device=device), t)
    with _raises(TypeError, "weight must have the dtype"):
        ops.linear_token_logprobs(h, w.half(), t)
    with _raises(ValueError, "bias must have shape"):
        ops.linear_token_logprobs(h, w, t, bias=torch.randn(6, device=device))
    with _raises(ValueError, "targets must have shape"):
        ops.linear_token_logprobs(h, w, t[:3])
    with _raises(ValueError, "chunk_size"):
        ops.linear_token_logprobs(h, w, t, chunk_size=0)
    with _raises(ValueError, "out of range"):
        ops.linear_token_logprobs(h, w, t + 7)
    one_bad = t.clone()
    one_bad[2] = 9
    with _raises(ValueError, r"targets\[2\] = 9 is out of range for vocab size 7"):
        ops.linear_token_logprobs(h, w, one_bad, chunk_size=1)
    if backend == "native":  # the backward op checks its targets too (it may be called alone)
        lse = torch.zeros(4, device=device)
        with _raises(ValueError, r"targets\[2\] = 9 is out of range"):
            torch.ops.latro_engine.linear_token_logprobs_backward(
                torch.ones(4, device=device), h, w, None, one_bad, lse, 0, -100, True, True, False
            )


@pytest.mark.parametrize("device,backend", PAIRS)
def test_sample_errors(device, backend, use_backend):
    use_backend(backend)
    logits = torch.randn(3, 5, device=device)
    for kw, match in [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(top_k=-2), "top_k"),
    ]:
        with _raises(ValueError, match):
            ops.sample(logits, seed=0, **kw)
    for bad in (2.5, 2.0, True, "2", torch.tensor(2.0)):  # int() would run 2.5 as 2, True as 1
        with _raises(TypeError, "top_k must be an int"):
            ops.sample(logits, seed=0, top_k=bad)
    ids, _ = ops.sample(logits, seed=0, top_k=2)
    for same in (np.int64(2), torch.tensor(2)):
        assert torch.equal(ops.sample(logits, seed=0, top_k=same)[0], ids)
    with _raises(ValueError, "seed must be"):
        ops.sample(logits, seed=torch.arange(2, device=device))
    with _raises(TypeError, "seed"):
        ops.sample(logits, seed=1.5)
    with _raises(TypeError, "seed"):
        ops.sample(logits, seed=torch.arange(3, device=device).float())
    with _raises(ValueError, "offset must be"):
        ops.sample(logits, seed=0, offset=torch.arange(2, device=device))
    with _raises(ValueError, "offset must be >= 0"):  # an empty batch fails like a full one
        ops.sample(logits[:0], seed=0, offset=torch.tensor(-1, device=device))
    with _raises(ValueError, "logits must have 2"):
        ops.sample(logits[0], seed=0)
    with _raises(TypeError, "logits"):
        ops.sample(logits.long(), seed=0)
    bad = logits.clone()
    bad[1, 2] = float("nan")
    with _raises(ValueError, "row 1 contains NaN"):
        ops.sample(bad, seed=0)
    with _raises(ValueError, "no finite value"):
        ops.sample(torch.full((2, 4), float("-inf"), device=device), seed=0)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_stop_errors(device, backend, use_backend):
    use_backend(backend)
    tokens = torch.zeros(2, 5, dtype=torch.long, device=device)
    with _raises(ValueError, r"stop_sequences\[1\] is empty"):
        ops.stop_positions(tokens, [[1], []])
    with _raises(ValueError, "stop_sequences"):
        ops.stop_positions(tokens, [["a"]])
    with _raises(TypeError, "tokens"):
        ops.stop_positions(tokens.float(), [[1]])
    with _raises(ValueError, "start"):
        ops.stop_positions(tokens, [[1]], start=6)
    positions = torch.full((2,), 5, device=device)
    with _raises(ValueError, "step"):
        ops.stop_positions_step(tokens, [[1]], step=5, positions=positions)
    with _raises(ValueError, "positions must have shape"):
        ops.stop_positions_step(tokens, [[1]], step=0, positions=positions[:1])
    with _raises(ValueError, r"step must be in \[0, 5\)"):  # an empty batch too
        ops.stop_positions_step(tokens[:0], [[1]], step=5, positions=positions[:0])


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
@requires_native
def test_raw_stop_tables_are_checked_without_sequences_or_rows(device):
    """torch.ops callers may pass any table: one of no sequences (which no kernel reads) or an
    empty batch (which runs no kernel) is checked all the same, on every device."""
    stop_positions = torch.ops.latro_engine.stop_positions
    tokens = torch.zeros(2, 5, dtype=torch.long, device=device)
    two_tokens, no_sequences = (torch.tensor(v, device=device) for v in ([7, 8], [0]))
    for rows in (tokens, tokens[:0]):
        with _raises(ValueError, "offsets end at 0 but there are 2 stop tokens"):
            stop_positions(rows, two_tokens, no_sequences, 0)
    with _raises(ValueError, "stop_sequences"):
        stop_positions(tokens[:0], two_tokens, torch.tensor([0, 3], device=device), 0)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_reward_errors(device, backend, use_backend):
    use_backend(backend)
    r = torch.randn(6, device=device)
    with _raises(ValueError, "k must be >= 2"):
        ops.rloo_advantages(r, 1)
    with _raises(ValueError, "does not divide"):
        ops.rloo_advantages(r, 4)
    with _raises(ValueError, "rewards is empty"):
        ops.rloo_advantages(r[:0], 2)
    with _raises(TypeError, "rewards"):
        ops.rloo_advantages(r.long(), 2)
    f = torch.ones(6, dtype=torch.bool, device=device)
    with _raises(ValueError, "penalty_mode"):
        ops.latro_rewards(r, r, r, f, kl_coef=0.1, nonstop_penalty=0.0, penalty_mode="mean")
    with _raises(ValueError, "rationale_logp must have the shape"):
        ops.latro_rewards(r, r[:3], r, f, kl_coef=0.1, nonstop_penalty=0.0)
    with _raises(TypeError, "finished"):
        ops.latro_rewards(r, r, r, f.float(), kl_coef=0.1, nonstop_penalty=0.0)
    with _raises(ValueError, "kl_coef"):
        ops.latro_rewards(r, r, r, f, kl_coef=float("nan"), nonstop_penalty=0.0)
    with _raises(ValueError, "answer_logp is empty"):
        ops.latro_rewards(r[:0], r[:0], r[:0], f[:0], kl_coef=0.1, nonstop_penalty=0.0)


def test_unknown_backend_is_rejected(use_backend):
    use_backend("fast")
    with _raises(ValueError, "LATRO_BACKEND"):
        ops.rloo_advantages(torch.randn(4), 2)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_decode_attention_errors(device, backend, use_backend):
    use_backend(backend)
    q = torch.randn(2, 4, 8, device=device)
    k, v = torch.randn(2, 2, 2, 5, 8, device=device)
    nk, nv = torch.randn(2, 2, 2, 8, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)

    def call(**kw):
        args = dict(query=q, cache_k=k, cache_v=v, length=3, new_k=nk, new_v=nv, slot_mask=mask)
        args.update(kw)
        return ops.decode_attention(args.pop("query"), args.pop("cache_k"), args.pop("cache_v"),
                                    **args)

    with _raises(TypeError, "query must be"):
        call(query=q.long())
    with _raises(ValueError, "query must have 3 dimension"):
        call(query=q[0])
    with _raises(TypeError, "cache_k must be"):
        call(cache_k=k.half())
    with _raises(ValueError, "cache_k must have shape"):
        call(cache_k=k[:, :, :, :4])
    with _raises(ValueError, "cache_v must have the shape of cache_k"):
        call(cache_v=v[:, :, :4])
    with _raises(ValueError, "heads must be a multiple"):
        call(query=q[:, :3])
    with _raises(ValueError, "head_dim must be in"):
        call(query=torch.randn(2, 2, 300, device=device),
             cache_k=torch.randn(2, 1, 5, 300, device=device),
             cache_v=torch.randn(2, 1, 5, 300, device=device), new_k=None, new_v=None)
    with _raises(ValueError, "new_k and new_v must be given together"):
        call(new_v=None)
    with _raises(ValueError, "new_k must have shape"):
        call(new_k=nk[:, :1])
    with _raises(TypeError, "slot_mask"):
        call(slot_mask=mask.int())
    with _raises(ValueError, "slot_mask must have shape"):
        call(slot_mask=mask[:, :4])
    with _raises(TypeError, "length"):
        call(length=torch.tensor(3.0, device=device))
    with _raises(ValueError, "length must be an int or a 0-d tensor"):
        call(length=torch.tensor([3], device=device))
    for bad in (0, 6, torch.tensor(-1, device=device)):
        with _raises(ValueError, r"length must be in \[1, slots = 5\]"):
            call(length=bad)
    with _raises(ValueError, r"length must be in \[1, slots = 5\]"):  # an empty batch too
        call(query=q[:0], cache_k=k[:0], cache_v=v[:0], new_k=nk[:0], new_v=nv[:0],
             slot_mask=mask[:0], length=0)
    cos = torch.ones(2, 8, device=device)
    with _raises(ValueError, "rotary_cos and rotary_sin must be given together"):
        ops.decode_attention(q, k, v, length=3, rotary=(cos, None))
    with _raises(TypeError, "rotary_sin must be float32 or the query's dtype"):
        call(rotary=(cos, cos.double()))
    with _raises(TypeError, "rotary_cos must be float32 or the query's dtype"):
        call(rotary=(cos.bfloat16(), cos.bfloat16()))  # a float32 query: its tables are float32
    with _raises(TypeError, "rotary_cos and rotary_sin must have the same dtype"):
        call(query=q.bfloat16(), cache_k=k.bfloat16(), cache_v=v.bfloat16(),
             new_k=nk.bfloat16(), new_v=nv.bfloat16(), rotary=(cos.bfloat16(), cos))
    with _raises(ValueError, "rotary_cos must have shape"):
        call(rotary=(cos[:, :6], cos))
    with _raises(ValueError, "head_dim must be even for a rotary embedding"):
        q5, k5, v5 = torch.randn(2, 4, 5, device=device), *torch.randn(2, 2, 2, 5, 5, device=device)
        ops.decode_attention(q5, k5, v5, length=3, rotary=(cos[:, :5], cos[:, :5]))
    with _raises(ValueError, "scale must be finite"):
        call(scale=float("inf"))
    if backend == "native":  # the reference accepts any layout; the kernels write in place
        with _raises(ValueError, "cache_k must be dense within each row"):
            call(cache_k=k.transpose(1, 2).contiguous().transpose(1, 2))
    if torch.cuda.is_available():
        other = "cpu" if device == "cuda" else "cuda"
        with _raises(ValueError, "cache_k is on"):
            call(cache_k=k.to(other))
    assert call(query=q[:0], cache_k=k[:0], cache_v=v[:0], new_k=nk[:0], new_v=nv[:0],
                slot_mask=mask[:0]).shape == (0, 4, 8)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_rms_norm_errors(device, backend, use_backend):
    use_backend(backend)
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    with _raises(TypeError, "x must be"):
        ops.rms_norm(x.long(), w, eps=1e-6)
    with _raises(ValueError, "x must have a non-empty last dimension"):
        ops.rms_norm(x[:, :0], w[:0], eps=1e-6)
    with _raises(TypeError, "weight must be"):
        ops.rms_norm(x, w.half(), eps=1e-6)
    with _raises(ValueError, "weight must have shape"):
        ops.rms_norm(x, w[:7], eps=1e-6)
    with _raises(TypeError, "residual must be"):
        ops.rms_norm(x, w, eps=1e-6, residual=x.half())
    with _raises(ValueError, "residual must have the shape of x"):
        ops.rms_norm(x, w, eps=1e-6, residual=x[:2])
    for eps in (-1.0, float("nan"), float("inf")):
        with _raises(ValueError, "eps must be finite and >= 0"):
            ops.rms_norm(x, w, eps=eps)
    if torch.cuda.is_available():
        other = "cpu" if device == "cuda" else "cuda"
        with _raises(ValueError, "weight is on"):
            ops.rms_norm(x, w.to(other), eps=1e-6)
    assert ops.rms_norm(x[:0], w, eps=1e-6).shape == (0, 8)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_silu_mul_errors(device, backend, use_backend):
    use_backend(backend)
    g = torch.randn(3, 8, device=device)
    with _raises(TypeError, "gate must be"):
        ops.silu_mul(g.long(), g)
    with _raises(TypeError, "up must be"):
        ops.silu_mul(g, g.half())
    with _raises(ValueError, "up must have the shape of gate"):
        ops.silu_mul(g, g[:2])
    if torch.cuda.is_available():
        with _raises(ValueError, "up is on"):
            ops.silu_mul(g, g.to("cpu" if device == "cuda" else "cuda"))
    assert ops.silu_mul(g[:0], g[:0]).shape == (0, 8)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_scalar_arguments_are_checked_alike_on_both_backends(device, backend, use_backend):
    """Ints past int64, fractional ints and text for numbers are errors naming the argument
    (pybind's own named none; int() truncated 3.7 to 3); numbers past float32 too, where the
    native kernels would compute with inf. A uint64 seed is the int64 of the same bits."""
    use_backend(backend)
    logits = torch.randn(2, 5, device=device)
    r = torch.randn(6, device=device)
    f = torch.tensor([True, False] * 3, device=device)
    tokens = torch.zeros(2, 4, dtype=torch.long, device=device)
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    for call, error, match in [
        (lambda: ops.rloo_advantages(r, 3.7), TypeError, "k must be an int, got float"),
        (lambda: ops.rloo_advantages(r, 2**64), ValueError, "k must fit in int64"),
        (lambda: ops.token_logprobs(logits, tokens[:, 0], ignore_index=2**63), ValueError,
         "ignore_index must fit in int64"),
        (lambda: ops.linear_token_logprobs(x, w[None].expand(5, 8), tokens[0, :3] * 0,
                                           chunk_size=1.5), TypeError, "chunk_size must be an int"),
        (lambda: ops.stop_positions(tokens, [[1]], start=1.5), TypeError, "start must be an int"),
        (lambda: ops.sample(logits, seed=2**64), ValueError, "seed must fit in 64 bits"),
        (lambda: ops.sample(logits, seed=0, temperature="1"), TypeError,
         "temperature must be a number, got str"),
        # finite logits over a subnormal temperature: +inf, said so
        (lambda: ops.sample(logits.abs() + 1, seed=0, temperature=1e-45), ValueError,
         r"contains \+inf \(after dividing by the temperature\)"),
        (lambda: ops.latro_rewards(r, r, r, f, kl_coef="0.1", nonstop_penalty=-1.0), TypeError,
         "kl_coef must be a number"),
        (lambda: ops.latro_rewards(r, r, r, f, kl_coef=0.1, nonstop_penalty=-1.0,
                                   penalty_mode=None), TypeError, "penalty_mode must be a string"),
        (lambda: ops.rms_norm(x, w, eps=1e300), ValueError, "eps must be finite and >= 0"),
        (lambda: ops.stop_positions_step(tokens, [[1]], step=torch.tensor(1, dtype=torch.int32,
                                         device=device), positions=tokens[:, 0]), TypeError, "step"),
        (lambda: ops.stop_positions_step(tokens, [[1]], step=torch.tensor([1], device=device),
                                         positions=tokens[:, 0]), ValueError,
         "step must be an int or a 0-d tensor"),
    ]:
        with _raises(error, match):
            call()
    # A uint64 seed draws as the int64 with its bits.
    assert torch.equal(ops.sample(logits, seed=2**64 - 5)[0], ops.sample(logits, seed=-5)[0])
    # float64 rewards run the reference on both backends; low-precision loss weights are cast.
    assert ops.rloo_advantages(r.double(), 2).dtype == torch.float64
    assert ops.latro_rewards(r.double(), r.double(), r.double(), f, kl_coef=0.1,
                             nonstop_penalty=-1.0).dtype == torch.float64
    h, lm, t = torch.randn(4, 3, device=device), torch.randn(7, 3, device=device), tokens[0]
    for dtype in (torch.bfloat16, torch.float16):
        total, _ = ops.linear_weighted_logprob_sum(h, lm, t, torch.ones(4, dtype=dtype, device=device))
        assert total.dtype == torch.float32


@pytest.mark.parametrize("device,backend", PAIRS)
def test_decode_attention_layouts_and_sizes(device, backend, use_backend):
    """One row with a cache_v that is not dense within its row (expanded, transposed, strided
    slots): the native kernels address both caches as dense and wrote outside cache_v (a
    segfault) or read garbage; they refuse it now, as they did for two rows. Both backends
    refuse empty heads, a scale past float32, and give no gradient (a decode step)."""
    use_backend(backend)
    q = torch.randn(1, 4, 8, device=device)
    k = torch.randn(1, 2, 5, 8, device=device)
    nk = torch.randn(1, 2, 8, device=device)
    bad_v = {
        "expanded": torch.randn(1, 1, 1, 8, device=device).expand(1, 2, 5, 8),
        "transposed": torch.randn(1, 2, 8, 5, device=device).transpose(2, 3),
        "strided slots": torch.randn(1, 2, 10, 8, device=device)[:, :, ::2],
    }
    if backend == "native":  # the reference takes any layout
        for v in bad_v.values():
            with _raises(ValueError, "cache_v must be dense within each row"):
                ops.decode_attention(q, k, v, length=5, new_k=nk, new_v=nk)
    # A size-1 dimension's stride does not matter (one KV head built by a transpose).
    k1 = torch.randn(1, 5, 1, 8, device=device).transpose(1, 2)
    v1 = torch.randn(1, 5, 1, 8, device=device).transpose(1, 2)
    got = ops.decode_attention(q, k1, v1, length=5)
    want = ops.decode_attention(q, k1.contiguous(), v1.contiguous(), length=5)
    torch.testing.assert_close(got, want)
    with _raises(ValueError, "query needs heads and head_dim >= 1"):
        ops.decode_attention(q[:, :, :0], k[..., :0], k[..., :0], length=5)
    with _raises(ValueError, "query needs heads"):
        ops.decode_attention(q[:, :0], k, k, length=5)
    with _raises(ValueError, r"scale must be finite \(in float32\)"):
        ops.decode_attention(q, k, k.clone(), length=5, scale=1e39)
    query = q.clone().requires_grad_()
    assert not ops.decode_attention(query, k, k.clone(), length=5).requires_grad


def test_second_order_gradients_are_refused_by_the_native_kernels(use_backend):
    """The native backward kernels have no derivative of their own: a double backward raises
    instead of giving zeros (the reference has one)."""
    use_backend("native")
    x = torch.randn(3, 7, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    h, w = torch.randn(3, 5, requires_grad=True), torch.randn(9, 5)
    for logp, wrt in ((ops.token_logprobs(x, t), x), (ops.linear_token_logprobs(h, w, t), h)):
        (g,) = torch.autograd.grad(logp.sum(), wrt, create_graph=True)
        with _raises(RuntimeError, "second-order gradients"):
            (g**2).sum().backward()
    # its gradients come from the forward: refused at the first backward that would need a graph
    total, _ = ops.linear_weighted_logprob_sum(h, w, t, torch.randn(3))
    with _raises(RuntimeError, "second-order gradients"):
        torch.autograd.grad(total, h, create_graph=True)
    total, _ = ops.linear_weighted_logprob_sum(h, w, t, torch.randn(3))
    total.backward()  # a plain backward is fine
    assert h.grad is not None

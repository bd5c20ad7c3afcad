"""The CUDA kernels against the float64 oracle and the CPU backend (skipped without a GPU).

What the rest of the suite cannot say on a GPU: that the CUDA backend returns what the CPU
backend returns (the same sampled ids, bit-equal advantages), at odd sizes and a 128k
vocabulary, from non-contiguous logits, without host synchronization and inside CUDA graphs,
and that it raises the CPU backend's errors. Run on a GPU machine by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DECODE_ATTENTION_ATOL,
    DECODE_ATTENTION_SHAPES,
    FLOAT_DTYPES,
    LLAMA3_VOCAB,
    ODD_SIZES,
    ROTARY,
    assert_close_to_oracle,
    decode_attention_oracle,
    decode_attention_problem,
    put_non_finite,
    rotary_for,
    rotary_tables,
)

import latro_engine
from latro_engine import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SAMPLING = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=0.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=50, top_p=0.95),
    dict(temperature=0.8, top_p=0.999),
    dict(temperature=1.0, top_k=3000, top_p=0.5, min_p=0.01),
]


@pytest.fixture(autouse=True)
def native_backend(monkeypatch):
    monkeypatch.setenv("LATRO_BACKEND", "native")
    monkeypatch.delenv("LATRO_CUDA_CHECKS", raising=False)


def _randn(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _on_both(*tensors):
    return [t.cpu() for t in tensors], [t.cuda() for t in tensors]


def test_extension_has_cuda_kernels():
    """On a GPU machine the build must carry the kernels (gpu_check.sh builds with
    LATRO_FORCE_CUDA=1); otherwise every CUDA call would fall back to the reference."""
    assert latro_engine.native_has_cuda()


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", ODD_SIZES[:3])
@pytest.mark.parametrize("vocab", [*ODD_SIZES, LLAMA3_VOCAB])
def test_token_logprobs_matches_oracle_and_cpu(dtype, rows, vocab):
    if vocab == LLAMA3_VOCAB and rows > 7:
        pytest.skip("one small batch is enough at 128k")
    logits = _randn((rows, vocab), dtype, seed=rows * 31 + vocab).cuda()
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))
    targets = targets.cuda()
    if rows > 2:
        targets[1] = -100
    if vocab > 17:
        logits[0, 17] = 40.0  # a dominant token: log-prob near 0, never above
        targets[0] = 17
    out = ops.token_logprobs(logits, targets)
    oracle = reference.token_logprobs(logits.double(), targets)
    plain = reference.token_logprobs(logits, targets)  # torch's CUDA log_softmax at this dtype
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert_close_to_oracle(out, oracle, plain, dtype)
    assert torch.all(out <= 0) and torch.all(out[targets == -100] == 0)
    cpu = ops.token_logprobs(logits.cpu(), targets.cpu())
    torch.testing.assert_close(out.cpu(), cpu, atol=2e-5, rtol=2e-5)


def test_token_logprobs_layouts_without_copies_match_cpu():
    full = _randn((3, 9, 97), seed=1).cuda()
    targets = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    views = {
        "shifted": (full[:, :-1], targets[:, 1:]),
        "transposed batch": (full.transpose(0, 1), targets.t()),
        "strided vocab": (full[..., ::2], targets.clamp(max=48)),
        "expanded rows": (full[:1, :1].expand(3, 4, 97), targets[:, :4]),
        "1-d": (full[0, 0], targets[0, 0]),
        "4-d": (full.view(3, 3, 3, 97)[:, 1:], targets.view(3, 3, 3)[:, 1:]),
    }
    for name, (logits, t) in views.items():
        out = ops.token_logprobs(logits, t)
        expected = ops.token_logprobs(logits.cpu(), t.cpu())
        torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
        x = logits.detach().clone().requires_grad_()
        (ops.token_logprobs(x, t) * grad.cuda()).sum().backward()
        x_cpu = logits.detach().cpu().clone().requires_grad_()
        (ops.token_logprobs(x_cpu, t.cpu()) * grad).sum().backward()
        torch.testing.assert_close(x.grad.cpu(), x_cpu.grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("vocab", [7, 1025, LLAMA3_VOCAB])
def test_token_logprobs_backward_matches_oracle(dtype, vocab):
    logits = _randn((5, vocab), dtype, seed=vocab).cuda()
    targets = torch.tensor([0, 3, -100, vocab - 1, 1]).cuda()
    upstream = _randn((5,), scale=1.0, seed=3).cuda()
    x = logits.clone().requires_grad_()
    (ops.token_logprobs(x, targets) * upstream).sum().backward()
    x64 = logits.double().requires_grad_()
    (reference.token_logprobs(x64, targets) * upstream.double()).sum().backward()
    # The kernel writes the gradient at the logits' dtype: one rounding of each element.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol, rtol=tol)
    assert torch.all(x.grad[2] == 0)
    # The in-place form overwrites the logits with the same gradient.
    _, lse = torch.ops.latro_engine.token_logprobs(logits, targets, -100)
    in_place = logits.clone()
    torch.ops.latro_engine.token_logprobs_backward_(upstream, in_place, targets, lse, -100)
    assert torch.equal(in_place, x.grad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,d,v,chunk", [(37, 16, 211, 8), (29, 64, LLAMA3_VOCAB, 16)])
def test_linear_token_logprobs_matches_cpu_and_oracle(dtype, n, d, v, chunk):
    g = torch.Generator().manual_seed(n + v)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = -100
    upstream = torch.randn(n, generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        h = hidden.to(device).detach().clone().requires_grad_()  # a leaf on each device
        w = weight.to(device).detach().clone().requires_grad_()
        out = ops.linear_token_logprobs(h, w, targets.to(device), chunk_size=chunk)
        (out * upstream.to(device)).sum().backward()
        results[device] = (out.cpu(), h.grad.float().cpu(), w.grad.float().cpu())
    h64 = hidden.double().detach().requires_grad_()
    w64 = weight.double().detach().requires_grad_()
    oracle = reference.token_logprobs(h64 @ w64.t(), targets)
    (oracle * upstream.double()).sum().backward()
    # The logits are rounded to `dtype` by the matmul on both devices (differently: cuBLAS vs
    # CPU kernels), so the comparison is against the oracle with a dtype-sized tolerance.
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for device, (out, gh, gw) in results.items():
        torch.testing.assert_close(out.double(), oracle.detach(), atol=tol, rtol=tol, msg=device)
        torch.testing.assert_close(gh.double(), h64.grad, atol=tol, rtol=tol, msg=device)
        torch.testing.assert_close(gw.double(), w64.grad, atol=tol, rtol=tol, msg=device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,d,v,chunk", [(37, 16, 211, 8), (29, 64, LLAMA3_VOCAB, 16)])
def test_linear_weighted_logprob_sum_matches_cpu_and_oracle(dtype, n, d, v, chunk):
    g = torch.Generator().manual_seed(n + v + 1)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = -100
    token_weights = torch.randn(n, generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        total, logp = ops.linear_weighted_logprob_sum(
            leaves[0], leaves[1], targets.to(device), token_weights.to(device), bias=leaves[2],
            chunk_size=chunk,
        )
        (1.5 * total).backward()
        results[device] = (total.cpu(), logp.cpu(), *(t.grad.float().cpu() for t in leaves))
    leaves64 = [t.double().detach().requires_grad_() for t in (hidden, weight, bias)]
    oracle = reference.token_logprobs(leaves64[0] @ leaves64[1].t() + leaves64[2], targets)
    oracle_total = (oracle * token_weights.double()).sum()
    (1.5 * oracle_total).backward()
    expected = (oracle_total.detach(), oracle.detach(), *(t.grad for t in leaves64))
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for device, got in results.items():
        for name, mine, theirs in zip(("total", "logp", "hidden", "weight", "bias"), got, expected):
            scale = 10 if name == "total" else 1  # a sum of n terms
            torch.testing.assert_close(mine.double(), theirs, atol=tol * scale, rtol=tol,
                                       msg=f"{device} {name}")


# ----------------------------------------------------------------------------- sampling
def _sample_both(logits, **kw):
    """ops.sample on CUDA and on the CPU; tensor arguments (seed, offset) follow the logits."""

    def on(device):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    cuda_ids, cuda_logp = ops.sample(logits.cuda(), **on("cuda"))
    cpu_ids, cpu_logp = ops.sample(logits.cpu(), **on("cpu"))
    return (cuda_ids.cpu(), cuda_logp.cpu()), (cpu_ids, cpu_logp)


def _check_same_draws(cuda, cpu, logits, options, min_agreement=1.0):
    (ids, logp), (cpu_ids, cpu_logp) = cuda, cpu
    same = ids == cpu_ids
    # The same Philox noise on both sides: only a near-tie of two Gumbel keys (log rounds
    # differently on host and device) may flip a draw.
    assert same.float().mean() >= min_agreement, f"{(~same).sum()} of {len(ids)} draws differ"
    torch.testing.assert_close(logp[same], cpu_logp[same], atol=1e-5, rtol=1e-5)
    if options.get("temperature", 1.0) > 0:
        kept = reference.kept_mask(logits.cpu(), **{"temperature": 1.0, **options})
        assert kept.gather(1, ids[:, None]).all(), "drew a token outside the kept set"
    assert torch.all(logp <= 0)


@pytest.mark.parametrize("options", SAMPLING, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 7), (97, 97), (7, 1025), (5, 5000)])
def test_sample_draws_the_cpu_ids(options, dtype, rows, vocab):
    logits = _randn((rows, vocab), dtype, scale=2.0, seed=rows + vocab)
    for seed in (1234, torch.arange(rows) * 7 + 1):
        cuda, cpu = _sample_both(logits, seed=seed, offset=5, **options)
        _check_same_draws(cuda, cpu, logits, options, min_agreement=0.99)


@pytest.mark.parametrize("options", SAMPLING, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_llama3_vocabulary(options, dtype):
    logits = _randn((16, LLAMA3_VOCAB), dtype, scale=4.0, seed=2)
    cuda, cpu = _sample_both(logits, seed=torch.arange(16) + 11, offset=torch.tensor(3), **options)
    _check_same_draws(cuda, cpu, logits, options, min_agreement=15 / 16)
    again = ops.sample(logits.cuda(), seed=torch.arange(16).cuda() + 11, offset=3, **options)
    assert torch.equal(again[0].cpu(), cuda[0]) and torch.equal(again[1].cpu(), cuda[1])


@pytest.mark.parametrize("options", [dict(), dict(temperature=1.7), dict(top_k=40)], ids=str)
def test_sample_peaked_rows(options):
    """Peaked rows, like a trained model's: most tokens lie far below the best key, so the
    kernels skip their noise (latro/gumbel.h); the draws stay the CPU's."""
    logits = _randn((16, 32_000), scale=9.0, seed=23)
    cuda, cpu = _sample_both(logits, seed=torch.arange(16) * 3 + 1, offset=2, **options)
    _check_same_draws(cuda, cpu, logits, options, min_agreement=15 / 16)


@pytest.mark.parametrize(
    "options",
    [dict(top_k=100), dict(top_p=0.5), dict(top_k=4000, top_p=0.7), dict(top_p=0.3, min_p=0.5)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["equal", "narrow", "steps"])
def test_sample_ties_and_crowded_bins(options, kind):
    """Rows whose threshold falls among more than 2048 near-equal logits take the kernel's
    refinement path; ties at a threshold are kept, as on the CPU."""
    vocab = 9000
    if kind == "equal":
        logits = torch.ones(3, vocab)
    elif kind == "narrow":
        logits = _randn((3, vocab), scale=0.02, seed=11)
    else:
        logits = ((torch.arange(3 * vocab) * 7919) % 13).float().view(3, vocab) * 0.25
    cuda, cpu = _sample_both(logits, seed=5, offset=1, **options)
    _check_same_draws(cuda, cpu, logits, options)


# The sampler's tuning variables (the benchmark's sweeps): LATRO_CUDA_SAMPLE_GRID makes the
# filtered kernel's blocks loop over rows, LATRO_CUDA_SAMPLE_PREFETCH sets how far ahead its
# passes prefetch into L2 over rows long enough for several iterations (0: none; the default, 2,
# is every other test's), LATRO_CUDA_SAMPLE_PLAIN_PREFETCH the same for plain sampling (default
# 0), LATRO_CUDA_SAMPLE_PLAIN_WARM=0 has its threads start without the block's max and best
# key (the default, 1, is every other test's),
# LATRO_CUDA_SAMPLE_SLICES splits each row of plain sampling over that
# many blocks (1: one block per row; left unset, few long rows are split, as in the tests of
# the 128k vocabulary, peaked rows and CUDA graphs). (variable, value, logits shape, seed, offset)
TUNINGS = [
    ("LATRO_CUDA_SAMPLE_GRID", "3", (11, 3001), 17, 7),
    ("LATRO_CUDA_SAMPLE_PREFETCH", "4", (5, 20011), 19, 2),
    ("LATRO_CUDA_SAMPLE_PREFETCH", "0", (5, 20011), 23, 1),
    ("LATRO_CUDA_SAMPLE_PLAIN_PREFETCH", "3", (300, 20011), 43, 2),  # a block per row
    ("LATRO_CUDA_SAMPLE_PLAIN_PREFETCH", "3", (2, 40009), 47, 3),  # sliced rows
    ("LATRO_CUDA_SAMPLE_PLAIN_WARM", "0", (300, 20011), 53, 2),
    ("LATRO_CUDA_SAMPLE_PLAIN_WARM", "0", (2, 40009), 59, 3),
    ("LATRO_CUDA_SAMPLE_SLICES", "1", (6, 20011), 29, 3),
    ("LATRO_CUDA_SAMPLE_SLICES", "4", (3, 20011), 31, 4),
    ("LATRO_CUDA_SAMPLE_SLICES", "64", (2, 9001), 37, 5),  # capped at 2: slices of >= 4,096
]


@pytest.mark.parametrize(
    "variable,value,shape,seed,offset", TUNINGS, ids=[f"{t[0]}={t[1]}" for t in TUNINGS]
)
@pytest.mark.parametrize("options", [o for o in SAMPLING if o["temperature"] > 0], ids=str)
def test_sample_tuning_variables_change_no_draw(options, variable, value, shape, seed, offset,
                                                monkeypatch):
    monkeypatch.setenv(variable, value)
    logits = _randn(shape, scale=2.0, seed=seed)
    cuda, cpu = _sample_both(logits, seed=torch.arange(shape[0]) + 2, offset=offset, **options)
    _check_same_draws(cuda, cpu, logits, options)


def test_sample_per_row_seeds_follow_the_row():
    logits = _randn((9, 500), seed=3).cuda()
    seeds = torch.arange(100, 109).cuda()
    ids, _ = ops.sample(logits, seed=seeds, offset=torch.tensor(4).cuda(), top_p=0.9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0)).cuda()
    ids_perm, _ = ops.sample(logits[perm], seed=seeds[perm], offset=4, top_p=0.9)
    assert torch.equal(ids_perm, ids[perm])


def test_sample_frequencies_follow_the_kept_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]]).cuda().expand(20000, 6).contiguous()
    options = dict(temperature=0.8, top_k=4, top_p=0.9)
    ids, logp = ops.sample(logits, seed=torch.arange(20000).cuda(), offset=0, **options)
    kept = reference.kept_mask(logits[:1].cpu(), **{"temperature": 1.0, **options})[0]
    probs = torch.where(kept, torch.softmax(logits[0].cpu() / 0.8, -1), 0.0)
    probs /= probs.sum()
    freq = torch.bincount(ids.cpu(), minlength=6).double() / 20000
    assert torch.all(freq[~kept] == 0)
    assert (freq - probs).abs().max() < 0.015
    torch.testing.assert_close(logp.cpu(), probs[ids.cpu()].log().float(), atol=1e-5, rtol=1e-5)


def test_sample_without_host_synchronization(monkeypatch):
    """With device seed/offset and the synchronizing checks off, sampling never waits for
    the GPU (torch's sync debug mode raises on any synchronizing call)."""
    monkeypatch.setenv("LATRO_CUDA_CHECKS", "off")
    logits = _randn((64, 32000), seed=4).cuda()
    seeds, offset = torch.arange(64).cuda(), torch.tensor(7).cuda()
    stops = ops.StopSequences([[1], [2, 3]], "cuda")  # built before: it copies from the host
    stop = torch.full((64,), 5, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, logp = ops.sample(logits, seed=seeds, offset=offset, top_k=50, top_p=0.9)
        plain = ops.sample(logits[:8], seed=seeds[:8], offset=offset)  # rows split over blocks
        tokens = ids[:, None].expand(64, 5).contiguous()
        ops.stop_positions_step(tokens, stops, step=offset.clamp(max=4), positions=stop)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = ops.sample(logits.cpu(), seed=seeds.cpu(), offset=7, top_k=50, top_p=0.9)
    assert (ids.cpu() == expected[0]).float().mean() >= 63 / 64  # ties aside
    expected = ops.sample(logits[:8].cpu(), seed=seeds[:8].cpu(), offset=7)
    assert (plain[0].cpu() == expected[0]).float().mean() >= 7 / 8


@pytest.mark.parametrize(
    "options", [dict(temperature=1.0), dict(top_k=50, top_p=0.9, min_p=0.02)], ids=str
)
def test_sample_inside_cuda_graph(options):
    """The decode-loop use: capture once, replay with a new offset written into the captured
    tensor; every replay draws what an eager call with that offset draws."""
    logits = _randn((32, 32000), seed=6).cuda()
    seeds = torch.arange(32).cuda() * 3 + 1
    offset = torch.tensor(0).cuda()
    ops.sample(logits, seed=seeds, offset=offset, **options)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, logp = ops.sample(logits, seed=seeds, offset=offset, **options)
    for step in (0, 1, 17):
        offset.fill_(step)
        graph.replay()
        eager = ops.sample(logits, seed=seeds, offset=step, **options)
        assert torch.equal(ids, eager[0]) and torch.equal(logp, eager[1]), step
        cpu = ops.sample(logits.cpu(), seed=seeds.cpu(), offset=step, **options)
        assert (ids.cpu() == cpu[0]).float().mean() >= 31 / 32


# ----------------------------------------------------------------------------- decode attention
# The CPU suite's shapes plus the decode benchmark's (64 rows, 32 heads over 8 KV heads, head
# dim 64, 640 slots) and few rows over many slots (the slots split over blocks, then combined).
ATTENTION_SHAPES = [
    *DECODE_ATTENTION_SHAPES,
    (64, 32, 8, 640, 64, 401),
    (1, 28, 4, 2100, 128, 2077),
]


@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_decode_attention_matches_cpu_and_oracle(shape, dtype, rotary):
    if rotary and shape[4] % 2:
        pytest.skip("a rotary embedding needs an even head dim")
    length = shape[-1]
    tensors = decode_attention_problem(*shape, dtype, seed=4)
    tables = rotary_for(rotary, shape[0], shape[4], dtype)
    oracle = decode_attention_oracle(*tensors, length, shape[4] ** -0.5, rotary=tables)
    results = {}
    for device in ("cpu", "cuda"):
        query, cache_k, cache_v, new_k, new_v, mask = (t.to(device) for t in tensors)
        out = ops.decode_attention(
            query,
            cache_k,
            cache_v,
            length=torch.tensor(length, device=device),
            new_k=new_k,
            new_v=new_v,
            slot_mask=mask,
            rotary=None if tables is None else tuple(t.to(device) for t in tables),
        )
        results[device] = out.cpu(), cache_k.cpu(), cache_v.cpu()
    tol = DECODE_ATTENTION_ATOL[dtype]
    (cpu, cpu_k, cpu_v), (gpu, gpu_k, gpu_v) = results["cpu"], results["cuda"]
    torch.testing.assert_close(gpu.double(), oracle, atol=tol, rtol=tol)
    torch.testing.assert_close(gpu.float(), cpu.float(), atol=tol, rtol=tol)
    # The same roundings on both devices: the rotated key is stored bit for bit alike.
    torch.testing.assert_close(gpu_k, cpu_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(gpu_v, cpu_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 6, 2, 37, 24, 37), (2, 3, 1, 1100, 12, 1090)], ids=str)
def test_decode_attention_nan_and_infinity_as_on_the_cpu(shape, dtype):
    """One block per head and the slots split over blocks (the combine kernel) alike."""
    length = shape[-1]
    tensors = decode_attention_problem(*shape, dtype, seed=6)
    put_non_finite(*(tensors[i] for i in (0, 3, 4)))
    oracle = decode_attention_oracle(*tensors, length, shape[4] ** -0.5)
    assert bool(oracle.isnan().any())
    tol = DECODE_ATTENTION_ATOL[dtype]
    outs = {}
    for device in ("cpu", "cuda"):
        query, cache_k, cache_v, new_k, new_v, mask = (t.to(device) for t in tensors)
        outs[device] = ops.decode_attention(query, cache_k, cache_v, length=length, new_k=new_k,
                                            new_v=new_v, slot_mask=mask).cpu()
    torch.testing.assert_close(outs["cuda"].double(), oracle, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(outs["cuda"], outs["cpu"], atol=tol, rtol=tol, equal_nan=True)


def test_decode_attention_inside_cuda_graph():
    """Captured once, replayed with a growing device length: each replay equals an eager call
    and writes its new key and value into the next slot."""
    rows, heads, kv, slots, dim = 6, 8, 2, 50, 32
    g = torch.Generator().manual_seed(8)
    query, new_k, new_v = (
        torch.randn(s, generator=g).cuda().bfloat16()
        for s in ((rows, heads, dim), (rows, kv, dim), (rows, kv, dim))
    )
    cache_k = torch.randn(rows, kv, slots, dim, generator=g).cuda().bfloat16()
    cache_v = torch.randn(rows, kv, slots, dim, generator=g).cuda().bfloat16()
    mask = (torch.rand(rows, slots, generator=g) < 0.8).cuda()
    length = torch.tensor(10).cuda()
    eager_k, eager_v = cache_k.clone(), cache_v.clone()
    rotary = tuple(t.cuda() for t in rotary_tables(rows, dim))
    kw = dict(new_k=new_k, new_v=new_v, slot_mask=mask, rotary=rotary)
    ops.decode_attention(query, cache_k, cache_v, length=length, **kw)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(query, cache_k, cache_v, length=length, **kw)
    for step in (10, 11, 37, 50):
        length.fill_(step)
        new_k.add_(1.0)  # each step brings another token
        graph.replay()
        eager = ops.decode_attention(query, eager_k, eager_v, length=step, **kw)
        assert torch.equal(out, eager), step
    assert torch.equal(cache_k, eager_k) and torch.equal(cache_v, eager_v)


def test_decode_attention_bad_length_raises_or_gives_nan(monkeypatch):
    query, cache_k, cache_v, new_k, new_v, mask = (
        t.cuda() for t in decode_attention_problem(2, 4, 2, 9, 8, 5, torch.float32)
    )
    before = cache_k.clone()
    with pytest.raises(ValueError, match=r"length must be in \[1, slots = 9\], got 10"):
        ops.decode_attention(
            query, cache_k, cache_v, length=torch.tensor(10).cuda(), new_k=new_k, new_v=new_v
        )
    monkeypatch.setenv("LATRO_CUDA_CHECKS", "off")
    out = ops.decode_attention(
        query, cache_k, cache_v, length=torch.tensor(0).cuda(), new_k=new_k, new_v=new_v
    )
    assert bool(out.isnan().all())
    torch.testing.assert_close(cache_k, before, equal_nan=True, atol=0, rtol=0)


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 1), (5, 37), (2, 3, 257), (64, 2048), (7, 4099)], ids=str)
def test_rms_norm_equals_cpu(shape, dtype):
    """The float64 sum of squares makes the float32 mean the CPU's: equal outputs, and the
    residual sum equal to torch's addition."""
    g = torch.Generator().manual_seed(9)
    x, residual = (torch.randn(*shape, generator=g) * 2).to(dtype), torch.randn(*shape, generator=g)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    residual = residual.to(dtype)
    cpu = ops.rms_norm(x, weight, eps=1e-5, residual=residual)
    gpu = ops.rms_norm(x.cuda(), weight.cuda(), eps=1e-5, residual=residual.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    plain = ops.rms_norm(x.cuda(), weight.cuda(), eps=1e-5)
    assert torch.equal(plain.cpu(), ops.rms_norm(x, weight, eps=1e-5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_misaligned_views_take_the_element_kernels(dtype):
    """rms_norm and silu_mul move whole 16-byte vectors when every tensor starts 16-byte aligned
    (the tests above) and else an element at a time: these views start one element into their
    storage, with rows of whole vectors. The CPU's results either way."""
    g = torch.Generator().manual_seed(13)

    def late(*shape):  # the same values on the CPU and the GPU, one element into the storage
        base = (torch.randn(math.prod(shape) + 1, generator=g) * 2).to(dtype)
        gpu = base.cuda()[1:].view(*shape)
        assert gpu.data_ptr() % 16 != 0
        return base[1:].view(*shape), gpu

    (x, xg), (residual, rg), (weight, wg) = late(3, 64), late(3, 64), late(64)
    cpu = ops.rms_norm(x, weight, eps=1e-5, residual=residual)
    gpu = ops.rms_norm(xg, wg, eps=1e-5, residual=rg)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(ops.rms_norm(xg, wg, eps=1e-5).cpu(), ops.rms_norm(x, weight, eps=1e-5))
    (gate, gate_g), (up, up_g) = late(4, 256), late(4, 256)
    # The same formula and roundings; expf may differ in its last bit between the two.
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ops.silu_mul(gate_g, up_g).cpu(), ops.silu_mul(gate, up),
                               atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- stops, rewards
def _many_stops() -> list[list[int]]:
    """70 sequences of 2-5 tokens (more than a warp's 32 lanes try at once), some sharing their
    ends, so several end at one step and the first in list order must win."""
    g = torch.Generator().manual_seed(70)
    stops = [torch.randint(0, 4, (int(n),), generator=g).tolist() for n in torch.randint(3, 6, (70,), generator=g)]
    return [s[1:] if i % 4 == 3 else s for i, s in enumerate(stops)]


@pytest.mark.parametrize("stops", [[[1, 2, 3], [0], [0, 1], [2, 2, 2, 3]], _many_stops()],
                         ids=["4 stops", "70 stops"])
@pytest.mark.parametrize("start", [0, 5, 300, 301])
def test_stop_positions_match_cpu(start, stops):
    g = torch.Generator().manual_seed(start)
    tokens = torch.randint(0, 4, (37, 301), generator=g)
    cpu = ops.stop_positions(tokens, stops, start=start)
    cuda = ops.stop_positions(tokens.cuda(), stops, start=start)
    assert torch.equal(cuda.cpu(), cpu)
    pos_cpu = torch.full((37,), 301)
    pos_cuda = pos_cpu.cuda()
    table = ops.StopSequences(stops, "cuda")
    for step in range(start, 301):
        pos_cpu = ops.stop_positions_step(tokens, stops, step=step, positions=pos_cpu, start=start)
        pos_cuda = ops.stop_positions_step(
            tokens.cuda(), table, step=torch.tensor(step).cuda(), positions=pos_cuda, start=start
        )
    assert torch.equal(pos_cuda.cpu(), pos_cpu)


def test_rewards_and_advantages_match_cpu():
    rewards = _randn((48,), seed=5)
    (r_cpu,), (r_cuda,) = _on_both(rewards)
    assert torch.equal(ops.rloo_advantages(r_cuda, 16).cpu(), ops.rloo_advantages(r_cpu, 16))
    a, r, ref = (_randn((1500,), seed=s) for s in (6, 7, 8))
    finished = torch.arange(1500) % 3 != 0
    cpu_in, cuda_in = _on_both(a, r, ref, finished)
    for mode in ("constant", "batch_mean"):
        kw = dict(kl_coef=0.05, nonstop_penalty=-2.0, penalty_mode=mode)
        torch.testing.assert_close(
            ops.latro_rewards(*cuda_in, **kw).cpu(),
            ops.latro_rewards(*cpu_in, **kw),
            atol=1e-6,
            rtol=1e-6,
        )


# ----------------------------------------------------------------------------- errors
def test_cuda_raises_the_cpu_errors():
    logits = torch.randn(2, 3, 5).cuda()
    targets = torch.tensor([[0, 1, 2], [3, 7, 4]]).cuda()
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = 7 is out of range"):
        ops.token_logprobs(logits, targets)
    with pytest.raises(ValueError, match="offset must be >= 0, got -3"):
        ops.sample(logits[0], seed=0, offset=torch.tensor(-3).cuda())
    bad = logits[0].clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="row 2 contains \\+inf"):
        ops.sample(bad, seed=0)
    tokens = torch.zeros(2, 5, dtype=torch.long).cuda()
    with pytest.raises(ValueError, match=r"positions\[1\] = 9 is outside \[0, 5\]"):
        ops.stop_positions_step(tokens, [[1]], step=0, positions=torch.tensor([5, 9]).cuda())
    with pytest.raises(ValueError, match=r"step must be in \[0, 5\), got 5"):
        ops.stop_positions_step(
            tokens, [[1]], step=torch.tensor(5).cuda(), positions=torch.full((2,), 5).cuda()
        )
    stop_tokens, bad_offsets = torch.tensor([1, 2]).cuda(), torch.tensor([0, 2, 2]).cuda()
    with pytest.raises(ValueError, match=r"stop_sequences\[1\] is empty"):
        torch.ops.latro_engine.stop_positions(tokens, stop_tokens, bad_offsets, 0)


def test_checks_off_mark_bad_rows_instead_of_raising(monkeypatch):
    monkeypatch.setenv("LATRO_CUDA_CHECKS", "off")
    logits = torch.randn(3, 5).cuda()
    logits[1, 0] = float("nan")
    ids, logp = ops.sample(logits, seed=0)
    assert ids[1].item() == -1 and torch.isnan(logp[1]) and ids[0].item() >= 0
    out = ops.token_logprobs(torch.randn(3, 5).cuda(), torch.tensor([0, 9, 1]).cuda())
    assert torch.isnan(out[1]) and not torch.isnan(out[[0, 2]]).any()

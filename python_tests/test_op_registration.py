"""torch.library.opcheck on every native op (schema, fake kernels, autograd registration,
AOT dispatch), and the package's behaviour without the extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES, requires_native

import latro_engine  # noqa: F401  (loads the extension)


def _op_samples(device: str):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 97, generator=g).to(device)
    targets = torch.randint(0, 97, (5, 7), generator=g).to(device)
    targets[0, 0] = -100
    logp, lse = torch.ops.latro_engine.token_logprobs(logits, targets, -100)
    hidden = torch.randn(9, 8, generator=g).to(device)
    weight = torch.randn(33, 8, generator=g).to(device)
    bias = torch.randn(33, generator=g).to(device)
    t9 = torch.randint(0, 33, (9,), generator=g).to(device)
    _, lin_lse = torch.ops.latro_engine.linear_token_logprobs(hidden, weight, bias, t9, 4, -100)
    tokens = torch.randint(0, 4, (6, 11), generator=g).to(device)
    stop_tokens = torch.tensor([1, 2, 3], device=device)
    stop_offsets = torch.tensor([0, 2, 3], device=device)
    scalar = lambda v: torch.tensor(v, device=device)  # noqa: E731
    rewards = torch.randn(12, generator=g).to(device)
    finished = torch.tensor([True, False] * 6, device=device)
    query = torch.randn(3, 6, 8, generator=g).to(device)
    cache = torch.randn(2, 4, 2, 9, 8, generator=g).to(device)  # [k/v, rows + 1, G, S, D]
    fresh = torch.randn(2, 3, 2, 8, generator=g).to(device)
    mask = torch.rand(3, 9, generator=g).to(device) < 0.8
    angles = torch.randn(2, 3, 8, generator=g).to(device)  # rotary cos and sin
    return {
        "token_logprobs": [
            (logits.clone().requires_grad_(), targets, -100),
            (logits.bfloat16(), targets, -100),
        ],
        "token_logprobs_backward": [
            (torch.randn(5, 7).to(device), logits.detach(), targets, lse, -100)
        ],
        "token_logprobs_backward_": [
            (torch.randn(5, 7).to(device), logits.detach().clone(), targets, lse, -100)
        ],
        "linear_token_logprobs": [
            (
                hidden.clone().requires_grad_(),
                weight.clone().requires_grad_(),
                bias.clone().requires_grad_(),
                t9,
                4,
                -100,
            ),
            (hidden.detach(), weight.detach(), None, t9, 0, -100),
        ],
        "linear_weighted_logprob_sum": [
            (
                hidden.clone().requires_grad_(),
                weight.clone().requires_grad_(),
                bias.clone().requires_grad_(),
                t9,
                torch.randn(9, generator=g).to(device),
                4,
                -100,
                True,
                True,
                True,
            ),
            (hidden.clone().requires_grad_(), weight.detach(), None, t9, torch.ones(9, device=device),
             0, -100, True, False, False),
            (hidden.detach(), weight.detach(), bias, t9, torch.ones(9, device=device), 2, -100,
             False, False, False),
        ],
        "linear_token_logprobs_backward": [
            (torch.randn(9).to(device), hidden.detach(), weight.detach(), bias, t9, lin_lse, 4,
             -100, True, True, True),
            (torch.randn(9).to(device), hidden.detach(), weight.detach(), None, t9, lin_lse, 4,
             -100, True, False, False),  # a frozen LM head: no weight gradient
        ],
        "sample": [
            (logits[0].detach(), scalar(3), scalar(2), 0.8, 10, 0.9, 0.05),
            (logits[0].detach(), torch.arange(7, device=device), scalar(0), 1.0, 0, 1.0, 0.0),
        ],
        "stop_positions": [(tokens, stop_tokens, stop_offsets, 1)],
        "stop_positions_step": [
            (tokens, stop_tokens, stop_offsets, scalar(4), torch.full((6,), 11, device=device), 0)
        ],
        "decode_attention": [
            (query, cache[0, :3], cache[1, :3], fresh[0], fresh[1], mask, None, None, scalar(7),
             0.3),
            (query.half(), *cache.half()[:, 1:], None, None, None, None, None, scalar(9), 0.35),
            (query, cache[0, :3], cache[1, :3], fresh[0], fresh[1], None, *angles, scalar(4),
             0.3),
        ],
        "rms_norm": [
            (query, query[0, 0], None, 1e-5),
            (query.bfloat16(), query[0, 0].bfloat16(), (query * 2).bfloat16(), 1e-6),
        ],
        "silu_mul": [(query, query * 3), (query.half(), query.half().neg())],
        "rloo_advantages": [(rewards, 4)],
        "latro_rewards": [(rewards, rewards * 2, rewards * 3, finished, 0.05, -1.0, "batch_mean")],
    }


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    samples = _op_samples(device)
    registered = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("latro_engine::")
    }
    assert registered == set(samples), f"untested ops: {registered - set(samples)}"
    for name, cases in samples.items():
        op = getattr(torch.ops.latro_engine, name).default
        for args in cases:
            torch.library.opcheck(op, args, test_utils=_OPCHECK_TESTS.get(name, _ALL_OPCHECK_TESTS))


_ALL_OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
# The eager backward of linear_weighted_logprob_sum scales the gradients it returned as outputs
# in place (no second LM-head-sized buffer), which the AOT test sees as eager outputs differing
# from traced ones; test_compiles_with_torch_compile checks it under torch.compile instead.
_OPCHECK_TESTS = {"linear_weighted_logprob_sum": _ALL_OPCHECK_TESTS[:3]}


@requires_native
def test_compiles_with_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def score(logits, targets):
        return latro_engine.ops.token_logprobs(logits, targets).sum()

    logits = torch.randn(3, 11, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    score(logits, targets).backward()
    expected = torch.autograd.grad(
        torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum(), logits
    )[0]
    torch.testing.assert_close(logits.grad, expected)


@requires_native
def test_weighted_logprob_sum_compiles_with_torch_compile():
    """Traced, the backward scales the stored gradients out of place; same gradients as eager."""

    def loss(hidden, weight, targets, token_weights):
        total, _ = latro_engine.ops.linear_weighted_logprob_sum(
            hidden, weight, targets, token_weights, chunk_size=3
        )
        return 0.5 * total

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 5, generator=g), torch.randn(13, 5, generator=g)
    targets, token_weights = torch.randint(0, 13, (7,), generator=g), torch.randn(7, generator=g)
    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fn(h, w, targets, token_weights).backward()
        grads.append((h.grad, w.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always::RuntimeWarning", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_package_works_without_the_extension():
    """A missing or broken extension: one clear warning, then the reference backend."""
    result = _run_python(
        """
        import sys
        sys.modules["latro_engine._C"] = None  # what a failed build looks like to Python
        import torch, latro_engine
        from latro_engine import ops
        assert not latro_engine.native_available()
        out = ops.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))
        assert torch.allclose(out, torch.log(torch.tensor(0.25)))
        ops.sample(torch.zeros(2, 4), seed=0)
        print("ok")
        """,
        LATRO_BACKEND="auto",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr.count("native extension is not built or failed to load") == 1


def test_native_backend_demanded_but_missing_is_an_error():
    result = _run_python(
        """
        import sys
        sys.modules["latro_engine._C"] = None
        import torch
        from latro_engine import ops
        ops.rloo_advantages(torch.zeros(4), 2)
        """,
        LATRO_BACKEND="native",
    )
    assert result.returncode != 0
    assert "LATRO_BACKEND=native but the extension did not load" in result.stderr

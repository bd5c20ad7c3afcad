"""rloo_advantages and latro_rewards against float64 hand computations."""

from __future__ import annotations

import pytest
import torch
from conftest import device_backend_pairs

from latro_engine import ops


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("groups,k", [(1, 2), (3, 7), (5, 16), (97, 3)])
def test_rloo_matches_hand_computation(device, backend, groups, k, use_backend):
    use_backend(backend)
    rewards = torch.randn(groups * k, device=device) * 5
    out = ops.rloo_advantages(rewards, k)
    r = rewards.double().view(groups, k).cpu().tolist()
    expected = [ri - (sum(group) - ri) / (k - 1) for group in r for ri in group]
    torch.testing.assert_close(
        out.double().cpu(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-6
    )
    # each group's advantages sum to zero: sum_i (r_i - (S - r_i)/(k-1)) = S - S = 0
    assert out.view(groups, k).sum(-1).abs().max() < 1e-4


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("mode", ["constant", "batch_mean"])
def test_latro_rewards(device, backend, mode, use_backend):
    use_backend(backend)
    n = 11
    answer = -torch.rand(n, device=device) * 4
    rationale = -torch.rand(n, device=device) * 30
    ref = -torch.rand(n, device=device) * 30
    finished = torch.rand(n, device=device) > 0.3
    finished[0], finished[1] = True, False
    out = ops.latro_rewards(
        answer, rationale, ref, finished, kl_coef=0.05, nonstop_penalty=-2.5, penalty_mode=mode
    )
    a, r, f = (
        answer.double().tolist(),
        (rationale.double() - ref.double()).tolist(),
        finished.tolist(),
    )
    penalty = -2.5 if mode == "constant" else -2.5 * sum(a) / n
    # The penalty replaces an unfinished row's self-reward; its KL term stays.
    expected = [(a[i] if f[i] else penalty) - 0.05 * r[i] for i in range(n)]
    torch.testing.assert_close(
        out.double().cpu(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-6
    )


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_no_gradient_flows_through_rewards(device, backend, use_backend):
    use_backend(backend)
    answer = torch.randn(4, device=device, requires_grad=True)
    out = ops.latro_rewards(
        answer,
        answer,
        answer,
        torch.ones(4, dtype=torch.bool, device=device),
        kl_coef=0.1,
        nonstop_penalty=0.0,
    )
    assert not out.requires_grad
    assert not ops.rloo_advantages(answer, 2).requires_grad

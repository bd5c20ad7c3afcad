"""The LaTRO loss against a float64 hand computation of the paper's estimator."""

from __future__ import annotations

import pytest
import torch

from latro_engine.objective import batch_advantages, latro_loss, loss_weights


def _hand(answer, rationale, ref, finished, k, kl_coef, sft_weight, penalty, mode):
    n = len(answer)
    mean_answer = sum(answer) / n
    nonstop = penalty if mode == "constant" else penalty * mean_answer
    # The penalty replaces an unfinished row's self-reward; its KL term stays.
    rewards = [
        (answer[i] if finished[i] else nonstop) - kl_coef * (rationale[i] - ref[i])
        for i in range(n)
    ]
    adv = []
    for g in range(n // k):
        group = rewards[g * k : (g + 1) * k]
        adv += [r - (sum(group) - r) / (k - 1) for r in group]
    loss = (
        sum(-adv[i] * rationale[i] for i in range(n)) / n + sft_weight * sum(-a for a in answer) / n
    )
    return loss, adv


@pytest.mark.parametrize("mode,penalty", [("constant", -7.0), ("batch_mean", 2.0)])
@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_loss_and_gradients_match_hand_computation(mode, penalty, sft_weight):
    g = torch.Generator().manual_seed(0)
    k, n = 4, 12
    answer = (-torch.rand(n, generator=g) * 5).requires_grad_()
    rationale = (-torch.rand(n, generator=g) * 40).requires_grad_()
    ref = -torch.rand(n, generator=g) * 40
    finished = torch.rand(n, generator=g) > 0.25
    finished[0] = False
    loss, stats = latro_loss(
        answer,
        rationale,
        ref,
        finished,
        k=k,
        kl_coef=0.05,
        sft_weight=sft_weight,
        nonstop_penalty=penalty,
        penalty_mode=mode,
    )
    expected, adv = _hand(
        answer.tolist(),
        rationale.tolist(),
        ref.tolist(),
        finished.tolist(),
        k,
        0.05,
        sft_weight,
        penalty,
        mode,
    )
    assert abs(loss.item() - expected) < 1e-3 * max(1.0, abs(expected))
    loss.backward()
    # d loss / d log p(z_i) = -A_i / N (advantages are constants); d / d log p(y_i) = -sft / N
    torch.testing.assert_close(
        rationale.grad.double(), -torch.tensor(adv, dtype=torch.float64) / n, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(answer.grad, torch.full((n,), -sft_weight / n), atol=1e-6, rtol=0)
    assert stats["finished_frac"] == pytest.approx(finished.float().mean().item())


def test_precomputed_advantages_give_the_same_loss():
    g = torch.Generator().manual_seed(1)
    answer, rationale, ref = -torch.rand(3, 8, generator=g) * 10
    finished = torch.ones(8, dtype=torch.bool)
    kw = dict(k=4, kl_coef=0.1, nonstop_penalty=-5.0, penalty_mode="constant")
    full, _ = latro_loss(answer, rationale, ref, finished, sft_weight=1.0, **kw)
    adv, stats = batch_advantages(answer, rationale, ref, finished, **kw)
    halves = sum(
        latro_loss(
            answer[s], rationale[s], ref[s], finished[s], sft_weight=1.0, advantages=adv[s], **kw
        )[0]
        / 2
        for s in (slice(0, 4), slice(4, 8))
    )
    assert abs(full.item() - halves.item()) < 1e-4
    assert stats["kl_mean"] == pytest.approx((rationale - ref).mean().item(), rel=1e-5)


@pytest.mark.parametrize("sft_weight", [1.0, 0.0, 0.3])
def test_loss_weights_are_the_coefficients_of_latro_loss(sft_weight):
    """loss_weights(A, sft) gives latro_loss's value as a weighted sum of the scores, and its
    coefficients are latro_loss's gradient w.r.t. them."""
    g = torch.Generator().manual_seed(2)
    answer, rationale, ref = (-torch.rand(3, 12, generator=g) * 10).unbind()
    finished = torch.rand(12, generator=g) > 0.2
    kw = dict(k=4, kl_coef=0.05, nonstop_penalty=-10.0, penalty_mode="constant")
    adv, _ = batch_advantages(answer, rationale, ref, finished, **kw)
    a, r = answer.clone().requires_grad_(), rationale.clone().requires_grad_()
    loss, _ = latro_loss(a, r, ref, finished, sft_weight=sft_weight, advantages=adv, **kw)
    loss.backward()
    rationale_w, answer_w = loss_weights(adv, sft_weight)
    torch.testing.assert_close(rationale_w, r.grad)
    torch.testing.assert_close(answer_w, a.grad)
    weighted = (rationale_w * rationale + answer_w * answer).sum()
    torch.testing.assert_close(weighted, loss.detach())

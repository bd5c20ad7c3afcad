"""The LaTRO objective on per-sequence log-probabilities.

With K rationales z_k per question, the self-reward R_k = log p(y | x, z_k), the reward
r_k = R_k - kl_coef * (log p(z_k|x) - log p_ref(z_k|x)) (for rationales that never stopped a
penalty replaces R_k, the KL term stays, as in the reference code) and the leave-one-out advantage A_k = r_k - mean of the other K - 1 rewards,

    loss = mean_i[-A_i * log p(z_i|x)] + sft_weight * mean_i[-log p(y|x, z_i)]

whose gradient is the paper's estimator mean_k[A_k grad log p(z_k|x) + grad log p(y|x,z_k)].
Rewards and advantages carry no gradient; there is no ratio, clipping or length normalisation.
"""

from __future__ import annotations

import torch

from latro_engine import ops


def latro_loss(
    answer_logp: torch.Tensor,
    rationale_logp: torch.Tensor,
    ref_rationale_logp: torch.Tensor,
    finished: torch.Tensor,
    *,
    k: int,
    kl_coef: float = 0.05,
    sft_weight: float = 1.0,
    nonstop_penalty: float = -10.0,
    penalty_mode: str = "constant",
    advantages: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The LaTRO loss and its statistics.

    Args:
        answer_logp: log p(y | x, z_i), float32 [N] with N = groups * k, samples of one prompt
            contiguous; carries the gradient of the answer term.
        rationale_logp: log p(z_i | x) summed over the rationale tokens (the answer template
            excluded), float32 [N]; carries the policy-gradient term.
        ref_rationale_logp: the frozen reference model's log p_ref(z_i | x), float32 [N].
        finished: bool [N], False for rationales cut off at the length limit.
        k: samples per prompt (>= 2). kl_coef: beta. sft_weight: weight of the answer term
            (the paper's gradient has 1; the reference code's recipe uses 0).
        nonstop_penalty, penalty_mode: see :func:`latro_engine.ops.latro_rewards`.
        advantages: precomputed advantages (when the rewards of a whole batch were computed
            in an earlier pass); computed here from the inputs when None.
    Returns:
        (loss, stats) where stats holds plain floats for logging.
    """
    stats: dict[str, float] = {}
    if advantages is None:
        advantages, stats = batch_advantages(
            answer_logp,
            rationale_logp,
            ref_rationale_logp,
            finished,
            k=k,
            kl_coef=kl_coef,
            nonstop_penalty=nonstop_penalty,
            penalty_mode=penalty_mode,
        )
    advantages = advantages.detach().to(rationale_logp.dtype)
    pg_loss = -(advantages * rationale_logp).mean()
    sft_loss = -answer_logp.mean()
    loss = pg_loss + sft_weight * sft_loss
    stats.update(
        _floats(
            {
                "loss": loss,
                "pg_loss": pg_loss,
                "sft_loss": sft_loss,
                "advantage_abs_mean": advantages.abs().mean(),
            }
        )
    )
    return loss, stats


def _floats(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as plain floats for the metrics log, in one copy to the host: each
    ``float(tensor)`` on a GPU waits for the device, and micro-batches log several."""
    values = torch.stack([t.detach().float().reshape(()) for t in named.values()]).tolist()
    return dict(zip(named, values))


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else x.new_zeros((), dtype=torch.float32)


def loss_weights(
    advantages: torch.Tensor, sft_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients of :func:`latro_loss` (given its advantages) on the per-row sums:
    ``loss = sum_i rationale_w_i * rationale_logp_i + answer_w_i * answer_logp_i``.

    With advantages known before the gradient pass, the loss is linear in the log-probabilities
    with fixed coefficients, so the scoring pass can take its gradient as it goes
    (``score_sequences(..., loss_weights=...)``, ``ops.linear_weighted_logprob_sum``)."""
    n = advantages.numel()
    rationale_w = -advantages.detach().to(torch.float32) / n
    return rationale_w, torch.full_like(rationale_w, -sft_weight / n)


def reward_stats(
    rewards: torch.Tensor,
    answer_logp: torch.Tensor,
    rationale_logp: torch.Tensor,
    ref_rationale_logp: torch.Tensor,
    finished: torch.Tensor,
    **more: torch.Tensor,
) -> dict[str, float]:
    """Means over the batch of what the rewards are made of, for the metrics log (with any
    ``more`` scalars, in the same copy to the host)."""
    kl = (rationale_logp.detach() - ref_rationale_logp.detach()).float()
    return _floats(
        {
            "reward_mean": rewards.mean(),
            "reward_std": _std(rewards),
            "answer_logp_mean": answer_logp.detach().float().mean(),
            "rationale_logp_mean": rationale_logp.detach().float().mean(),
            "kl_mean": kl.mean(),
            "finished_frac": finished.float().mean(),
            **more,
        }
    )


def batch_advantages(
    answer_logp: torch.Tensor,
    rationale_logp: torch.Tensor,
    ref_rationale_logp: torch.Tensor,
    finished: torch.Tensor,
    *,
    k: int,
    kl_coef: float,
    nonstop_penalty: float,
    penalty_mode: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards and RLOO advantages of a whole batch from no-grad scores, with their stats:
    the first half of a step whose gradient pass then runs in micro-batches."""
    rewards = ops.latro_rewards(
        answer_logp,
        rationale_logp,
        ref_rationale_logp,
        finished,
        kl_coef=kl_coef,
        nonstop_penalty=nonstop_penalty,
        penalty_mode=penalty_mode,
    )
    advantages = ops.rloo_advantages(rewards, k)
    stats = reward_stats(
        rewards, answer_logp, rationale_logp, ref_rationale_logp, finished,
        advantage_std=_std(advantages), advantage_abs_max=advantages.abs().max(),
    )
    return advantages, stats

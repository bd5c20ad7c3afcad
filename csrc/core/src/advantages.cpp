// LaTRO rewards and leave-one-out (RLOO) advantages.

#include "cpu_common.h"
#include "latro/latro.h"

namespace latro {

void rloo_advantages(const float* rewards, int64_t groups, int64_t k, float* out) {
  detail::check_rloo_args(rewards, groups, k, out);
  for (int64_t g = 0; g < groups; ++g) {
    const float* r = rewards + g * k;
    double sum = 0.0;
    for (int64_t i = 0; i < k; ++i) sum += r[i];
    for (int64_t i = 0; i < k; ++i) {
      const double others = (sum - r[i]) / static_cast<double>(k - 1);
      out[g * k + i] = static_cast<float>(static_cast<double>(r[i]) - others);
    }
  }
}

void latro_rewards(const float* answer_logp, const float* rationale_logp,
                   const float* ref_rationale_logp, const bool* finished, int64_t n,
                   float kl_coef, float nonstop_penalty, PenaltyMode mode, float* out) {
  detail::check_latro_rewards_args(answer_logp, rationale_logp, ref_rationale_logp, finished, n,
                                   kl_coef, nonstop_penalty, out);
  double penalty = nonstop_penalty;
  if (mode == PenaltyMode::BatchMean) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += answer_logp[i];
    penalty = nonstop_penalty * (sum / static_cast<double>(n));
  } else {
    LATRO_CHECK(mode == PenaltyMode::Constant, "penalty_mode must be Constant or BatchMean");
  }
  for (int64_t i = 0; i < n; ++i) {
    const double kl = static_cast<double>(rationale_logp[i]) - ref_rationale_logp[i];
    // The penalty replaces the self-reward of a row that never stopped, not its KL term (as
    // the reference code does).
    const double self_reward = finished[i] ? static_cast<double>(answer_logp[i]) : penalty;
    out[i] = static_cast<float>(self_reward - kl_coef * kl);
  }
}

}  // namespace latro

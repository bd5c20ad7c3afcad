// LaTRO rewards and leave-one-out (RLOO) advantages on CUDA (semantics in latro.h).
#include "cuda_common.cuh"

namespace latro::cuda {
namespace {

// One thread per sample; each sums its own group in float64 in index order, exactly the CPU's
// arithmetic, so both backends agree bit for bit (groups are small: k samples per prompt).
__global__ void rloo_kernel(const float* __restrict__ rewards, int64_t n, int64_t k,
                            float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* group = rewards + (i / k) * k;
  double sum = 0.0;
  for (int64_t j = 0; j < k; ++j) sum += group[j];
  const double others = (sum - rewards[i]) / static_cast<double>(k - 1);
  out[i] = static_cast<float>(static_cast<double>(rewards[i]) - others);
}

constexpr int kRewardThreads = 1024;

// One block: the batch mean (for BatchMean) needs every answer log-probability first.
__global__ void __launch_bounds__(kRewardThreads)
    latro_rewards_kernel(const float* __restrict__ answer_logp,
                         const float* __restrict__ rationale_logp,
                         const float* __restrict__ ref_rationale_logp,
                         const bool* __restrict__ finished, int64_t n, float kl_coef,
                         float nonstop_penalty, bool batch_mean, float* __restrict__ out) {
  __shared__ double scratch[detail::kMaxWarps];
  double penalty = nonstop_penalty;
  if (batch_mean) {
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) local += answer_logp[i];
    const double sum =
        detail::block_all_reduce(local, [](double a, double b) { return a + b; }, scratch);
    penalty = static_cast<double>(nonstop_penalty) * (sum / static_cast<double>(n));
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double kl = static_cast<double>(rationale_logp[i]) - ref_rationale_logp[i];
    // As the CPU: the penalty replaces an unfinished row's self-reward, not its KL term;
    // kl_coef * kl in float64 (float * double promotes).
    const double self_reward = finished[i] ? static_cast<double>(answer_logp[i]) : penalty;
    out[i] = static_cast<float>(self_reward - kl_coef * kl);
  }
}

}  // namespace

void rloo_advantages(const float* rewards, int64_t groups, int64_t k, float* out,
                     cudaStream_t stream) {
  detail::check_rloo_args(rewards, groups, k, out);
  const int64_t n = groups * k;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  LATRO_CHECK(blocks <= INT32_MAX, "too many rewards: ", n);
  detail::launch(rloo_kernel, static_cast<unsigned int>(blocks), kThreads, stream, rewards, n, k,
                 out);
  LATRO_CUDA_CHECK(cudaGetLastError());
}

void latro_rewards(const float* answer_logp, const float* rationale_logp,
                   const float* ref_rationale_logp, const bool* finished, int64_t n,
                   float kl_coef, float nonstop_penalty, PenaltyMode mode, float* out,
                   cudaStream_t stream) {
  detail::check_latro_rewards_args(answer_logp, rationale_logp, ref_rationale_logp, finished, n,
                                   kl_coef, nonstop_penalty, out);
  LATRO_CHECK(mode == PenaltyMode::Constant || mode == PenaltyMode::BatchMean,
              "penalty_mode must be Constant or BatchMean");
  detail::launch(latro_rewards_kernel, 1, kRewardThreads, stream,
      answer_logp, rationale_logp, ref_rationale_logp, finished, n, kl_coef, nonstop_penalty,
      mode == PenaltyMode::BatchMean, out);
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

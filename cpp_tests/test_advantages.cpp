// latro::rloo_advantages and latro::latro_rewards against float64 references.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace {

using namespace latro_test;

std::vector<double> reference_rloo(const std::vector<float>& rewards, int64_t groups, int64_t k) {
  std::vector<double> out(rewards.size());
  for (int64_t g = 0; g < groups; ++g) {
    double sum = 0.0;
    for (int64_t i = 0; i < k; ++i) sum += rewards[static_cast<size_t>(g * k + i)];
    for (int64_t i = 0; i < k; ++i) {
      const double r = rewards[static_cast<size_t>(g * k + i)];
      out[static_cast<size_t>(g * k + i)] = r - (sum - r) / static_cast<double>(k - 1);
    }
  }
  return out;
}

TEST(RlooAdvantages, RandomAgainstReference) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(-3.0f, 4.0f);
  for (int64_t k = 2; k <= 16; ++k) {
    for (const int64_t groups : {int64_t{1}, int64_t{3}, int64_t{64}}) {
      std::vector<float> rewards(static_cast<size_t>(groups * k));
      for (float& r : rewards) r = normal(rng);
      std::vector<float> out(rewards.size(), 1e30f);
      latro::rloo_advantages(rewards.data(), groups, k, out.data());
      EXPECT_TRUE(all_close(to_double(out), reference_rloo(rewards, groups, k),
                            float32_result_tolerance()))
          << "groups " << groups << " k " << k;
      // Each group's advantages sum to zero.
      for (int64_t g = 0; g < groups; ++g) {
        double sum = 0.0;
        for (int64_t i = 0; i < k; ++i) sum += out[static_cast<size_t>(g * k + i)];
        EXPECT_NEAR(sum, 0.0, 1e-4 * static_cast<double>(k)) << "group " << g << " k " << k;
      }
    }
  }
}

TEST(RlooAdvantages, HandWritten) {
  // k = 2: a_i = r_i - r_other.  k = 3, group {2, 3, 5}: 2 - 8 / 2 = -2, 3 - 7 / 2 = -0.5,
  // 5 - 5 / 2 = 2.5.
  const std::vector<float> rewards = {1.0f, 4.0f, 1.0f, 2.0f, 3.0f, 5.0f};
  std::vector<float> out(6);
  latro::rloo_advantages(rewards.data(), 3, 2, out.data());
  EXPECT_TRUE(all_close(to_double(out), {-3.0, 3.0, -1.0, 1.0, -2.0, 2.0},
                        float32_result_tolerance()));
  latro::rloo_advantages(rewards.data(), 2, 3, out.data());
  EXPECT_TRUE(all_close(to_double(out), {-1.5, 3.0, -1.5, -2.0, -0.5, 2.5},
                        float32_result_tolerance()));
  // Equal rewards: zero advantage.
  const std::vector<float> same(8, -7.25f);
  std::vector<float> zero(8, 1.0f);
  latro::rloo_advantages(same.data(), 2, 4, zero.data());
  EXPECT_TRUE(all_close(to_double(zero), std::vector<double>(8, 0.0), float32_result_tolerance()));
}

TEST(RlooAdvantages, Errors) {
  std::vector<float> rewards(8), out(8);
  EXPECT_LATRO_ERROR(latro::rloo_advantages(rewards.data(), 4, 1, out.data()), "k");
  EXPECT_LATRO_ERROR(latro::rloo_advantages(rewards.data(), 8, 0, out.data()), "k");
  EXPECT_LATRO_ERROR(latro::rloo_advantages(rewards.data(), 0, 2, out.data()), "groups");
  EXPECT_LATRO_ERROR(latro::rloo_advantages(rewards.data(), -1, 2, out.data()), "groups");
  EXPECT_THROW(latro::rloo_advantages(nullptr, 4, 2, out.data()), latro::Error);
  EXPECT_THROW(latro::rloo_advantages(rewards.data(), 4, 2, nullptr), latro::Error);
}

// ---------------------------------------------------------------- latro_rewards
struct RewardInputs {
  std::vector<float> answer, rationale, ref_rationale;
  std::unique_ptr<bool[]> finished;  // std::vector<bool> has no data()
  int64_t n;
};

RewardInputs random_reward_inputs(int64_t n, std::mt19937& rng) {
  RewardInputs in;
  in.n = n;
  std::normal_distribution<float> logp(-20.0f, 8.0f);
  std::bernoulli_distribution done(0.7);
  in.finished.reset(new bool[static_cast<size_t>(n)]);
  for (int64_t i = 0; i < n; ++i) {
    in.answer.push_back(-std::fabs(logp(rng)) / 4);
    in.rationale.push_back(-std::fabs(logp(rng)) * 3);
    in.ref_rationale.push_back(-std::fabs(logp(rng)) * 3);
    in.finished[static_cast<size_t>(i)] = i == 0 ? false : (i == 1 ? true : done(rng));
  }
  return in;
}

std::vector<double> reference_rewards(const RewardInputs& in, double kl_coef, double penalty,
                                      latro::PenaltyMode mode) {
  double mean_answer = 0.0;
  for (float a : in.answer) mean_answer += a;
  mean_answer /= static_cast<double>(in.n);
  std::vector<double> out;
  const double nonstop = mode == latro::PenaltyMode::Constant ? penalty : penalty * mean_answer;
  for (int64_t i = 0; i < in.n; ++i) {
    const size_t s = static_cast<size_t>(i);
    // The penalty replaces the self-reward of an unfinished row; the KL term stays.
    const double self_reward = in.finished[s] ? static_cast<double>(in.answer[s]) : nonstop;
    out.push_back(self_reward -
                  kl_coef * (static_cast<double>(in.rationale[s]) - in.ref_rationale[s]));
  }
  return out;
}

TEST(LatroRewards, BothPenaltyModesAgainstReference) {
  std::mt19937 rng(5);
  for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{64}, int64_t{1000}}) {
    const RewardInputs in = random_reward_inputs(n, rng);
    for (const auto mode : {latro::PenaltyMode::Constant, latro::PenaltyMode::BatchMean}) {
      for (const float kl : {0.0f, 0.05f, 1.0f}) {
        for (const float penalty : {-100.0f, 0.0f, 2.5f}) {
          std::vector<float> out(static_cast<size_t>(n), 1e30f);
          latro::latro_rewards(in.answer.data(), in.rationale.data(), in.ref_rationale.data(),
                               in.finished.get(), n, kl, penalty, mode, out.data());
          EXPECT_TRUE(all_close(to_double(out), reference_rewards(in, kl, penalty, mode),
                                float32_result_tolerance()))
              << "n " << n << " mode " << static_cast<int>(mode) << " kl " << kl << " penalty "
              << penalty;
        }
      }
    }
  }
}

TEST(LatroRewards, HandWritten) {
  const std::vector<float> answer = {-1.0f, -2.0f, -3.0f, -6.0f};
  const std::vector<float> rationale = {-10.0f, -20.0f, -30.0f, -40.0f};
  const std::vector<float> ref = {-12.0f, -22.0f, -25.0f, -40.0f};
  const bool finished[] = {true, false, true, false};
  std::vector<float> out(4);
  latro::latro_rewards(answer.data(), rationale.data(), ref.data(), finished, 4, 0.5f, -7.0f,
                       latro::PenaltyMode::Constant, out.data());
  // finished: -1 - 0.5 * (-10 + 12) = -2;  -3 - 0.5 * (-30 + 25) = -0.5
  // unfinished: the penalty, minus the KL term: -7 - 0.5 * (-20 + 22) = -8;  -7 - 0 = -7
  EXPECT_TRUE(all_close(to_double(out), {-2.0, -8.0, -0.5, -7.0}, float32_result_tolerance()));
  latro::latro_rewards(answer.data(), rationale.data(), ref.data(), finished, 4, 0.5f, 2.0f,
                       latro::PenaltyMode::BatchMean, out.data());
  // mean answer_logp over all 4 rows = -3, times 2 = -6; minus the KL terms as above.
  EXPECT_TRUE(all_close(to_double(out), {-2.0, -7.0, -0.5, -6.0}, float32_result_tolerance()));
  // All finished: the penalty plays no role.
  const bool all_done[] = {true, true, true, true};
  latro::latro_rewards(answer.data(), rationale.data(), ref.data(), all_done, 4, 0.0f, 99.0f,
                       latro::PenaltyMode::BatchMean, out.data());
  EXPECT_TRUE(all_close(to_double(out), to_double(answer), float32_result_tolerance()));
}

TEST(LatroRewards, Errors) {
  const std::vector<float> a(3, -1.0f);
  const bool f[] = {true, false, true};
  std::vector<float> out(3);
  const auto C = latro::PenaltyMode::Constant;
  EXPECT_THROW(latro::latro_rewards(nullptr, a.data(), a.data(), f, 3, 0.1f, 0.0f, C, out.data()),
               latro::Error);
  EXPECT_THROW(latro::latro_rewards(a.data(), nullptr, a.data(), f, 3, 0.1f, 0.0f, C, out.data()),
               latro::Error);
  EXPECT_THROW(latro::latro_rewards(a.data(), a.data(), nullptr, f, 3, 0.1f, 0.0f, C, out.data()),
               latro::Error);
  EXPECT_THROW(latro::latro_rewards(a.data(), a.data(), a.data(), nullptr, 3, 0.1f, 0.0f, C,
                                    out.data()),
               latro::Error);
  EXPECT_THROW(latro::latro_rewards(a.data(), a.data(), a.data(), f, 3, 0.1f, 0.0f, C, nullptr),
               latro::Error);
  EXPECT_LATRO_ERROR(
      latro::latro_rewards(a.data(), a.data(), a.data(), f, -1, 0.1f, 0.0f, C, out.data()), "n");
  EXPECT_THROW(latro::latro_rewards(a.data(), a.data(), a.data(), f, 3, 0.1f, 0.0f,
                                    static_cast<latro::PenaltyMode>(7), out.data()),
               latro::Error);
}

}  // namespace

// latro::token_logprobs and its backward against float64 references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace {

using latro::DType;
using namespace latro_test;

struct Reference {
  std::vector<double> logprobs;
  std::vector<double> lse;
};

// log_softmax(row)[target] in float64; 0 (and lse 0) where the target is ignored.
Reference reference_forward(const Matrix& logits, const std::vector<int64_t>& targets,
                            int64_t ignore_index) {
  Reference ref;
  for (int64_t r = 0; r < logits.rows; ++r) {
    const int64_t t = targets[static_cast<size_t>(r)];
    if (t == ignore_index) {
      ref.logprobs.push_back(0.0);
      ref.lse.push_back(0.0);
      continue;
    }
    const double lse = logsumexp(row_values(logits, r));
    ref.lse.push_back(lse);
    ref.logprobs.push_back(logits.get(r, t) - lse);
  }
  return ref;
}



// ---------------------------------------------------------------- parametrized: dtype x size
class TokenLogprobsTest : public ShapeTest {
 protected:
  std::mt19937 rng{static_cast<unsigned>(1234 + rows() * 31 + vocab() * 7 +
                                         static_cast<int>(dtype()))};
};

TEST_P(TokenLogprobsTest, ForwardMatchesReference) {
  for (const bool dense : {true, false}) {
    SCOPED_TRACE(dense ? "dense rows" : "row_stride = vocab + 5");
    const int64_t stride = dense ? vocab() : vocab() + 5;
    const Matrix logits = random_matrix(dtype(), rows(), vocab(), stride, rng);
    const auto targets = random_targets(rows(), vocab(), rng, kIgnore, /*with_ignored=*/true);
    std::vector<float> logprobs(static_cast<size_t>(rows()), 123.0f);
    std::vector<float> lse(static_cast<size_t>(rows()), 123.0f);

    auto args = forward_args(logits, targets, logprobs, &lse);
    if (dense && rows() % 2 == 1) args.row_stride = -1;  // the default spelling of dense rows
    latro::token_logprobs(args);

    const Reference ref = reference_forward(logits, targets, kIgnore);
    EXPECT_TRUE(all_close(to_double(logprobs), ref.logprobs, float32_result_tolerance()));
    EXPECT_TRUE(all_close(to_double(lse), ref.lse, float32_result_tolerance()));
    for (float lp : logprobs) EXPECT_LE(lp, 0.0f) << "a log-probability is never above 0";
  }
}

TEST_P(TokenLogprobsTest, CustomIgnoreIndexAndNoLse) {
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  const int64_t ignore_index = -1;
  const auto targets = random_targets(rows(), vocab(), rng, ignore_index, true);
  std::vector<float> logprobs(static_cast<size_t>(rows()), 123.0f);
  auto args = forward_args(logits, targets, logprobs, nullptr, ignore_index);
  latro::token_logprobs(args);
  const Reference ref = reference_forward(logits, targets, ignore_index);
  EXPECT_TRUE(all_close(to_double(logprobs), ref.logprobs, float32_result_tolerance()));
}

TEST_P(TokenLogprobsTest, ResultDoesNotDependOnRowSplit) {
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab() + 1, rng);
  const auto targets = random_targets(rows(), vocab(), rng, kIgnore, true);
  std::vector<float> whole(static_cast<size_t>(rows())), whole_lse(whole.size());
  latro::token_logprobs(forward_args(logits, targets, whole, &whole_lse));

  for (const int64_t k : {int64_t{0}, rows() / 2, rows() - 1, rows()}) {
    SCOPED_TRACE("split at " + std::to_string(k));
    std::vector<float> split(whole.size(), 99.0f), split_lse(whole.size(), 99.0f);
    const auto args = forward_args(logits, targets, split, &split_lse);
    latro::token_logprobs(args, 0, k);
    latro::token_logprobs(args, k, rows());
    for (size_t r = 0; r < whole.size(); ++r) {
      // Bitwise equal: a row's result must not depend on which call computed it.
      EXPECT_EQ(latro::float_to_bits(split[r]), latro::float_to_bits(whole[r])) << "row " << r;
      EXPECT_EQ(latro::float_to_bits(split_lse[r]), latro::float_to_bits(whole_lse[r]))
          << "row " << r;
    }
  }
}

TEST_P(TokenLogprobsTest, RowRangeWritesOnlyItsRows) {
  if (rows() < 3) GTEST_SKIP() << "needs 3 rows";
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  const auto targets = random_targets(rows(), vocab(), rng, kIgnore, false);
  std::vector<float> out(static_cast<size_t>(rows()), 77.0f);
  latro::token_logprobs(forward_args(logits, targets, out, nullptr), 1, 2);
  EXPECT_EQ(out[0], 77.0f);
  EXPECT_NE(out[1], 77.0f);
  for (size_t r = 2; r < out.size(); ++r) EXPECT_EQ(out[r], 77.0f) << "row " << r;
}

TEST_P(TokenLogprobsTest, BackwardMatchesAnalyticFormula) {
  for (const bool dense : {true, false}) {
    SCOPED_TRACE(dense ? "dense rows" : "row strides vocab + 3 / vocab + 2");
    const int64_t stride = dense ? vocab() : vocab() + 3;
    const Matrix logits = random_matrix(dtype(), rows(), vocab(), stride, rng);
    const auto targets = random_targets(rows(), vocab(), rng, kIgnore, true);
    const Reference ref = reference_forward(logits, targets, kIgnore);
    // The lse the kernel gets is the float32 one a forward would have stored.
    std::vector<float> lse(ref.lse.begin(), ref.lse.end());
    std::uniform_real_distribution<float> upstream(-2.0f, 2.0f);
    std::vector<float> grad_logprobs(static_cast<size_t>(rows()));
    for (float& g : grad_logprobs) g = upstream(rng);

    const int64_t grad_stride = dense ? vocab() : vocab() + 2;
    Matrix grad = random_matrix(dtype(), rows(), vocab(), grad_stride, rng);  // garbage to overwrite

    latro::TokenLogprobsBackwardArgs args;
    args.logits = logits.data();
    args.dtype = dtype();
    args.rows = rows();
    args.vocab = vocab();
    args.row_stride = dense ? -1 : stride;
    args.targets = targets.data();
    args.ignore_index = kIgnore;
    args.lse = lse.data();
    args.grad_logprobs = grad_logprobs.data();
    args.grad_logits = grad.data();
    args.grad_row_stride = dense ? -1 : grad_stride;
    latro::token_logprobs_backward(args);

    std::vector<double> got, want;
    for (int64_t r = 0; r < rows(); ++r) {
      const int64_t t = targets[static_cast<size_t>(r)];
      const double g = grad_logprobs[static_cast<size_t>(r)];
      for (int64_t v = 0; v < vocab(); ++v) {
        got.push_back(grad.get(r, v));
        if (t == kIgnore) {
          want.push_back(0.0);
        } else {
          const double p = std::exp(logits.get(r, v) - static_cast<double>(lse[static_cast<size_t>(r)]));
          want.push_back(g * ((v == t ? 1.0 : 0.0) - p));
        }
      }
      if (!dense) {
        for (int64_t v = vocab(); v < grad_stride; ++v) {
          EXPECT_TRUE(std::isnan(grad.get(r, v))) << "padding of grad row " << r << " written";
        }
      }
    }
    EXPECT_TRUE(all_close(got, want, stored_tolerance(dtype())));
  }
}

TEST_P(TokenLogprobsTest, BackwardInPlaceOverLogits) {
  const Matrix original = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  const auto targets = random_targets(rows(), vocab(), rng, kIgnore, true);
  const Reference ref = reference_forward(original, targets, kIgnore);
  std::vector<float> lse(ref.lse.begin(), ref.lse.end());
  std::vector<float> grad_logprobs(static_cast<size_t>(rows()));
  for (size_t r = 0; r < grad_logprobs.size(); ++r) grad_logprobs[r] = 0.5f + 0.25f * (r % 4);

  Matrix buffer = original;  // logits, then overwritten with their gradient
  latro::TokenLogprobsBackwardArgs args;
  args.logits = buffer.data();
  args.dtype = dtype();
  args.rows = rows();
  args.vocab = vocab();
  args.targets = targets.data();
  args.lse = lse.data();
  args.grad_logprobs = grad_logprobs.data();
  args.grad_logits = buffer.data();
  latro::token_logprobs_backward(args);

  std::vector<double> got, want;
  for (int64_t r = 0; r < rows(); ++r) {
    const int64_t t = targets[static_cast<size_t>(r)];
    for (int64_t v = 0; v < vocab(); ++v) {
      got.push_back(buffer.get(r, v));
      want.push_back(t == kIgnore ? 0.0
                                  : grad_logprobs[static_cast<size_t>(r)] *
                                        ((v == t ? 1.0 : 0.0) -
                                         std::exp(original.get(r, v) - lse[static_cast<size_t>(r)])));
    }
  }
  EXPECT_TRUE(all_close(got, want, stored_tolerance(dtype())));
}

INSTANTIATE_TEST_SUITE_P(DTypesAndSizes, TokenLogprobsTest,
                         ::testing::Combine(::testing::Values(DType::Float32, DType::BFloat16,
                                                              DType::Float16),
                                            ::testing::Values<int64_t>(1, 7, 97),
                                            ::testing::Values<int64_t>(1, 7, 97, 1025, 32000)),
                         shape_name);

// ---------------------------------------------------------------- the simple overloads
template <typename T>
void check_simple_overload(DType dtype) {
  std::mt19937 rng(42);
  const int64_t rows = 5, vocab = 300;
  const Matrix logits = random_matrix(dtype, rows, vocab, vocab, rng);
  const auto targets = random_targets(rows, vocab, rng, kIgnore, true);
  std::vector<float> out(static_cast<size_t>(rows), 55.0f);
  latro::token_logprobs(static_cast<const T*>(logits.data()), rows, vocab, targets.data(),
                        out.data());
  const Reference ref = reference_forward(logits, targets, kIgnore);
  EXPECT_TRUE(all_close(to_double(out), ref.logprobs, float32_result_tolerance()));
}

TEST(TokenLogprobsSimple, Float32) { check_simple_overload<float>(DType::Float32); }
TEST(TokenLogprobsSimple, BFloat16) { check_simple_overload<latro::bfloat16>(DType::BFloat16); }
TEST(TokenLogprobsSimple, Float16) { check_simple_overload<latro::float16>(DType::Float16); }

// ---------------------------------------------------------------- non-finite logits
class TokenLogprobsNonFinite : public ::testing::TestWithParam<DType> {};

TEST_P(TokenLogprobsNonFinite, FollowsLogSoftmax) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // row 0: NaN somewhere else than the target         -> NaN
  // row 1: -inf at the target, finite elsewhere        -> -inf
  // row 2: all -inf                                    -> NaN (like torch.log_softmax)
  // row 3: -inf elsewhere, finite target               -> 0 (the target has all the mass)
  // row 4: +inf at the target                          -> NaN (torch: inf - inf)
  // row 5: +inf elsewhere                              -> NaN or -inf, never finite
  // row 6: -inf at some other token                    -> finite, as if the token were absent
  const std::vector<std::vector<float>> values = {
      {0.5f, nan, 1.0f, 2.0f, -1.0f, 0.0f},
      {-inf, 0.5f, 1.0f, 2.0f, -1.0f, 0.0f},
      {-inf, -inf, -inf, -inf, -inf, -inf},
      {-inf, -inf, 3.0f, -inf, -inf, -inf},
      {0.0f, inf, 1.0f, 2.0f, -1.0f, 0.0f},
      {0.0f, inf, 1.0f, 2.0f, -1.0f, 0.0f},
      {0.5f, -inf, 1.0f, 2.0f, -1.0f, 0.0f},
  };
  const std::vector<int64_t> targets = {2, 0, 3, 2, 1, 3, 4};
  const int64_t rows = static_cast<int64_t>(values.size());
  const Matrix logits = matrix_of_rows(GetParam(), values);
  std::vector<float> out(static_cast<size_t>(rows), 9.0f), lse(out.size(), 9.0f);
  latro::token_logprobs(forward_args(logits, targets, out, &lse));

  EXPECT_TRUE(std::isnan(out[0])) << out[0];
  EXPECT_EQ(out[1], -inf);
  EXPECT_TRUE(std::isnan(out[2])) << out[2];
  EXPECT_TRUE(close(out[3], 0.0, float32_result_tolerance()));
  EXPECT_TRUE(std::isnan(out[4])) << out[4];
  EXPECT_TRUE(std::isnan(out[5]) || out[5] == -inf) << out[5];
  EXPECT_TRUE(close(out[6], values[6][4] - logsumexp({0.5, -kInf, 1.0, 2.0, -1.0, 0.0}),
                    float32_result_tolerance()));
  EXPECT_TRUE(close(lse[6], logsumexp({0.5, -kInf, 1.0, 2.0, -1.0, 0.0}),
                    float32_result_tolerance()));
  EXPECT_TRUE(close(lse[1], logsumexp({-kInf, 0.5, 1.0, 2.0, -1.0, 0.0}),
                    float32_result_tolerance()));
}

TEST_P(TokenLogprobsNonFinite, LargeLogitsDoNotOverflow) {
  // exp(60000) overflows float32: the kernel must subtract a running max. Values chosen to be
  // exact in float16 (max 65504) and bfloat16.
  const int64_t vocab = 4;
  const std::vector<float> row = {60000.0f, 59904.0f, -60000.0f, 59968.0f};
  const Matrix logits = repeated_row(GetParam(), row, 1);
  // The float32 lse of this row has an ulp of 2^-8: allow two of them (the point here is finite
  // results; ShiftedLogitsKeepFullPrecision holds the precision to the usual tolerance).
  const Tolerance tol{2.0 * 0x1.0p-8, 0.0};
  for (int64_t t = 0; t < vocab; ++t) {
    std::vector<int64_t> targets = {t};
    std::vector<float> out(1), lse(1);
    latro::token_logprobs(forward_args(logits, targets, out, &lse));
    const double want_lse = logsumexp(row_values(logits, 0));
    EXPECT_TRUE(std::isfinite(out[0]) && std::isfinite(lse[0])) << "target " << t;
    EXPECT_TRUE(close(out[0], logits.get(0, t) - want_lse, tol)) << "target " << t;
    EXPECT_TRUE(close(lse[0], want_lse, {0.0, 2.5e-7})) << "target " << t;
  }
}

TEST_P(TokenLogprobsNonFinite, ShiftedLogitsKeepFullPrecision) {
  // log_softmax is shift-invariant: logits around 1000 must give the log-probabilities of the
  // unshifted row to float32 precision (torch's log_softmax computes (x - max) - log(sum) and
  // does). Returning x - lse rounded through a float32 lse of ~1000 would be off by up to
  // ulp(1000) / 2 = 3e-5, 100x torch's error (STYLE.md point 9 allows 2x).
  std::mt19937 rng(17);
  const int64_t rows = 16, vocab = 1025;
  Matrix logits = random_matrix(GetParam(), rows, vocab, vocab, rng);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < vocab; ++v) logits.set(r, v, static_cast<float>(logits.get(r, v) + 1000.0));
  }
  std::vector<int64_t> targets(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) targets[static_cast<size_t>(r)] = (r * 61) % vocab;
  std::vector<float> out(static_cast<size_t>(rows));
  latro::token_logprobs(forward_args(logits, targets, out, nullptr));
  EXPECT_TRUE(all_close(to_double(out), reference_forward(logits, targets, kIgnore).logprobs,
                        float32_result_tolerance()));
}

// log_softmax(values) in float64 as (x - max) - log(sum exp(x - max)): exact near the float32
// maximum, where max + log(sum) rounds back to max even in float64. Finite values only.
std::vector<double> stable_log_softmax(const std::vector<double>& values) {
  double max = -kInf;
  for (double v : values) max = std::max(max, v);
  double sum = 0.0;
  for (double v : values) sum += std::exp(v - max);
  std::vector<double> out;
  for (double v : values) out.push_back((v - max) - std::log(sum));
  return out;
}

// grad_logprobs[r] * ([v == targets[r]] - softmax(row r)[v]) from the stable log_softmax.
std::vector<double> reference_backward(const Matrix& logits, const std::vector<int64_t>& targets,
                                       const std::vector<float>& grad_logprobs) {
  std::vector<double> want;
  for (int64_t r = 0; r < logits.rows; ++r) {
    const std::vector<double> logp = stable_log_softmax(row_values(logits, r));
    const double g = grad_logprobs[static_cast<size_t>(r)];
    for (int64_t v = 0; v < logits.cols; ++v) {
      want.push_back(g * ((v == targets[static_cast<size_t>(r)] ? 1.0 : 0.0) -
                          std::exp(logp[static_cast<size_t>(v)])));
    }
  }
  return want;
}

std::vector<double> run_backward(const Matrix& logits, const std::vector<int64_t>& targets,
                                 const std::vector<float>& lse,
                                 const std::vector<float>& grad_logprobs) {
  Matrix grad = logits;  // overwritten
  latro::TokenLogprobsBackwardArgs args;
  args.logits = logits.data();
  args.dtype = logits.dtype;
  args.rows = logits.rows;
  args.vocab = logits.cols;
  args.targets = targets.data();
  args.lse = lse.data();
  args.grad_logprobs = grad_logprobs.data();
  args.grad_logits = grad.data();
  latro::token_logprobs_backward(args);
  std::vector<double> got;
  for (int64_t r = 0; r < logits.rows; ++r) {
    for (int64_t v = 0; v < logits.cols; ++v) got.push_back(grad.get(r, v));
  }
  return got;
}

TEST_P(TokenLogprobsNonFinite, TiesNearTheFloatMaximum) {
  // Near the float32 maximum max + log(sum) rounds back to max, even in float64 (an ulp of 3e38
  // is 4e22): x - lse gave two tied logits log-probability 0 instead of -log 2, and
  // exp(x - lse) in the backward gave each of them probability 1. float16 tops out at 65504,
  // where float64 still holds the lse exactly; it runs the same rows at its own maximum.
  const bool half = GetParam() == DType::Float16;
  const float big = half ? 65504.0f : 3.38e38f;  // below the bfloat16 maximum, 3.3895e38
  const float near = half ? 60000.0f : 3.0e38f;
  const std::vector<std::vector<float>> values = {
      {big, big, -2.0f, 0.0f},             // -log 2
      {near, near, near, -near},           // -log 3
      {-big, -big, -big, -big},            // -log 4
      {-near, -near, -near, -big},         // -log 3
      {big, near, 0.0f, -big},             // target `near`: near - big, every other term 0
  };
  const std::vector<int64_t> targets = {0, 2, 1, 0, 1};
  const int64_t rows = static_cast<int64_t>(values.size());
  const Matrix logits = matrix_of_rows(GetParam(), values);
  std::vector<float> out(static_cast<size_t>(rows), 9.0f), lse(out.size(), 9.0f);
  latro::token_logprobs(forward_args(logits, targets, out, &lse));

  const std::vector<double> want = {-std::log(2.0), -std::log(3.0), -std::log(4.0),
                                    -std::log(3.0), logits.get(4, 1) - logits.get(4, 0)};
  for (int64_t r = 0; r < rows; ++r) {
    SCOPED_TRACE("row " + std::to_string(r));
    const std::vector<double> logp = stable_log_softmax(row_values(logits, r));
    EXPECT_TRUE(close(logp[static_cast<size_t>(targets[static_cast<size_t>(r)])],
                      want[static_cast<size_t>(r)], {1e-12, 1e-12}));  // the reference itself
    EXPECT_TRUE(close(out[static_cast<size_t>(r)], want[static_cast<size_t>(r)],
                      float32_result_tolerance()));
    // lse keeps its meaning: the row's log-sum-exp, rounded once to float32.
    EXPECT_TRUE(close(lse[static_cast<size_t>(r)], logsumexp(row_values(logits, r)),
                      {0.0, 1e-7}));
  }

  const std::vector<float> grad_logprobs = {1.0f, -0.5f, 2.0f, 1.5f, 1.0f};
  const std::vector<double> got = run_backward(logits, targets, lse, grad_logprobs);
  EXPECT_TRUE(all_close(got, reference_backward(logits, targets, grad_logprobs),
                        stored_tolerance(GetParam())));
  EXPECT_TRUE(close(got[0], 0.5, stored_tolerance(GetParam())));  // 1 - 1/2, not 1 - 1
}

TEST_P(TokenLogprobsNonFinite, ShiftedLogitsBackwardKeepFullPrecision) {
  // The backward's softmax for rows with a large |lse| (here ~1000 and ~-1e6, past
  // kRecomputeLseFrom) must be that of the row itself to the usual tolerance: exp(x - lse)
  // through a float32 lse of 1000 would be off by up to ulp(1000) / 2 = 3e-5 of each
  // probability, and by 0.03 at 1e6 (-30000 for float16, whose maximum is 65504).
  const double far = GetParam() == DType::Float16 ? -30000.0 : -1.0e6;
  for (const double shift : {1000.0, far}) {
    SCOPED_TRACE("shift " + std::to_string(shift));
    std::mt19937 rng(23);
    const int64_t rows = 8, vocab = 1025;
    Matrix logits = random_matrix(GetParam(), rows, vocab, vocab, rng);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t v = 0; v < vocab; ++v) {
        logits.set(r, v, static_cast<float>(logits.get(r, v) + shift));
      }
    }
    std::vector<int64_t> targets(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) targets[static_cast<size_t>(r)] = (r * 67) % vocab;
    std::vector<float> out(static_cast<size_t>(rows)), lse(out.size());
    latro::token_logprobs(forward_args(logits, targets, out, &lse));
    std::vector<float> grad_logprobs(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) grad_logprobs[static_cast<size_t>(r)] = 2.0f - 0.5f * r;
    EXPECT_TRUE(all_close(run_backward(logits, targets, lse, grad_logprobs),
                          reference_backward(logits, targets, grad_logprobs),
                          stored_tolerance(GetParam())));
  }
}

INSTANTIATE_TEST_SUITE_P(DTypes, TokenLogprobsNonFinite,
                         ::testing::Values(DType::Float32, DType::BFloat16, DType::Float16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return dtype_str(info.param);
                         });

// ---------------------------------------------------------------- argument errors
class TokenLogprobsErrors : public ::testing::Test {
 protected:
  std::mt19937 rng{7};
  Matrix logits = random_matrix(DType::Float32, 3, 10, 10, rng);
  std::vector<int64_t> targets = {1, 2, 3};
  std::vector<float> out = std::vector<float>(3);
  latro::TokenLogprobsArgs args() { return forward_args(logits, targets, out, nullptr); }
};

TEST_F(TokenLogprobsErrors, TargetOutOfRange) {
  for (const int64_t bad : {int64_t{10}, int64_t{-1}, int64_t{1} << 40}) {
    targets[1] = bad;
    EXPECT_LATRO_ERROR(latro::token_logprobs(args()), "targets");
  }
  targets[1] = 10;
  std::vector<float> g(3 * 10);
  std::vector<float> lse(3), grad_logprobs(3, 1.0f);
  latro::TokenLogprobsBackwardArgs b;
  b.logits = logits.data();
  b.rows = 3;
  b.vocab = 10;
  b.targets = targets.data();
  b.lse = lse.data();
  b.grad_logprobs = grad_logprobs.data();
  b.grad_logits = g.data();
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(b), "targets");
}

TEST_F(TokenLogprobsErrors, NullPointers) {
  auto a = args();
  a.logits = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "logits");
  a = args();
  a.targets = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "targets");
  a = args();
  a.logprobs = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "logprobs");
  EXPECT_THROW(latro::token_logprobs(static_cast<const float*>(nullptr), 3, 10, targets.data(),
                                     out.data()),
               latro::Error);
}

TEST_F(TokenLogprobsErrors, BadSizes) {
  auto a = args();
  a.rows = -1;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "rows");
  a = args();
  a.vocab = 0;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "vocab");
  a = args();
  a.vocab = -3;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "vocab");
  a = args();
  a.row_stride = 9;  // < vocab
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "row_stride");
  a = args();
  a.row_stride = 0;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "row_stride");
  a = args();
  a.row_stride = -2;
  EXPECT_LATRO_ERROR(latro::token_logprobs(a), "row_stride");
}

TEST_F(TokenLogprobsErrors, BadRowRange) {
  EXPECT_THROW(latro::token_logprobs(args(), 2, 1), latro::Error);
  EXPECT_THROW(latro::token_logprobs(args(), 0, 4), latro::Error);
  EXPECT_THROW(latro::token_logprobs(args(), -1, 2), latro::Error);
}

TEST_F(TokenLogprobsErrors, ZeroRowsIsANoOp) {
  auto a = args();
  a.rows = 0;
  EXPECT_NO_THROW(latro::token_logprobs(a));
}

TEST_F(TokenLogprobsErrors, BackwardBadArguments) {
  std::vector<float> g(3 * 10), lse(3), grad_logprobs(3, 1.0f);
  latro::TokenLogprobsBackwardArgs b;
  b.logits = logits.data();
  b.rows = 3;
  b.vocab = 10;
  b.targets = targets.data();
  b.lse = lse.data();
  b.grad_logprobs = grad_logprobs.data();
  b.grad_logits = g.data();
  EXPECT_NO_THROW(latro::token_logprobs_backward(b));
  auto c = b;
  c.lse = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(c), "lse");
  c = b;
  c.grad_logprobs = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(c), "grad_logprobs");
  c = b;
  c.grad_logits = nullptr;
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(c), "grad_logits");
  c = b;
  c.grad_row_stride = 5;
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(c), "grad_row_stride");
  c = b;
  c.rows = -2;
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(c), "rows");
}

}  // namespace

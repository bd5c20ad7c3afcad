// latro::rms_norm on the CPU against a float64 reference: with and without the residual sum,
// odd sizes, every dtype, row ranges, bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "latro/latro.h"
#include "rms_norm_reference.h"
#include "test_util.h"

namespace {

using namespace latro_test;

class RmsNorm : public ::testing::TestWithParam<NormShape> {};

TEST_P(RmsNorm, MatchesTheFloat64Reference) {
  std::mt19937 rng(41);
  const NormCase c(GetParam(), rng);
  Matrix out = c.blank(), sum = c.blank();
  latro::rms_norm(c.args(out, sum));
  EXPECT_TRUE(all_close(matrix_values(out), c.reference(), stored_tolerance(c.shape.dtype)));
  if (c.shape.residual) {
    EXPECT_TRUE(sum.storage == c.expected_sum().storage);
  }
}

TEST_P(RmsNorm, RowRangesGiveTheSameResults) {
  std::mt19937 rng(42);
  const NormCase c(GetParam(), rng);
  Matrix out = c.blank(), sum = c.blank(), split = c.blank(), split_sum = c.blank();
  latro::rms_norm(c.args(out, sum));
  const latro::RmsNormArgs args = c.args(split, split_sum);
  for (int64_t r = 0; r < c.shape.rows; ++r) latro::rms_norm(args, r, r + 1);
  EXPECT_TRUE(split.storage == out.storage && split_sum.storage == sum.storage);
}

TEST_P(RmsNorm, InPlaceFormsGiveTheSameResults) {
  std::mt19937 rng(44);
  expect_in_place_forms_match(NormCase(GetParam(), rng),
                              [](const latro::RmsNormArgs& a) { latro::rms_norm(a); });
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsNorm, ::testing::ValuesIn(norm_shapes()), norm_name);

TEST(RmsNormErrors, NameTheArgument) {
  std::mt19937 rng(43);
  const NormCase c({latro::DType::Float32, 3, 10, true}, rng);
  Matrix out = c.blank(), sum = c.blank();
  const latro::RmsNormArgs good = c.args(out, sum);
  auto with = [&](auto change) {
    latro::RmsNormArgs a = good;
    change(a);
    return a;
  };
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.dim = 0; })), "dim must be > 0");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.rows = -1; })), "rows");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.eps = -1.0f; })), "eps");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.eps = NAN; })), "eps");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.weight = nullptr; })), "weight");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.sum = nullptr; })), "sum (output)");
  EXPECT_LATRO_ERROR(latro::rms_norm(with([](auto& a) { a.x = nullptr; })), "x is a null");
  EXPECT_LATRO_ERROR(latro::rms_norm(good, 2, 5), "row range");
}

}  // namespace

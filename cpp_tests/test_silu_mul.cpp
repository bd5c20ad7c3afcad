// latro::silu_mul on the CPU against a float64 reference, element ranges and bad arguments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace {

using namespace latro_test;

// silu(g) rounded to the dtype, times u, in float64 (the op rounds the product too).
std::vector<double> reference(const Matrix& gate, const Matrix& up) {
  std::vector<double> out;
  for (int64_t c = 0; c < gate.cols; ++c) {
    const double g = gate.get(0, c);
    Matrix activated = matrix_of_rows(gate.dtype, {{static_cast<float>(g / (1.0 + std::exp(-g)))}});
    out.push_back(activated.get(0, 0) * up.get(0, c));
  }
  return out;
}

class SiluMul : public ::testing::TestWithParam<DType> {};

TEST_P(SiluMul, MatchesTheFloat64ReferenceAndRangesAgree) {
  std::mt19937 rng(53);
  for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
    const Matrix gate = random_matrix(GetParam(), 1, n, n, rng, 4.0);
    const Matrix up = random_matrix(GetParam(), 1, n, n, rng, 2.0);
    Matrix out = nan_matrix(GetParam(), 1, n), split = nan_matrix(GetParam(), 1, n);
    latro::SiluMulArgs args{GetParam(), n, gate.data(), up.data(), out.data()};
    latro::silu_mul(args);
    // One rounding of the product after one of the activation: twice the stored tolerance.
    Tolerance tol = stored_tolerance(GetParam());
    tol.rtol *= 2;
    EXPECT_TRUE(all_close(matrix_values(out), reference(gate, up), tol)) << "n " << n;
    args.out = split.data();
    for (int64_t i = 0; i < n; i += 10) latro::silu_mul(args, i, std::min(n, i + 10));
    EXPECT_TRUE(split.storage == out.storage);
  }
}

INSTANTIATE_TEST_SUITE_P(DTypes, SiluMul, ::testing::ValuesIn(all_dtypes()),
                         [](const auto& info) { return dtype_str(info.param); });

TEST(SiluMulErrors, NameTheArgument) {
  float x = 1.0f;
  EXPECT_LATRO_ERROR(latro::silu_mul({DType::Float32, -1, &x, &x, &x}), "count");
  EXPECT_LATRO_ERROR(latro::silu_mul({DType::Float32, 1, nullptr, &x, &x}), "gate");
  EXPECT_LATRO_ERROR(latro::silu_mul({DType::Float32, 1, &x, nullptr, &x}), "up");
  EXPECT_LATRO_ERROR(latro::silu_mul({DType::Float32, 1, &x, &x, nullptr}), "out");
  EXPECT_LATRO_ERROR(latro::silu_mul({DType::Float32, 1, &x, &x, &x}, 0, 2), "element range");
}

}  // namespace

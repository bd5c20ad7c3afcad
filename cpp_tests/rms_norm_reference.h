// Random RMSNorm problems and their float64 reference, shared by the CPU suite
// (test_rms_norm.cpp) and the emulated CUDA kernels (test_cuda_emulated.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace latro_test {

struct NormShape {
  DType dtype;
  int64_t rows, dim;
  bool residual;  // normalize x + residual (and write the sum)
};

inline std::string norm_name(const ::testing::TestParamInfo<NormShape>& info) {
  const NormShape& s = info.param;
  return dtype_str(s.dtype) + "_rows" + std::to_string(s.rows) + "_dim" + std::to_string(s.dim) +
         (s.residual ? "_residual" : "");
}

// Odd sizes, one element, and the 1.5B model's hidden size.
inline std::vector<NormShape> norm_shapes() {
  std::vector<NormShape> shapes;
  for (DType dtype : all_dtypes()) {
    for (bool residual : {false, true}) {
      shapes.push_back({dtype, 3, 1, residual});
      shapes.push_back({dtype, 5, 37, residual});
      shapes.push_back({dtype, 2, 257, residual});
      shapes.push_back({dtype, 7, 2048, residual});
    }
  }
  return shapes;
}

struct NormCase {
  NormShape shape;
  Matrix x, residual, weight;
  float eps = 1e-5f;

  NormCase(const NormShape& s, std::mt19937& rng) : shape(s) {
    x = random_matrix(s.dtype, s.rows, s.dim, s.dim, rng, 2.0);
    residual = random_matrix(s.dtype, s.rows, s.dim, s.dim, rng, 2.0);
    weight = random_matrix(s.dtype, 1, s.dim, s.dim, rng, 1.0);
  }

  Matrix blank() const { return nan_matrix(shape.dtype, shape.rows, shape.dim); }

  latro::RmsNormArgs args(Matrix& out, Matrix& sum) const {
    latro::RmsNormArgs a;
    a.dtype = shape.dtype;
    a.rows = shape.rows;
    a.dim = shape.dim;
    a.x = x.data();
    a.residual = shape.residual ? residual.data() : nullptr;
    a.sum = shape.residual ? sum.data() : nullptr;
    a.weight = weight.data();
    a.eps = eps;
    a.out = out.data();
    return a;
  }

  // x + residual rounded to the dtype (float32 addition of the exact stored values).
  Matrix expected_sum() const {
    Matrix m = x;
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t c = 0; c < shape.dim; ++c) {
        m.set(r, c, static_cast<float>(x.get(r, c)) + static_cast<float>(residual.get(r, c)));
      }
    }
    return m;
  }

  // weight * s / sqrt(mean(s^2) + eps) in float64 (s: the stored sum, or x).
  std::vector<double> reference() const {
    const Matrix s = shape.residual ? expected_sum() : x;
    std::vector<double> out;
    for (int64_t r = 0; r < shape.rows; ++r) {
      double squares = 0.0;
      for (int64_t c = 0; c < shape.dim; ++c) squares += s.get(r, c) * s.get(r, c);
      const double inverse = 1.0 / std::sqrt(squares / shape.dim + eps);
      for (int64_t c = 0; c < shape.dim; ++c) out.push_back(weight.get(0, c) * s.get(r, c) * inverse);
    }
    return out;
  }
};

// The in-place forms an embedder may use (latro.h): the sum written over the residual or over
// x (the residual stream updated where it lies), and without a residual out written over x.
// Each must give the out-of-place result; `run` normalizes with the arguments it is given.
template <typename Run>
void expect_in_place_forms_match(const NormCase& c, Run&& run) {
  Matrix out = c.blank(), sum = c.blank();
  run(c.args(out, sum));
  if (!c.shape.residual) {
    Matrix stream = c.x;
    latro::RmsNormArgs a = c.args(stream, stream);
    a.x = stream.data();
    run(a);
    EXPECT_TRUE(stream.storage == out.storage) << "out over x";
    return;
  }
  for (bool over_residual : {true, false}) {
    Matrix stream = over_residual ? c.residual : c.x, in_place_out = c.blank();
    latro::RmsNormArgs a = c.args(in_place_out, stream);
    (over_residual ? a.residual : a.x) = stream.data();
    a.sum = stream.data();
    run(a);
    const char* form = over_residual ? "sum over the residual" : "sum over x";
    EXPECT_TRUE(in_place_out.storage == out.storage) << form;
    EXPECT_TRUE(stream.storage == sum.storage) << form;
  }
}

}  // namespace latro_test

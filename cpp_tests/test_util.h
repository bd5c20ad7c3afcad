// Shared helpers of the core's C++ tests: dtype storage, random logits, float64 references and
// the one tolerance table every comparison goes through.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "latro/latro.h"

namespace latro_test {

using latro::DType;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------- tolerances
// What a value is compared with: a float32 result of a float32 computation, or a value stored
// in `dtype` (its rounding dominates). |got - want| <= atol + rtol * |want|.
struct Tolerance {
  double atol;
  double rtol;
};

// Results computed in float32 (log-probabilities, log-sum-exp, rewards): the inputs are exact in
// every dtype (they are read back from storage before the reference sees them), so only float32
// arithmetic separates the kernel from the float64 reference, whatever the storage dtype.
inline Tolerance float32_result_tolerance() { return {2e-5, 2e-5}; }

// Results stored in `dtype` (gradients): the float32 error plus one rounding of the storage type.
inline Tolerance stored_tolerance(DType dtype) {
  switch (dtype) {
    // atol: float32 error of exp(x - lse) near p = 1, where 1 - p cancels (|upstream| <= 2).
    case DType::Float32: return {1e-5, 1e-5};
    case DType::BFloat16: return {1e-5, 1.0 / 128};  // 8 significant bits: 2^-9 relative, x4
    case DType::Float16: return {1e-5, 1.0 / 1024};  // 11 significant bits: 2^-12 relative, x4
  }
  return {0, 0};
}

// Compares one value; infinities must match exactly, NaN must match NaN.
inline ::testing::AssertionResult close(double got, double want, Tolerance tol) {
  if (std::isnan(want)) {
    if (std::isnan(got)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "got " << got << ", want NaN";
  }
  if (std::isinf(want) || std::isinf(got) || std::isnan(got)) {
    if (got == want) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "got " << got << ", want " << want;
  }
  const double err = std::fabs(got - want);
  const double bound = tol.atol + tol.rtol * std::fabs(want);
  if (err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want << " (|err| " << err
                                       << " > " << bound << ")";
}

// Element-wise over two vectors; reports the first few mismatches with their index.
inline ::testing::AssertionResult all_close(const std::vector<double>& got,
                                            const std::vector<double>& want, Tolerance tol) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  int failures = 0;
  auto result = ::testing::AssertionFailure();
  for (size_t i = 0; i < got.size(); ++i) {
    auto one = close(got[i], want[i], tol);
    if (!one) {
      if (failures < 5) result << "[" << i << "] " << one.message() << "; ";
      ++failures;
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return result << failures << " of " << got.size() << " elements differ";
}

// ---------------------------------------------------------------- dtype storage
// Logits kept as raw storage of `dtype` (what the core reads) next to their exact values.
struct Matrix {
  DType dtype = DType::Float32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride = 0;
  std::vector<unsigned char> storage;  // rows * stride elements of dtype

  size_t element_size() const { return dtype == DType::Float32 ? 4 : 2; }
  const void* data() const { return storage.data(); }
  void* data() { return storage.data(); }

  void set(int64_t r, int64_t c, float value) {
    unsigned char* at = storage.data() + (r * stride + c) * element_size();
    switch (dtype) {
      case DType::Float32: std::memcpy(at, &value, 4); break;
      case DType::BFloat16: {
        const latro::bfloat16 v = latro::to_bfloat16(value);
        std::memcpy(at, &v, 2);
        break;
      }
      case DType::Float16: {
        const latro::float16 v = latro::to_float16(value);
        std::memcpy(at, &v, 2);
        break;
      }
    }
  }
  // The exact value the core sees.
  double get(int64_t r, int64_t c) const {
    const unsigned char* at = storage.data() + (r * stride + c) * element_size();
    switch (dtype) {
      case DType::Float32: {
        float v;
        std::memcpy(&v, at, 4);
        return v;
      }
      case DType::BFloat16: {
        latro::bfloat16 v;
        std::memcpy(&v, at, 2);
        return latro::to_float(v);
      }
      case DType::Float16: {
        latro::float16 v;
        std::memcpy(&v, at, 2);
        return latro::to_float(v);
      }
    }
    return kNaN;
  }
};

// rows x cols of N(0, scale^2), rounded to dtype; the padding of each row (stride > cols) is
// filled with NaN so a kernel that reads past `cols` poisons its result.
inline Matrix random_matrix(DType dtype, int64_t rows, int64_t cols, int64_t stride,
                            std::mt19937& rng, double scale = 3.0) {
  Matrix m;
  m.dtype = dtype;
  m.rows = rows;
  m.cols = cols;
  m.stride = stride;
  m.storage.assign(static_cast<size_t>(rows * stride) * m.element_size(), 0);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < stride; ++c) {
      m.set(r, c, c < cols ? normal(rng) : std::numeric_limits<float>::quiet_NaN());
    }
  }
  return m;
}

// rows x cols of N(0, scale^2) as editable float rows (for matrix_of_rows, after a test plants
// its special values).
inline std::vector<std::vector<float>> normal_rows(int64_t rows, int64_t cols, std::mt19937& rng,
                                                   float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<std::vector<float>> values(static_cast<size_t>(rows),
                                         std::vector<float>(static_cast<size_t>(cols)));
  for (auto& row : values) {
    for (float& x : row) x = normal(rng);
  }
  return values;
}

// Dense rows of the given values, rounded to dtype (`values` must be rectangular).
inline Matrix matrix_of_rows(DType dtype, const std::vector<std::vector<float>>& values) {
  Matrix m;
  m.dtype = dtype;
  m.rows = static_cast<int64_t>(values.size());
  m.cols = m.stride = m.rows ? static_cast<int64_t>(values[0].size()) : 0;
  m.storage.assign(static_cast<size_t>(m.rows * m.stride) * m.element_size(), 0);
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t c = 0; c < m.cols; ++c) m.set(r, c, values[r][c]);
  }
  return m;
}

// rows x cols of NaN: an output buffer in which an element the op forgets to write fails the
// comparison.
inline Matrix nan_matrix(DType dtype, int64_t rows, int64_t cols) {
  Matrix m = matrix_of_rows(dtype, {});
  m.rows = rows;
  m.cols = m.stride = cols;
  m.storage.assign(static_cast<size_t>(rows * cols) * m.element_size(), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) m.set(r, c, std::numeric_limits<float>::quiet_NaN());
  }
  return m;
}

// The exact values of a matrix's elements, row after row (its padding left out).
inline std::vector<double> matrix_values(const Matrix& m) {
  std::vector<double> values;
  values.reserve(static_cast<size_t>(m.rows * m.cols));
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t c = 0; c < m.cols; ++c) values.push_back(m.get(r, c));
  }
  return values;
}

// `rows` copies of one row.
inline Matrix repeated_row(DType dtype, const std::vector<float>& row, int64_t rows) {
  return matrix_of_rows(dtype, std::vector<std::vector<float>>(static_cast<size_t>(rows), row));
}

inline std::string dtype_str(DType dtype) { return latro::dtype_name(dtype); }

inline const std::vector<DType>& all_dtypes() {
  static const std::vector<DType> dtypes = {DType::Float32, DType::BFloat16, DType::Float16};
  return dtypes;
}

// ---------------------------------------------------------------- float64 references
// log-sum-exp of values (NaN if any is NaN, -inf for all -inf... then callers see NaN in
// logit - lse, as torch.log_softmax does; +inf anywhere gives NaN like torch).
inline double logsumexp(const std::vector<double>& values) {
  double max = -kInf;
  for (double v : values) {
    if (std::isnan(v)) return kNaN;
    if (v > max) max = v;
  }
  if (std::isinf(max)) return max > 0 ? kNaN : -kInf;
  double sum = 0.0;
  for (double v : values) sum += std::exp(v - max);
  return max + std::log(sum);
}

inline std::vector<double> row_values(const Matrix& m, int64_t r) {
  std::vector<double> values(static_cast<size_t>(m.cols));
  for (int64_t c = 0; c < m.cols; ++c) values[static_cast<size_t>(c)] = m.get(r, c);
  return values;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& values) {
  return std::vector<double>(values.begin(), values.end());
}

// Checks that `statement` throws latro::Error whose what() contains `needle`.
#define EXPECT_LATRO_ERROR(statement, needle)                                              \
  do {                                                                                     \
    bool latro_thrown_ = false;                                                            \
    try {                                                                                  \
      statement;                                                                           \
    } catch (const ::latro::Error& latro_error_) {                                         \
      latro_thrown_ = true;                                                                \
      EXPECT_NE(std::string(latro_error_.what()).find(needle), std::string::npos)          \
          << "message \"" << latro_error_.what() << "\" does not mention \"" << (needle)   \
          << "\"";                                                                         \
    } catch (const std::exception& other_) {                                               \
      ADD_FAILURE() << "threw a non-latro exception: " << other_.what();                   \
      latro_thrown_ = true;                                                                \
    }                                                                                      \
    EXPECT_TRUE(latro_thrown_) << #statement " did not throw latro::Error";                \
  } while (0)

// ---------------------------------------------------------------- parametrized shapes
// dtype x rows x vocab, the parameter of every size-parametrized suite, and its test-name part
// (float32_rows7_vocab97).
using Shape = std::tuple<DType, int64_t, int64_t>;

class ShapeTest : public ::testing::TestWithParam<Shape> {
 protected:
  DType dtype() const { return std::get<0>(GetParam()); }
  int64_t rows() const { return std::get<1>(GetParam()); }
  int64_t vocab() const { return std::get<2>(GetParam()); }
};

inline std::string shape_name(const ::testing::TestParamInfo<Shape>& info) {
  return dtype_str(std::get<0>(info.param)) + "_rows" + std::to_string(std::get<1>(info.param)) +
         "_vocab" + std::to_string(std::get<2>(info.param));
}

// ---------------------------------------------------------------- token log-probabilities
constexpr int64_t kIgnore = -100;

// Targets in [0, vocab); with_ignored: every third row (1, 4, ...) is ignore_index.
inline std::vector<int64_t> random_targets(int64_t rows, int64_t vocab, std::mt19937& rng,
                                           int64_t ignore_index, bool with_ignored) {
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  std::vector<int64_t> targets(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    targets[static_cast<size_t>(r)] = (with_ignored && r % 3 == 1) ? ignore_index : pick(rng);
  }
  return targets;
}

inline latro::TokenLogprobsArgs forward_args(const Matrix& logits,
                                             const std::vector<int64_t>& targets,
                                             std::vector<float>& logprobs, std::vector<float>* lse,
                                             int64_t ignore_index = kIgnore) {
  latro::TokenLogprobsArgs args;
  args.logits = logits.data();
  args.dtype = logits.dtype;
  args.rows = logits.rows;
  args.vocab = logits.cols;
  args.row_stride = logits.stride;
  args.targets = targets.data();
  args.ignore_index = ignore_index;
  args.logprobs = logprobs.data();
  args.lse = lse ? lse->data() : nullptr;
  return args;
}

}  // namespace latro_test

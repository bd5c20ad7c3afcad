// Internal helpers of the CPU core: argument checks shared by the kernels, the row-range
// convention and a vectorizable exp. Not installed.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "latro/error.h"
#include "latro/types.h"
#include "launch_checks.h"

namespace latro::detail {

// Resolves [row_begin, row_end) against `rows` (row_end = -1: all rows) and checks it.
inline void resolve_row_range(int64_t rows, int64_t& row_begin, int64_t& row_end) {
  if (row_end == -1) row_end = rows;
  LATRO_CHECK(row_begin >= 0 && row_begin <= row_end && row_end <= rows,
              "row range [", row_begin, ", ", row_end, ") is not inside [0, ", rows, ")");
}

// exp(x) for x <= 0 in float32 (std::exp neither vectorizes nor is branch-free).
// Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, 2^n from the exponent bits.
// Relative error about 2 ulp; exp(-inf) = 0; NaN stays NaN.
namespace exp_constants {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kMin = -87.0f;  // below this the result would be subnormal: flushed to 0
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_constants

inline float exp_nonpositive(float x) {
  using namespace exp_constants;
  const float clamped = x < kMin ? kMin : x;
  // Round to nearest for t <= 0: truncation toward zero of t - 0.5.
  const int n = static_cast<int>(clamped * kLog2e - 0.5f);
  const float nf = static_cast<float>(n);
  const float r = (clamped - nf * kLn2Hi) - nf * kLn2Lo;
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * r * r + r + 1.0f;
  const float result = p * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  const float flushed = x < kMin ? 0.0f : result;
  return x != x ? x : flushed;
}

// max(value, best) where a NaN wins (once best is NaN no comparison replaces it).
inline float max_keep_nan(float value, float best) {
  return (value > best || value != value) ? value : best;
}

#if defined(__GNUC__)
// The same on 8 floats at once with GCC/Clang vector extensions: explicit SIMD without
// intrinsics, lowered to AVX2 or SSE2 by whichever clone runs (see LATRO_CPU_CLONES).
#define LATRO_HAVE_VECTOR_EXT 1
// Always inlined, so each clone of a caller gets them compiled for its own instruction set.
#define LATRO_INLINE inline __attribute__((always_inline))
constexpr int kVecWidth = 8;
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));

LATRO_INLINE vfloat vbroadcast(float value) { return vfloat{} + value; }
LATRO_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
LATRO_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
// Loads n < kVecWidth floats, the missing lanes set to `fill`.
LATRO_INLINE vfloat vload_partial(const float* p, int64_t n, float fill) {
  float lanes[kVecWidth];
  for (int i = 0; i < kVecWidth; ++i) lanes[i] = i < n ? p[i] : fill;
  return vload(lanes);
}
LATRO_INLINE vfloat vselect(vint mask, vfloat if_true, vfloat if_false) {
  return reinterpret_cast<vfloat>((reinterpret_cast<vint>(if_true) & mask) |
                                  (reinterpret_cast<vint>(if_false) & ~mask));
}
// max that lets a NaN win (once a lane holds NaN no comparison replaces it).
LATRO_INLINE vfloat vmax_keep_nan(vfloat value, vfloat best) {
  return vselect((value > best) | (value != value), value, best);
}
// Folds a vector's lanes into `best` with max_keep_nan.
LATRO_INLINE float hmax_keep_nan(vfloat value, float best) {
  for (int i = 0; i < kVecWidth; ++i) best = max_keep_nan(value[i], best);
  return best;
}

// The core of vexp_nonpositive for finite or -inf inputs: inputs below -87 give exp(-87) ~
// 1.6e-38 instead of 0, harmless in a sum that is >= 1 and two blends cheaper.
LATRO_INLINE vfloat vexp_nonpositive_unflushed(vfloat x) {
  using namespace exp_constants;
  const vfloat clamped = vselect(x < kMin, vbroadcast(kMin), x);
  const vint n = __builtin_convertvector(clamped * kLog2e - 0.5f, vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (clamped - nf * kLn2Hi) - nf * kLn2Lo;
  vfloat p = vbroadcast(kP[0]);
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * r * r + r + 1.0f;
  return p * reinterpret_cast<vfloat>((n + 127) << 23);
}

LATRO_INLINE vfloat vexp_nonpositive(vfloat x) {
  using namespace exp_constants;
  const vint too_small = x < kMin;
  const vfloat clamped = vselect(too_small, vbroadcast(kMin), x);
  const vint n = __builtin_convertvector(clamped * kLog2e - 0.5f, vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (clamped - nf * kLn2Hi) - nf * kLn2Lo;
  vfloat p = vbroadcast(kP[0]);
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * r * r + r + 1.0f;
  const vfloat result = p * reinterpret_cast<vfloat>((n + 127) << 23);
  const vfloat flushed = vselect(too_small, vbroadcast(0.0f), result);
  return vselect(x != x, x, flushed);
}
#endif

// Copies `count` elements of a row into float32 (a no-op view for float rows).
template <typename T>
inline const float* row_as_float(const T* row, int64_t count, float* buffer) {
  for (int64_t i = 0; i < count; ++i) buffer[i] = to_float(row[i]);
  return buffer;
}
template <>
inline const float* row_as_float<float>(const float* row, int64_t, float*) {
  return row;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace latro::detail

// Hot loops are compiled twice, for x86-64-v3 (AVX2, FMA, F16C) and the baseline, and the
// loader picks one at run time, so a portable build still uses the wide units. A build whose
// baseline has AVX2 already (-march=native, x86-64-v3 and later) needs no second copy, and
// GCC 12 stops with an internal compiler error on these clones under -march=native or
// x86-64-v4 (scripts/test.sh compiles the core that way to keep it building).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__AVX2__) && !defined(LATRO_NO_CPU_CLONES)
#define LATRO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LATRO_CPU_CLONES
#endif

// The element formulas of the decode-step ops (decode_attention's rotary embedding, rms_norm,
// silu_mul), shared by their CPU and CUDA implementations so that both round alike: the
// models' own roundings, float32 arithmetic, results rounded to the storage type T where the
// models store a tensor. Not installed.
#pragma once

#include <cmath>
#include <cstdint>

#include "latro/types.h"

namespace latro::detail {

// x rounded to T, as a T tensor would store it (exact: T's values are floats).
template <typename T>
LATRO_HOST_DEVICE float rounded_to(float x) {
  return to_float(from_float<T>(x));
}

// Element i of the rotary embedding of the head `raw` (head_dim floats): x * cos + rotate_half(x)
// * sin, where rotate_half(x)[i] is -x[i + D/2] in the first half and x[i - D/2] in the second.
// Each product and the sum are rounded to float32, then by `round` (the identity, or a rounding
// to the model's bf16 / fp16: DecodeAttentionArgs::rotary_dtype), as torch's element-wise ops
// round them: no fused multiply-add, which would change the last bit against the models' own
// forward.
template <typename Round>
LATRO_HOST_DEVICE float rotary_element(const float* raw, int64_t i, int64_t head_dim, float cos,
                                       float sin, Round round) {
  const int64_t half = head_dim / 2;
  const bool first = i < half;
  const float rotated = first ? -raw[i + half] : raw[i - half];
#if defined(__CUDA_ARCH__)
  return round(__fadd_rn(round(__fmul_rn(raw[i], cos)), round(__fmul_rn(rotated, sin))));
#else
  // GCC contracts a * b + c into an FMA by default where the target has one; volatile stops it.
  const volatile float direct = round(raw[i] * cos);
  const volatile float turned = round(rotated * sin);
  return round(direct + turned);
#endif
}

// RMSNorm with the residual addition: x + residual rounded to T, as the models' sum.
template <typename T>
LATRO_HOST_DEVICE float rms_residual_sum(float x, float residual) {
  return rounded_to<T>(x + residual);
}

// RMSNorm: the value normalized at element i, x (+ residual, rounded to T as the models' sum).
template <typename T>
LATRO_HOST_DEVICE float rms_input(const T* x, const T* residual, int64_t i) {
  const float v = to_float(x[i]);
  return residual ? rms_residual_sum<T>(v, to_float(residual[i])) : v;
}

// RMSNorm: 1 / sqrt(mean + eps) from the float64 sum of squares; IEEE sqrt and division (also
// nvcc's defaults), not an approximate rsqrt, so every backend gets the same float.
LATRO_HOST_DEVICE float rms_inverse(double squares, int64_t dim, float eps) {
  return 1.0f / sqrtf(static_cast<float>(squares / static_cast<double>(dim)) + eps);
}

// RMSNorm: weight * (s * inverse rounded to T), rounded to T.
template <typename T>
LATRO_HOST_DEVICE T rms_output(T weight, float s, float inverse) {
  return from_float<T>(to_float(weight) * rounded_to<T>(s * inverse));
}

// silu(g) * u: silu in float32 (g / (1 + exp(-g)), torch's formula), rounded to T as the
// activation's output tensor, then the product rounded to T.
template <typename T>
LATRO_HOST_DEVICE T silu_times(float g, float u) {
  return from_float<T>(rounded_to<T>(g / (1.0f + expf(-g))) * u);
}

}  // namespace latro::detail

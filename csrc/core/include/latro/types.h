// Plain 16-bit float storage types and the dtype tag used at the core boundary.
// The core never depends on a framework's half types: bindings reinterpret their tensors'
// storage (at::BFloat16, __nv_bfloat16, ...) as these bit-compatible structs.
#pragma once

#include <cstdint>
#include <cstring>

#include "latro/error.h"

#if defined(__CUDACC__)
#define LATRO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LATRO_HOST_DEVICE inline
#endif

namespace latro {

struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};
static_assert(sizeof(bfloat16) == 2 && sizeof(float16) == 2, "16-bit storage types");

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "unknown";
}

LATRO_HOST_DEVICE float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

LATRO_HOST_DEVICE uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

LATRO_HOST_DEVICE float to_float(float value) { return value; }

LATRO_HOST_DEVICE float to_float(bfloat16 value) {
  return bits_to_float(static_cast<uint32_t>(value.bits) << 16);
}

// IEEE half -> float without branches or hardware support (exact for every input, including
// subnormals, infinities and NaN): the exponent is rebiased by a float multiplication.
LATRO_HOST_DEVICE float to_float(float16 value) {
  const uint32_t w = static_cast<uint32_t>(value.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

// float -> bfloat16, round to nearest even; NaN stays NaN.
LATRO_HOST_DEVICE bfloat16 to_bfloat16(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return bfloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return bfloat16{static_cast<uint16_t>(rounded >> 16)};
}

// float -> IEEE half, round to nearest even, overflow to infinity, NaN stays NaN.
LATRO_HOST_DEVICE float16 to_float16(float value) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const float magnitude = value < 0.0f ? -value : value;
  float base = (magnitude * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return float16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

template <typename T>
LATRO_HOST_DEVICE T from_float(float value);
template <>
LATRO_HOST_DEVICE float from_float<float>(float value) { return value; }
template <>
LATRO_HOST_DEVICE bfloat16 from_float<bfloat16>(float value) { return to_bfloat16(value); }
template <>
LATRO_HOST_DEVICE float16 from_float<float16>(float value) { return to_float16(value); }

// Compile-time dtype switch: LATRO_DISPATCH_DTYPE(dtype, T, body) runs body with T bound to
// the storage type of dtype. The one place that maps the runtime tag to a C++ type.
#define LATRO_DISPATCH_DTYPE(DTYPE, T, ...)                              \
  [&] {                                                                  \
    switch (DTYPE) {                                                     \
      case ::latro::DType::Float32: { using T = float; return __VA_ARGS__(); }          \
      case ::latro::DType::BFloat16: { using T = ::latro::bfloat16; return __VA_ARGS__(); } \
      case ::latro::DType::Float16: { using T = ::latro::float16; return __VA_ARGS__(); }   \
    }                                                                    \
    LATRO_FAIL("unsupported dtype tag ", static_cast<int>(DTYPE));       \
  }()

}  // namespace latro

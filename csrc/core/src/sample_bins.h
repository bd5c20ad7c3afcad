// Internal helpers of top-k and top-p shared by the CPU (sample.cpp) and CUDA (sample_kernels.cu)
// samplers, so both bin values the same way. Not installed.
#pragma once

#include <cstdint>

#include "latro/types.h"  // LATRO_HOST_DEVICE, float_to_bits

namespace latro::detail {

// Unsigned keys with the order of the floats (-0 and +0 share one: they are equal values).
LATRO_HOST_DEVICE uint32_t order_key(float s) {
  s += 0.0f;  // -0 + 0 = +0; every other value unchanged
  const uint32_t bits = float_to_bits(s);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Top-k's bins: a key's top 11 bits (sign, exponent, two mantissa bits), the largest values in
// bin 0. They need no max, so a single pass can count them.
constexpr int kKeyBins = 1 << 11;
LATRO_HOST_DEVICE int key_bin(float s) {
  return kKeyBins - 1 - static_cast<int>(order_key(s) >> 21);
}

// Top-p's (level-0) bins of d = ref - s for s <= ref: width 1/32 over [0, 64), everything
// further in the last bin. Computed the same way in every pass, so the bin is a fixed,
// non-increasing function of s.
constexpr int kLevel0Bins = 2048;
constexpr float kLevel0BinsPerUnit = 32.0f;
LATRO_HOST_DEVICE int level0_bin(float s, float ref) {
  const float scaled = (ref - s) * kLevel0BinsPerUnit;
  return scaled < static_cast<float>(kLevel0Bins - 1) ? static_cast<int>(scaled)
                                                       : kLevel0Bins - 1;
}

}  // namespace latro::detail

// Philox4x32-10 counter-based random numbers (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC 2011). Header-only and identical on host and device, so the CPU and CUDA
// samplers draw the same numbers for the same (seed, row, step, token) whatever the batch is.
#pragma once

#include <cmath>
#include <cstdint>

#include "latro/types.h"

namespace latro {

struct Philox4 {
  uint32_t v[4];
};

LATRO_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// The ten round keys of a 64-bit key (the key plus the Weyl increments). A caller drawing many
// blocks under one key computes them once: two adds per round fewer per block.
struct PhiloxKey {
  uint32_t k0[10];
  uint32_t k1[10];
};

LATRO_HOST_DEVICE PhiloxKey philox_round_keys(uint32_t key0, uint32_t key1) {
  PhiloxKey key;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    key.k0[round] = key0;
    key.k1[round] = key1;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  return key;
}

// Ten rounds over a 128-bit counter.
LATRO_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, const PhiloxKey& key) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, counter.v[0], &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, counter.v[2], &hi1, &lo1);
    counter = Philox4{{hi1 ^ counter.v[1] ^ key.k0[round], lo1, hi0 ^ counter.v[3] ^ key.k1[round],
                       lo0}};
  }
  return counter;
}

LATRO_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  return philox4x32_10(counter, philox_round_keys(key0, key1));
}

// The key of a sampling row: the 64-bit seed.
LATRO_HOST_DEVICE PhiloxKey sampling_key(uint64_t seed) {
  return philox_round_keys(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The four random words that cover tokens [4 * block, 4 * block + 4) of one sampling row.
// Counter = (token block, stream, step low, step high), key = the 64-bit seed. `stream` is the
// row index when one seed serves the whole batch and 0 when every row has its own seed.
LATRO_HOST_DEVICE Philox4 sampling_random_block(const PhiloxKey& key, uint32_t stream,
                                                uint64_t step, uint32_t block) {
  const Philox4 counter{{block, stream, static_cast<uint32_t>(step),
                         static_cast<uint32_t>(step >> 32)}};
  return philox4x32_10(counter, key);
}

LATRO_HOST_DEVICE Philox4 sampling_random_block(uint64_t seed, uint32_t stream, uint64_t step,
                                                uint32_t block) {
  return sampling_random_block(sampling_key(seed), stream, step, block);
}

// A uniform float in the open interval (0, 1) from 23 random bits: (2n + 1) / 2^24 is exact
// in float32, never 0 or 1, so log(u) and log(-log(u)) are always finite.
LATRO_HOST_DEVICE float uniform_open01(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 0x1.0p-23f;
}

// 1 - u for the uniform of `bits`, exact in float32: (2^23 - n - 1 + 0.5) / 2^23 with n = bits >> 9.
LATRO_HOST_DEVICE float uniform_open01_complement(uint32_t bits) {
  return (static_cast<float>(0x7FFFFFu - (bits >> 9)) + 0.5f) * 0x1.0p-23f;
}

// Standard Gumbel noise -log(-log(u)). Sampling is argmax(logit / temperature + noise), which
// needs no prefix sum, so no rounding order can make it pick a token outside the kept set.
// logf, not a fast approximation: host and device must round alike.
LATRO_HOST_DEVICE float gumbel_noise(uint32_t bits) {
  return -logf(-logf(uniform_open01(bits)));
}

}  // namespace latro

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

// Block `block` of one sampling row's random stream: counter = (block, stream, step low,
// step high), key = the 64-bit seed. `stream` is the row index when one seed serves the whole
// batch and 0 when every row has its own seed. Which blocks hold which token's bits: below.
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

// A token's random bits. Token v of a row (v < 2^32) gets a 23-bit uniform index
// n = coarse * 2^7 + fine, u = (n + 0.5) / 2^23:
//   coarse  16 bits, half v % 2 (low half first) of word (v / 2) % 4 of block v / 8;
//   fine     7 bits, the low 7 of byte v % 4 (lowest first) of word (v / 4) % 4 of block
//            2^31 + v / 16 (v / 8 < 2^29, so the two ranges of blocks never meet).
// Why two parts: a token that cannot win is skipped on its coarse bits alone (its least
// possible 1 - u already says so; gumbel.h) for all but a few tokens of a row, so a sampler
// computes one Philox block per 8 tokens, where a 32-bit word per token took one per 4, and a
// fine block only for the handful of tokens a draw looks at closely.
constexpr uint32_t kFineBlocks = 0x80000000u;

LATRO_HOST_DEVICE uint32_t coarse_block_index(uint32_t v) { return v >> 3; }
LATRO_HOST_DEVICE uint32_t fine_block_index(uint32_t v) { return kFineBlocks | (v >> 4); }

// Selects, not block.v[i]: on the GPU a dynamic index puts the words in local memory.
LATRO_HOST_DEVICE uint32_t block_word(const Philox4& block, uint32_t i) {
  return i == 0 ? block.v[0] : i == 1 ? block.v[1] : i == 2 ? block.v[2] : block.v[3];
}

// Token v's coarse bits from its coarse block (coarse_block_index(v)).
LATRO_HOST_DEVICE uint32_t coarse_bits(const Philox4& block, uint32_t v) {
  return (block_word(block, (v >> 1) & 3u) >> (16u * (v & 1u))) & 0xFFFFu;
}

// Token v's fine bits from its fine block (fine_block_index(v)).
LATRO_HOST_DEVICE uint32_t fine_bits(const Philox4& block, uint32_t v) {
  return (block_word(block, (v >> 2) & 3u) >> (8u * (v & 3u))) & 0x7Fu;
}

// The 32-bit word whose top 23 bits are n (the form uniform_open01 and gumbel_noise take).
LATRO_HOST_DEVICE uint32_t token_bits(uint32_t coarse, uint32_t fine) {
  return (coarse << 16) | (fine << 9);
}

// Among the 128 uniforms sharing these coarse bits the largest, whose 1 - u is the least.
LATRO_HOST_DEVICE uint32_t coarse_bound_bits(uint32_t coarse) { return token_bits(coarse, 0x7Fu); }

// Token v's bits, both blocks computed (for references and tests; samplers reuse blocks).
LATRO_HOST_DEVICE uint32_t sampling_token_bits(const PhiloxKey& key, uint32_t stream,
                                               uint64_t step, uint32_t v) {
  const uint32_t coarse =
      coarse_bits(sampling_random_block(key, stream, step, coarse_block_index(v)), v);
  const uint32_t fine = fine_bits(sampling_random_block(key, stream, step, fine_block_index(v)), v);
  return token_bits(coarse, fine);
}

LATRO_HOST_DEVICE uint32_t sampling_token_bits(uint64_t seed, uint32_t stream, uint64_t step,
                                               uint32_t v) {
  return sampling_token_bits(sampling_key(seed), stream, step, v);
}

// (m + 0.5) / 2^23 for m < 2^23, exactly: the float 1 + m / 2^23 (m as the mantissa of 1.0)
// less 1 - 2^-24. The difference (2m + 1) / 2^24 has 24 significant bits, so the subtraction
// is exact. Two integer operations and an add, where converting m to float would take a
// conversion (a quarter-rate instruction on the GPU) and a multiply.
LATRO_HOST_DEVICE float half_odd_over_2p23(uint32_t m) {
  return bits_to_float(0x3F800000u | m) - 0x1.fffffep-1f;
}

// A uniform float in the open interval (0, 1) from 23 random bits: (2n + 1) / 2^24 is exact
// in float32, never 0 or 1, so log(u) and log(-log(u)) are always finite.
LATRO_HOST_DEVICE float uniform_open01(uint32_t bits) { return half_odd_over_2p23(bits >> 9); }

// 1 - u for the uniform of `bits`, exact in float32: (2^23 - n - 1 + 0.5) / 2^23 with
// n = bits >> 9, and 2^23 - n - 1 = (~bits) >> 9.
LATRO_HOST_DEVICE float uniform_open01_complement(uint32_t bits) {
  return half_odd_over_2p23(~bits >> 9);
}

// Standard Gumbel noise -log(-log(u)). Sampling is argmax(logit / temperature + noise), which
// needs no prefix sum, so no rounding order can make it pick a token outside the kept set.
// logf, not a fast approximation: host and device must round alike.
LATRO_HOST_DEVICE float gumbel_noise(uint32_t bits) {
  return -logf(-logf(uniform_open01(bits)));
}

}  // namespace latro

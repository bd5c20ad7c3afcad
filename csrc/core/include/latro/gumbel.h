// The Gumbel-max draw shared by the CPU and CUDA samplers: a row's noise stream, the running
// argmax, and the test that skips the noise of tokens that cannot win. Host and device code
// alike, so both backends compute the same keys and pick the same token.
#pragma once

#include <cmath>
#include <cstdint>

#include "latro/philox.h"

namespace latro {

// Noise lies in [-2.82, 16.64] (23-bit uniforms): a token more than this below the max never wins.
constexpr float kGumbelSpan = 20.0f;
// Above the largest noise, gumbel_noise(0xFFFFFFFF) = 16.636, with room for rounding.
constexpr float kGumbelCeiling = 16.65f;

// The random words of one sampling row: token v gets word v % 4 of Philox block v / 4 at
// (seed, stream, step). One block is cached, as consecutive tokens share it.
struct RowNoise {
  uint64_t seed;
  uint32_t stream;
  uint64_t step;
  uint32_t cached_block;
  Philox4 words;
  LATRO_HOST_DEVICE static RowNoise at(uint64_t seed, uint32_t stream, uint64_t step) {
    return RowNoise{seed, stream, step, 0xFFFFFFFFu, Philox4{}};
  }
  // Round keys are recomputed per block here (two adds a round): holding the twenty of them
  // (sampling_key) costs the GPU's filtered kernel 30 registers, half its occupancy.
  LATRO_HOST_DEVICE Philox4 block(uint32_t index) const {
    return sampling_random_block(seed, stream, step, index);
  }
  // 32-bit token ids (the samplers check vocab < 2^32): 64-bit index arithmetic costs the GPU
  // loop a few instructions per token.
  LATRO_HOST_DEVICE uint32_t bits(uint32_t v) {
    if ((v >> 2) != cached_block) {
      cached_block = v >> 2;
      words = block(cached_block);
    }
    // Selects, not words.v[v & 3]: on the GPU a dynamic index puts the words in local memory.
    const uint32_t lane = v & 3u;
    return lane == 0 ? words.v[0] : lane == 1 ? words.v[1] : lane == 2 ? words.v[2] : words.v[3];
  }
};

// Skipping noise that cannot matter. In the Gumbel argmax a token with scaled logit s beats the
// best key B found so far only if its noise g >= B - s. As -log(u) >= 1 - u, the noise is at most
// -log(1 - u), so g < B - s whenever 1 - u > exp(s - B). The samplers compute p = exp(s - m) for
// the normalizer anyway (m: the row's running max), so the test is 1 - u > p * factor with
// factor = exp(m - B), updated when m or B change (rarely): two logarithms per token become one
// multiply for all but a handful of tokens per row.
//
// The test is conservative, so results are exactly those of computing every key. B is lowered by
// a slack (2^-10 + 2^-20 |B|) that exceeds the gap between B and the float below it and the
// error of the computed noise against the exact one (under 1e-5): a skipped token's key rounds
// strictly below B. The factor carries a 2^-10 relative margin over the error of p (an exp of
// s - m: a few ulps, or about 1e-5 for the GPU's __expf), of the factor and of their product. While no key is known (B = -inf)
// the factor is +inf and nothing is skipped; an overflowing factor skips nothing either. The one
// inexact case, p flushed to 0 (s < m - 87) under a finite factor, concerns tokens whose key
// is at most s + 16.7 < m - 70, below the key of the max token (>= m - 2.9): never the winner.
LATRO_HOST_DEVICE float best_key_less_slack(float best_key) {
  return best_key - (0x1.0p-10f + 0x1.0p-20f * fabsf(best_key));
}

LATRO_HOST_DEVICE float gumbel_skip_factor(float best_key, float max) {
  return expf(max - best_key_less_slack(best_key)) * (1.0f + 0x1.0p-10f);
}

// True when the token whose exp(s - m) is `p` cannot beat the best key (see gumbel_skip_factor).
// False for p * factor = NaN (p = 0 with an infinite factor): the key is then computed.
LATRO_HOST_DEVICE bool gumbel_cannot_win(uint32_t bits, float p, float skip_factor) {
  return uniform_open01_complement(bits) > p * skip_factor;
}

// The best key so far: larger key wins, ties go to the lower index (the CPU's scan order, and
// what makes merging the GPU threads' winners order-free). `value` is the winner's scaled logit.
struct GumbelWinner {
  float key;
  float value;
  int64_t index;
  LATRO_HOST_DEVICE static GumbelWinner none() {
    return GumbelWinner{-INFINITY, -INFINITY, INT64_MAX};
  }
  LATRO_HOST_DEVICE bool offer(float k, float s, int64_t v) {
    const bool wins = k > key || (k == key && v < index);
    if (wins) *this = GumbelWinner{k, s, v};
    return wins;
  }
  LATRO_HOST_DEVICE static GumbelWinner better(const GumbelWinner& a, const GumbelWinner& b) {
    return (a.key > b.key || (a.key == b.key && a.index < b.index)) ? a : b;
  }
};

// A running Gumbel argmax over the tokens one thread (or the CPU's row loop) is shown. Tokens
// come with p = exp(s - max) for the caller's current max (which it needs for the normalizer);
// a token is skipped without its Philox words when s is below `floor` (more than the largest
// noise below the best key, or kGumbelSpan below the max), and without its logarithms when
// gumbel_cannot_win says so. Skips are exact: the winner is that of computing every key.
struct GumbelArgmax {
  GumbelWinner best;
  float skip_factor;
  float floor;
  // The key a token must beat to be worth its noise: the best key seen here, or a larger one
  // known to belong to another token of the same draw (raise_bar).
  float bar;
  LATRO_HOST_DEVICE static GumbelArgmax start(float max) {
    GumbelArgmax draw{GumbelWinner::none(), 0.0f, 0.0f, -INFINITY};
    draw.max_changed(max);
    return draw;
  }
  // Call when the max the p's are relative to changes (or the best key does).
  LATRO_HOST_DEVICE void max_changed(float max) {
    const float key = best.key > bar ? best.key : bar;
    skip_factor = gumbel_skip_factor(key, max);
    // Below the bar (less the slack) by more than the largest noise, a key rounds below it;
    // -inf while no key is known.
    const float by_best = best_key_less_slack(key) - kGumbelCeiling;
    const float by_max = max - kGumbelSpan;
    floor = by_best > by_max ? by_best : by_max;
  }
  // Skips from now on as if `key` were the best key so far, without making it the winner (the
  // GPU's threads share the best key of a first stretch of the row): `key` must be the exact key
  // of a token of the same draw that another argmax holds, so the draw's winner is that token or
  // beats it, and a token skipped for it (its key rounds strictly below `key`) cannot win, tie
  // included. `max` as for max_changed.
  LATRO_HOST_DEVICE void raise_bar(float key, float max) {
    if (key > bar) bar = key;
    max_changed(max);
  }
  // Offers token v; `bits()` gives its random word and is called only when the token passes
  // the floor. The floor never decreases, so a caller may skip a group's Philox block when no
  // token of the group is at or above the floor when the group starts.
  template <typename Bits>
  LATRO_HOST_DEVICE void offer(int64_t v, float s, float p, float max, Bits&& bits) {
    if (!(s >= floor)) return;
    const uint32_t word = bits();
    if (gumbel_cannot_win(word, p, skip_factor)) return;
    if (best.offer(s + gumbel_noise(word), s, v)) max_changed(max);
  }
  LATRO_HOST_DEVICE void offer(RowNoise& noise, int64_t v, float s, float p, float max) {
    offer(v, s, p, max, [&] { return noise.bits(static_cast<uint32_t>(v)); });
  }
};

}  // namespace latro

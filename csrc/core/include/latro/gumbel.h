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

// The random bits of one sampling row (philox.h: token v's coarse bits from block v / 8, its
// fine bits from a block of another range per 16 tokens). One block is cached, coarse or fine:
// consecutive tokens share coarse blocks, and a draw needs fine bits for a handful of tokens
// per row, after which the next token recomputes its coarse block. (A second cached block
// costs the GPU's filtered kernel registers, and with them spills.)
struct RowNoise {
  uint64_t seed;
  uint32_t stream;
  uint64_t step;
  uint32_t cached_index;
  Philox4 words;
  LATRO_HOST_DEVICE static RowNoise at(uint64_t seed, uint32_t stream, uint64_t step) {
    // 0xFFFFFFFF is no block's index: coarse ones are below 2^29, fine ones below 2^31 + 2^28.
    return RowNoise{seed, stream, step, 0xFFFFFFFFu, Philox4{}};
  }
  // Round keys are recomputed per block here (two adds a round): holding the twenty of them
  // (sampling_key) costs the GPU's filtered kernel 30 registers, half its occupancy.
  LATRO_HOST_DEVICE const Philox4& block(uint32_t index) {
    if (index != cached_index) {
      cached_index = index;
      words = sampling_random_block(seed, stream, step, index);
    }
    return words;
  }
  // 32-bit token ids (the samplers check vocab < 2^32): 64-bit index arithmetic costs the GPU
  // loop a few instructions per token.
  LATRO_HOST_DEVICE uint32_t coarse(uint32_t v) { return coarse_bits(block(coarse_block_index(v)), v); }
  LATRO_HOST_DEVICE uint32_t fine(uint32_t v) { return fine_bits(block(fine_block_index(v)), v); }
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
// False for p * factor = NaN (p = 0 with an infinite factor): the key is then computed. Given
// coarse_bound_bits(coarse) in place of the token's bits, the test holds for every uniform
// sharing the coarse bits (1 - u only grows as n falls): the coarse skip of philox.h.
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
// a token is skipped without its random bits when s is below `floor` (more than the largest
// noise below the best key, or kGumbelSpan below the max), without its fine bits when
// gumbel_cannot_win says so of its coarse ones, and without its logarithms when it says so of
// all its bits. Skips are exact: the winner is that of computing every key.
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
  // Whether token s (p as for offer, `coarse` its coarse bits) passes the tests offer makes
  // before it needs the fine bits: at or above the floor, and not ruled out by its coarse
  // bits. For callers that test several tokens before offering those that may win.
  LATRO_HOST_DEVICE bool may_win(float s, float p, uint32_t coarse) const {
    // `&`, not `&&`: both tests are cheap, and a branch-free form lets the GPU combine
    // predicates instead of branching per token.
    return (s >= floor) & !gumbel_cannot_win(coarse_bound_bits(coarse), p, skip_factor);
  }
  // Offers token v: `coarse()` gives its coarse bits and is called only when the token passes
  // the floor, `fine()` its fine bits, called only when the coarse bits do not rule it out
  // either. The floor never decreases, so a caller may skip a group's coarse block when no
  // token of the group is at or above the floor when the group starts.
  template <typename Coarse, typename Fine>
  LATRO_HOST_DEVICE void offer(int64_t v, float s, float p, float max, Coarse&& coarse,
                               Fine&& fine) {
    if (!(s >= floor)) return;
    const uint32_t c = coarse();
    if (gumbel_cannot_win(coarse_bound_bits(c), p, skip_factor)) return;
    const uint32_t word = token_bits(c, fine());
    if (gumbel_cannot_win(word, p, skip_factor)) return;
    if (best.offer(s + gumbel_noise(word), s, v)) max_changed(max);
  }
  LATRO_HOST_DEVICE void offer(RowNoise& noise, int64_t v, float s, float p, float max) {
    const uint32_t token = static_cast<uint32_t>(v);
    offer(v, s, p, max, [&] { return noise.coarse(token); }, [&] { return noise.fine(token); });
  }
};

}  // namespace latro

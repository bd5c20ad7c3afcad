// Philox4x32-10 against the known-answer vectors of the Random123 distribution
// (Random123/examples/kat_vectors, lines "philox4x32 10 ..."), and the float helpers on top.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "latro/gumbel.h"
#include "latro/philox.h"

namespace {

struct Kat {
  uint32_t counter[4];
  uint32_t key[2];
  uint32_t expected[4];
};

const Kat kKatVectors[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

TEST(Philox, Random123KnownAnswers) {
  for (const Kat& kat : kKatVectors) {
    const latro::Philox4 counter{{kat.counter[0], kat.counter[1], kat.counter[2], kat.counter[3]}};
    const latro::Philox4 out = latro::philox4x32_10(counter, kat.key[0], kat.key[1]);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(out.v[i], kat.expected[i])
          << std::hex << "word " << i << " of counter " << kat.counter[0] << ", key " << kat.key[0];
    }
  }
}

TEST(Philox, SamplingBlockLayout) {
  // counter = (token block, stream, step low, step high), key = (seed low, seed high).
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t step = 0x0000000500000007ull;
  const latro::Philox4 got = latro::sampling_random_block(seed, 3, step, 11);
  const latro::Philox4 want =
      latro::philox4x32_10(latro::Philox4{{11u, 3u, 7u, 5u}}, 0x89abcdefu, 0x01234567u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got.v[i], want.v[i]) << "word " << i;

  // Any change of block, stream, step or seed changes the words.
  const latro::Philox4 other[] = {
      latro::sampling_random_block(seed, 3, step, 12),
      latro::sampling_random_block(seed, 4, step, 11),
      latro::sampling_random_block(seed, 3, step + 1, 11),
      latro::sampling_random_block(seed, 3, step + (uint64_t{1} << 32), 11),
      latro::sampling_random_block(seed + 1, 3, step, 11),
      latro::sampling_random_block(seed ^ (uint64_t{1} << 40), 3, step, 11),
  };
  for (const auto& o : other) {
    EXPECT_FALSE(o.v[0] == got.v[0] && o.v[1] == got.v[1] && o.v[2] == got.v[2] &&
                 o.v[3] == got.v[3]);
  }
}

TEST(Philox, UniformOpen01StaysInside) {
  const float lo = latro::uniform_open01(0u);
  const float hi = latro::uniform_open01(0xffffffffu);
  EXPECT_GT(lo, 0.0f);
  EXPECT_LT(lo, 1.0f);
  EXPECT_GT(hi, 0.0f);
  EXPECT_LT(hi, 1.0f);
  EXPECT_EQ(lo, 0x1.0p-24f);
  EXPECT_EQ(hi, 1.0f - 0x1.0p-24f);
  // log and log(-log) are finite at both ends, so the Gumbel noise is too.
  EXPECT_TRUE(std::isfinite(latro::gumbel_noise(0u)));
  EXPECT_TRUE(std::isfinite(latro::gumbel_noise(0xffffffffu)));
  EXPECT_LT(latro::gumbel_noise(0u), latro::gumbel_noise(0xffffffffu));
}

// Every one of the 2^23 uniforms and its complement against the integer formulas, in double.
TEST(Philox, UniformAndComplementAreExact) {
  for (uint32_t n = 0; n < (1u << 23); ++n) {
    for (uint32_t low : {0u, 0x1FFu}) {  // the 9 unused bits must not matter
      const uint32_t b = (n << 9) | low;
      const double u = (static_cast<double>(n) + 0.5) / 8388608.0;
      ASSERT_EQ(static_cast<double>(latro::uniform_open01(b)), u) << std::hex << b;
      ASSERT_EQ(static_cast<double>(latro::uniform_open01_complement(b)), 1.0 - u)
          << std::hex << b;
    }
  }
}

// The skip test may only skip a token whose key s + noise rounds strictly below the best key B.
// Adversarial cases: B just above, at and below the key itself, noise from the top of the range
// (u near 1, where the bound -log(1 - u) is tight), logits from tiny to large magnitudes, and
// p = exp(s - m) a few ulps off (another exp implementation), with B >= m - 3 as in a sampler
// (the max token's key is at least m - 2.9).
TEST(Philox, GumbelSkipNeverSkipsAPossibleWinner) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const float scales[] = {1e-3f, 1.0f, 30.0f, 1e3f, 1e5f};
  int64_t skipped = 0, checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = (i % 2) ? static_cast<uint32_t>(rng())
                                  : 0xFFFFFFFFu - static_cast<uint32_t>(rng() % (1u << 20));
    const float noise = latro::gumbel_noise(bits);
    const float scale = scales[i % 5];
    const float m = (unit(rng) - 0.5f) * 2.0f * scale;
    const float s = m - unit(rng) * 40.0f;
    const float key = s + noise;
    // B equal to the key, an ulp or up to 4e-3 below or above it, or up to 20 above it. Skipping
    // is wrong in the first cases (a key equal to B can win on a lower index).
    float best;
    switch (i % 6) {
      case 0: best = key; break;
      case 1: best = std::nextafter(key, -INFINITY); break;
      case 2: best = key - unit(rng) * 4e-3f; break;
      case 3: best = std::nextafter(key, INFINITY); break;
      case 4: best = key + unit(rng) * 4e-3f; break;
      default: best = key + unit(rng) * 20.0f; break;
    }
    if (best < m - 3.0f) continue;
    const float exact_p = std::exp(s - m);
    const int ulps = static_cast<int>(rng() % 9) - 4;
    float p = exact_p;
    for (int u = 0; u < std::abs(ulps); ++u) p = std::nextafter(p, ulps > 0 ? INFINITY : 0.0f);
    ++checked;
    if (latro::gumbel_cannot_win(bits, p, latro::gumbel_skip_factor(best, m))) {
      ++skipped;
      ASSERT_LT(key, best) << "bits " << std::hex << bits << std::dec << " s " << s << " m " << m
                           << " best " << best;
    }
  }
  // The skip is live: most tokens well below the best key (a sixth of the cases) are skipped.
  EXPECT_GT(skipped, checked / 10);
}

TEST(Philox, GumbelSkipFactorEdgeCases) {
  // No key yet: nothing is skipped, whatever p.
  const float none = latro::gumbel_skip_factor(-INFINITY, 2.0f);
  EXPECT_FALSE(latro::gumbel_cannot_win(0u, 1e-30f, none));
  EXPECT_FALSE(latro::gumbel_cannot_win(0u, 0.0f, none));
  // A token 30 below the best key can never win (the noise is at most 16.7).
  const float far = latro::gumbel_skip_factor(10.0f, 10.0f);
  EXPECT_TRUE(latro::gumbel_cannot_win(0xFFFFFFFFu, std::exp(-30.0f), far));
  // A token at the best key's level with the largest noise must be computed.
  EXPECT_FALSE(latro::gumbel_cannot_win(0xFFFFFFFFu, 1.0f, far));
}

// A token's bits pinned to their documented layout (philox.h): values computed when the
// layout was written, by this header and independently by latro_engine/reference.py.
TEST(Philox, TokenBitsKnownAnswers) {
  const uint64_t seed = 0x0123456789ABCDEFull;
  const uint64_t step = (uint64_t{1} << 32) + 3;
  const std::vector<std::pair<uint32_t, uint32_t>> known = {
      {0u, 0xCFB26400u},  {1u, 0x43D31800u},  {2u, 0x85A00800u},
      {7u, 0xFD1EE800u},  {8u, 0xBC1AF000u},  {15u, 0x3B3F0800u},
      {16u, 0x47725600u}, {1000003u, 0x7D93E400u}, {0xFFFFFFFEu, 0x8DDA2E00u}};
  for (const auto& [v, bits] : known) {
    EXPECT_EQ(latro::sampling_token_bits(seed, 7, step, v), bits) << "token " << v;
  }
}

TEST(Philox, TokenBitsComeFromTheDocumentedWords) {
  const latro::PhiloxKey key = latro::sampling_key(99);
  for (uint32_t v = 0; v < 64; ++v) {
    const latro::Philox4 c = latro::sampling_random_block(key, 2, 5, v / 8);
    const latro::Philox4 f = latro::sampling_random_block(key, 2, 5, 0x80000000u + v / 16);
    const uint32_t coarse = (c.v[(v / 2) % 4] >> (16 * (v % 2))) & 0xFFFFu;
    const uint32_t fine = (f.v[(v / 4) % 4] >> (8 * (v % 4))) & 0x7Fu;
    EXPECT_EQ(latro::sampling_token_bits(key, 2, 5, v), (coarse << 16) | (fine << 9)) << v;
    EXPECT_EQ(latro::coarse_bits(c, v), coarse) << v;
    EXPECT_EQ(latro::fine_bits(f, v), fine) << v;
  }
  // The low 9 bits, which no uniform reads, are zero; the ranges of blocks do not meet.
  EXPECT_EQ(latro::token_bits(0xFFFFu, 0x7Fu), 0xFFFFFE00u);
  EXPECT_EQ(latro::coarse_block_index(0xFFFFFFFFu), 0x1FFFFFFFu);
  EXPECT_EQ(latro::fine_block_index(0u), 0x80000000u);
}

// The coarse skip: the least 1 - u among the 128 uniforms sharing coarse bits is the one of
// coarse_bound_bits, so a token the coarse test skips is one the exact test skips.
TEST(Philox, CoarseBoundIsTheLeastComplementOfItsUniforms) {
  std::mt19937 rng(13);
  std::vector<uint32_t> coarse = {0u, 1u, 0x7FFFu, 0xFFFEu, 0xFFFFu};
  for (int i = 0; i < 300; ++i) coarse.push_back(static_cast<uint32_t>(rng()) & 0xFFFFu);
  for (uint32_t c : coarse) {
    const float least = latro::uniform_open01_complement(latro::coarse_bound_bits(c));
    for (uint32_t f = 0; f < 128; ++f) {
      const float complement = latro::uniform_open01_complement(latro::token_bits(c, f));
      ASSERT_GE(complement, least) << c << " " << f;
      ASSERT_EQ(complement == least, f == 127u) << c << " " << f;
      for (float pf : {least * 0.5f, least, std::nextafter(least, 0.0f), complement}) {
        if (latro::gumbel_cannot_win(latro::coarse_bound_bits(c), pf, 1.0f)) {
          ASSERT_TRUE(latro::gumbel_cannot_win(latro::token_bits(c, f), pf, 1.0f)) << c << " " << f;
        }
      }
    }
  }
}

TEST(Philox, UniformMomentsLookUniform) {
  // 200000 tokens' uniforms: mean 1/2 and variance 1/12 within generous bounds, and the fine
  // bits (the 7 lowest of n) evenly spread over their 128 values.
  double sum = 0.0, sum_sq = 0.0;
  std::vector<int> fine_counts(128, 0);
  const int tokens = 200000;
  const latro::PhiloxKey key = latro::sampling_key(2024);
  for (int v = 0; v < tokens; ++v) {
    const uint32_t bits = latro::sampling_token_bits(key, 0, 0, static_cast<uint32_t>(v));
    const double u = latro::uniform_open01(bits);
    ASSERT_GT(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    sum_sq += u * u;
    ++fine_counts[(bits >> 9) & 0x7Fu];
  }
  const double n = tokens;
  const double mean = sum / n;
  const double var = sum_sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(var, 1.0 / 12, 0.002);
  // Chi-square with 127 degrees of freedom: mean 127, sd 16; 250 is far in the tail.
  const double expected = n / 128;
  double chi2 = 0.0;
  for (int count : fine_counts) chi2 += (count - expected) * (count - expected) / expected;
  EXPECT_LT(chi2, 250.0);
}

}  // namespace

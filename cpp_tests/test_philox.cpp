// Philox4x32-10 against the known-answer vectors of the Random123 distribution
// (Random123/examples/kat_vectors, lines "philox4x32 10 ..."), and the float helpers on top.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
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

TEST(Philox, UniformComplementIsExact) {
  std::mt19937 rng(5);
  std::vector<uint32_t> bits = {0u, 1u, 0x1FFu, 0x200u, 0x7FFFFFFFu, 0xFFFFFDFFu, 0xFFFFFE00u,
                                0xFFFFFFFFu};
  for (int i = 0; i < 10000; ++i) bits.push_back(static_cast<uint32_t>(rng()));
  for (uint32_t b : bits) {
    EXPECT_EQ(static_cast<double>(latro::uniform_open01_complement(b)),
              1.0 - static_cast<double>(latro::uniform_open01(b)))
        << std::hex << b;
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

TEST(Philox, UniformMomentsLookUniform) {
  // 4 * 50000 draws: mean 1/2 and variance 1/12 within generous bounds.
  double sum = 0.0, sum_sq = 0.0;
  const int blocks = 50000;
  for (int b = 0; b < blocks; ++b) {
    const latro::Philox4 w = latro::sampling_random_block(2024, 0, 0, static_cast<uint32_t>(b));
    for (uint32_t bits : w.v) {
      const double u = latro::uniform_open01(bits);
      ASSERT_GT(u, 0.0);
      ASSERT_LT(u, 1.0);
      sum += u;
      sum_sq += u * u;
    }
  }
  const double n = 4.0 * blocks;
  const double mean = sum / n;
  const double var = sum_sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(var, 1.0 / 12, 0.002);
}

}  // namespace

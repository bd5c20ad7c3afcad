// Philox4x32-10 against the known-answer vectors of the Random123 distribution
// (Random123/examples/kat_vectors, lines "philox4x32 10 ..."), and the float helpers on top.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>

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

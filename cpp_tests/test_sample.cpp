// latro::sample: the kept set of top-k / top-p / min-p against a float64 reference that follows
// the semantics documented in latro.h, the returned log-probabilities, determinism and the
// per-row / per-batch seeding contract, and the distribution of the draws.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "latro/latro.h"
#include "sample_reference.h"
#include "test_util.h"

namespace {

using latro::DType;
using namespace latro_test;

Draws run_sample(const Matrix& logits, const std::vector<int64_t>& seeds, bool per_row_seeds,
                 int64_t offset, const Options& o) {
  Draws out;
  latro::sample(sample_args(logits, seeds, per_row_seeds, &offset, o, out));
  return out;
}

// Copies rows of `src` (in the given order) into a new matrix of the same dtype and stride.
Matrix gather_rows(const Matrix& src, const std::vector<int64_t>& rows) {
  Matrix m = src;
  m.rows = static_cast<int64_t>(rows.size());
  m.storage.assign(static_cast<size_t>(m.rows * m.stride) * m.element_size(), 0);
  const size_t row_bytes = static_cast<size_t>(src.stride) * src.element_size();
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(m.storage.data() + i * row_bytes,
                src.storage.data() + static_cast<size_t>(rows[i]) * row_bytes, row_bytes);
  }
  return m;
}

// ---------------------------------------------------------------- parametrized: dtype x size
class SampleTest : public ShapeTest {
 protected:
  unsigned seed() const { return static_cast<unsigned>(99 + rows() * 13 + vocab() * 5 + static_cast<int>(dtype())); }
};

TEST_P(SampleTest, DrawsFromTheKeptSetWithItsLogprob) {
  std::mt19937 rng(seed());
  std::mt19937_64 seed_rng(seed());
  const Matrix logits = random_logits_with_masked(dtype(), rows(), vocab(), vocab() + 3, rng);
  int robust_rows = 0;
  for (size_t c = 0; c < filter_configs().size(); ++c) {
    const Options& o = filter_configs()[c];
    const bool per_row = c % 2 == 1;  // both seeding modes, over alternate configurations
    SCOPED_TRACE(options_str(o) + (per_row ? ", per-row seeds" : ", one seed"));
    const auto seeds = random_seeds(per_row ? rows() : 1, seed_rng);
    const int64_t offset = 5;
    const Draws d = run_sample(logits, seeds, per_row, offset, o);
    for (int64_t r = 0; r < rows(); ++r) {
      const KeptSet ks = reference_kept_set(row_values(logits, r), o);
      const int64_t id = d.ids[static_cast<size_t>(r)];
      ASSERT_GE(id, 0) << "row " << r;
      ASSERT_LT(id, vocab()) << "row " << r;
      EXPECT_TRUE(ks.allowed[static_cast<size_t>(id)])
          << "row " << r << " drew " << id << ", outside the kept set";
      EXPECT_LE(d.logprobs[static_cast<size_t>(r)], 0.0f) << "row " << r;
      if (ks.robust) {
        ++robust_rows;
        const double want = ks.scaled[static_cast<size_t>(id)] - ks.log_norm;
        EXPECT_TRUE(close(d.logprobs[static_cast<size_t>(r)], want, float32_result_tolerance()))
            << "row " << r << " id " << id;
      }
    }
  }
  EXPECT_GT(robust_rows, 0);
}

TEST_P(SampleTest, MatchesTheDocumentedGumbelConstruction) {
  std::mt19937 rng(seed() + 1);
  std::mt19937_64 seed_rng(seed() + 1);
  const Matrix logits = random_logits_with_masked(dtype(), rows(), vocab(), vocab(), rng);
  int compared = 0;
  for (size_t c = 0; c < filter_configs().size(); ++c) {
    const Options& o = filter_configs()[c];
    const bool per_row = c % 2 == 0;  // the other half than in DrawsFromTheKeptSetWithItsLogprob
    SCOPED_TRACE(options_str(o) + (per_row ? ", per-row seeds" : ", one seed"));
    const auto seeds = random_seeds(per_row ? rows() : 1, seed_rng);
    const int64_t offset = static_cast<int64_t>(seed_rng() >> 20);
    const Draws d = run_sample(logits, seeds, per_row, offset, o);
    for (int64_t r = 0; r < rows(); ++r) {
      const KeptSet ks = reference_kept_set(row_values(logits, r), o);
      if (!ks.robust) continue;
      const uint64_t seed = static_cast<uint64_t>(seeds[per_row ? static_cast<size_t>(r) : 0]);
      const uint32_t stream = per_row ? 0u : static_cast<uint32_t>(r);
      const int64_t want = reference_gumbel_draw(ks, seed, stream, static_cast<uint64_t>(offset));
      if (want < 0) continue;  // a near tie: either answer is right
      ++compared;
      EXPECT_EQ(d.ids[static_cast<size_t>(r)], want) << "row " << r;
    }
  }
  EXPECT_GT(compared, 0);
}

TEST_P(SampleTest, Deterministic) {
  std::mt19937 rng(seed() + 2);
  std::mt19937_64 seed_rng(seed() + 2);
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  for (const bool per_row : {false, true}) {
    const auto seeds = random_seeds(per_row ? rows() : 1, seed_rng);
    const Options o{0.9f, 50, 0.9f, 0.01f};
    const Draws a = run_sample(logits, seeds, per_row, 3, o);
    const Draws b = run_sample(logits, seeds, per_row, 3, o);
    EXPECT_EQ(a.ids, b.ids);
    for (size_t r = 0; r < a.logprobs.size(); ++r) {
      EXPECT_EQ(latro::float_to_bits(a.logprobs[r]), latro::float_to_bits(b.logprobs[r]));
    }
  }
}

TEST_P(SampleTest, PerRowSeedsDoNotDependOnTheBatch) {
  std::mt19937 rng(seed() + 3);
  std::mt19937_64 seed_rng(seed() + 3);
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  const auto seeds = random_seeds(rows(), seed_rng);
  const Options o{1.0f, 0, 0.95f, 0.0f};
  const Draws whole = run_sample(logits, seeds, true, 11, o);

  // Reversed batch order: every row keeps its draw.
  std::vector<int64_t> order(static_cast<size_t>(rows()));
  std::iota(order.rbegin(), order.rend(), int64_t{0});
  std::vector<int64_t> reversed_seeds;
  for (int64_t r : order) reversed_seeds.push_back(seeds[static_cast<size_t>(r)]);
  const Draws reversed = run_sample(gather_rows(logits, order), reversed_seeds, true, 11, o);
  for (size_t i = 0; i < order.size(); ++i) {
    const size_t r = static_cast<size_t>(order[i]);
    EXPECT_EQ(reversed.ids[i], whole.ids[r]) << "row " << r << " at position " << i;
    EXPECT_EQ(reversed.logprobs[i], whole.logprobs[r]) << "row " << r;
  }
  // Alone in a batch of one.
  for (int64_t r = 0; r < std::min<int64_t>(rows(), 8); ++r) {
    const Draws alone = run_sample(gather_rows(logits, {r}), {seeds[static_cast<size_t>(r)]}, true, 11, o);
    EXPECT_EQ(alone.ids[0], whole.ids[static_cast<size_t>(r)]) << "row " << r;
    EXPECT_EQ(alone.logprobs[0], whole.logprobs[static_cast<size_t>(r)]) << "row " << r;
  }
}

TEST_P(SampleTest, OneSeedRowRangesMatchTheWholeBatch) {
  std::mt19937 rng(seed() + 4);
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng);
  const std::vector<int64_t> seeds = {-1234567890123LL};
  const Options o{0.8f, 20, 1.0f, 0.0f};
  const int64_t offset = 2;
  const Draws whole = run_sample(logits, seeds, false, offset, o);
  for (const int64_t k : {int64_t{0}, int64_t{1}, rows() / 2, rows()}) {
    if (k > rows()) continue;
    Draws split;
    const auto args = sample_args(logits, seeds, false, &offset, o, split);
    latro::sample(args, 0, k);
    latro::sample(args, k, rows());
    EXPECT_EQ(split.ids, whole.ids) << "split at " << k;
    for (size_t r = 0; r < whole.logprobs.size(); ++r) {
      EXPECT_EQ(split.logprobs[r], whole.logprobs[r]) << "row " << r << ", split at " << k;
    }
  }
}

TEST_P(SampleTest, OffsetAndSeedChangeTheDraws) {
  if (vocab() < 97) GTEST_SKIP() << "needs a vocabulary where collisions are unlikely";
  std::mt19937 rng(seed() + 5);
  // Flat logits: every token equally likely, so different noise means different ids.
  Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab(), rng, 0.01);
  const std::vector<int64_t> seeds = {77};
  const Draws a = run_sample(logits, seeds, false, 0, {});
  const Draws b = run_sample(logits, seeds, false, 1, {});
  const Draws c = run_sample(logits, {78}, false, 0, {});
  int differ_offset = 0, differ_seed = 0;
  for (size_t r = 0; r < a.ids.size(); ++r) {
    differ_offset += a.ids[r] != b.ids[r];
    differ_seed += a.ids[r] != c.ids[r];
  }
  EXPECT_GE(differ_offset, static_cast<int>(a.ids.size()) / 2);
  EXPECT_GE(differ_seed, static_cast<int>(a.ids.size()) / 2);
  if (rows() > 1) {  // one seed: rows have their own streams
    std::vector<int64_t> same_logits_rows(static_cast<size_t>(rows()), 0);
    const Draws same = run_sample(gather_rows(logits, same_logits_rows), seeds, false, 0, {});
    EXPECT_GT(std::count(same.ids.begin(), same.ids.end(), same.ids[0]), 0);
    EXPECT_LT(std::count(same.ids.begin(), same.ids.end(), same.ids[0]), rows());
  }
}

TEST_P(SampleTest, GreedyIsArgmaxWithLogprobZero) {
  std::mt19937 rng(seed() + 6);
  Matrix logits = random_logits_with_masked(dtype(), rows(), vocab(), vocab() + 1, rng);
  // Make ties: in odd rows copy the row's maximum into a later and an earlier column.
  for (int64_t r = 1; r < rows(); r += 2) {
    if (vocab() < 3) break;
    logits.set(r, vocab() - 1, 50.0f);
    logits.set(r, vocab() / 2, 50.0f);
  }
  for (const Options& o : {Options{0.0f, 0, 1.0f, 0.0f}, Options{0.0f, 5, 0.5f, 0.2f}}) {
    const Draws d = run_sample(logits, {1}, false, 0, o);
    for (int64_t r = 0; r < rows(); ++r) {
      const auto values = row_values(logits, r);
      const int64_t want = std::max_element(values.begin(), values.end()) - values.begin();
      EXPECT_EQ(d.ids[static_cast<size_t>(r)], want) << "row " << r;
      EXPECT_EQ(d.logprobs[static_cast<size_t>(r)], 0.0f) << "row " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DTypesAndSizes, SampleTest,
                         ::testing::Combine(::testing::Values(DType::Float32, DType::BFloat16,
                                                              DType::Float16),
                                            ::testing::Values<int64_t>(1, 7, 97),
                                            ::testing::Values<int64_t>(1, 7, 97, 1025, 32000)),
                         shape_name);

// ---------------------------------------------------------------- distribution of the draws
// vocab 7, 20000 draws (one row per draw: per-row seeds in one half, one seed with 10000 streams
// in the other): every kept id's frequency within 5 sigma of its probability under the kept
// distribution, tokens outside the kept set (and -inf tokens) never drawn.
class SampleFrequencies : public ::testing::TestWithParam<std::tuple<DType, Options>> {};

TEST_P(SampleFrequencies, MatchTheKeptDistribution) {
  const DType dtype = std::get<0>(GetParam());
  const Options o = std::get<1>(GetParam());
  const std::vector<float> row = {1.5f, 0.25f, -std::numeric_limits<float>::infinity(), 1.0f,
                                  -0.5f, 0.75f, -2.0f};
  const int64_t vocab = static_cast<int64_t>(row.size());
  const int64_t draws = 10000;
  const Matrix logits = repeated_row(dtype, row, draws);
  const KeptSet ks = reference_kept_set(row_values(logits, 0), o);
  ASSERT_TRUE(ks.robust) << "test design: the kept set must not be a rounding question";

  std::vector<int64_t> counts(static_cast<size_t>(vocab), 0);
  std::mt19937_64 seed_rng(555);
  const Draws per_row = run_sample(logits, random_seeds(draws, seed_rng), true, 0, o);
  const Draws one_seed = run_sample(logits, {static_cast<int64_t>(seed_rng())}, false, 3, o);
  for (const Draws* d : {&per_row, &one_seed}) {
    for (size_t r = 0; r < d->ids.size(); ++r) {
      const int64_t id = d->ids[r];
      ASSERT_GE(id, 0);
      ASSERT_LT(id, vocab);
      ++counts[static_cast<size_t>(id)];
      ASSERT_TRUE(close(d->logprobs[r], ks.scaled[static_cast<size_t>(id)] - ks.log_norm,
                        float32_result_tolerance()));
    }
  }
  const double n = 2.0 * draws;
  for (int64_t v = 0; v < vocab; ++v) {
    if (!ks.kept[static_cast<size_t>(v)]) {
      EXPECT_EQ(counts[static_cast<size_t>(v)], 0) << "token " << v << " is not in the kept set";
      continue;
    }
    const double p = std::exp(ks.scaled[static_cast<size_t>(v)] - ks.log_norm);
    const double sigma = std::sqrt(n * p * (1 - p));
    EXPECT_NEAR(static_cast<double>(counts[static_cast<size_t>(v)]), n * p, 5 * sigma + 1e-9)
        << "token " << v << " (p = " << p << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Options, SampleFrequencies,
    ::testing::Combine(::testing::Values(DType::Float32, DType::BFloat16, DType::Float16),
                       ::testing::Values(Options{1.0f, 0, 1.0f, 0.0f},   // all but -inf
                                         Options{0.7f, 0, 1.0f, 0.0f},   // sharper
                                         Options{2.0f, 3, 1.0f, 0.0f},   // top-k 3
                                         Options{1.0f, 0, 0.8f, 0.0f},   // top-p
                                         Options{1.0f, 0, 1.0f, 0.3f},   // min-p
                                         Options{1.2f, 5, 0.9f, 0.1f})), // all three
    [](const ::testing::TestParamInfo<std::tuple<DType, Options>>& info) {
      const Options& o = std::get<1>(info.param);
      std::string name = dtype_str(std::get<0>(info.param)) + "_t" +
                         std::to_string(static_cast<int>(o.temperature * 10)) + "_k" +
                         std::to_string(o.top_k) + "_p" +
                         std::to_string(static_cast<int>(o.top_p * 100)) + "_minp" +
                         std::to_string(static_cast<int>(o.min_p * 100));
      return name;
    });

// ---------------------------------------------------------------- more kept-set semantics
TEST(SampleSemantics, TopKKeepsTiesAndLargeKKeepsEverything) {
  // Three tokens tie at the 2nd-largest value: top_k = 2 keeps all four of the top values.
  const std::vector<float> row = {0.0f, 3.0f, 2.0f, 2.0f, -1.0f, 2.0f};
  const Matrix logits = repeated_row(DType::Float32, row, 4000);
  std::vector<int64_t> counts(row.size(), 0);
  for (int64_t id : run_sample(logits, {9}, false, 0, {1.0f, 2, 1.0f, 0.0f}).ids) ++counts[static_cast<size_t>(id)];
  EXPECT_EQ(counts[0], 0);
  EXPECT_EQ(counts[4], 0);
  for (size_t v : {1, 2, 3, 5}) EXPECT_GT(counts[v], 0) << "token " << v;

  // top_k larger than the vocabulary: nothing is filtered.
  std::fill(counts.begin(), counts.end(), 0);
  const Draws d = run_sample(logits, {9}, false, 0, {1.0f, 1000, 1.0f, 0.0f});
  for (int64_t id : d.ids) ++counts[static_cast<size_t>(id)];
  for (size_t v = 0; v < row.size(); ++v) EXPECT_GT(counts[v], 0) << "token " << v;
  const KeptSet ks = reference_kept_set(row_values(logits, 0), {});
  EXPECT_TRUE(close(d.logprobs[0], ks.scaled[static_cast<size_t>(d.ids[0])] - ks.log_norm,
                    float32_result_tolerance()));
}

// Top-k's threshold comes from counting the values in bins of their top bits and selecting
// within one bin: rows where one bin holds everything, where the k-th largest ends a bin
// exactly or starts the next, where +0 and -0 (equal values, one key) tie at it, and
// where fewer than k values are finite. The kept set shows in the log-prob.
TEST(SampleSemantics, TopKThresholdAtBinEdges) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> equal(3001, 0.5f), steps, zeros, masked(2000, -kInf);
  for (int i = 0; i < 3; ++i) steps.push_back(4.0f);
  for (int i = 0; i < 7; ++i) steps.push_back(2.0f);
  for (int i = 0; i < 5; ++i) steps.push_back(1.0f);
  for (int i = 0; i < 985; ++i) steps.push_back(-3.0f - static_cast<float>(i % 7));
  for (int i = 0; i < 10; ++i) zeros.push_back(0.0f);
  for (int i = 0; i < 10; ++i) zeros.push_back(-0.0f);
  for (int i = 0; i < 500; ++i) {
    zeros.push_back(i % 3 == 0 ? -kInf : -2.0f - static_cast<float>(i % 5));
  }
  for (int i = 0; i < 40; ++i) masked[static_cast<size_t>(i * 37)] = static_cast<float>(i % 4);
  std::vector<float> distinct(1000, -4.0f);  // 21 different values in the bin [1, 1.25)
  for (int i = 0; i < 21; ++i) {
    distinct[static_cast<size_t>(i * 47)] = 1.0f + 0.01f * static_cast<float>(i);
  }
  const std::vector<std::pair<std::vector<float>, std::vector<int64_t>>> cases = {
      {equal, {1, 50, 3000}},         // every value in one bin, all tied
      {steps, {2, 3, 4, 10, 11, 15, 16}},  // k-th largest inside, ending or after a bin
      {zeros, {5, 10, 15, 20, 21}},   // +0 and -0 tie at the threshold
      {masked, {39, 40, 41, 1999}},   // fewer finite values than k: every finite one stays
      {distinct, {1, 5, 20, 21, 22}},  // the k-th largest of one bin's different values
  };
  for (const auto& [row, ks] : cases) {
    for (const int64_t k : ks) {
      SCOPED_TRACE("vocab " + std::to_string(row.size()) + ", top_k " + std::to_string(k));
      const Options o{1.0f, k, 1.0f, 0.0f};
      const Matrix logits = repeated_row(DType::Float32, row, 16);
      const KeptSet want = reference_kept_set(row_values(logits, 0), o);
      ASSERT_TRUE(want.robust);
      const Draws d = run_sample(logits, {3}, false, 0, o);
      for (size_t r = 0; r < d.ids.size(); ++r) {
        const size_t id = static_cast<size_t>(d.ids[r]);
        ASSERT_LT(id, row.size());
        EXPECT_TRUE(want.kept[id]) << "drew " << id;
        const double logprob = want.scaled[id] - want.log_norm;
        EXPECT_TRUE(close(d.logprobs[r], logprob, float32_result_tolerance())) << "drew " << id;
      }
    }
  }
}

TEST(SampleSemantics, MinusInfinityNeverDrawn) {
  // One finite token among -inf: always drawn, with log-prob 0, whatever the options.
  const int64_t vocab = 1025;
  Matrix logits;
  logits.rows = 64;
  logits.cols = logits.stride = vocab;
  logits.storage.assign(static_cast<size_t>(logits.rows * vocab) * 4, 0);
  for (int64_t r = 0; r < logits.rows; ++r) {
    for (int64_t v = 0; v < vocab; ++v) {
      logits.set(r, v, v == (r * 37) % vocab ? -5.0f : -std::numeric_limits<float>::infinity());
    }
  }
  for (const Options& o : filter_configs()) {
    const Draws d = run_sample(logits, {4242}, false, 1, o);
    for (int64_t r = 0; r < logits.rows; ++r) {
      EXPECT_EQ(d.ids[static_cast<size_t>(r)], (r * 37) % vocab) << options_str(o);
      EXPECT_TRUE(close(d.logprobs[static_cast<size_t>(r)], 0.0, float32_result_tolerance()));
    }
  }
}

// ---------------------------------------------------------------- argument errors
class SampleErrors : public ::testing::Test {
 protected:
  std::mt19937 rng{3};
  Matrix logits = random_matrix(DType::Float32, 2, 16, 16, rng);
  std::vector<int64_t> seeds = {1, 2};
  int64_t offset = 0;
  Draws out;
  latro::SampleArgs args(const Options& o = {}) {
    return sample_args(logits, seeds, true, &offset, o, out);
  }
};

TEST_F(SampleErrors, BadOptions) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_NO_THROW(latro::sample(args()));
  EXPECT_LATRO_ERROR(latro::sample(args({nan, 0, 1.0f, 0.0f})), "temperature");
  EXPECT_LATRO_ERROR(latro::sample(args({-0.5f, 0, 1.0f, 0.0f})), "temperature");
  EXPECT_LATRO_ERROR(latro::sample(args({inf, 0, 1.0f, 0.0f})), "temperature");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, -1, 1.0f, 0.0f})), "top_k");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, 0.0f, 0.0f})), "top_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, 1.5f, 0.0f})), "top_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, -0.1f, 0.0f})), "top_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, nan, 0.0f})), "top_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, 1.0f, -0.1f})), "min_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, 1.0f, 1.5f})), "min_p");
  EXPECT_LATRO_ERROR(latro::sample(args({1.0f, 0, 1.0f, nan})), "min_p");
  // The boundaries are valid.
  EXPECT_NO_THROW(latro::sample(args({0.0f, 0, 1.0f, 0.0f})));
  EXPECT_NO_THROW(latro::sample(args({1.0f, 0, 1.0f, 1.0f})));
  EXPECT_NO_THROW(latro::sample(args({1.0f, 0, 1e-6f, 0.0f})));

  EXPECT_LATRO_ERROR(latro::check_sampling_options(nan, 0, 1.0f, 0.0f), "temperature");
  EXPECT_LATRO_ERROR(latro::check_sampling_options(1.0f, -3, 1.0f, 0.0f), "top_k");
  EXPECT_LATRO_ERROR(latro::check_sampling_options(1.0f, 0, 0.0f, 0.0f), "top_p");
  EXPECT_LATRO_ERROR(latro::check_sampling_options(1.0f, 0, 1.0f, 2.0f), "min_p");
  EXPECT_NO_THROW(latro::check_sampling_options(0.0f, 10, 0.5f, 0.5f));
}

TEST_F(SampleErrors, NullPointers) {
  auto a = args();
  a.seeds = nullptr;
  EXPECT_LATRO_ERROR(latro::sample(a), "seeds");
  a = args();
  a.offset = nullptr;
  EXPECT_LATRO_ERROR(latro::sample(a), "offset");
  a = args();
  a.logits = nullptr;
  EXPECT_LATRO_ERROR(latro::sample(a), "logits");
  a = args();
  a.ids = nullptr;
  EXPECT_LATRO_ERROR(latro::sample(a), "ids");
}

TEST_F(SampleErrors, BadSizes) {
  auto a = args();
  a.rows = -1;
  EXPECT_LATRO_ERROR(latro::sample(a), "rows");
  a = args();
  a.vocab = 0;
  EXPECT_LATRO_ERROR(latro::sample(a), "vocab");
  a = args();
  a.row_stride = 15;
  EXPECT_LATRO_ERROR(latro::sample(a), "row_stride");
  // Token ids in the noise stream are 32-bit: refused before any element is read.
  a = args();
  a.rows = 1;
  a.vocab = int64_t{1} << 32;
  a.row_stride = a.vocab;
  EXPECT_LATRO_ERROR(latro::sample(a), "vocab must be below 2^32");
  EXPECT_THROW(latro::sample(args(), 0, 3), latro::Error);
  EXPECT_THROW(latro::sample(args(), 2, 1), latro::Error);
}

}  // namespace

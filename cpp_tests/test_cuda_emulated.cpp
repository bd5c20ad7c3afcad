// The CUDA kernels (latro/cuda.h), run on the CPU by cuda_emulator/, against the CPU functions
// and the float64 sampling reference: what test_cuda_ops.py checks on a GPU, on every machine.
// Each comparison also runs the kernels under the emulator's other thread schedules, which
// must not change a single bit of the output (a missing barrier usually does).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "latro/cuda.h"
#include "latro/latro.h"
#include "decode_attention_reference.h"
#include "huge_sizes.h"
#include "latro_cuda_emulator.h"
#include "rms_norm_reference.h"
#include "sample_reference.h"
#include "test_util.h"

namespace {

using latro::DType;
using namespace latro_test;

constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr float kNaNF = std::numeric_limits<float>::quiet_NaN();

// Runs `launch` (which writes its outputs into the vectors it captured) under every schedule
// and returns the forward schedule's outputs as `collect()` sees them; the others must match.
// `only_forward`: one schedule (for repeats of a case already checked under all three).
template <typename Launch, typename Collect>
auto under_every_schedule(Launch&& launch, Collect&& collect, bool only_forward = false) {
  using latro_emu::Schedule;
  latro_emu::set_schedule(Schedule::Forward);
  launch();
  const auto forward = collect();
  if (only_forward) return forward;
  for (const auto& [schedule, name] :
       {std::pair{Schedule::Reverse, "reverse"}, std::pair{Schedule::Shuffled, "shuffled"}}) {
    latro_emu::set_schedule(schedule, 12345);
    launch();
    EXPECT_TRUE(collect() == forward) << "the " << name << " schedule changed the outputs";
  }
  latro_emu::set_schedule(Schedule::Forward);
  return forward;
}

// Bitwise equality of float vectors (NaN equal to NaN), for the schedule comparisons.
std::vector<uint32_t> bits_of(const std::vector<float>& values) {
  std::vector<uint32_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = latro::float_to_bits(values[i]);
  return bits;
}

// ---------------------------------------------------------------- sampling
struct Sampled {
  std::vector<int64_t> ids;
  std::vector<uint32_t> logprob_bits;
  uint64_t status = latro::cuda::kStatusOk;
  bool operator==(const Sampled& o) const {
    return ids == o.ids && logprob_bits == o.logprob_bits && status == o.status;
  }
  float logprob(size_t i) const { return latro::bits_to_float(logprob_bits[i]); }
};

// `data`: where the kernel reads the logits (default: the matrix's own storage). `slices` > 1
// splits each row of plain sampling over that many blocks (latro::cuda::SamplePlan).
Sampled emulated_sample(const Matrix& logits, const std::vector<int64_t>& seeds,
                        bool per_row_seeds, int64_t offset, const Options& o,
                        const void* data = nullptr, bool only_forward = false,
                        int64_t slices = 1) {
  Draws out;
  uint64_t status = 0;
  latro::cuda::SamplePlan plan;
  plan.slices = slices;
  plan.workspace_bytes = slices > 1 ? logits.rows * slices * 64 : 0;  // >= a partial per block
  std::vector<unsigned char> workspace(static_cast<size_t>(plan.workspace_bytes));
  auto launch = [&] {
    latro::SampleArgs args = sample_args(logits, seeds, per_row_seeds, &offset, o, out);
    if (data != nullptr) args.logits = data;
    latro::cuda::reset_status(&status, nullptr);
    latro::cuda::sample(args, plan, workspace.data(), nullptr, &status);
  };
  auto collect = [&] { return Sampled{out.ids, bits_of(out.logprobs), status}; };
  return under_every_schedule(launch, collect, only_forward);
}

Draws cpu_sample(const Matrix& logits, const std::vector<int64_t>& seeds, bool per_row_seeds,
                 int64_t offset, const Options& o) {
  Draws out;
  latro::sample(sample_args(logits, seeds, per_row_seeds, &offset, o, out));
  return out;
}

// The kernels draw the CPU's ids: a row may differ only where the float64 reference cannot
// tell (a threshold or two Gumbel keys within rounding), and every id is one the reference
// allows, with the CPU's log-probability when the ids agree.
void expect_cpu_draws(const Matrix& logits, const std::vector<int64_t>& seeds, bool per_row_seeds,
                      int64_t offset, const Options& o, const void* data = nullptr,
                      bool only_forward = false, int64_t slices = 1) {
  const Sampled got =
      emulated_sample(logits, seeds, per_row_seeds, offset, o, data, only_forward, slices);
  const Draws want = cpu_sample(logits, seeds, per_row_seeds, offset, o);
  ASSERT_EQ(got.status, latro::cuda::kStatusOk) << options_str(o);
  for (int64_t r = 0; r < logits.rows; ++r) {
    const size_t i = static_cast<size_t>(r);
    SCOPED_TRACE("row " + std::to_string(r) + ", " + options_str(o));
    if (o.temperature == 0.0f) {
      EXPECT_EQ(got.ids[i], want.ids[i]);
      EXPECT_EQ(got.logprob(i), 0.0f);
      continue;
    }
    const KeptSet ks = reference_kept_set(row_values(logits, r), o);
    ASSERT_GE(got.ids[i], 0);
    ASSERT_LT(got.ids[i], logits.cols);
    EXPECT_TRUE(ks.allowed[static_cast<size_t>(got.ids[i])]) << "id " << got.ids[i];
    EXPECT_LE(got.logprob(i), 0.0f);
    if (got.ids[i] == want.ids[i]) {
      EXPECT_TRUE(close(got.logprob(i), want.logprobs[i], {1e-5, 1e-5}));
    } else {
      const uint64_t seed = static_cast<uint64_t>(per_row_seeds ? seeds[i] : seeds[0]);
      const uint32_t stream = per_row_seeds ? 0u : static_cast<uint32_t>(r);
      const bool decidable =
          ks.robust && reference_gumbel_draw(ks, seed, stream, static_cast<uint64_t>(offset)) >= 0;
      EXPECT_FALSE(decidable) << "id " << got.ids[i] << " where the CPU drew " << want.ids[i];
    }
  }
}

std::vector<Options> sampling_options() {
  std::vector<Options> options = filter_configs();
  options.push_back({0.0f, 0, 1.0f, 0.0f});  // greedy
  options.push_back({0.6f, 0, 1.0f, 0.0f});  // plain, temperature != 1
  return options;
}

class EmulatedSample : public ShapeTest {};

TEST_P(EmulatedSample, DrawsTheCpuIds) {
  std::mt19937 rng(static_cast<unsigned>(rows() * 31 + vocab() + static_cast<int>(dtype())));
  std::mt19937_64 seed_rng(7);
  const Matrix logits = random_logits_with_masked(dtype(), rows(), vocab(), vocab(), rng);
  for (const Options& o : sampling_options()) {
    expect_cpu_draws(logits, {1234}, false, 5, o);
    // The same kernels with other seeds: one schedule is enough.
    expect_cpu_draws(logits, random_seeds(rows(), seed_rng), true, 3, o, nullptr, true);
  }
}

// Plain sampling with each row split over several blocks: the ids of one block per row (and so
// the CPU's), log-probabilities within the rounding of the merge. Slices past the row's end
// (vocab < 64 x slices) are empty and change nothing.
TEST_P(EmulatedSample, SlicedRowsDrawTheSameIds) {
  std::mt19937 rng(static_cast<unsigned>(rows() * 7 + vocab() + static_cast<int>(dtype())));
  std::mt19937_64 seed_rng(9);
  const Matrix logits = random_logits_with_masked(dtype(), rows(), vocab(), vocab(), rng);
  const std::vector<int64_t> seeds = random_seeds(rows(), seed_rng);
  for (const Options& o : {Options{1.0f, 0, 1.0f, 0.0f}, Options{0.6f, 0, 1.0f, 0.0f}}) {
    const Sampled one = emulated_sample(logits, seeds, true, 3, o, nullptr, true);
    for (int64_t slices : {2, 3, 64}) {
      SCOPED_TRACE(std::to_string(slices) + " slices, " + options_str(o));
      const Sampled sliced = emulated_sample(logits, seeds, true, 3, o, nullptr, false, slices);
      EXPECT_EQ(sliced.ids, one.ids);
      EXPECT_EQ(sliced.status, one.status);
      for (size_t r = 0; r < one.ids.size(); ++r) {
        EXPECT_TRUE(close(sliced.logprob(r), one.logprob(r), {1e-6, 1e-6})) << "row " << r;
      }
      expect_cpu_draws(logits, seeds, true, 3, o, nullptr, true, slices);
    }
  }
}

TEST_P(EmulatedSample, RowsThatStartMisaligned) {
  // An odd stride and a copy of the logits one element past a 16-byte boundary: every row
  // starts misaligned, so the kernels take their scalar head and tail around the 16-byte
  // vectors. The padding is NaN: reading past a row fails the row.
  std::mt19937 rng(static_cast<unsigned>(vocab() + 17));
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab() + 3, rng, 2.0);
  const size_t element = logits.element_size();
  std::vector<unsigned char> shifted(logits.storage.size() + 16);
  std::memcpy(shifted.data() + element, logits.storage.data(), logits.storage.size());
  for (const Options& o : sampling_options()) {
    expect_cpu_draws(logits, {99}, false, 1, o, shifted.data() + element);
  }
  expect_cpu_draws(logits, {99}, false, 1, Options{}, shifted.data() + element, false, 3);
}

INSTANTIATE_TEST_SUITE_P(DTypesAndSizes, EmulatedSample,
                         ::testing::Combine(::testing::ValuesIn(all_dtypes()),
                                            ::testing::Values(1, 5),
                                            ::testing::Values(1, 7, 97, 1025, 5003)),
                         shape_name);

TEST(EmulatedSampleLarge, Llama3Vocabulary) {
  // 128,256 tokens: top-p's nucleus (thousands of tokens) is larger than shared memory, so the
  // draw's pass finds the threshold itself; top-k 40 fits and runs from shared memory.
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    std::mt19937 rng(2);
    const Matrix logits = random_matrix(dtype, 2, 128256, 128256, rng, 2.0);
    for (const Options& o : filter_configs()) expect_cpu_draws(logits, {11, 12}, true, 3, o);
    expect_cpu_draws(logits, {11, 12}, true, 3, Options{}, nullptr, true, 31);  // plain, sliced
  }
}

TEST(EmulatedSampleLarge, PeakedRows) {
  // Most tokens lie far below the best key, so the kernels skip their noise (latro/gumbel.h).
  std::mt19937 rng(23);
  const Matrix logits = random_matrix(DType::Float32, 3, 32000, 32000, rng, 9.0);
  // Top-p's nucleus then lies among the few tokens above the row prefix's max: one read.
  for (const Options& o : {Options{1.0f, 0, 1.0f, 0.0f}, Options{1.7f, 0, 1.0f, 0.0f},
                           Options{1.0f, 40, 1.0f, 0.0f}, Options{1.0f, 0, 0.9f, 0.0f},
                           Options{1.0f, 0, 1.0f, 0.1f}}) {
    expect_cpu_draws(logits, {1, 4, 7}, true, 2, o);
  }
}

TEST(EmulatedSampleLarge, TiesAndCrowdedBins) {
  // Thresholds among more than 2048 equal or near-equal logits: the refinement by the value's
  // bits; ties at a threshold are kept, as on the CPU.
  constexpr int64_t kVocab = 9000;
  std::mt19937 rng(11);
  std::normal_distribution<float> narrow(0.0f, 0.02f);
  for (const char* kind : {"equal", "narrow", "steps"}) {
    Matrix logits = random_matrix(DType::Float32, 3, kVocab, kVocab, rng);
    for (int64_t r = 0; r < 3; ++r) {
      for (int64_t c = 0; c < kVocab; ++c) {
        const float steps = static_cast<float>(((r * kVocab + c) * 7919) % 13) * 0.25f;
        logits.set(r, c, kind[0] == 'e' ? 1.0f : kind[0] == 'n' ? narrow(rng) : steps);
      }
    }
    SCOPED_TRACE(kind);
    for (const Options& o : {Options{1.0f, 100, 1.0f, 0.0f}, Options{1.0f, 0, 0.5f, 0.0f},
                             Options{1.0f, 4000, 0.7f, 0.0f}, Options{1.0f, 0, 0.3f, 0.5f}}) {
      expect_cpu_draws(logits, {5}, false, 1, o);
    }
  }
}

// An environment variable set for a scope, unset at its end (also when an assertion ends the
// test early, so that no later test runs with it).
class ScopedVariable {
 public:
  ScopedVariable(const char* name, const char* value) : name_(name) {
    EXPECT_EQ(setenv(name, value, 1), 0);
  }
  ~ScopedVariable() { unsetenv(name_); }
  ScopedVariable(const ScopedVariable&) = delete;
  ScopedVariable& operator=(const ScopedVariable&) = delete;

 private:
  const char* name_;
};

// With the filtered kernel's tuning variable `name` set to `value`, every filter configuration
// draws the CPU's ids from random float32 logits [rows, vocab].
void expect_cpu_draws_tuned(const char* name, const char* value, int64_t rows, int64_t vocab,
                            unsigned int seed, int64_t offset) {
  const ScopedVariable tuned(name, value);
  std::mt19937 rng(seed);
  const Matrix logits = random_matrix(DType::Float32, rows, vocab, vocab, rng, 2.0);
  std::mt19937_64 seed_rng(seed);
  for (const Options& o : filter_configs()) {
    expect_cpu_draws(logits, random_seeds(rows, seed_rng), true, offset, o);
  }
}

TEST(EmulatedSampleLarge, FewerBlocksThanRows) {
  // LATRO_CUDA_SAMPLE_GRID makes the filtered kernel's blocks loop over rows.
  expect_cpu_draws_tuned("LATRO_CUDA_SAMPLE_GRID", "3", 11, 3001, 17, 7);
}

TEST(EmulatedSampleLarge, L2PrefetchChangesNoDraw) {
  // LATRO_CUDA_SAMPLE_PREFETCH: the filtered passes prefetch a thread's vector that many
  // iterations ahead (here each byte prefetched is read, so ASan checks the bound), rows long
  // enough for several iterations, misaligned starts (row strides of an odd length) included;
  // 0 turns the default (2, every other test's) off.
  for (const char* ahead : {"3", "0"}) {
    SCOPED_TRACE(std::string("LATRO_CUDA_SAMPLE_PREFETCH=") + ahead);
    expect_cpu_draws_tuned("LATRO_CUDA_SAMPLE_PREFETCH", ahead, 4, 20011, 23, 2);
  }
}

TEST(EmulatedSampleLarge, PlainPrefetchAndWarmStartChangeNoDraw) {
  // LATRO_CUDA_SAMPLE_PLAIN_PREFETCH: the plain kernels' pass prefetches the same way (each
  // byte prefetched is read here, so ASan checks the bound); LATRO_CUDA_SAMPLE_PLAIN_WARM=0:
  // each thread starts its argmax from nothing instead of from the block's max and best key
  // after its first call (the default, which every other test runs: here with a prefetch).
  // Over whole rows (20,011 tokens share a start) and slices (5,056 tokens, too short to: the
  // first calls alone take 4,096), in every dtype, with misaligned row starts and temperatures
  // 1 and 0.7.
  const std::vector<std::pair<const char*, const char*>> settings = {
      {"3", "1"}, {"0", "0"}, {"2", "0"}};
  for (const auto& [prefetch, warm] : settings) {
    const ScopedVariable tuned("LATRO_CUDA_SAMPLE_PLAIN_PREFETCH", prefetch);
    const ScopedVariable started("LATRO_CUDA_SAMPLE_PLAIN_WARM", warm);
    for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16}) {
      SCOPED_TRACE(std::string(latro::dtype_name(dtype)) + ", prefetch " + prefetch +
                   ", warm start " + warm);
      std::mt19937 rng(41);
      const Matrix logits = random_matrix(dtype, 3, 20011, 20011 + 3, rng, 2.0);
      for (int64_t slices : {1, 4}) {
        SCOPED_TRACE(std::to_string(slices) + " slices");
        for (float temperature : {1.0f, 0.7f}) {
          expect_cpu_draws(logits, {3, 5, 8}, true, 2, Options{temperature, 0, 1.0f, 0.0f},
                           nullptr, false, slices);
        }
      }
    }
  }
}

TEST(EmulatedSampleLarge, WarmStartDrawsExactlyTheIdsOfAColdStart) {
  // The warm start only skips noise that cannot win, so with and without it the kernels draw
  // the same ids (not merely ids the float64 reference cannot tell apart) and log-probabilities
  // within rounding: whole rows and slices long enough for it in every dtype (the slices of
  // 40,009 logits over 4 blocks hold 10,048 tokens, more than twice the 4,096 of the threads'
  // first calls of eight), at temperatures 1 and 0.7, with misaligned row starts.
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16}) {
    std::mt19937 rng(53);
    const Matrix logits = random_matrix(dtype, 2, 40009, 40009 + 5, rng, 2.0);
    for (int64_t slices : {1, 4}) {
      for (float temperature : {1.0f, 0.7f}) {
        SCOPED_TRACE(std::string(latro::dtype_name(dtype)) + ", " + std::to_string(slices) +
                     " slices, temperature " + std::to_string(temperature));
        const Options o{temperature, 0, 1.0f, 0.0f};
        Sampled cold, warm;
        {
          const ScopedVariable started("LATRO_CUDA_SAMPLE_PLAIN_WARM", "0");
          cold = emulated_sample(logits, {5, 6}, true, 3, o, nullptr, false, slices);
        }
        warm = emulated_sample(logits, {5, 6}, true, 3, o, nullptr, false, slices);
        EXPECT_EQ(warm.status, latro::cuda::kStatusOk);
        EXPECT_EQ(warm.ids, cold.ids);
        for (size_t r = 0; r < 2; ++r) {
          EXPECT_TRUE(close(warm.logprob(r), cold.logprob(r), {1e-6, 1e-6})) << "row " << r;
        }
      }
    }
  }
}

TEST(EmulatedSampleLarge, WarmStartOverRowsWhoseFirstVectorsAreNotFinite) {
  // Rows long enough for the warm start (9,001 float32 logits: 4,096 in the threads' first
  // calls) whose start holds what the shared max and key must survive: all -inf (no max and
  // no key to share), the row's max with the winner far after it, a peak that wins at once, and
  // NaN or +inf in the start (the row fails as it would without the warm start).
  std::mt19937 rng(47);
  std::vector<std::vector<float>> rows = normal_rows(3, 9001, rng, 2.0f);
  std::fill(rows[0].begin(), rows[0].begin() + 4500, -kInfF);
  rows[1][7] = 9.0f;
  rows[2][3] = 40.0f;
  for (const char* warm : {"1", "0"}) {
    const ScopedVariable started("LATRO_CUDA_SAMPLE_PLAIN_WARM", warm);
    SCOPED_TRACE(std::string("warm start ") + warm);
    const Matrix logits = matrix_of_rows(DType::Float32, rows);
    for (int64_t offset : {0, 1, 2, 3}) {
      expect_cpu_draws(logits, {11, 12, 13}, true, offset, Options{}, nullptr);
    }
    std::vector<std::vector<float>> bad = rows;
    bad[1][100] = kNaNF;
    bad[2][50] = kInfF;
    const Sampled got = emulated_sample(matrix_of_rows(DType::Float32, bad), {3}, false, 0, {});
    EXPECT_EQ(latro::cuda::decode_status(got.status).row, 1);
    EXPECT_EQ(latro::cuda::decode_status(got.status).kind, latro::cuda::StatusKind::RowHasNaN);
    EXPECT_GE(got.ids[0], 4500);
    EXPECT_EQ(got.ids[1], -1);
    EXPECT_EQ(got.ids[2], -1);
    EXPECT_TRUE(std::isnan(got.logprob(2)));
  }
}

TEST(EmulatedSampleLarge, NonFiniteValuesInsideCallsFailRowsAsOnTheCpu) {
  // The plain kernels test a thread's call of eight tokens against the running max before its
  // tokens (a NaN fails that test, +inf passes it as a new max). Rows of 9,001 float32 logits
  // (aligned; long enough for the warm start): +inf in thread 1's first call and NaN in its
  // second (tokens 8 and 8 + 8 x 512; NaN decides), +inf alone, NaN alone, -inf over every
  // thread's first call then finite values. Each in a one-row batch, so the recorded failure is
  // that row's, whole or in slices, warm or cold.
  std::mt19937 rng(61);
  std::vector<std::vector<float>> rows = normal_rows(4, 9001, rng, 2.0f);
  rows[0][8] = kInfF;
  rows[0][8 + 8 * 512] = kNaNF;
  rows[1][601] = kInfF;
  rows[2][2050] = kNaNF;
  std::fill(rows[3].begin(), rows[3].begin() + 8 * 512, -kInfF);
  const latro::cuda::StatusKind want[3] = {latro::cuda::StatusKind::RowHasNaN,
                                          latro::cuda::StatusKind::RowHasPosInf,
                                          latro::cuda::StatusKind::RowHasNaN};
  for (const char* warm : {"1", "0"}) {
    const ScopedVariable started("LATRO_CUDA_SAMPLE_PLAIN_WARM", warm);
    for (int64_t slices : {1, 3}) {
      SCOPED_TRACE(std::string("warm start ") + warm + ", " + std::to_string(slices) + " slices");
      for (size_t r = 0; r < 3; ++r) {
        const Matrix one = matrix_of_rows(DType::Float32, {rows[r]});
        const Sampled got = emulated_sample(one, {3}, false, 0, {}, nullptr, false, slices);
        EXPECT_EQ(latro::cuda::decode_status(got.status).kind, want[r]) << "row " << r;
        EXPECT_EQ(got.ids[0], -1) << "row " << r;
      }
      expect_cpu_draws(matrix_of_rows(DType::Float32, {rows[3]}), {5}, false, 2, Options{},
                       nullptr, false, slices);
    }
  }
}

TEST(EmulatedSampleLarge, TopPAloneOnFlatRowsTakesTheSecondPass) {
  // Top-p alone on flat rows: pass 1 builds the mass histogram (relative to the row prefix's
  // max), and the nucleus ends in a bin that the second pass gathers while it draws over the
  // bins above it (every row here). Every dtype, a tight nucleus and a wide one.
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16}) {
    SCOPED_TRACE(latro::dtype_name(dtype));
    std::mt19937 rng(31);
    const Matrix logits = random_matrix(dtype, 4, 40009, 40009, rng, 2.0);
    for (const Options& o : {Options{1.0f, 0, 0.9f, 0.0f}, Options{0.7f, 0, 0.5f, 0.0f},
                             Options{1.0f, 0, 0.99f, 0.0f}}) {
      expect_cpu_draws(logits, {3, 5, 8, 13}, true, 4, o);
    }
  }
  // Rows whose rest is unlike their prefix: row 0's rest narrower (the row max in the prefix),
  // row 1's wider with more tokens near the top (hundreds above the prefix's max, held in
  // shared memory), row 2's shifted up (more tokens above the prefix's max than shared memory
  // holds: the general top-p path, a histogram pass of its own before the draw's), row 3 as
  // drawn.
  std::mt19937 rng(37);
  constexpr int64_t kVocab = 20011;
  Matrix logits = random_matrix(DType::Float32, 4, kVocab, kVocab, rng, 2.0);
  const int64_t prefix = (kVocab / 8) & ~int64_t{7};
  for (int64_t c = prefix; c < kVocab; ++c) {
    logits.set(0, c, static_cast<float>(logits.get(0, c) * 0.25));
    logits.set(1, c, static_cast<float>(logits.get(1, c) * 1.5 + 1.0));
    logits.set(2, c, static_cast<float>(logits.get(2, c) + 6.0));
  }
  expect_cpu_draws(logits, {3, 5, 8, 13}, true, 4, Options{1.0f, 0, 0.9f, 0.0f});
}

TEST(EmulatedSampleErrors, BadRowsGetMinusOneAndNaNAndTheFirstIsRecorded) {
  const float ninf = -kInfF;
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f, 3.0f},
                                                        {1.0f, kNaNF, 3.0f},
                                                        {ninf, ninf, ninf},
                                                        {1.0f, kInfF, 0.0f},
                                                        {0.5f, 0.25f, 0.0f}});
  for (const auto& [o, slices] : {std::pair{Options{}, int64_t{1}}, std::pair{Options{}, int64_t{2}},
                                  std::pair{Options{1.0f, 2, 0.9f, 0.1f}, int64_t{1}}}) {
    SCOPED_TRACE(options_str(o) + ", " + std::to_string(slices) + " slices");
    const Sampled got = emulated_sample(logits, {3}, false, 0, o, nullptr, false, slices);
    EXPECT_EQ(latro::cuda::decode_status(got.status).row, 1);
    EXPECT_EQ(latro::cuda::decode_status(got.status).kind, latro::cuda::StatusKind::RowHasNaN);
    for (size_t r : {size_t{1}, size_t{2}, size_t{3}}) {
      EXPECT_EQ(got.ids[r], -1) << "row " << r;
      EXPECT_TRUE(std::isnan(got.logprob(r))) << "row " << r;
    }
    EXPECT_GE(got.ids[0], 0);
    EXPECT_GE(got.ids[4], 0);
  }
  const Matrix no_finite = matrix_of_rows(DType::Float32, {{0.0f, 1.0f}, {ninf, ninf}});
  EXPECT_EQ(latro::cuda::decode_status(emulated_sample(no_finite, {3}, false, 0, {}).status).kind,
            latro::cuda::StatusKind::RowHasNoFinite);
  EXPECT_EQ(
      latro::cuda::decode_status(emulated_sample(no_finite, {3}, false, 0, {}, nullptr, false, 2).status)
          .kind,
      latro::cuda::StatusKind::RowHasNoFinite);
  for (int64_t slices : {1, 3}) {
    const Sampled negative = emulated_sample(logits, {3}, false, -1, {}, nullptr, false, slices);
    EXPECT_EQ(latro::cuda::decode_status(negative.status).kind,
              latro::cuda::StatusKind::NegativeOffset);
    for (int64_t id : negative.ids) EXPECT_EQ(id, -1);
  }
}

TEST(EmulatedSamplePlan, SlicesFillTheDeviceForPlainSamplingOnly) {
  std::mt19937 rng(4);
  const Matrix logits = random_matrix(DType::Float32, 64, 128256, 128256, rng);
  std::vector<int64_t> seeds = {1};
  int64_t offset = 0;
  Draws out;
  latro::SampleArgs args = sample_args(logits, seeds, false, &offset, {}, out);
  // 64 rows on 132 SMs: 264 / 64 = 4 slices; the workspace holds a partial per block.
  latro::cuda::SamplePlan plan = latro::cuda::plan_sample(args, 132);
  EXPECT_EQ(plan.slices, 4);
  EXPECT_EQ(plan.workspace_bytes, 64 * 4 * 32);  // 32-byte partials (max, flag, sum, best)
  args.rows = 300;  // more rows than two blocks per SM: one block per row
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 1);
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).workspace_bytes, 0);
  args.rows = 1;  // at most 64 slices, each of at least 4,096 tokens
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 31);
  args.vocab = 5000;
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 1);
  args.vocab = 128256 * 4;
  args.row_stride = args.vocab;
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 64);
  args = sample_args(logits, seeds, false, &offset, Options{1.0f, 40, 1.0f, 0.0f}, out);
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 1);  // filters: one block per row
  args = sample_args(logits, seeds, false, &offset, Options{0.0f, 0, 1.0f, 0.0f}, out);
  EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 1);  // greedy
  args = sample_args(logits, seeds, false, &offset, {}, out);
  {
    const ScopedVariable chosen("LATRO_CUDA_SAMPLE_SLICES", "7");
    EXPECT_EQ(latro::cuda::plan_sample(args, 132).slices, 7);
  }
  {
    const ScopedVariable bad("LATRO_CUDA_SAMPLE_SLICES", "65");
    EXPECT_LATRO_ERROR(latro::cuda::plan_sample(args, 132),
                       "LATRO_CUDA_SAMPLE_SLICES must be an integer in [0, 64], got '65'");
    latro::SampleArgs filtered = sample_args(logits, seeds, false, &offset,
                                             Options{1.0f, 40, 1.0f, 0.0f}, out);
    EXPECT_LATRO_ERROR(latro::cuda::plan_sample(filtered, 132),  // read for any sampling
                       "LATRO_CUDA_SAMPLE_SLICES must be an integer");
  }
  {
    const ScopedVariable many("LATRO_CUDA_SAMPLE_SLICES", "64");
    latro::SampleArgs tall = args;  // 2^30 rows: the grid holds one slice per row
    tall.rows = int64_t{1} << 30;
    EXPECT_EQ(latro::cuda::plan_sample(tall, 132).slices, 1);
  }
  EXPECT_LATRO_ERROR(latro::cuda::plan_sample(args, 0), "multiprocessors must be >= 1");
}

TEST(EmulatedSamplePlan, APlanThatDoesNotFitIsAnError) {
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f}, {3.0f, 4.0f}});
  std::vector<int64_t> seeds = {1};
  int64_t offset = 0;
  Draws out;
  std::vector<unsigned char> workspace(4096);
  latro::SampleArgs args = sample_args(logits, seeds, false, &offset, {}, out);
  latro::cuda::SamplePlan plan{2, 8};
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, plan, workspace.data(), nullptr),
                     "plan.workspace_bytes = 8 is below the");
  plan.workspace_bytes = 4096;
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, plan, nullptr, nullptr), "workspace is a null");
  for (int64_t slices : {0, 65}) {
    EXPECT_LATRO_ERROR(latro::cuda::sample(args, {slices, 4096}, workspace.data(), nullptr),
                       "plan.slices must be in [1, 64]");
  }
  args = sample_args(logits, seeds, false, &offset, Options{1.0f, 1, 1.0f, 0.0f}, out);
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, plan, workspace.data(), nullptr),
                     "splits rows of plain temperature sampling only");
}

TEST(EmulatedSampleErrors, HostVisibleMistakesThrowLikeTheCpu) {
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f}});
  std::vector<int64_t> seeds = {1};
  int64_t offset = 0;
  Draws out;
  latro::SampleArgs args = sample_args(logits, seeds, false, &offset, {}, out);
  args.top_p = 1.5f;
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, nullptr), "top_p");
  args = sample_args(logits, seeds, false, &offset, {}, out);
  args.ids = nullptr;
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, nullptr), "ids");
}

TEST(EmulatedSampleErrors, MalformedTuningVariablesAreErrorsNamingThem) {
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f}});
  std::vector<int64_t> seeds = {1};
  int64_t offset = 0;
  Draws out;
  Options filtered;
  filtered.top_k = 1;
  const latro::SampleArgs args = sample_args(logits, seeds, false, &offset, filtered, out);
  for (const char* name : {"LATRO_CUDA_SAMPLE_PREFETCH", "LATRO_CUDA_SAMPLE_PLAIN_PREFETCH",
                           "LATRO_CUDA_SAMPLE_PLAIN_WARM", "LATRO_CUDA_SAMPLE_GRID"}) {
    for (const char* bad : {"4abc", "-1", "99999999999999999999"}) {
      const ScopedVariable tuned(name, bad);
      EXPECT_LATRO_ERROR(latro::cuda::sample(args, nullptr),
                         std::string(name) + " must be an integer in [0, ");
    }
    const ScopedVariable empty(name, "");  // empty: as unset
    latro::cuda::sample(args, nullptr);
  }
  const ScopedVariable too_far("LATRO_CUDA_SAMPLE_PREFETCH", "65");
  EXPECT_LATRO_ERROR(latro::cuda::sample(args, nullptr), "[0, 64], got '65'");
}

// ---------------------------------------------------------------- token log-probabilities
struct Scored {
  std::vector<uint32_t> logprobs, lse;
  uint64_t status = latro::cuda::kStatusOk;
  bool operator==(const Scored& o) const {
    return logprobs == o.logprobs && lse == o.lse && status == o.status;
  }
};

class EmulatedTokenLogprobs : public ShapeTest {};

// The backward kernel against the CPU's for these logits, the forward's lse and an upstream
// gradient, under every schedule; the gradients within the dtype's rounding.
void expect_backward_matches_the_cpu(const Matrix& logits, const std::vector<int64_t>& targets,
                                     const std::vector<float>& lse,
                                     const std::vector<float>& upstream) {
  latro::TokenLogprobsBackwardArgs back;
  back.logits = logits.data();
  back.dtype = logits.dtype;
  back.rows = logits.rows;
  back.vocab = logits.cols;
  back.row_stride = logits.stride;
  back.targets = targets.data();
  back.lse = lse.data();
  back.grad_logprobs = upstream.data();
  Matrix cpu_grad = logits, grad = logits;
  back.grad_logits = cpu_grad.data();
  back.grad_row_stride = logits.stride;
  latro::token_logprobs_backward(back);
  back.grad_logits = grad.data();
  under_every_schedule([&] { latro::cuda::token_logprobs_backward(back, nullptr); },
                       [&] { return grad.storage; });
  EXPECT_TRUE(
      all_close(matrix_values(grad), matrix_values(cpu_grad), stored_tolerance(logits.dtype)));
}

TEST_P(EmulatedTokenLogprobs, ForwardAndBackwardMatchTheCpu) {
  std::mt19937 rng(static_cast<unsigned>(rows() * 7 + vocab()));
  const Matrix logits = random_matrix(dtype(), rows(), vocab(), vocab() + 1, rng);
  const auto targets = random_targets(rows(), vocab(), rng, kIgnore, /*with_ignored=*/true);
  std::vector<float> upstream(static_cast<size_t>(rows()));
  std::normal_distribution<float> normal;
  for (auto& u : upstream) u = normal(rng);

  std::vector<float> cpu_logp(targets.size()), cpu_lse(targets.size());
  latro::token_logprobs(forward_args(logits, targets, cpu_logp, &cpu_lse));

  std::vector<float> logp(targets.size()), lse(targets.size());
  uint64_t status = 0;
  const latro::TokenLogprobsArgs args = forward_args(logits, targets, logp, &lse);
  const Scored got = under_every_schedule(
      [&] {
        latro::cuda::reset_status(&status, nullptr);
        latro::cuda::token_logprobs(args, nullptr, &status);
      },
      [&] { return Scored{bits_of(logp), bits_of(lse), status}; });
  EXPECT_EQ(got.status, latro::cuda::kStatusOk);
  EXPECT_TRUE(all_close(to_double(logp), to_double(cpu_logp), float32_result_tolerance()));
  EXPECT_TRUE(all_close(to_double(lse), to_double(cpu_lse), float32_result_tolerance()));

  expect_backward_matches_the_cpu(logits, targets, cpu_lse, upstream);
}

// Rows with NaN and infinities (the cases of test_token_logprobs.cpp's FollowsLogSoftmax, in
// rows longer than a block's stride so the reductions combine them across threads): forward
// and backward give the CPU's NaN, infinities and values.
TEST(EmulatedTokenLogprobs, NonFiniteRowsAsOnTheCpu) {
  std::mt19937 rng(41);
  std::vector<std::vector<float>> values = normal_rows(8, 1301, rng);
  const std::vector<int64_t> targets = {2, 0, 3, 1000, 1, 3, 4, 900};
  values[0][700] = kNaNF;                                 // NaN elsewhere: NaN
  values[1][0] = -kInfF;                                  // -inf at the target: -inf
  std::fill(values[2].begin(), values[2].end(), -kInfF);  // all -inf: NaN
  std::fill(values[3].begin(), values[3].end(), -kInfF);  // only the target finite: 0
  values[3][1000] = 3.0f;
  values[4][1] = kInfF;     // +inf at the target: NaN
  values[5][1200] = kInfF;  // +inf elsewhere: NaN or -inf
  values[6][1100] = -kInfF;  // -inf elsewhere: as if absent
  values[7][900] = kNaNF;   // NaN at the target
  for (DType dtype : all_dtypes()) {
    SCOPED_TRACE(dtype_str(dtype));
    const Matrix logits = matrix_of_rows(dtype, values);
    const size_t n = targets.size();
    std::vector<float> cpu_logp(n), cpu_lse(n), logp(n), lse(n);
    latro::token_logprobs(forward_args(logits, targets, cpu_logp, &cpu_lse));
    under_every_schedule(
        [&] { latro::cuda::token_logprobs(forward_args(logits, targets, logp, &lse), nullptr); },
        [&] { return std::make_pair(bits_of(logp), bits_of(lse)); });
    EXPECT_TRUE(std::isnan(cpu_logp[0]) && cpu_logp[1] == -kInfF && cpu_logp[3] == 0.0f);
    EXPECT_TRUE(all_close(to_double(logp), to_double(cpu_logp), float32_result_tolerance()));
    EXPECT_TRUE(all_close(to_double(lse), to_double(cpu_lse), float32_result_tolerance()));
    expect_backward_matches_the_cpu(logits, targets, cpu_lse, std::vector<float>(n, 0.75f));
  }
}

// LATRO_CUDA_LOGPROBS_VECTORS sets the threads per row (16-byte vectors a thread): for these
// rows of 20,011 logits, 1 and 8 (unset: 0) give 512 threads to float32 and 512 / 256 to
// bfloat16, 16 gives 256 / 128, 32 gives 128 / 64, 64 the minimum of 64 (each thread loops).
// Every mapping scores as the CPU does, forward and backward under every schedule, on rows
// that start misaligned and with ignored targets; a value outside [0, 64] is an error naming
// the variable.
TEST(EmulatedTokenLogprobs, ThreadsPerRowFromTheTuningVariable) {
  std::mt19937 rng(43);
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(dtype_str(dtype));
    const Matrix logits = random_matrix(dtype, 3, 20011, 20011 + 3, rng);
    const auto targets = random_targets(3, 20011, rng, kIgnore, /*with_ignored=*/true);
    std::vector<float> cpu_logp(3), cpu_lse(3);
    latro::token_logprobs(forward_args(logits, targets, cpu_logp, &cpu_lse));
    for (const char* vectors : {"1", "0", "16", "32", "64"}) {
      SCOPED_TRACE(std::string("LATRO_CUDA_LOGPROBS_VECTORS=") + vectors);
      const ScopedVariable tuned("LATRO_CUDA_LOGPROBS_VECTORS", vectors);
      std::vector<float> logp(3), lse(3);
      under_every_schedule(
          [&] { latro::cuda::token_logprobs(forward_args(logits, targets, logp, &lse), nullptr); },
          [&] { return std::make_pair(bits_of(logp), bits_of(lse)); });
      EXPECT_TRUE(all_close(to_double(logp), to_double(cpu_logp), float32_result_tolerance()));
      EXPECT_TRUE(all_close(to_double(lse), to_double(cpu_lse), float32_result_tolerance()));
      expect_backward_matches_the_cpu(logits, targets, cpu_lse, {0.5f, -1.0f, 2.0f});
    }
  }
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f}});
  const std::vector<int64_t> targets = {1};
  std::vector<float> logp(1);
  for (const char* bad : {"65", "-1", "8x"}) {
    const ScopedVariable tuned("LATRO_CUDA_LOGPROBS_VECTORS", bad);
    EXPECT_LATRO_ERROR(
        latro::cuda::token_logprobs(forward_args(logits, targets, logp, nullptr), nullptr),
        "LATRO_CUDA_LOGPROBS_VECTORS must be an integer in [0, 64], got '");
  }
}

TEST(EmulatedTokenLogprobsErrors, TargetOutOfRangeIsNaNAndRecorded) {
  const Matrix logits = matrix_of_rows(DType::Float32, {{1.0f, 2.0f}, {0.0f, 0.0f}, {3.0f, 1.0f}});
  const std::vector<int64_t> targets = {1, 2, -5};
  std::vector<float> logp(3);
  uint64_t status = 0;
  latro::TokenLogprobsArgs args;
  args.logits = logits.data();
  args.rows = 3;
  args.vocab = 2;
  args.targets = targets.data();
  args.logprobs = logp.data();
  latro::cuda::reset_status(&status, nullptr);
  latro::cuda::token_logprobs(args, nullptr, &status);
  const latro::cuda::StatusRecord record = latro::cuda::decode_status(status);
  EXPECT_EQ(record.kind, latro::cuda::StatusKind::TargetOutOfRange);
  EXPECT_EQ(record.row, 1);
  EXPECT_TRUE(close(logp[0], std::log(1.0 / (1.0 + std::exp(-1.0))), {1e-6, 1e-6}));
  EXPECT_TRUE(std::isnan(logp[1]));
  EXPECT_TRUE(std::isnan(logp[2]));
}

INSTANTIATE_TEST_SUITE_P(DTypesAndSizes, EmulatedTokenLogprobs,
                         ::testing::Combine(::testing::ValuesIn(all_dtypes()),
                                            ::testing::Values(1, 6),
                                            ::testing::Values(1, 7, 1025, 32011)),
                         shape_name);

// ---------------------------------------------------------------- stops, rewards, advantages
// Rows of the stop tests: kStopRows x kStopLen tokens in rows of kStopStride.
constexpr int64_t kStopRows = 37, kStopLen = 61, kStopStride = 64;

// The whole-row and step forms against the CPU on `tokens`, at two starts.
void expect_stops_match_the_cpu(const std::vector<int64_t>& tokens,
                                const std::vector<int64_t>& stop_tokens,
                                const std::vector<int64_t>& offsets) {
  const latro::StopSequences stops{stop_tokens.data(), offsets.data(),
                                   static_cast<int64_t>(offsets.size()) - 1,
                                   static_cast<int64_t>(stop_tokens.size())};
  for (int64_t start : {int64_t{0}, int64_t{9}}) {
    std::vector<int64_t> want(kStopRows), got(kStopRows);
    latro::stop_positions(tokens.data(), kStopRows, kStopLen, kStopStride, stops, start,
                          want.data());
    under_every_schedule(
        [&] {
          latro::cuda::stop_positions(tokens.data(), kStopRows, kStopLen, kStopStride, stops,
                                      start, got.data(), nullptr);
        },
        [&] { return got; });
    EXPECT_EQ(got, want) << "start " << start;
    // The incremental form, step by step, ends at the same positions.
    std::vector<int64_t> positions(kStopRows, kStopLen), cpu_positions(kStopRows, kStopLen);
    uint64_t status = latro::cuda::kStatusOk;
    for (int64_t step = start; step < kStopLen; ++step) {
      latro::stop_positions_step(tokens.data(), kStopRows, kStopLen, kStopStride, stops, step,
                                 start, cpu_positions.data(), cpu_positions.data());
      const std::vector<int64_t> before = positions;
      under_every_schedule(
          [&] {
            positions = before;
            latro::cuda::stop_positions_step(tokens.data(), kStopRows, kStopLen, kStopStride,
                                             stops, &step, start, positions.data(),
                                             positions.data(), nullptr, &status);
          },
          [&] { return positions; });
      ASSERT_EQ(positions, cpu_positions) << "step " << step;
    }
    // (Not always `want`: a row stops where a sequence is first completed, which may begin
    // after another that completes later; test_stop.cpp covers the CPU's two forms.)
    EXPECT_EQ(status, latro::cuda::kStatusOk);
  }
}

TEST(EmulatedStops, MatchTheCpuOnRandomTokens) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int64_t> token(0, 4);
  std::vector<int64_t> tokens(static_cast<size_t>(kStopRows * kStopStride));
  for (auto& t : tokens) t = token(rng);
  expect_stops_match_the_cpu(tokens, {1, 2, 3, 4, 4, 0, 2, 2, 2}, {0, 3, 5, 6, 9});
}

// More sequences than a warp has lanes: the step kernel tries them 32 at a time, and where
// several end at the same step the first in table order must win, whichever round and lane
// finds it. Every fifth sequence is the last three tokens of the one before (later in the same
// or the next round), and from the 40th on every fifth one extends an entry 40 places earlier
// (an earlier round) by a token in front; each wins with another start than its rival. Rows are
// random tokens with whole stop sequences spliced in, so those coincidences happen often.
TEST(EmulatedStops, ManySequencesMatchTheCpu) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int64_t> token(0, 9);
  std::vector<std::vector<int64_t>> table;
  for (int i = 0; i < 100; ++i) {
    if (i % 5 == 4) {
      table.emplace_back(table.back().end() - 3, table.back().end());
    } else if (i >= 40 && i % 5 == 3) {
      std::vector<int64_t> longer = {token(rng)};
      longer.insert(longer.end(), table[static_cast<size_t>(i - 40)].begin(),
                    table[static_cast<size_t>(i - 40)].end());
      table.push_back(longer);
    } else {
      table.push_back({token(rng), token(rng), token(rng), token(rng)});
    }
  }
  std::vector<int64_t> stop_tokens, offsets = {0};
  for (const auto& sequence : table) {
    stop_tokens.insert(stop_tokens.end(), sequence.begin(), sequence.end());
    offsets.push_back(static_cast<int64_t>(stop_tokens.size()));
  }
  std::vector<int64_t> tokens(static_cast<size_t>(kStopRows * kStopStride));
  std::uniform_int_distribution<size_t> pick(0, table.size() - 1);
  std::bernoulli_distribution splice(0.05);
  for (int64_t r = 0; r < kStopRows; ++r) {
    for (int64_t i = 0; i < kStopStride;) {
      const std::vector<int64_t> piece =
          splice(rng) ? table[pick(rng)] : std::vector<int64_t>{token(rng)};
      for (size_t j = 0; j < piece.size() && i < kStopStride; ++j, ++i) {
        tokens[static_cast<size_t>(r * kStopStride + i)] = piece[j];
      }
    }
  }
  expect_stops_match_the_cpu(tokens, stop_tokens, offsets);
}

// A table whose offsets stop increasing past the first warp's worth: the step kernel reports
// it and leaves every position as it was.
TEST(EmulatedStops, StepReportsABadTableFoundByAnyLane) {
  constexpr int64_t kRows = 5, kLen = 8;
  std::vector<int64_t> tokens(kRows * kLen, 1), stop_tokens(40, 1), offsets(41);
  for (int64_t i = 0; i <= 40; ++i) offsets[static_cast<size_t>(i)] = i;
  offsets[35] = offsets[34];  // sequence 34 is empty
  const latro::StopSequences stops{stop_tokens.data(), offsets.data(), 40, 40};
  const int64_t step = 3;
  std::vector<int64_t> positions = {kLen, 2, kLen, kLen, 0};
  const std::vector<int64_t> before = positions;
  uint64_t status = latro::cuda::kStatusOk;
  latro::cuda::stop_positions_step(tokens.data(), kRows, kLen, kLen, stops, &step, 0,
                                   positions.data(), positions.data(), nullptr, &status);
  EXPECT_EQ(positions, before);
  EXPECT_EQ(latro::cuda::decode_status(status).kind, latro::cuda::StatusKind::BadStopTable);
  // The same table whole stops rows at the first 1 (sequence 0 is the single token 1).
  offsets[35] = 35;
  status = latro::cuda::kStatusOk;
  latro::cuda::stop_positions_step(tokens.data(), kRows, kLen, kLen, stops, &step, 0,
                                   positions.data(), positions.data(), nullptr, &status);
  EXPECT_EQ(status, latro::cuda::kStatusOk);
  EXPECT_EQ(positions, (std::vector<int64_t>{3, 2, 3, 3, 0}));
}

// The whole-row kernel checks the table once per block: every kind of bad table (a repeated
// offset past the first warp's worth, a first offset other than 0, a last one other than the
// token count) is recorded and stops no row, under every schedule; the good table stops rows
// at their first 1.
TEST(EmulatedStops, WholeRowsReportABadTableAndStopNone) {
  constexpr int64_t kRows = 5, kLen = 8;
  std::vector<int64_t> tokens(kRows * kLen, 0), stop_tokens(40, 1), offsets(41);
  for (int64_t r = 0; r < kRows; ++r) tokens[static_cast<size_t>(r * kLen + r + 1)] = 1;
  for (int64_t i = 0; i <= 40; ++i) offsets[static_cast<size_t>(i)] = i;
  latro::StopSequences stops{stop_tokens.data(), offsets.data(), 40, 40};
  auto run = [&](int64_t token_count, uint64_t* status) {
    std::vector<int64_t> out(kRows, -7);
    stops.token_count = token_count;
    under_every_schedule(
        [&] {
          latro::cuda::stop_positions(tokens.data(), kRows, kLen, kLen, stops, 0, out.data(),
                                      nullptr, status);
        },
        [&] { return out; });
    return out;
  };
  uint64_t status = latro::cuda::kStatusOk;
  EXPECT_EQ(run(40, &status), (std::vector<int64_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(status, latro::cuda::kStatusOk);
  const std::vector<int64_t> none(kRows, kLen);
  for (int bad = 0; bad < 3; ++bad) {
    SCOPED_TRACE("bad table " + std::to_string(bad));
    std::vector<int64_t> saved = offsets;
    int64_t count = 40;
    if (bad == 0) offsets[35] = offsets[34];
    if (bad == 1) offsets[0] = 1;
    if (bad == 2) count = 39;
    status = latro::cuda::kStatusOk;
    EXPECT_EQ(run(count, &status), none);
    EXPECT_EQ(latro::cuda::decode_status(status).kind, latro::cuda::StatusKind::BadStopTable);
    std::copy(saved.begin(), saved.end(), offsets.begin());  // (stops points into it)
  }
  // A table of no sequences (stops no row): good with no tokens and offsets {0} or none, bad
  // otherwise.
  for (int bad = 0; bad < 4; ++bad) {
    SCOPED_TRACE("table of no sequences " + std::to_string(bad));
    std::vector<int64_t> out(kRows, -7);
    const std::vector<int64_t> first_offset{bad == 2 ? 3 : 0};
    const latro::StopSequences empty{stop_tokens.data(), bad == 3 ? nullptr : first_offset.data(),
                                     0, bad == 1 ? 2 : 0};
    status = latro::cuda::kStatusOk;
    latro::cuda::stop_positions(tokens.data(), kRows, kLen, kLen, empty, 0, out.data(), nullptr,
                                &status);
    const bool good = bad == 0 || bad == 3;
    EXPECT_EQ(out, none);
    EXPECT_EQ(latro::cuda::decode_status(status).kind,
              good ? latro::cuda::StatusKind::Ok : latro::cuda::StatusKind::BadStopTable);
  }
}

TEST(EmulatedAdvantages, RlooAndRewardsEqualTheCpuBitForBit) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t k : {int64_t{2}, int64_t{3}, int64_t{16}}) {
    const int64_t groups = 37, n = groups * k;
    std::vector<float> answer(n), rationale(n), ref(n), cpu_out(n), out(n);
    std::unique_ptr<bool[]> finished(new bool[static_cast<size_t>(n)]);
    for (int64_t i = 0; i < n; ++i) {
      answer[i] = normal(rng);
      rationale[i] = normal(rng);
      ref[i] = normal(rng);
      finished[i] = (i % 5) != 0;
    }
    latro::rloo_advantages(answer.data(), groups, k, cpu_out.data());
    under_every_schedule(
        [&] { latro::cuda::rloo_advantages(answer.data(), groups, k, out.data(), nullptr); },
        [&] { return bits_of(out); });
    EXPECT_EQ(bits_of(out), bits_of(cpu_out)) << "k " << k;
    for (auto mode : {latro::PenaltyMode::Constant, latro::PenaltyMode::BatchMean}) {
      latro::latro_rewards(answer.data(), rationale.data(), ref.data(), finished.get(), n, 0.05f,
                           -10.0f, mode, cpu_out.data());
      under_every_schedule(
          [&] {
            latro::cuda::latro_rewards(answer.data(), rationale.data(), ref.data(),
                                       finished.get(), n, 0.05f, -10.0f, mode, out.data(),
                                       nullptr);
          },
          [&] { return bits_of(out); });
      EXPECT_TRUE(all_close(to_double(out), to_double(cpu_out), float32_result_tolerance()))
          << "k " << k << ", mode " << static_cast<int>(mode);
    }
  }
}

// ---------------------------------------------------------------- argument sizes
// Sizes past any memory (huge_sizes.h): the CUDA entry points refuse them as the CPU ones do,
// naming the argument, before any launch.
TEST(EmulatedArgumentSizes, PastAnyMemoryAreRefusedNamingTheArgument) {
  HugeSizes h;
  EXPECT_LATRO_ERROR(latro::cuda::token_logprobs(h.token_logprobs(), nullptr),
                     "logits is too large");
  EXPECT_LATRO_ERROR(latro::cuda::token_logprobs_backward(h.token_logprobs_backward(), nullptr),
                     "logits is too large");
  EXPECT_LATRO_ERROR(latro::cuda::sample(h.sample(), nullptr), "logits is too large");
  EXPECT_LATRO_ERROR(latro::cuda::plan_decode_attention(h.decode_attention(true), 132),
                     "cache_k is too large");
  EXPECT_LATRO_ERROR(latro::cuda::plan_decode_attention(h.decode_attention(false), 132),
                     "a cache row is too large");
  EXPECT_LATRO_ERROR(latro::cuda::rms_norm(h.rms_norm(), nullptr), "x is too large");
  const latro::StopSequences none;
  const int64_t step = 0;
  EXPECT_LATRO_ERROR(latro::cuda::stop_positions(h.ints(), HugeSizes::kHuge, HugeSizes::kHuge,
                                                 HugeSizes::kHuge, none, 0, h.ints(), nullptr),
                     "tokens is too large");
  EXPECT_LATRO_ERROR(
      latro::cuda::stop_positions_step(h.ints(), HugeSizes::kHuge, HugeSizes::kHuge,
                                       HugeSizes::kHuge, none, &step, 0, h.ints(), h.ints(),
                                       nullptr),
      "tokens is too large");
  EXPECT_LATRO_ERROR(latro::cuda::rloo_advantages(h.floats(), HugeSizes::kHuge, HugeSizes::kHuge,
                                                  h.floats(), nullptr),
                     "rewards is too large");
}

// ---------------------------------------------------------------- decode attention
class EmulatedDecodeAttention : public ::testing::TestWithParam<AttentionShape> {};

// The kernel against the CPU function and the float64 reference, with one block per (row, KV
// head) (one multiprocessor) and with the slots split over blocks (132 of them: the combine
// kernel); the caches must end bit for bit as the CPU leaves them.
void expect_emulated_attention_matches(const AttentionCase& c) {
  Matrix cpu_k = c.cache_k, cpu_v = c.cache_v, cpu_out = c.output();
  latro::decode_attention(c.args(cpu_k, cpu_v, cpu_out));
  const std::vector<double> want = c.reference();
  for (int multiprocessors : {1, 132}) {
    Matrix k = c.cache_k, v = c.cache_v, out = c.output();
    const latro::DecodeAttentionArgs args = c.args(k, v, out);
    const latro::cuda::DecodeAttentionPlan plan =
        latro::cuda::plan_decode_attention(args, multiprocessors);
    std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats));
    under_every_schedule(
        [&] {
          k = c.cache_k;
          v = c.cache_v;
          latro::cuda::decode_attention(args, plan, workspace.data(), nullptr);
        },
        [&] { return out.storage; });
    SCOPED_TRACE("splits " + std::to_string(plan.splits));
    if (multiprocessors == 1) {
      EXPECT_EQ(plan.splits, (c.shape.slots + 1023) / 1024);
    } else if (c.shape.rows * c.shape.kv_heads < 132 && c.shape.slots >= 128) {
      EXPECT_GT(plan.splits, 1);
    }
    const Tolerance tol = attention_tolerance(c.shape.dtype);
    EXPECT_TRUE(all_close(matrix_values(out), want, tol));
    EXPECT_TRUE(all_close(matrix_values(out), matrix_values(cpu_out), tol));
    EXPECT_TRUE(k.storage == cpu_k.storage && v.storage == cpu_v.storage);
  }
}

TEST_P(EmulatedDecodeAttention, MatchesTheCpuAndTheReference) {
  std::mt19937 rng(23);
  expect_emulated_attention_matches(AttentionCase(GetParam(), rng));
}

// NaN and infinity where the op reads them (put_non_finite_inputs): the kernels give the NaN
// and infinite outputs of the CPU and the reference, with and without split slots (fmaxf passes
// a NaN score over, so the kernels must not take a NaN sum for "no allowed slot").
TEST_P(EmulatedDecodeAttention, NonFiniteInputsGiveTheCpusNaNAndInfinity) {
  std::mt19937 rng(24);
  AttentionCase c(GetParam(), rng);
  put_non_finite_inputs(c);
  expect_emulated_attention_matches(c);
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmulatedDecodeAttention, ::testing::ValuesIn(attention_shapes()),
                         attention_name);

TEST(EmulatedDecodeAttentionErrors, LengthOutOfRangeIsNaNAndRecorded) {
  std::mt19937 rng(29);
  const AttentionCase c({DType::BFloat16, 2, 4, 2, 90, 16, 40, true, false}, rng);
  for (int multiprocessors : {1, 132}) {
    for (int64_t bad : {int64_t{0}, int64_t{91}}) {
      Matrix k = c.cache_k, v = c.cache_v, out = c.output();
      latro::DecodeAttentionArgs args = c.args(k, v, out);
      args.length = &bad;
      const auto plan = latro::cuda::plan_decode_attention(args, multiprocessors);
      std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats));
      uint64_t status = 0;
      latro::cuda::reset_status(&status, nullptr);
      latro::cuda::decode_attention(args, plan, workspace.data(), nullptr, &status);
      const latro::cuda::StatusRecord record = latro::cuda::read_status(&status, nullptr);
      EXPECT_EQ(record.kind, latro::cuda::StatusKind::LengthOutOfRange);
      EXPECT_EQ(record.row, -1);
      for (double x : matrix_values(out)) ASSERT_TRUE(std::isnan(x));
      EXPECT_TRUE(k.storage == c.cache_k.storage && v.storage == c.cache_v.storage);
    }
  }
}

TEST(EmulatedDecodeAttentionErrors, HostVisibleMistakesThrowLikeTheCpu) {
  std::mt19937 rng(31);
  const AttentionCase c({DType::Float32, 2, 4, 2, 2100, 8, 5, false, false}, rng);
  Matrix k = c.cache_k, v = c.cache_v, out = c.output();
  latro::DecodeAttentionArgs args = c.args(k, v, out);
  args.head_dim = 300;
  EXPECT_LATRO_ERROR(latro::cuda::plan_decode_attention(args, 4), "head_dim must be in [1, 256]");
  args = c.args(k, v, out);
  latro::cuda::DecodeAttentionPlan plan = latro::cuda::plan_decode_attention(args, 1);
  EXPECT_EQ(plan.splits, 3);  // 2,100 slots need three blocks of at most 1,024
  std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats));
  plan.splits = 2;
  EXPECT_LATRO_ERROR(latro::cuda::decode_attention(args, plan, workspace.data(), nullptr),
                     "plan.splits = 2 is below the 3");
  plan = latro::cuda::plan_decode_attention(args, 1);
  EXPECT_LATRO_ERROR(latro::cuda::decode_attention(args, plan, nullptr, nullptr), "workspace");
  plan.workspace_floats -= 1;
  EXPECT_LATRO_ERROR(latro::cuda::decode_attention(args, plan, workspace.data(), nullptr),
                     "plan.workspace_floats");
  EXPECT_LATRO_ERROR(latro::cuda::plan_decode_attention(args, 0), "multiprocessors");
}

// ---------------------------------------------------------------- RMSNorm
class EmulatedRmsNorm : public ::testing::TestWithParam<NormShape> {};

TEST_P(EmulatedRmsNorm, MatchesTheCpuAndTheReference) {
  std::mt19937 rng(47);
  const NormCase c(GetParam(), rng);
  Matrix cpu_out = c.blank(), cpu_sum = c.blank(), out = c.blank(), sum = c.blank();
  latro::rms_norm(c.args(cpu_out, cpu_sum));
  under_every_schedule([&] { latro::cuda::rms_norm(c.args(out, sum), nullptr); },
                       [&] { return out.storage; });
  const Tolerance tol = stored_tolerance(c.shape.dtype);
  EXPECT_TRUE(all_close(matrix_values(out), c.reference(), tol));
  // The float64 sums of squares differ in order only: the float32 results are the CPU's.
  EXPECT_TRUE(out.storage == cpu_out.storage);
  if (c.shape.residual) {
    EXPECT_TRUE(sum.storage == cpu_sum.storage);
  }
}

// Both kernels (the 2,048-wide shapes take the vector one) re-read s from the sum, so the
// residual stream may be updated in place.
TEST_P(EmulatedRmsNorm, InPlaceFormsGiveTheSameResults) {
  std::mt19937 rng(48);
  expect_in_place_forms_match(NormCase(GetParam(), rng), [](const latro::RmsNormArgs& a) {
    latro::cuda::rms_norm(a, nullptr);
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmulatedRmsNorm, ::testing::ValuesIn(norm_shapes()), norm_name);

// The shapes above whose dim is whole 16-byte vectors (2,048) take the vector kernel. Here the
// rows are whole vectors too, but one array at a time (then all) starts one element past a
// 16-byte boundary, which only the element kernel may read: the same results as the CPU.
TEST(EmulatedRmsNormMisaligned, EqualsTheCpu) {
  std::mt19937 rng(61);
  const char* arrays[] = {"x", "residual", "weight", "sum", "out", "all"};
  for (DType dtype : all_dtypes()) {
    for (const std::string late : arrays) {
      const int64_t rows = 3, dim = 64, n = rows * dim + 1;
      const Matrix x = random_matrix(dtype, 1, n, n, rng, 2.0);
      const Matrix residual = random_matrix(dtype, 1, n, n, rng, 2.0);
      const Matrix weight = random_matrix(dtype, 1, dim + 1, dim + 1, rng, 1.0);
      Matrix cpu_out = nan_matrix(dtype, 1, n), cpu_sum = nan_matrix(dtype, 1, n);
      Matrix out = nan_matrix(dtype, 1, n), sum = nan_matrix(dtype, 1, n);
      const size_t e = x.element_size();
      auto skip = [&](const char* name) { return late == name || late == "all" ? e : 0; };
      auto args = [&](Matrix& o, Matrix& s) {
        latro::RmsNormArgs a;
        a.dtype = dtype;
        a.rows = rows;
        a.dim = dim;
        a.x = static_cast<const unsigned char*>(x.data()) + skip("x");
        a.residual = static_cast<const unsigned char*>(residual.data()) + skip("residual");
        a.weight = static_cast<const unsigned char*>(weight.data()) + skip("weight");
        a.sum = static_cast<unsigned char*>(s.data()) + skip("sum");
        a.out = static_cast<unsigned char*>(o.data()) + skip("out");
        return a;
      };
      latro::rms_norm(args(cpu_out, cpu_sum));
      under_every_schedule([&] { latro::cuda::rms_norm(args(out, sum), nullptr); },
                           [&] { return out.storage; });
      EXPECT_TRUE(out.storage == cpu_out.storage) << dtype_str(dtype) << " late " << late;
      EXPECT_TRUE(sum.storage == cpu_sum.storage) << dtype_str(dtype) << " late " << late;
    }
  }
}

// ---------------------------------------------------------------- silu_mul
TEST(EmulatedSiluMul, EqualsTheCpu) {
  std::mt19937 rng(59);
  for (DType dtype : all_dtypes()) {
    // 4,096 and 70,000: whole 16-byte vectors (the vector kernel); 1, 37, 70,001: not. Then
    // 4,096 again with one array (bit 0: gate, 1: up, 2: out) or all starting one element past
    // a 16-byte boundary, which only the element kernel may read.
    for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{4096}, int64_t{70000}, int64_t{70001}}) {
      for (int late : {0, 1, 2, 4, 7}) {
        if (late && n != 4096) continue;
        const Matrix gate = random_matrix(dtype, 1, n + 1, n + 1, rng, 4.0);
        const Matrix up = random_matrix(dtype, 1, n + 1, n + 1, rng, 2.0);
        Matrix cpu = nan_matrix(dtype, 1, n + 1), out = nan_matrix(dtype, 1, n + 1);
        const size_t e = gate.element_size();
        auto skip = [&](int bit) { return (late >> bit) & 1 ? e : 0; };
        auto args = [&](Matrix& o) {
          return latro::SiluMulArgs{dtype, n, static_cast<const unsigned char*>(gate.data()) + skip(0),
                                    static_cast<const unsigned char*>(up.data()) + skip(1),
                                    static_cast<unsigned char*>(o.data()) + skip(2)};
        };
        latro::silu_mul(args(cpu));
        under_every_schedule([&] { latro::cuda::silu_mul(args(out), nullptr); },
                             [&] { return out.storage; });
        EXPECT_TRUE(out.storage == cpu.storage) << dtype_str(dtype) << " n " << n << " late " << late;
      }
    }
  }
}

// ---------------------------------------------------------------- the emulator itself
TEST(CudaEmulator, ReportsABarrierThatSomeThreadsSkip) {
  latro_emu::launch(dim3(1), dim3(64), [] {
    if (threadIdx.x < 32) __syncthreads();
  });
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_NE(std::string(latro_emu::last_error_message()).find("deadlock"), std::string::npos)
      << latro_emu::last_error_message();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read once, then cleared
}

// Dynamic shared memory past 48 KiB fails the launch until the kernel's limit is raised, and
// the limit cannot be raised past the device's opt-in maximum, as on a GPU.
void kernel_with_dynamic_shared() {}

TEST(CudaEmulator, DynamicSharedMemoryBeyondTheDefaultNeedsTheOptIn) {
  const auto kernel = reinterpret_cast<latro_emu::KernelKey>(&kernel_with_dynamic_shared);
  int optin = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0),
            cudaSuccess);
  bool ran = false;
  latro_emu::launch(dim3(1), dim3(32), 48 * 1024, kernel, [&] { ran = true; });
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_TRUE(ran);
  ran = false;
  latro_emu::launch(dim3(1), dim3(32), 48 * 1024 + 16, kernel, [&] { ran = true; });
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_NE(std::string(latro_emu::last_error_message()).find("49168 bytes of dynamic shared"),
            std::string::npos)
      << latro_emu::last_error_message();
  EXPECT_FALSE(ran);
  EXPECT_EQ(cudaFuncSetAttribute(&kernel_with_dynamic_shared,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, optin + 1),
            cudaErrorInvalidValue);
  ASSERT_EQ(cudaFuncSetAttribute(&kernel_with_dynamic_shared,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, optin),
            cudaSuccess);
  cudaFuncAttributes attributes;
  ASSERT_EQ(cudaFuncGetAttributes(&attributes, &kernel_with_dynamic_shared), cudaSuccess);
  EXPECT_EQ(attributes.maxDynamicSharedSizeBytes, optin);
  latro_emu::launch(dim3(1), dim3(32), static_cast<size_t>(optin), kernel, [&] {
    static_cast<unsigned char*>(latro_emu::dynamic_shared())[optin - 1] = 1;  // all of it
    ran = true;
  });
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_TRUE(ran);
}

TEST(CudaEmulator, ReportsThreadsAtDifferentBarriers) {
  // Each half reaches a __syncthreads, but not the same one: CUDA leaves that undefined.
  latro_emu::launch(dim3(1), dim3(64), [] {
    if (threadIdx.x < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  });
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_NE(std::string(latro_emu::last_error_message()).find("divergent __syncthreads"),
            std::string::npos)
      << latro_emu::last_error_message();
}

TEST(CudaEmulator, ShufflesAndBarriersFollowCuda) {
  std::vector<int> out(96, -1);
  for (auto schedule : {latro_emu::Schedule::Forward, latro_emu::Schedule::Reverse,
                        latro_emu::Schedule::Shuffled}) {
    latro_emu::set_schedule(schedule, 3);
    latro_emu::launch(dim3(2), dim3(48), [&] {
      __shared__ int total;
      const int lane = static_cast<int>(threadIdx.x % 32);
      if (threadIdx.x == 0) total = 0;
      __syncthreads();
      atomicAdd(&total, static_cast<int>(threadIdx.x));
      __syncthreads();
      // Warp 1 is partial (16 lanes): its shuffles stay within those lanes.
      const int up = __shfl_up_sync(threadIdx.x < 32 ? 0xFFFFFFFFu : 0xFFFFu, lane, 1);
      const int x = __shfl_xor_sync(threadIdx.x < 32 ? 0xFFFFFFFFu : 0xFFFFu, lane, 1);
      out[blockIdx.x * 48 + threadIdx.x] = total * 10000 + up * 100 + x;
    });
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << latro_emu::last_error_message();
    for (int b = 0; b < 2; ++b) {
      for (int t = 0; t < 48; ++t) {
        const int lane = t % 32;
        const int up = lane == 0 ? 0 : lane - 1;
        EXPECT_EQ(out[b * 48 + t], (47 * 48 / 2) * 10000 + up * 100 + (lane ^ 1));
      }
    }
  }
  latro_emu::set_schedule(latro_emu::Schedule::Forward);
}

}  // namespace

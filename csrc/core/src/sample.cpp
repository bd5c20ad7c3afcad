// Sampling with temperature, top-k, top-p and min-p on the CPU (semantics in latro.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "latro/gumbel.h"
#include "latro/latro.h"
#include "sample_bins.h"

namespace latro {
namespace {

using detail::exp_nonpositive;
using detail::kNegInf;

struct RowScratch {
  std::vector<float> scaled;     // logits / temperature
  std::vector<float> selection;  // top-k's values in the bin of its k-th largest
  std::vector<int64_t> key_bin_counts;
  std::vector<int64_t> order;    // top-p's tokens around its crossing, sorted
  std::vector<double> weight;    // exp(s - m) of each token, for top-p's sums
  std::vector<double> bin_mass;  // top-p's mass per bin of m - s
};

// Which tokens the draw keeps: s != -inf, s >= kth_largest (top-k), s - m >= log_min_p
// (min-p) and s >= nucleus_floor (top-p); a filter that is off leaves -inf.
struct KeptSet {
  float kth_largest;
  float log_min_p;
  float nucleus_floor;
  bool keeps(float s, float m) const {
    return s != kNegInf && s >= kth_largest && (s - m) >= log_min_p && s >= nucleus_floor;
  }
};

// The k-th largest of s[0, n) (0 < k < n, no NaN). The values are counted in the CUDA kernel's
// top-k bins (sample_bins.h); only the bin where the count from the top reaches k needs
// selecting, usually a few hundred values, where nth_element over a copy of the row would move
// all of them.
float kth_largest_value(const float* s, int64_t n, int64_t k, std::vector<int64_t>& counts,
                        std::vector<float>& selection) {
  using detail::key_bin;
  constexpr size_t kBins = detail::kKeyBins;
  // Four interleaved histograms, summed after: neighbouring values often share a bin, and one
  // histogram would make each increment wait for the one before.
  counts.assign(4 * kBins, 0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (size_t j = 0; j < 4; ++j) ++counts[j * kBins + static_cast<size_t>(key_bin(s[i + j]))];
  }
  for (; i < n; ++i) ++counts[static_cast<size_t>(key_bin(s[i]))];
  for (size_t b = 0; b < kBins; ++b) {
    for (size_t j = 1; j < 4; ++j) counts[b] += counts[j * kBins + b];
  }
  int64_t above = 0;  // values in the bins above (before) `bin`
  int bin = 0;
  while (above + counts[static_cast<size_t>(bin)] < k) above += counts[static_cast<size_t>(bin++)];
  selection.clear();
  for (i = 0; i < n; ++i) {
    if (key_bin(s[i]) == bin) selection.push_back(s[i]);
  }
  const auto nth = selection.begin() + (k - above - 1);
  std::nth_element(selection.begin(), nth, selection.end(), std::greater<float>());
  return *nth;
}

// Pass 1 over a float32 row: s = x / temperature and the max of s, NaN winning (so one
// compare after the loop finds a NaN anywhere).
LATRO_CPU_CLONES float scale_row(const float* x, int64_t n, float temperature, float* s) {
  int64_t i = 0;
  float best = kNegInf;
#if LATRO_HAVE_VECTOR_EXT
  using detail::kVecWidth;
  detail::vfloat a = detail::vbroadcast(kNegInf), b = a;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    const detail::vfloat u = detail::vload(x + i) / temperature;
    const detail::vfloat v = detail::vload(x + i + kVecWidth) / temperature;
    detail::vstore(s + i, u);
    detail::vstore(s + i + kVecWidth, v);
    a = detail::vmax_keep_nan(u, a);
    b = detail::vmax_keep_nan(v, b);
  }
  a = detail::vmax_keep_nan(b, a);
  best = detail::hmax_keep_nan(a, best);
#endif
  for (; i < n; ++i) {
    s[i] = x[i] / temperature;
    best = detail::max_keep_nan(s[i], best);
  }
  return best;
}

// The Gumbel-max draw over the kept tokens of s[0, n) and their mass sum exp(s - m) (m: the
// row max, which the kept set holds). Eight tokens at a time (one coarse Philox block): their
// exps, the kept-set tests and the coarse skip test of gumbel.h run as vectors, and only tokens
// that could still beat the best key reach draw.offer, which computes their fine bits (one
// block for the group) and tests them again against the current best. The vector tests use
// the draw's floor and skip factor as of the group's start; both only tighten as the best key
// grows, so they skip a subset of what offer would: the winner is the one the scalar loop (the
// tail, and builds without vector extensions) finds.
LATRO_CPU_CLONES void draw_from_kept(const float* s, int64_t n, float m, const KeptSet& keep,
                                     uint64_t seed, uint32_t stream, uint64_t step,
                                     GumbelArgmax& draw, double& kept_mass) {
  int64_t i = 0;
#if LATRO_HAVE_VECTOR_EXT
  using detail::kVecWidth;
  using detail::vfloat;
  using detail::vint;
  typedef uint32_t vuint __attribute__((vector_size(32)));
  typedef float vfloat4 __attribute__((vector_size(16)));
  typedef double vdouble4 __attribute__((vector_size(32)));
  static_assert(kVecWidth == 8, "a group is the eight tokens of one coarse block");
  const PhiloxKey key = sampling_key(seed);
  vdouble4 mass_lo{}, mass_hi{};
  // Whether any lane of a mask is set: OR-ing 64-bit words costs a few instructions where
  // extracting eight lanes costs sixteen.
  auto any = [](vint mask) {
    uint64_t words[4];
    std::memcpy(words, &mask, sizeof(words));
    return ((words[0] | words[1]) | (words[2] | words[3])) != 0;
  };
  // Lane j's coarse bits: half j % 2 of word j / 2 (philox.h's coarse_bits for v = 8b + j).
  const vuint word_shift = {0, 16, 0, 16, 0, 16, 0, 16};
  for (; i + kVecWidth <= n; i += kVecWidth) {
    const vfloat x = detail::vload(s + i);
    const vint kept = (x != kNegInf) & (x >= keep.kth_largest) & ((x - m) >= keep.log_min_p) &
                      (x >= keep.nucleus_floor);
    const vfloat p = detail::vselect(kept, detail::vexp_nonpositive(x - m), vfloat{});
    vfloat4 halves[2];
    std::memcpy(halves, &p, sizeof(p));
    mass_lo += __builtin_convertvector(halves[0], vdouble4);
    mass_hi += __builtin_convertvector(halves[1], vdouble4);
    const vint candidates = kept & (x >= draw.floor);
    if (!any(candidates)) continue;
    const uint32_t token = static_cast<uint32_t>(i);
    const Philox4 b = sampling_random_block(key, stream, step, coarse_block_index(token));
    const vuint words = {b.v[0], b.v[0], b.v[1], b.v[1], b.v[2], b.v[2], b.v[3], b.v[3]};
    const vuint coarse = (words >> word_shift) & 0xFFFFu;
    // uniform_open01_complement of coarse_bound_bits, as philox.h computes them
    // (half_odd_over_2p23): gumbel_cannot_win's coarse test.
    const vuint bound = (coarse << 16) | (0x7Fu << 9);
    const vfloat least_complement =
        reinterpret_cast<vfloat>(0x3F800000u | (~bound >> 9)) - 0x1.fffffep-1f;
    const vint may_win = candidates & ~(least_complement > p * draw.skip_factor);
    if (!any(may_win)) continue;
    const Philox4 fine = sampling_random_block(key, stream, step, fine_block_index(token));
    for (int j = 0; j < kVecWidth; ++j) {
      if (!may_win[j]) continue;
      const uint32_t v = token + static_cast<uint32_t>(j);
      draw.offer(i + j, x[j], p[j], m, [&] { return coarse[j]; },
                 [&] { return fine_bits(fine, v); });
    }
  }
  for (int j = 0; j < 4; ++j) kept_mass += mass_lo[j] + mass_hi[j];
#endif
  RowNoise noise = RowNoise::at(seed, stream, step);
  for (; i < n; ++i) {
    if (!keep.keeps(s[i], m)) continue;
    const float p = exp_nonpositive(s[i] - m);
    kept_mass += static_cast<double>(p);
    draw.offer(noise, i, s[i], p, m);
  }
}

template <typename T>
void greedy_row(const T* row, int64_t vocab, int64_t r, int64_t* id, float* logprob) {
  int64_t best = -1;
  float best_value = kNegInf;
  for (int64_t v = 0; v < vocab; ++v) {
    const float x = to_float(row[v]);
    LATRO_CHECK(x == x, "logits row ", r, " contains NaN");
    if (best < 0 || x > best_value) {
      best = v;
      best_value = x;
    }
  }
  *id = best;
  *logprob = 0.0f;  // a point mass
}

template <typename T>
void sample_row(const SampleArgs& args, const T* row, int64_t r, uint64_t seed, uint32_t stream,
                uint64_t step, RowScratch& scratch) {
  const int64_t vocab = args.vocab;
  std::vector<float>& s = scratch.scaled;
  s.resize(static_cast<size_t>(vocab));
  const float* x = detail::row_as_float(row, vocab, s.data());  // 16-bit rows into s first
  const float m = scale_row(x, vocab, args.temperature, s.data());
  LATRO_CHECK(m == m, "logits row ", r, " contains NaN");
  LATRO_CHECK(m != kNegInf, "logits row ", r, " has no finite value");
  LATRO_CHECK(m != -kNegInf, "logits row ", r,
              " contains +inf (after dividing by the temperature)");

  // Thresholds of top-k and min-p: keep s >= kth_largest and s - m >= log(min_p).
  float kth_largest = kNegInf;
  if (args.top_k > 0 && args.top_k < vocab) {
    kth_largest = kth_largest_value(s.data(), vocab, args.top_k, scratch.key_bin_counts,
                                    scratch.selection);
  }
  const float log_min_p =
      args.min_p > 0.0f ? static_cast<float>(std::log(static_cast<double>(args.min_p))) : kNegInf;
  KeptSet keep{kth_largest, log_min_p, kNegInf};  // top-p's floor comes below
  auto kept_before_top_p = [&](int64_t v) { return keep.keeps(s[v], m); };

  // Top-p over the renormalized survivors: walk them by decreasing logit until the mass reaches
  // top_p; every token at least as likely as the last one walked is kept (ties stay together).
  // Only the tokens near the crossing need sorting: the survivors' mass summed over bins of
  // d = m - s (width 1/32, the CUDA kernel's level-0 bins) gives the bin where the running mass
  // reaches the target. Every token of an earlier bin is larger than every token of a later
  // one, so the walk sorts only that bin's tokens (and the following bins' up to where the
  // running mass passes the target by a margin, in case the bins' sums, added in another order
  // than the walk's, round to the other side of it) and starts from the mass of the bins before.
  // A trained model's few-token nucleus and a flat row's 30,000-token one alike sort a few
  // hundred tokens, not the nucleus.
  if (args.top_p < 1.0f) {
    using detail::level0_bin;
    constexpr int kBins = detail::kLevel0Bins;
    const auto bin_of = [m](float value) { return level0_bin(value, m); };  // (value <= m)
    std::vector<double>& weight = scratch.weight;
    std::vector<double>& bin_mass = scratch.bin_mass;
    weight.resize(static_cast<size_t>(vocab));
    bin_mass.assign(kBins, 0.0);
    double mass = 0.0;
    for (int64_t v = 0; v < vocab; ++v) {
      if (kept_before_top_p(v)) {
        weight[v] = std::exp(static_cast<double>(s[v]) - m);
        bin_mass[bin_of(s[v])] += weight[v];
        mass += weight[v];
      }
    }
    const double target = static_cast<double>(args.top_p) * mass;
    int first = 0;  // the crossing bin (less the margin)
    double before = 0.0;
    while (first < kBins - 1 && before + bin_mass[first] < target * (1.0 - 1e-9)) {
      before += bin_mass[first++];
    }
    int last = first;  // where the running mass is past the target (plus the margin)
    for (double through = before + bin_mass[first];
         last < kBins - 1 && through < target * (1.0 + 1e-9);) {
      through += bin_mass[++last];
    }
    std::vector<int64_t>& order = scratch.order;
    order.clear();
    float smallest = -kNegInf;
    for (int64_t v = 0; v < vocab; ++v) {
      if (!kept_before_top_p(v)) continue;
      smallest = std::min(smallest, s[v]);
      const int bin = bin_of(s[v]);
      if (bin >= first && bin <= last) order.push_back(v);
    }
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return s[a] > s[b] || (s[a] == s[b] && a < b);
    });
    double cumulative = before;
    for (const int64_t v : order) {
      cumulative += weight[v];
      if (cumulative >= target) {
        keep.nucleus_floor = s[v];
        break;
      }
    }
    // Rounding can leave the target unreached: every survivor is kept.
    if (keep.nucleus_floor == kNegInf) keep.nucleus_floor = smallest;
  }

  // Gumbel-max over the kept set, and the kept set's normalizer for the log-prob.
  GumbelArgmax draw = GumbelArgmax::start(m);
  double kept_mass = 0.0;
  draw_from_kept(s.data(), vocab, m, keep, seed, stream, step, draw, kept_mass);
  // The max token is always kept, so there is a winner.
  const int64_t best = draw.best.index;
  args.ids[r] = best;
  args.logprobs[r] =
      static_cast<float>(static_cast<double>(s[best]) - m - std::log(kept_mass));
}

}  // namespace

void check_sampling_options(float temperature, int64_t top_k, float top_p, float min_p) {
  LATRO_CHECK(std::isfinite(temperature) && temperature >= 0.0f,
              "temperature must be a finite number >= 0, got ", temperature);
  LATRO_CHECK(top_k >= 0, "top_k must be >= 0 (0 disables it), got ", top_k);
  LATRO_CHECK(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
  LATRO_CHECK(min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1], got ", min_p);
}

void sample(const SampleArgs& args, int64_t row_begin, int64_t row_end) {
  const int64_t stride = detail::check_sample_args(args);
  detail::resolve_row_range(args.rows, row_begin, row_end);
  LATRO_CHECK(*args.offset >= 0, "offset must be >= 0, got ", *args.offset);
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const T* logits = static_cast<const T*>(args.logits);
    RowScratch scratch;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const T* row = logits + r * stride;
      if (args.temperature == 0.0f) {
        greedy_row(row, args.vocab, r, &args.ids[r], &args.logprobs[r]);
        continue;
      }
      const uint64_t seed = static_cast<uint64_t>(args.per_row_seeds ? args.seeds[r] : args.seeds[0]);
      const uint32_t stream = args.per_row_seeds ? 0u : static_cast<uint32_t>(r);
      sample_row(args, row, r, seed, stream, static_cast<uint64_t>(*args.offset), scratch);
    }
  });
}

}  // namespace latro

// Sampling with temperature, top-k, top-p and min-p on the CPU (semantics in latro.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "latro/gumbel.h"
#include "latro/latro.h"

namespace latro {
namespace {

using detail::exp_nonpositive;
using detail::kNegInf;

struct RowScratch {
  std::vector<float> scaled;     // logits / temperature
  std::vector<float> selection;  // copy for nth_element
  std::vector<int64_t> order;    // top-p's tokens around its crossing, sorted
  std::vector<double> weight;    // exp(s - m) of each token, for top-p's sums
  std::vector<double> bin_mass;  // top-p's mass per bin of m - s
};

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
  float m = kNegInf;
  for (int64_t v = 0; v < vocab; ++v) {
    s[v] = to_float(row[v]) / args.temperature;
    LATRO_CHECK(s[v] == s[v], "logits row ", r, " contains NaN");
    m = s[v] > m ? s[v] : m;
  }
  LATRO_CHECK(m != kNegInf, "logits row ", r, " has no finite value");
  LATRO_CHECK(m != -kNegInf, "logits row ", r, " contains +inf");

  // Thresholds of top-k and min-p: keep s >= kth_largest and s - m >= log(min_p).
  float kth_largest = kNegInf;
  if (args.top_k > 0 && args.top_k < vocab) {
    std::vector<float>& sel = scratch.selection;
    sel.assign(s.begin(), s.end());
    std::nth_element(sel.begin(), sel.begin() + (args.top_k - 1), sel.end(), std::greater<float>());
    kth_largest = sel[static_cast<size_t>(args.top_k - 1)];
  }
  const float log_min_p =
      args.min_p > 0.0f ? static_cast<float>(std::log(static_cast<double>(args.min_p))) : kNegInf;
  auto kept_before_top_p = [&](int64_t v) {
    return s[v] != kNegInf && s[v] >= kth_largest && (s[v] - m) >= log_min_p;
  };

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
  float nucleus_floor = kNegInf;
  if (args.top_p < 1.0f) {
    constexpr int kBins = 2048;
    constexpr float kBinsPerUnit = 32.0f;
    const auto bin_of = [m](float value) {
      const float d = (m - value) * kBinsPerUnit;  // >= 0: value <= m
      return d < static_cast<float>(kBins - 1) ? static_cast<int>(d) : kBins - 1;
    };
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
        nucleus_floor = s[v];
        break;
      }
    }
    // Rounding can leave the target unreached: every survivor is kept.
    if (nucleus_floor == kNegInf) nucleus_floor = smallest;
  }

  // Gumbel-max over the kept set, and the kept set's normalizer for the log-prob.
  RowNoise noise = RowNoise::at(seed, stream, step);
  GumbelArgmax draw = GumbelArgmax::start(m);
  double kept_mass = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    if (!kept_before_top_p(v) || s[v] < nucleus_floor) continue;
    const float p = exp_nonpositive(s[v] - m);
    kept_mass += static_cast<double>(p);
    draw.offer(noise, v, s[v], p, m);
  }
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

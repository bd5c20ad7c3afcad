// The float64 reference of latro::sample's semantics (latro.h) and the helpers its tests share:
// test_sample.cpp checks the CPU sampler against it, test_cuda_emulated.cpp the CUDA kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "latro/latro.h"
#include "latro/philox.h"
#include "test_util.h"

namespace latro_test {

struct Options {
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
};

inline std::string options_str(const Options& o) {
  return "temperature " + std::to_string(o.temperature) + ", top_k " + std::to_string(o.top_k) +
         ", top_p " + std::to_string(o.top_p) + ", min_p " + std::to_string(o.min_p);
}

// ---------------------------------------------------------------- the float64 reference
// The kept set of one row, from the documentation of SampleArgs: scale by 1/temperature; keep
// logits >= the k-th largest (ties kept) and p >= min_p * max p; then the smallest nucleus of the
// renormalized survivors whose mass reaches top_p. Decisions within `eps` of a threshold are
// rounding-dependent: `allowed` holds every token a correct float32 kernel may keep, and
// `robust` says whether `kept` is the only correct answer.
struct KeptSet {
  std::vector<double> scaled;  // logit / temperature
  std::vector<bool> kept;      // the exact float64 decision
  std::vector<bool> allowed;   // kept, or within rounding of a threshold
  bool robust = true;
  double log_norm = 0.0;  // log-sum-exp of the scaled logits over `kept`
};

inline KeptSet reference_kept_set(const std::vector<double>& logits, const Options& o) {
  constexpr double eps = 1e-4;
  const size_t n = logits.size();
  KeptSet ks;
  ks.scaled.resize(n);
  for (size_t v = 0; v < n; ++v) ks.scaled[v] = logits[v] / o.temperature;
  ks.kept.assign(n, true);
  ks.allowed.assign(n, true);
  for (size_t v = 0; v < n; ++v) {
    if (ks.scaled[v] == -kInf) ks.kept[v] = ks.allowed[v] = false;  // probability 0
  }
  const double max = *std::max_element(ks.scaled.begin(), ks.scaled.end());
  auto near = [&](double a, double b) { return std::fabs(a - b) <= eps * std::max(1.0, std::fabs(b)); };

  if (o.top_k > 0 && static_cast<size_t>(o.top_k) < n) {
    std::vector<double> sorted = ks.scaled;
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(),
                     std::greater<double>());
    const double kth = sorted[static_cast<size_t>(o.top_k) - 1];
    for (size_t v = 0; v < n; ++v) {
      if (ks.scaled[v] < kth) {
        ks.kept[v] = false;
        if (near(ks.scaled[v], kth)) ks.robust = false;
        else ks.allowed[v] = false;
      }
    }
  }
  if (o.min_p > 0.0f) {
    const double threshold = max + std::log(static_cast<double>(o.min_p));
    for (size_t v = 0; v < n; ++v) {
      if (near(ks.scaled[v], threshold)) ks.robust = false;
      if (ks.scaled[v] < threshold) {
        ks.kept[v] = false;
        if (!near(ks.scaled[v], threshold)) ks.allowed[v] = false;
      }
    }
  }
  if (o.top_p < 1.0f) {
    // Renormalize over the survivors (the exact ones; if those are not robust, neither is this).
    std::vector<double> q(n, 0.0);
    double total = 0.0;
    for (size_t v = 0; v < n; ++v) {
      if (ks.kept[v]) total += q[v] = std::exp(ks.scaled[v] - max);
    }
    for (double& x : q) x /= total;
    std::vector<size_t> order;
    for (size_t v = 0; v < n; ++v) {
      if (ks.kept[v]) order.push_back(v);
    }
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return q[a] > q[b]; });
    const double p = o.top_p;
    double greater = 0.0;  // mass of the tokens strictly more likely than the current group
    for (size_t i = 0; i < order.size();) {
      size_t j = i;  // [i, j): a group of equally likely tokens
      double group_mass = 0.0;
      while (j < order.size() && q[order[j]] == q[order[i]]) group_mass += q[order[j++]];
      const bool tie = j - i > 1;
      if (std::fabs(greater - p) <= eps ||
          (tie && greater < p + eps && greater + group_mass > p - eps)) {
        ks.robust = false;
      }
      for (size_t g = i; g < j; ++g) {
        // A token is in the nucleus while the mass before it is below top_p.
        if (!(greater < p)) {
          ks.kept[order[g]] = false;
          if (!(greater < p + eps)) ks.allowed[order[g]] = false;
        }
      }
      greater += group_mass;
      i = j;
    }
  }
  std::vector<double> kept_values;
  for (size_t v = 0; v < n; ++v) {
    if (ks.kept[v]) kept_values.push_back(ks.scaled[v]);
  }
  ks.log_norm = logsumexp(kept_values);
  return ks;
}

// What the documentation says a draw is: argmax over the kept set of scaled logit + Gumbel
// noise, the noise of token v from its coarse and fine bits (philox.h's sampling_token_bits)
// at (stream, offset) under the seed. Returns -1 when the two best scores are too close to call.
inline int64_t reference_gumbel_draw(const KeptSet& ks, uint64_t seed, uint32_t stream, uint64_t offset) {
  int64_t best = -1;
  double best_score = -kInf, second = -kInf;
  for (size_t v = 0; v < ks.scaled.size(); ++v) {
    if (!ks.kept[v]) continue;
    const uint32_t bits =
        latro::sampling_token_bits(seed, stream, offset, static_cast<uint32_t>(v));
    const double score = ks.scaled[v] + static_cast<double>(latro::gumbel_noise(bits));
    if (score > best_score) {
      second = best_score;
      best_score = score;
      best = static_cast<int64_t>(v);
    } else if (score > second) {
      second = score;
    }
  }
  if (best_score - second < 1e-4 * std::max(1.0, std::fabs(best_score))) return -1;
  return best;
}

// ---------------------------------------------------------------- calling the kernel
struct Draws {
  std::vector<int64_t> ids;
  std::vector<float> logprobs;
};

inline latro::SampleArgs sample_args(const Matrix& logits, const std::vector<int64_t>& seeds,
                              bool per_row_seeds, const int64_t* offset, const Options& o,
                              Draws& out) {
  out.ids.assign(static_cast<size_t>(logits.rows), -7);
  out.logprobs.assign(static_cast<size_t>(logits.rows), 7.0f);
  latro::SampleArgs args;
  args.logits = logits.data();
  args.dtype = logits.dtype;
  args.rows = logits.rows;
  args.vocab = logits.cols;
  args.row_stride = logits.stride;
  args.seeds = seeds.data();
  args.per_row_seeds = per_row_seeds;
  args.offset = offset;
  args.temperature = o.temperature;
  args.top_k = o.top_k;
  args.top_p = o.top_p;
  args.min_p = o.min_p;
  args.ids = out.ids.data();
  args.logprobs = out.logprobs.data();
  return args;
}

// Random logits with about 10% of the entries at -inf (never in the first column, so no row is
// entirely -inf).
inline Matrix random_logits_with_masked(DType dtype, int64_t rows, int64_t vocab, int64_t stride,
                                 std::mt19937& rng) {
  Matrix m = random_matrix(dtype, rows, vocab, stride, rng);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 1; v < vocab; ++v) {
      if (u(rng) < 0.1) m.set(r, v, -std::numeric_limits<float>::infinity());
    }
  }
  return m;
}

inline std::vector<int64_t> random_seeds(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> seeds(static_cast<size_t>(n));
  for (auto& s : seeds) s = static_cast<int64_t>(rng());
  return seeds;
}

inline const std::vector<Options>& filter_configs() {
  static const std::vector<Options> configs = {
      {1.0f, 0, 1.0f, 0.0f},     // plain
      {0.7f, 5, 1.0f, 0.0f},     // top-k
      {1.0f, 0, 0.9f, 0.0f},     // top-p
      {1.0f, 0, 0.3f, 0.0f},     // tight top-p
      {1.0f, 0, 1.0f, 0.1f},     // min-p
      {1.3f, 40, 0.95f, 0.05f},  // everything
      {0.5f, 1, 1.0f, 0.0f},     // top-k 1: only the argmax survives
      {2.0f, 3, 0.5f, 0.3f},
  };
  return configs;
}

}  // namespace latro_test

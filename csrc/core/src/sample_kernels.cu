// Sampling with temperature, top-k, top-p and min-p on CUDA (semantics in latro.h).
//
// One block per row. Tokens are drawn by Gumbel-max with the CPU's Philox stream (latro/philox.h),
// so both backends return the same ids. A token's fine bits and the noise's two logarithms are
// computed only for the few tokens per thread that could still beat the best key
// (gumbel_cannot_win on the coarse bits): the cost per token is its coarse bits (one Philox
// block per eight tokens), one exp and a compare.
//
// Without filters (plain_sample_kernel) one read of the row does everything: the online max and
// sum of exp(s - m) and the Gumbel argmax. With filters (sample_kernel), nothing sorts the
// vocabulary:
//
//   pass 1     the row max m (and the NaN / +inf / all -inf checks); with top-k also a count
//              histogram over 2048 bins of the value's top 11 bits (shared memory). With top-k
//              or min-p it also gathers, speculatively, every token that may be kept: the
//              first eighth of the row gives a bound (its max for min-p, its histogram's k-th
//              largest bin for top-k: the row's are at least as large), the rest pushes the
//              tokens above the bound into shared memory, and at the end the candidates are
//              cut to the row's final bounds and the eighth read again for its own. When they
//              fit (the usual case: a few hundred tokens), the thresholds and the draw run
//              there and the row is read once (and an eighth); when not, the steps below.
//              With top-p alone (sample_kernel<T, true>) pass 1 instead builds top-p's mass
//              histogram relative to the eighth's max M (the tokens above M, a handful, go to
//              shared memory), adds the eighth's tokens after, and rescales the bins by
//              exp(M - m): the nucleus ends either among the tokens above M (one read) or in a
//              bin the final pass gathers (two reads and an eighth).
//   top-k      the histogram gives the bin holding the k-th largest value; the tokens of that
//              bin and above (usually a few hundred) are copied to shared memory, sorted there,
//              and the threshold read.
//   top-p      a histogram of d = m - s over 2048 bins of width 1/32, each token weighted by
//              exp(s - m), over the top-k / min-p survivors, then the same gathering; when
//              top-k already left every survivor in shared memory, top-p runs there without
//              touching the row again.
//   final      the Gumbel argmax and the kept mass, from shared memory when the kept set is
//              there, else in one more pass over the row. When the nucleus is larger than
//              shared memory, that pass also gathers top-p's crossing bin and finds the
//              threshold after it.
//
// Pathological rows whose critical bin holds more than 2048 tokens (many equal logits) are
// narrowed further by histograms over the bits of the value, each pass dividing the range by
// 2048, until the tokens fit or are all equal. Thresholds are exact: the kept set is the one
// the CPU keeps, except where the CPU's and our float64 / fixed-point sums of the same masses
// round differently at a top-p boundary (ties within rounding; top-p alone also scales its bin
// sums by exp(M - m) in float64, a relative rounding of about 1e-7).
//
// Histogram masses are 32.32 fixed-point integers added with 32-bit integer atomics (add_mass),
// so their sums, and with them every threshold, are the same on every run.
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "latro/gumbel.h"
#include "sample_bins.h"

namespace latro::cuda {
namespace {

using detail::block_all_reduce;
using detail::block_exclusive_scan;
using detail::count_of;
using detail::for_each_in_row;
using detail::kMaxWarps;
using detail::neg_inf;
using detail::tuning_variable;

constexpr int kThreads = 512;
constexpr int kBins = 2048;             // histogram bins, and candidates held in shared memory
constexpr int kPerThread = kBins / kThreads;
constexpr float kMassScale = 4294967296.0f;  // 2^32: fixed-point unit of histogram masses
constexpr int64_t kPrefixFraction = 8;  // speculative gathering: 1/8 of the row bounds the rest
static_assert(kBins % kThreads == 0, "bins split evenly over the threads");
static_assert((kBins & (kBins - 1)) == 0, "the candidate sort needs a power of two");

struct SampleKernelArgs {
  const void* logits;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  const int64_t* seeds;
  bool per_row_seeds;
  const int64_t* offset;
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
  float log_min_p;  // computed on the host exactly as the CPU does
  int64_t prefetch_ahead;  // L2 prefetch distance in iterations (see filtered_prefetch), 0: none
  bool warm_start;         // plain kernels: share a first stretch's max and best key (plain_pass)
  int64_t* ids;
  float* logprobs;
  uint64_t* status;
};

// ---------------------------------------------------------------- values, keys, bins
// Unsigned keys with the order of the floats, and back (order_key: sample_bins.h).
using ::latro::detail::order_key;
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// Level-0 bins of a finite s <= m (sample_bins.h's level0_bin, as the CPU's top-p has them).
using ::latro::detail::level0_bin;
static_assert(kBins == ::latro::detail::kLevel0Bins, "level-0 bins are sample_bins.h's");

// Level-0 bins of the key instead (top-k, sample_bins.h's key_bin): its top 11 bits, largest
// values in bin 0. They need no max, so pass 1 counts them: top-k reads the row twice, not
// three times. Bin b holds the keys [key_bin_lo(b), key_bin_hi(b)].
static_assert(kBins == ::latro::detail::kKeyBins, "key bins are the top 11 bits of a 32-bit key");
using ::latro::detail::key_bin;
__device__ __forceinline__ uint32_t key_bin_lo(int bin) {
  return static_cast<uint32_t>(kBins - 1 - bin) << 21;
}
__device__ __forceinline__ uint32_t key_bin_hi(int bin) { return key_bin_lo(bin) | 0x1FFFFFu; }

// A mass exp(s - m) in 32.32 fixed point: integer sums are exact and order-free.
__device__ __forceinline__ unsigned long long fixed_mass(float s, float m) {
  return __float2ull_rn(expf(s - m) * kMassScale);
}

// Adds a fixed-point mass to a shared histogram bin with 32-bit atomics. There is no native
// 64-bit shared atomicAdd (it compiles to a compare-and-swap loop, ATOMS.CAST.SPIN.64, which
// crawls when a warp's threads hit the same few bins, as a top-p histogram's do). The low
// word's wrap-arounds carry into the high word one by one, so the bin ends with the same exact
// integer in any order.
__device__ __forceinline__ void add_mass(unsigned long long* bin, unsigned long long mass) {
  uint32_t* words = reinterpret_cast<uint32_t*>(bin);  // little-endian: words[0] is the low one
  const uint32_t lo = static_cast<uint32_t>(mass);
  const uint32_t old = atomicAdd(&words[0], lo);
  const uint32_t high = static_cast<uint32_t>(mass >> 32) + (old + lo < old ? 1u : 0u);
  if (high != 0) atomicAdd(&words[1], high);
}

// Sorted candidates: ascending order = s descending, then index ascending (the CPU's order).
__device__ __forceinline__ unsigned long long candidate(float s, int64_t index) {
  return (static_cast<unsigned long long>(~order_key(s)) << 32) |
         static_cast<unsigned long long>(static_cast<uint32_t>(index));
}
__device__ __forceinline__ float candidate_value(unsigned long long c) {
  return key_value(~static_cast<uint32_t>(c >> 32));
}
__device__ __forceinline__ int64_t candidate_index(unsigned long long c) {
  return static_cast<int64_t>(static_cast<uint32_t>(c & 0xFFFFFFFFull));
}

// The thresholds of one row; a filter that is off leaves -inf.
struct Filters {
  float max;
  float tau_k;      // keep s >= tau_k (top-k)
  float log_min_p;  // keep s - max >= log_min_p (min-p)
  float tau_p;      // keep s >= tau_p (top-p, over the survivors of the two above)
  __device__ bool finite(float s) const { return s != neg_inf(); }
  __device__ bool survives(float s) const {  // top-k and min-p: the set top-p works on
    return s != neg_inf() && s >= tau_k && (s - max) >= log_min_p;
  }
  __device__ bool kept(float s) const { return survives(s) && s >= tau_p; }
};

// Which tokens a selection looks at: every finite one (top-k) or the survivors (top-p),
// restricted to level-0 bins [bin_lo, bin_hi] and keys [key_lo, key_hi].
struct Region {
  bool survivors_only;
  int bin_lo, bin_hi;
  uint32_t key_lo, key_hi;
  __device__ bool contains(const Filters& f, float s) const {
    if (!(survivors_only ? f.survives(s) : f.finite(s))) return false;
    const int bin = level0_bin(s, f.max);
    if (bin < bin_lo || bin > bin_hi) return false;
    const uint32_t key = order_key(s);
    return key >= key_lo && key <= key_hi;
  }
};

// The Gumbel argmax's winner (latro/gumbel.h), merged across threads by block_all_reduce.
using Best = GumbelWinner;
struct CombineBest {
  __device__ Best operator()(const Best& a, const Best& b) const { return Best::better(a, b); }
};

// Pass 1: max, NaN flag and (without filters) the online sum and Gumbel argmax.
struct FirstPass {
  float max;
  uint32_t nan;
  double sum;  // of exp(s - max), over finite s
  Best best;
};
struct CombineFirstPass {
  __device__ FirstPass operator()(const FirstPass& a, const FirstPass& b) const {
    const detail::ScaledSum m = detail::merge_scaled_sums(a.max, a.sum, b.max, b.sum);
    return FirstPass{m.max, a.nan | b.nan, m.sum, CombineBest{}(a.best, b.best)};
  }
};

// A block's largest scaled logit and largest Gumbel key (plain_pass's shared start).
struct MaxAndKey {
  float max;
  float key;
};
struct CombineMaxAndKey {
  __device__ MaxAndKey operator()(const MaxAndKey& a, const MaxAndKey& b) const {
    return MaxAndKey{fmaxf(a.max, b.max), fmaxf(a.key, b.key)};
  }
};
static_assert(sizeof(MaxAndKey) <= sizeof(FirstPass), "the plain kernels' scratch holds it");

struct SumU64 {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a + b;
  }
};

struct CombineMax {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct Final {
  double mass;
  Best best;
};
struct CombineFinal {
  __device__ Final operator()(const Final& a, const Final& b) const {
    return Final{a.mass + b.mass, CombineBest{}(a.best, b.best)};
  }
};

struct Greedy {
  float value;
  uint32_t nan;
  int64_t index;
};
struct CombineGreedy {
  __device__ Greedy operator()(const Greedy& a, const Greedy& b) const {
    const bool a_wins = a.value > b.value || (a.value == b.value && a.index < b.index);
    Greedy out = a_wins ? a : b;
    out.nan = a.nan | b.nan;
    return out;
  }
};

struct MinMaxKey {
  uint32_t lo, hi;
};
struct CombineMinMaxKey {
  __device__ MinMaxKey operator()(const MinMaxKey& a, const MinMaxKey& b) const {
    return MinMaxKey{a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
  }
};

// Where a running total (in bin order) first reaches `need`.
struct Crossing {
  int index;                      // the bin
  unsigned long long before;      // measure of the bins before it
  unsigned long long count_before;
  uint32_t count_at;              // tokens in it
  double need;                    // the absolute need used
};

struct Shared {
  uint32_t count[kBins];
  unsigned long long mass[kBins];
  unsigned long long candidates[kBins];
  unsigned int candidate_count;
  unsigned int dropped;  // candidates below the speculative gathering's final cut
  Crossing crossing;
  int last_nonempty;
  alignas(16) unsigned char scratch[(kMaxWarps + 1) * sizeof(FirstPass)];
};

template <typename T>
__device__ __forceinline__ T* scratch_as(Shared& sh) {
  static_assert(sizeof(T) * (kMaxWarps + 1) <= sizeof(Shared::scratch), "scratch too small");
  return reinterpret_cast<T*>(sh.scratch);
}

// Calls f(index, scaled logit) for every token of the row (prefetch_ahead: see for_each_in_row).
template <typename T, typename F>
__device__ __forceinline__ void for_each_scaled(const T* row, int64_t vocab, float temperature,
                                                F&& f, int64_t prefetch_ahead = 0) {
  const bool unit = temperature == 1.0f;  // x / 1 == x: skip the division's dozen instructions
  for_each_in_row(
      row, vocab,
      [&](int64_t base, const auto& values) {
        constexpr int n = count_of<decltype(values)>;
#pragma unroll
        for (int i = 0; i < n; ++i) {
          f(base + i, unit ? values[i] : values[i] / temperature);  // IEEE division, as the CPU
        }
      },
      prefetch_ahead);
}

__device__ void clear_histogram(Shared& sh) {
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    sh.count[i] = 0;
    sh.mass[i] = 0;
  }
  __syncthreads();
}

// The first bin where the running total of the measure (mass when `by_mass`, else count)
// reaches `need` (`need` times the total when `fraction`). Bins are walked in index order.
// When rounding leaves the need above the total, the last non-empty bin is taken (the CPU's
// default of keeping every survivor).
__device__ Crossing find_crossing(Shared& sh, bool by_mass, double need, bool fraction) {
  const int first = threadIdx.x * kPerThread;
  unsigned long long local_measure = 0, local_count = 0;
  int last_nonempty = -1;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const uint32_t c = sh.count[first + i];
    local_measure += by_mass ? sh.mass[first + i] : c;
    local_count += c;
    if (c) last_nonempty = first + i;
  }
  unsigned long long total_measure = 0, total_count = 0;
  const unsigned long long measure_before =
      block_exclusive_scan(local_measure, scratch_as<unsigned long long>(sh), &total_measure);
  const unsigned long long count_before =
      block_exclusive_scan(local_count, scratch_as<unsigned long long>(sh), &total_count);
  const double absolute = fraction ? need * static_cast<double>(total_measure) : need;
  if (threadIdx.x == 0) {
    sh.crossing.index = -1;
    sh.last_nonempty = -1;
  }
  __syncthreads();
  atomicMax(&sh.last_nonempty, last_nonempty);
  unsigned long long running = measure_before, running_count = count_before;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const uint32_t c = sh.count[first + i];
    const unsigned long long m = by_mass ? sh.mass[first + i] : c;
    // Totals only grow, so exactly one bin satisfies this.
    if (static_cast<double>(running) < absolute && static_cast<double>(running + m) >= absolute) {
      sh.crossing = Crossing{first + i, running, running_count, c, absolute};
    }
    running += m;
    running_count += c;
  }
  __syncthreads();
  if (sh.crossing.index < 0) {
    const int last = sh.last_nonempty < 0 ? kBins - 1 : sh.last_nonempty;
    if (last >= first && last < first + kPerThread) {
      unsigned long long before = measure_before, before_count = count_before;
      for (int i = first; i < last; ++i) {
        before += by_mass ? sh.mass[i] : sh.count[i];
        before_count += sh.count[i];
      }
      sh.crossing = Crossing{last, before, before_count, sh.count[last], absolute};
    }
  }
  __syncthreads();
  const Crossing result = sh.crossing;
  __syncthreads();
  return result;
}

// Counts s into level-0 bin of d = ref - s with its fixed-point mass exp(s - ref) (s <= ref).
__device__ __forceinline__ void add_to_histogram(Shared& sh, float s, float ref) {
  const int bin = level0_bin(s, ref);
  atomicAdd(&sh.count[bin], 1u);
  add_mass(&sh.mass[bin], fixed_mass(s, ref));
}

// The sum of a histogram's bins (sh.count or sh.mass), for every thread; its barriers also
// complete the atomics that filled the bins.
template <typename U>
__device__ unsigned long long histogram_total(Shared& sh, const U* bins) {
  const int first_bin = threadIdx.x * kPerThread;
  unsigned long long local = 0;
  for (int i = 0; i < kPerThread; ++i) local += bins[first_bin + i];
  unsigned long long total = 0;
  block_exclusive_scan(local, scratch_as<unsigned long long>(sh), &total);
  return total;
}

__device__ __forceinline__ int candidates_held(const Shared& sh) {
  return sh.candidate_count < kBins ? static_cast<int>(sh.candidate_count) : kBins;
}

// Candidates are appended in any order (after sh.candidate_count = 0 and a barrier), then
// sorted in place; sort_candidates returns how many there are.
__device__ __forceinline__ void push_candidate(Shared& sh, float s, int64_t v) {
  const unsigned int slot = atomicAdd(&sh.candidate_count, 1u);
  if (slot < kBins) sh.candidates[slot] = candidate(s, v);
}

// push_candidate for a pass that pushes speculatively: once the buffer is full (the gathering
// has failed and the row takes the passes of the general path) no more atomics.
__device__ __forceinline__ void push_candidate_while_room(Shared& sh, float s, int64_t v) {
  if (*static_cast<volatile unsigned int*>(&sh.candidate_count) < kBins) push_candidate(sh, s, v);
}

__device__ int sort_candidates(Shared& sh) {
  const int n = candidates_held(sh);
  int padded = 1;
  while (padded < n) padded *= 2;
  for (int i = n + threadIdx.x; i < padded; i += blockDim.x) sh.candidates[i] = ~0ull;
  __syncthreads();
  // Bitonic sort, ascending, of at most kBins 64-bit keys.
  for (int size = 2; size <= padded; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const unsigned long long a = sh.candidates[i], b = sh.candidates[partner];
          const bool ascending = (i & size) == 0;
          if ((a > b) == ascending) {
            sh.candidates[i] = b;
            sh.candidates[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  return n;
}

// Copies the tokens of `region` into shared memory as sorted candidates; returns how many.
template <typename T>
__device__ int gather_sorted(Shared& sh, const T* row, int64_t vocab, float temperature,
                             const Filters& f, const Region& region) {
  if (threadIdx.x == 0) sh.candidate_count = 0;
  __syncthreads();
  for_each_scaled(row, vocab, temperature, [&](int64_t v, float s) {
    if (region.contains(f, s)) push_candidate(sh, s, v);
  });
  __syncthreads();
  return sort_candidates(sh);
}

// Walks the first n sorted candidates with the given measure until `need` is reached and
// returns the value there (the last candidate's when it never is). `weight_survivors_only`:
// candidates that do not survive top-k / min-p weigh nothing.
__device__ float walk_candidates(Shared& sh, int n, const Filters& f, bool by_mass,
                                 bool weight_survivors_only, double need, bool fraction) {
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    uint32_t c = 0;
    unsigned long long m = 0;
    if (i < n) {
      const float s = candidate_value(sh.candidates[i]);
      if (!weight_survivors_only || f.survives(s)) {
        c = 1;
        m = by_mass ? fixed_mass(s, f.max) : 0;
      }
    }
    sh.count[i] = c;
    sh.mass[i] = m;
  }
  __syncthreads();
  const Crossing crossing = find_crossing(sh, by_mass, need, fraction);
  // n >= 1 whenever the histogram that led here counted the region (it always does); an empty
  // region would mean "no threshold", i.e. keep everything.
  if (n == 0) return neg_inf();
  return candidate_value(sh.candidates[crossing.index < n ? crossing.index : n - 1]);
}

struct Threshold {
  float value;
  bool all_above_in_shared;  // the candidates hold every token of the set at or above it
};

// The threshold of one selection, from its level-0 histogram (already in sh.count / sh.mass;
// `key_bins`: binned by key_bin, else by level0_bin): by count (top-k: the value of rank
// `need`) or by mass (top-p: the value where the mass from the top reaches `need`, a fraction
// of the total).
template <typename T>
__device__ Threshold select_threshold(Shared& sh, const T* row, int64_t vocab, float temperature,
                                      const Filters& f, bool key_bins, bool survivors_only,
                                      bool by_mass, double need, bool fraction) {
  const Crossing level0 = find_crossing(sh, by_mass, need, fraction);
  const unsigned long long through = level0.count_before + level0.count_at;
  // The crossing bin and every bin above it.
  Region region = key_bins
                      ? Region{survivors_only, 0, kBins - 1, key_bin_lo(level0.index), 0xFFFFFFFFu}
                      : Region{survivors_only, 0, level0.index, 0u, 0xFFFFFFFFu};
  if (through <= static_cast<unsigned long long>(kBins)) {
    // The bin and everything above it fit: the common case, and the one that leaves the
    // whole set at or above the threshold in shared memory.
    const int n = gather_sorted(sh, row, vocab, temperature, f, region);
    return {walk_candidates(sh, n, f, by_mass, false, level0.need, false), true};
  }
  // The crossing bin alone.
  if (key_bins) {
    region.key_hi = key_bin_hi(level0.index);
  } else {
    region.bin_lo = level0.index;
  }
  double remaining = level0.need - static_cast<double>(level0.before);
  if (level0.count_at <= static_cast<uint32_t>(kBins)) {
    const int n = gather_sorted(sh, row, vocab, temperature, f, region);
    return {walk_candidates(sh, n, f, by_mass, false, remaining, false), false};
  }
  // More than kBins tokens in the crossing bin: narrow by the value's bits, from the bin's key
  // range (a key bin) or from the keys found in it (a level-0 bin of width 1/32).
  uint32_t lo = region.key_lo, hi = region.key_hi;
  if (!key_bins) {
    MinMaxKey range{0xFFFFFFFFu, 0u};
    for_each_scaled(row, vocab, temperature, [&](int64_t, float s) {
      if (region.contains(f, s)) {
        const uint32_t key = order_key(s);
        range = CombineMinMaxKey{}(range, MinMaxKey{key, key});
      }
    });
    range = block_all_reduce(range, CombineMinMaxKey{}, scratch_as<MinMaxKey>(sh));
    lo = range.lo;
    hi = range.hi;
  }
  for (;;) {
    if (lo >= hi) return {key_value(lo), false};  // one value left: the threshold is it
    region.key_lo = lo;
    region.key_hi = hi;
    clear_histogram(sh);
    const unsigned long long width = static_cast<unsigned long long>(hi - lo) + 1;
    for_each_scaled(row, vocab, temperature, [&](int64_t, float s) {
      if (region.contains(f, s)) {
        // Bin 0 holds the largest keys, so bins run in decreasing value like level 0.
        const unsigned long long u = (static_cast<unsigned long long>(order_key(s) - lo) * kBins) / width;
        const int bin = kBins - 1 - static_cast<int>(u);
        atomicAdd(&sh.count[bin], 1u);
        if (by_mass) add_mass(&sh.mass[bin], fixed_mass(s, f.max));
      }
    });
    __syncthreads();
    const Crossing sub = find_crossing(sh, by_mass, remaining, false);
    remaining -= static_cast<double>(sub.before);
    const unsigned long long u = static_cast<unsigned long long>(kBins - 1 - sub.index);
    // Keys whose bin is u: (key - lo) in [ceil(u * width / kBins), ceil((u + 1) * width / kBins)).
    const uint32_t new_lo = lo + static_cast<uint32_t>((u * width + kBins - 1) / kBins);
    const uint32_t new_hi = lo + static_cast<uint32_t>(((u + 1) * width + kBins - 1) / kBins - 1);
    lo = new_lo;
    hi = new_hi;
    if (sub.count_at <= static_cast<uint32_t>(kBins) && lo < hi) {
      region.key_lo = lo;
      region.key_hi = hi;
      const int n = gather_sorted(sh, row, vocab, temperature, f, region);
      return {walk_candidates(sh, n, f, by_mass, false, remaining, false), false};
    }
  }
}

// A row that cannot be sampled: the error goes to the status word, the outputs to -1 / NaN.
__device__ void fail_row(const SampleKernelArgs& a, int64_t row, int64_t where, StatusKind kind) {
  if (threadIdx.x == 0) {
    detail::record(a.status, where, kind);
    a.ids[row] = -1;
    a.logprobs[row] = NAN;
  }
}

// After pass 1: fails the row (and returns true) when it holds NaN, no finite value or +inf.
__device__ bool row_unsampleable(const SampleKernelArgs& a, int64_t row, uint32_t nan, float max) {
  if (nan) {
    fail_row(a, row, row, StatusKind::RowHasNaN);
  } else if (max == neg_inf()) {
    fail_row(a, row, row, StatusKind::RowHasNoFinite);
  } else if (max == INFINITY) {
    fail_row(a, row, row, StatusKind::RowHasPosInf);
  } else {
    return false;
  }
  return true;
}

__device__ RowNoise row_noise(const SampleKernelArgs& a, int64_t row, int64_t step) {
  return RowNoise::at(static_cast<uint64_t>(a.per_row_seeds ? a.seeds[row] : a.seeds[0]),
                      a.per_row_seeds ? 0u : static_cast<uint32_t>(row),
                      static_cast<uint64_t>(step));
}

// Token v's fine bits (philox.h), in a call of its own: a draw needs them for a handful of
// tokens per row, and a Philox block inlined at every offer site pushed the plain kernels past
// their 64 registers into spills (ptxas sm_90, CUDA 13.0: 36 bytes in the slices kernels).
// The plain kernels' group of eight may call it for several of its tokens (one fine block
// each time): a few per row.
__device__ LATRO_DEVICE_NOINLINE uint32_t fine_bits_out_of_line(uint64_t seed, uint32_t stream,
                                                                uint64_t step, uint32_t v) {
  return RowNoise::at(seed, stream, step).fine(v);
}
// (Arguments by value: a reference to the row's RowNoise would put it in local memory.)
__device__ __forceinline__ uint32_t fine_bits_out_of_line(const RowNoise& noise, uint32_t v) {
  return fine_bits_out_of_line(noise.seed, noise.stream, noise.step, v);
}

// exp(x) as one ex2.approx.ftz: 0 below exp(-87) (flushed, as gumbel.h's skip test allows);
// relative error about 1e-6 for |x| < 20, growing with |x| to 5e-6 near 87 (the rounding of
// x * log2(e)). Only for the normalizers, where that moves a log-probability by about 1e-6;
// the thresholds and their fixed-point masses keep expf.
__device__ __forceinline__ float fast_exp(float x) {
#if defined(LATRO_CUDA_EMULATION)
  return exp2f(x * 1.44269504088896341f);  // the CPU emulation has no PTX
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#endif
}

// Temperature sampling without filters (the rollout's case): one read of a row computes its
// max, the normalizer online, and the Gumbel argmax. Kernels of their own: without the filters'
// histograms they need a tenth of the shared memory. One 16-byte load in flight per thread
// (two blocks per SM). A row may be split over several blocks ("slices", see plan_sample) when
// there are too few rows to give every SM two blocks: each slice's block reduces its tokens to
// a partial (max, normalizer, best key) and a second kernel merges a row's partials. Keys
// compare exactly and the best key is the same whichever block saw it, so the ids do not
// depend on the slices; the normalizer differs by the rounding of its merge (float64). kUnit:
// temperature 1, no division (x / 1 == x).
//
// What the pass spends is most likely instructions more than loads (the H100 run of
// 2026-11-27: 0.155-0.175 ms for 256 rows of 128,256 float32 logits, flat or peaked, with or
// without more loads in flight). A warp runs a branch when any of its lanes takes it, and each
// thread starts its own argmax from nothing: its max and best key rise over its first tokens,
// and while they do, some lane redoes the skip bounds (a new max) or computes a key's
// logarithms at about one token position in three (benchmarks/sample_branch_model.py: 128k
// flat or peaked logits over 512 threads). So with a.warm_start (rows of more than two calls
// a thread), after each thread's first call the block shares its max and best key (one
// reduction of two floats) and every thread goes on from them: the max as its own (its
// normalizer rescaled onto it), the best key as the bar its skips compare with
// (GumbelArgmax::raise_bar; the winner is still found among its own tokens, and the skips stay
// exact). The same model then has 2-5% of positions taking either branch.
template <typename T, bool kUnit>
__device__ __forceinline__ FirstPass plain_pass(const SampleKernelArgs& a, int64_t row,
                                                int64_t begin, int64_t end, int64_t step,
                                                FirstPass* scratch) {
  // Eight consecutive tokens per call (one coarse Philox block): two 16-byte vectors of
  // float32, one of 16-bit values.
  constexpr int kVectors = 8 / detail::kVec<T> > 1 ? 8 / detail::kVec<T> : 1;
  constexpr int64_t kCallTokens = kVectors * detail::kVec<T>;
  RowNoise noise = row_noise(a, row, step);
  const PhiloxKey key = sampling_key(noise.seed);  // round keys once per row (whole blocks)
  FirstPass first{neg_inf(), 0u, 0.0, Best::none()};
  float sum = 0.0f;
  GumbelArgmax draw = GumbelArgmax::start(neg_inf());
  // A larger max m: the normalizer moves onto it (a side that saw only -inf holds 0s).
  auto grow_max = [&](float m) {
    sum *= first.max == neg_inf() ? 0.0f : expf(first.max - m);
    first.max = m;
  };
  // One token with everything checked: NaN, a new max, -inf. coarse() and fine() give its bits.
  auto visit = [&](int64_t v, float s, auto&& coarse, auto&& fine) {
    first.nan |= s != s;
    if (s > first.max) {
      grow_max(s);
      draw.max_changed(s);
    }
    if (s == neg_inf()) return;
    const float p = fast_exp(s - first.max);
    sum += p;
    draw.offer(v, s, p, first.max, coarse, fine);  // first.max <= the row max: skips stay exact
  };
  // The stretch: every thread's first call, where the row is long enough for the shared
  // values to pay off (one loop; a second copy of it for the stretch cost the kernels 20-40
  // registers, ptxas sm_90).
  bool warm_pending = a.warm_start && end - begin > 2 * int64_t{kThreads} * kCallTokens;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride + begin;
  detail::for_each_in_row<kVectors>(x, end - begin, [&](int64_t from, const auto& values) {
    constexpr int n = count_of<decltype(values)>;
    const int64_t base = begin + from;  // the token index within the row
    float s[n];
#pragma unroll
    for (int i = 0; i < n; ++i) s[i] = kUnit ? values[i] : values[i] / a.temperature;
    bool whole_blocks = false;
    if constexpr (n % 8 == 0) whole_blocks = (base & 7) == 0;
    if (whole_blocks) {
      // Whole coarse blocks: each computed once (when a token may need it), bits picked by
      // constant index, no per-token block bookkeeping. The call's max first (fmaxf skips
      // NaN), so that a new max costs one update per call; then the usual call: a finite max
      // that no token exceeds (a NaN fails the test too). Its tokens need no branch of their
      // own: exps, sums and the coarse skip tests run for all eight, and one rarely taken
      // branch offers the group when any may win (offer tests each again, against a best key
      // an earlier one may have raised, as visit would have, and fetches fine bits only for a
      // token its coarse bits leave in). NaN, and -inf while the row has shown nothing else, go through visit.
      float call_max = s[0];
#pragma unroll
      for (int i = 1; i < n; ++i) call_max = fmaxf(call_max, s[i]);
      if (call_max > first.max) {
        grow_max(call_max);
        draw.max_changed(call_max);
      }
      bool usual = first.max > neg_inf();
#pragma unroll
      for (int i = 0; i < n; ++i) usual &= s[i] <= first.max;
#pragma unroll
      for (int g = 0; g < n / 8; ++g) {
        const float* t = s + 8 * g;
        const uint32_t token = static_cast<uint32_t>(base) + 8u * g;
        bool needed = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) needed |= t[i] >= draw.floor;
        Philox4 words{};
        if (needed) words = sampling_random_block(key, noise.stream, noise.step, token >> 3);
        // Token token + i's coarse bits (philox.h's coarse_bits at a constant index).
        auto coarse = [&](int i) { return (words.v[i >> 1] >> (16 * (i & 1))) & 0xFFFFu; };
        auto fine = [&](int i) { return fine_bits_out_of_line(noise, token + static_cast<uint32_t>(i)); };
        if (usual) {
          bool any_may_win = false;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float p = fast_exp(t[i] - first.max);
            sum += p;
            any_may_win |= draw.may_win(t[i], p, coarse(i));
          }
          if (any_may_win) {
            // The exps again rather than eight more registers live through the common path.
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              draw.offer(base + 8 * g + i, t[i], fast_exp(t[i] - first.max), first.max,
                         [&] { return coarse(i); }, [&] { return fine(i); });
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            visit(base + 8 * g + i, t[i], [&] { return coarse(i); }, [&] { return fine(i); });
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const uint32_t v = static_cast<uint32_t>(base + i);
        visit(base + i, s[i], [&] { return noise.coarse(v); },
              [&] { return fine_bits_out_of_line(noise, v); });
      }
    }
    if constexpr (n > 1) {
      // Every thread's first call is the loop's first iteration (the row holds more than
      // twice kThreads calls' tokens less a head of under one vector, so each thread has at
      // least one): the block reaches the reduction together.
      if (warm_pending) {
        warm_pending = false;
        const MaxAndKey shared = block_all_reduce(MaxAndKey{first.max, draw.best.key},
                                                  CombineMaxAndKey{},
                                                  reinterpret_cast<MaxAndKey*>(scratch));
        if (shared.max > first.max) grow_max(shared.max);  // finite, or +inf (the row fails)
        draw.raise_bar(shared.key, first.max);
      }
    }
  }, a.prefetch_ahead);
  first.sum = sum;
  first.best = draw.best;
  return block_all_reduce(first, CombineFirstPass{}, scratch);
}

// A row's draw from its reduced pass (thread 0 writes it), or the row fails.
__device__ void finish_plain_row(const SampleKernelArgs& a, int64_t row, const FirstPass& first) {
  if (row_unsampleable(a, row, first.nan, first.max)) return;
  if (threadIdx.x == 0) {
    a.ids[row] = first.best.index;
    a.logprobs[row] = static_cast<float>(static_cast<double>(first.best.value) - first.max -
                                         log(first.sum));
  }
}

// The rows of a block (a grid-stride loop): each row's reduced pass, pass(row, step, scratch),
// gives its draw; a negative offset fails every row.
template <typename Pass>
__device__ __forceinline__ void draw_plain_rows(const SampleKernelArgs& a, FirstPass* scratch,
                                                Pass&& pass) {
  const int64_t step = *a.offset;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    __syncthreads();  // the scratch is reused from the previous row
    if (step < 0) {
      fail_row(a, row, -1, StatusKind::NegativeOffset);
      continue;
    }
    finish_plain_row(a, row, pass(row, step, scratch));
  }
}

// One block per row. Both plain kernels are bounded to two blocks per SM (64 registers): ptxas
// (sm_90) then fits them in 56-64 registers without spilling, where unbounded it gave the
// 16-bit whole-row forms 64 registers and spills.
template <typename T, bool kUnit>
__global__ void __launch_bounds__(kThreads, 2) plain_sample_kernel(SampleKernelArgs a) {
  alignas(16) __shared__ unsigned char scratch[(kMaxWarps + 1) * sizeof(FirstPass)];
  draw_plain_rows(a, reinterpret_cast<FirstPass*>(scratch),
                  [&](int64_t row, int64_t step, FirstPass* sh) {
                    return plain_pass<T, kUnit>(a, row, 0, a.vocab, step, sh);
                  });
}

// The tokens of one slice of a row: a whole multiple of 64 (so every slice starts on a Philox
// block and keeps the row's 16-byte alignment); the row's last slice is shorter, and slices
// past its end are empty.
int64_t slice_length(int64_t vocab, int64_t slices) {
  return ((vocab + slices - 1) / slices + 63) / 64 * 64;
}

// Block b (one per slice: the grid is rows x slices < 2^31 blocks) reduces slice b % slices of
// row b / slices, tokens [slice x length, + length) cut at the row's end, to partials[b];
// nothing with a negative offset (the combining kernel fails every row then). No loop and
// 32-bit indices: the 64 registers of two blocks per SM hold the half-precision forms only so.
template <typename T, bool kUnit>
__global__ void __launch_bounds__(kThreads, 2) plain_sample_slices_kernel(SampleKernelArgs a,
                                                                       uint32_t slices,
                                                                       int64_t length,
                                                                       FirstPass* partials) {
  alignas(16) __shared__ unsigned char scratch[(kMaxWarps + 1) * sizeof(FirstPass)];
  const int64_t step = *a.offset;
  if (step < 0) return;
  const uint32_t row = blockIdx.x / slices;
  const int64_t start = static_cast<int64_t>(blockIdx.x - row * slices) * length;
  const int64_t begin = start < a.vocab ? start : a.vocab;
  const int64_t end = begin + length < a.vocab ? begin + length : a.vocab;
  const FirstPass first = plain_pass<T, kUnit>(a, row, begin, end, step,
                                               reinterpret_cast<FirstPass*>(scratch));
  if (threadIdx.x == 0) partials[blockIdx.x] = first;
}

// A warp per row merges its slices' partials (a fixed tree: the same sums on every run).
constexpr int kCombineThreads = 32;
__global__ void __launch_bounds__(kCombineThreads) plain_sample_combine_kernel(
    SampleKernelArgs a, int64_t slices, const FirstPass* partials) {
  alignas(16) __shared__ unsigned char scratch[(kMaxWarps + 1) * sizeof(FirstPass)];
  draw_plain_rows(a, reinterpret_cast<FirstPass*>(scratch),
                  [&](int64_t row, int64_t, FirstPass* sh) {
                    FirstPass first{neg_inf(), 0u, 0.0, Best::none()};
                    for (int64_t s = threadIdx.x; s < slices; s += blockDim.x) {
                      first = CombineFirstPass{}(first, partials[row * slices + s]);
                    }
                    return block_all_reduce(first, CombineFirstPass{}, sh);
                  });
}

// Greedy decoding and sampling with top-k / top-p / min-p. Two blocks per SM (at most 64
// registers): left to itself the compiler takes up to 98 and one block per SM, half the loads
// in flight for passes that stream the row. kTopPOnly: top-p without top-k or min-p, whose
// pass 1 also builds the mass histogram; an instantiation of its own, so each keeps only its
// own pass-1 state in registers.
template <typename T, bool kTopPOnly>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(SampleKernelArgs a) {
  __shared__ Shared sh;
  const int64_t step = *a.offset;
  const T* logits = static_cast<const T*>(a.logits);
  const bool top_k_on = a.top_k > 0 && a.top_k < a.vocab;
  const bool top_p_on = a.top_p < 1.0f;
  const bool min_p_on = a.min_p > 0.0f;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    __syncthreads();  // shared memory is reused from the previous row
    const T* x = logits + row * a.row_stride;
    if (step < 0) {
      fail_row(a, row, -1, StatusKind::NegativeOffset);
      continue;
    }
    if (a.temperature == 0.0f) {  // greedy: argmax of the raw logits, lowest id on ties
      Greedy g{neg_inf(), 0u, INT64_MAX};
      for_each_in_row(x, a.vocab, [&](int64_t base, const auto& values) {
        constexpr int n = count_of<decltype(values)>;
#pragma unroll
        for (int i = 0; i < n; ++i) {
          g.nan |= values[i] != values[i];
          g = CombineGreedy{}(g, Greedy{values[i], g.nan, base + i});
        }
      });
      g = block_all_reduce(g, CombineGreedy{}, scratch_as<Greedy>(sh));
      if (g.nan) {
        fail_row(a, row, row, StatusKind::RowHasNaN);
      } else if (threadIdx.x == 0) {
        a.ids[row] = g.index;
        a.logprobs[row] = 0.0f;  // a point mass
      }
      continue;
    }
    // ---- pass 1: the max, with top-k the count histogram by key bins (no max needed), and
    // with top-k or min-p the speculative gathering of every token that may be kept
    const bool gather = !kTopPOnly && (top_k_on || min_p_on);
    // Top-p alone: pass 1 also builds the mass histogram, relative to the prefix's max.
    constexpr bool fused_top_p = kTopPOnly;
    if (top_k_on || fused_top_p) clear_histogram(sh);
    if (threadIdx.x == 0) sh.candidate_count = 0;
    FirstPass first{neg_inf(), 0u, 0.0, Best::none()};
    auto count_token = [&](float s) {
      first.nan |= s != s;
      first.max = fmaxf(first.max, s);
      if (top_k_on && s != neg_inf() && s == s) atomicAdd(&sh.count[key_bin(s)], 1u);
    };
    // The prefix: its max and top-k histogram bound what the rest of the row can keep.
    const bool use_prefix = (gather || fused_top_p) && a.vocab > kBins;
    const int64_t prefix = use_prefix ? (a.vocab / kPrefixFraction) & ~int64_t{7} : 0;
    float prefix_max = neg_inf();
    uint32_t floor_key = 0;  // top-k: every kept key is >= it (0: no bound yet)
    if (prefix > 0) {
      for_each_scaled(x, prefix, a.temperature, [&](int64_t, float s) { count_token(s); });
      // (the reduction's barriers complete the histogram)
      prefix_max = block_all_reduce(first.max, CombineMax{}, scratch_as<float>(sh));
      if (top_k_on) {
        // k tokens at or above a key bin's low end: the k-th largest of the row is too.
        const Crossing c = find_crossing(sh, false, static_cast<double>(a.top_k), false);
        if (c.count_before + c.count_at >= static_cast<unsigned long long>(a.top_k)) {
          floor_key = key_bin_lo(c.index);
        }
      }
    } else {
      __syncthreads();  // candidate_count is reset before anyone pushes
    }
    // The rest of the row, one loop per kind of row (each keeps only its own state live).
    auto rest_of_row = [&](auto&& also) {
      for_each_scaled(
          x + prefix, a.vocab - prefix, a.temperature,
          [&](int64_t i, float s) {
            count_token(s);
            if (s == s && s != neg_inf()) also(prefix + i, s);
          },
          a.prefetch_ahead);
    };
    if (gather) {
      // The block's max of the prefix bounds the row max from below, like each thread's own.
      first.max = fmaxf(first.max, prefix_max);
      rest_of_row([&](int64_t v, float s) {
        // min-p keeps s - m >= log_min_p for the row max m >= the max seen so far, and float
        // subtraction is monotone: testing against the smaller running max only keeps more.
        if (order_key(s) >= floor_key && (s - first.max) >= a.log_min_p) {
          push_candidate_while_room(sh, s, v);
        }
      });
    } else if (fused_top_p) {
      rest_of_row([&](int64_t v, float s) {
        if (s > prefix_max) {
          push_candidate_while_room(sh, s, v);  // above the prefix's max: a few tokens
        } else {
          add_to_histogram(sh, s, prefix_max);
        }
      });
    } else {
      rest_of_row([](int64_t, float) {});
    }
    // (its barriers also complete the histogram and the candidates)
    first = block_all_reduce(first, CombineFirstPass{}, scratch_as<FirstPass>(sh));
    if (row_unsampleable(a, row, first.nan, first.max)) continue;
    const float m = first.max;

    // ---- thresholds
    Filters f{m, neg_inf(), a.log_min_p, neg_inf()};
    bool kept_in_shared = false;  // the sorted candidates hold every kept token
    int n_candidates = 0;
    // Top-p's crossing level-0 bin when the draw must find its threshold (-1: tau_p is known),
    // and the mass still needed inside that bin.
    int nucleus_bin = -1;
    double nucleus_bin_need = 0.0;
    // top-k: finite tokens of the row
    const unsigned long long finite_count = top_k_on ? histogram_total(sh, sh.count) : 0;
    // Fewer finite tokens than k: the k-th largest is -inf and every finite token stays.
    const bool top_k_binds = top_k_on && finite_count > static_cast<unsigned long long>(a.top_k);
    // Whether the candidates still fit, read by every thread before any pushes again.
    auto room_left = [&] {
      const bool room = sh.candidate_count < kBins;
      __syncthreads();
      return room;
    };
    if (gather && room_left()) {
      // The speculative gathering held: cut the candidates to the row's final bounds (top-k's
      // key bin from the whole histogram, min-p exactly), add the prefix's tokens within them,
      // and the candidates are every token of one prefix of the sorted row.
      uint32_t cut_key = 0;
      if (top_k_binds) {
        cut_key = key_bin_lo(find_crossing(sh, false, static_cast<double>(a.top_k), false).index);
      }
      auto within_cut = [&](float s) { return order_key(s) >= cut_key && (s - m) >= a.log_min_p; };
      if (prefix > 0) {
        for_each_scaled(x, prefix, a.temperature, [&](int64_t v, float s) {
          if (s == s && s != neg_inf() && within_cut(s)) push_candidate_while_room(sh, s, v);
        });
        __syncthreads();
      }
      if (room_left()) {
        if (threadIdx.x == 0) sh.dropped = 0;
        __syncthreads();
        const int held = candidates_held(sh);
        for (int i = threadIdx.x; i < held; i += blockDim.x) {
          if (!within_cut(candidate_value(sh.candidates[i]))) {
            sh.candidates[i] = ~0ull;  // sorts last
            atomicAdd(&sh.dropped, 1u);
          }
        }
        __syncthreads();
        sort_candidates(sh);
        n_candidates = held - static_cast<int>(sh.dropped);
        // The k-th candidate is the k-th largest of the row when there are k; with fewer, the
        // min-p cut lies above the k-th largest and decides alone (tau_k = the last candidate).
        if (top_k_binds) {
          f.tau_k = walk_candidates(sh, n_candidates, f, false, false,
                                    static_cast<double>(a.top_k), false);
        }
        kept_in_shared = true;
      }
    }
    if (top_k_binds && !kept_in_shared) {
      const Threshold t = select_threshold(sh, x, a.vocab, a.temperature, f, true, false, false,
                                           static_cast<double>(a.top_k), false);
      f.tau_k = t.value;
      kept_in_shared = t.all_above_in_shared;
      n_candidates = kept_in_shared ? candidates_held(sh) : 0;
    }
    // The level-0 bins' reference: d = bin_ref - s (the row max, or the prefix's max when pass 1
    // built the mass histogram; tokens above it are then kept whenever top-p binds below them).
    float bin_ref = m;
    bool top_p_done = false;
    if (fused_top_p && room_left()) {
      // Pass 1 binned every token below the prefix's max M relative to M and kept the (few)
      // tokens above M as candidates. Add the prefix's tokens to the bins, then find where the
      // mass from the top reaches top_p: among the candidates (every kept token is then one:
      // no more reads), or in a bin, which the draw's pass gathers. Masses in units of
      // exp(s - m) 2^32: the candidates' exact, the bins' scaled by exp(M - m).
      if (prefix > 0) {
        for_each_scaled(x, prefix, a.temperature, [&](int64_t, float s) {
          if (s == s && s != neg_inf()) add_to_histogram(sh, s, prefix_max);
        });
      }
      const int held = candidates_held(sh);
      unsigned long long local_top = 0;
      for (int i = threadIdx.x; i < held; i += blockDim.x) {
        local_top += fixed_mass(candidate_value(sh.candidates[i]), m);
      }
      const unsigned long long top_mass =
          block_all_reduce(local_top, SumU64{}, scratch_as<unsigned long long>(sh));
      const unsigned long long bins_mass = histogram_total(sh, sh.mass);
      const double scale = prefix_max == neg_inf() ? 0.0 : static_cast<double>(expf(prefix_max - m));
      const double need =
          static_cast<double>(a.top_p) *
          (static_cast<double>(top_mass) + static_cast<double>(bins_mass) * scale);
      if (need <= static_cast<double>(top_mass) || bins_mass == 0 || scale == 0.0) {
        const int n = sort_candidates(sh);
        f.tau_p = walk_candidates(sh, n, f, true, false, need, false);
        kept_in_shared = true;
        n_candidates = n;
        top_p_done = true;
      } else {
        const double remaining = need - static_cast<double>(top_mass);  // in m units
        const Crossing c = find_crossing(sh, true, remaining / scale, false);
        if (c.count_at <= static_cast<uint32_t>(kBins)) {
          bin_ref = prefix_max;
          nucleus_bin = c.index;
          nucleus_bin_need = remaining - static_cast<double>(c.before) * scale;
          top_p_done = true;
        }
      }
    }
    if (top_p_on && !top_p_done) {
      if (kept_in_shared) {
        // Every survivor is a candidate already (sorted): top-p without another pass.
        f.tau_p = walk_candidates(sh, n_candidates, f, true, true, static_cast<double>(a.top_p),
                                  true);
      } else {
        clear_histogram(sh);
        for_each_scaled(
            x, a.vocab, a.temperature,
            [&](int64_t, float s) {
              if (f.survives(s)) add_to_histogram(sh, s, m);
            },
            a.prefetch_ahead);
        __syncthreads();
        const Crossing level0 = find_crossing(sh, true, static_cast<double>(a.top_p), true);
        if (level0.count_before + level0.count_at > static_cast<unsigned long long>(kBins) &&
            level0.count_at <= static_cast<uint32_t>(kBins)) {
          // A nucleus larger than shared memory: the draw's pass gathers the crossing bin too.
          nucleus_bin = level0.index;
          nucleus_bin_need = level0.need - static_cast<double>(level0.before);
        } else {
          const Threshold t = select_threshold(sh, x, a.vocab, a.temperature, f, false, true,
                                               true, static_cast<double>(a.top_p), true);
          f.tau_p = t.value;
          kept_in_shared = t.all_above_in_shared;
          n_candidates = kept_in_shared ? candidates_held(sh) : 0;
        }
      }
    }

    // ---- the draw: Gumbel argmax and kept mass over the kept set
    Final fin{0.0, Best::none()};
    float kept_mass = 0.0f;
    RowNoise noise = row_noise(a, row, step);
    GumbelArgmax draw = GumbelArgmax::start(m);
    auto offer_kept = [&](int64_t v, float s) {
      if (!f.kept(s)) return;
      const float p = fast_exp(s - m);
      kept_mass += p;
      const uint32_t token = static_cast<uint32_t>(v);
      // Which form fits 64 registers without spilling is ptxas's call (sm_90, CUDA 13.0): the
      // fine block inline for float32 rows, out of line for 16-bit ones (either way round
      // spilled 8-28 bytes; scripts/cuda_compile_check.sh fails any spill).
      draw.offer(v, s, p, m, [&] { return noise.coarse(token); }, [&] {
        if constexpr (sizeof(T) == 4) {
          return noise.fine(token);
        } else {
          return fine_bits_out_of_line(noise, token);
        }
      });
    };
    auto offer_candidates = [&](int n) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned long long c = sh.candidates[i];
        offer_kept(candidate_index(c), candidate_value(c));
      }
    };
    if (kept_in_shared) {
      offer_candidates(n_candidates);
    } else if (nucleus_bin >= 0) {
      // One pass: the survivors of the bins above the crossing one are all in the nucleus (tau_p
      // lies in the crossing bin, whose values are all smaller) and drawn over now; the crossing
      // bin is gathered, its threshold found as select_threshold would, and its kept tokens
      // drawn over after. Until then f.tau_p is -inf, so offer_kept keeps every survivor.
      if (threadIdx.x == 0) sh.candidate_count = 0;
      __syncthreads();
      for_each_scaled(
          x, a.vocab, a.temperature,
          [&](int64_t v, float s) {
            if (!f.survives(s)) return;
            const int bin = s > bin_ref ? -1 : level0_bin(s, bin_ref);  // -1: above every bin
            if (bin < nucleus_bin) {
              offer_kept(v, s);
            } else if (bin == nucleus_bin) {
              push_candidate(sh, s, v);
            }
          },
          a.prefetch_ahead);
      __syncthreads();
      const int n = sort_candidates(sh);
      f.tau_p = walk_candidates(sh, n, f, true, false, nucleus_bin_need, false);
      offer_candidates(n);
    } else {
      for_each_scaled(x, a.vocab, a.temperature, offer_kept, a.prefetch_ahead);
    }
    fin.mass = kept_mass;
    fin.best = draw.best;
    fin = block_all_reduce(fin, CombineFinal{}, scratch_as<Final>(sh));
    if (threadIdx.x == 0) {
      // The max token is always kept (every filter keeps it), so mass >= 1 and best is set.
      a.ids[row] = fin.best.index;
      a.logprobs[row] =
          static_cast<float>(static_cast<double>(fin.best.value) - m - log(fin.mass));
    }
  }
}

// Blocks of the filtered kernel (each loops over rows). Filters read a row up to three times;
// with fewer rows in flight their logits may stay in L2 between passes (a 128k float32 row is
// 0.5 MiB; an H100 has 50 MiB of L2, and 264 rows in flight need 130 MiB). It does not: on
// the H100 runs of 2026-11-26 and -27 one block per row was fastest or within 6% in every case.
// LATRO_CUDA_SAMPLE_GRID=<blocks> sets the grid (unset or 0: one block per row), and
// benchmarks/bench_gpu.py sweeps it.
unsigned int filtered_grid(int64_t rows) {
  const int64_t blocks = tuning_variable("LATRO_CUDA_SAMPLE_GRID", int64_t{1} << 30);
  if (blocks > 0 && blocks < rows) return static_cast<unsigned int>(blocks);
  return detail::row_blocks(rows);
}

// The filtered kernel is at its 64-register budget (two blocks per SM) with one 16-byte load in
// flight per thread, which leaves a block streaming its row latency-bound; more loads in flight
// spill (ptxas: 100 bytes with two). An L2 prefetch needs no register:
// LATRO_CUDA_SAMPLE_PREFETCH=<iterations> has each thread ask for its vector that many
// iterations ahead in the passes over the whole row (0: none; at most 64; benchmarks/bench_gpu.py
// sweeps it). Unset, 2: on the H100 run of 2026-11-27 (256 flat rows of 128,256 float32
// logits) it was best or tied in every filtered case, top-k 0.121 -> 0.115 ms, min-p 0.147 ->
// 0.133, all three filters 0.125 -> 0.118, and on the run after top-p alone 0.399 -> 0.386; 8
// iterations and more were slower.
int64_t filtered_prefetch() { return tuning_variable("LATRO_CUDA_SAMPLE_PREFETCH", 64, 2); }

// The same for the plain kernels' one pass (LATRO_CUDA_SAMPLE_PLAIN_PREFETCH, whole rows and
// slices alike). Unset, 0 (none) until a GPU run times it: benchmarks/bench_gpu.py sweeps it.
int64_t plain_prefetch() { return tuning_variable("LATRO_CUDA_SAMPLE_PLAIN_PREFETCH", 64, 0); }

// LATRO_CUDA_SAMPLE_PLAIN_WARM: 1 (unset: the default) starts the plain kernels' threads from
// the max and best key of a first stretch of the row (plain_pass), 0 from nothing. The draws are
// the same either way. Not yet timed on a GPU: benchmarks/bench_gpu.py's sample_plain_warm
// table compares both.
bool plain_warm_start() { return tuning_variable("LATRO_CUDA_SAMPLE_PLAIN_WARM", 1, 1) == 1; }

// The most slices a row is split into, and the fewest tokens a slice holds.
constexpr int64_t kMaxSlices = 64;
constexpr int64_t kMinSliceTokens = 4096;

bool plain_sampling(const SampleArgs& args) {
  const bool top_k_on = args.top_k > 0 && args.top_k < args.vocab;
  return args.temperature > 0.0f && !top_k_on && !(args.top_p < 1.0f) && !(args.min_p > 0.0f);
}

}  // namespace

SamplePlan plan_sample(const SampleArgs& args, int multiprocessors) {
  detail::check_sample_args(args);
  LATRO_CHECK(multiprocessors >= 1, "multiprocessors must be >= 1, got ", multiprocessors);
  // Two blocks per SM fill the device (the plain kernels' registers allow two); fewer rows
  // than that leave SMs idle unless rows are split. LATRO_CUDA_SAMPLE_SLICES=<n> sets the
  // slices of plain sampling (benchmarks/bench_gpu.py sweeps it), read (and so checked) for
  // any sampling; unset or 0: this rule. Either way at most one grid of 2^31 blocks.
  const int64_t chosen = tuning_variable("LATRO_CUDA_SAMPLE_SLICES", kMaxSlices);
  SamplePlan plan;
  if (!plain_sampling(args) || args.rows == 0) return plan;
  const int64_t most = std::max<int64_t>(
      1, std::min({kMaxSlices, args.vocab / kMinSliceTokens, (int64_t{1} << 31) / args.rows - 1}));
  const int64_t wanted = chosen > 0 ? chosen : 2 * int64_t{multiprocessors} / args.rows;
  plan.slices = std::max<int64_t>(1, std::min(wanted, most));
  plan.workspace_bytes =
      plan.slices > 1 ? args.rows * plan.slices * static_cast<int64_t>(sizeof(FirstPass)) : 0;
  return plan;
}

void sample(const SampleArgs& args, cudaStream_t stream, uint64_t* status) {
  sample(args, SamplePlan{}, nullptr, stream, status);
}

void sample(const SampleArgs& args, const SamplePlan& plan, void* workspace, cudaStream_t stream,
            uint64_t* status) {
  const int64_t stride = detail::check_sample_args(args);
  // Candidates carry 32-bit token indices.
  LATRO_CHECK(args.vocab <= INT32_MAX, "vocab must be below 2^31 on CUDA, got ", args.vocab);
  const bool plain = plain_sampling(args);
  LATRO_CHECK(plan.slices >= 1 && plan.slices <= kMaxSlices, "plan.slices must be in [1, ",
              kMaxSlices, "], got ", plan.slices);
  LATRO_CHECK(plan.slices == 1 || plain, "plan.slices = ", plan.slices,
              " splits rows of plain temperature sampling only (use plan_sample)");
  const int64_t needed =
      plan.slices > 1 ? args.rows * plan.slices * static_cast<int64_t>(sizeof(FirstPass)) : 0;
  LATRO_CHECK(plan.workspace_bytes >= needed, "plan.workspace_bytes = ", plan.workspace_bytes,
              " is below the ", needed, " bytes the slices need");
  LATRO_CHECK(workspace != nullptr || needed == 0 || args.rows == 0,
              "workspace is a null pointer");
  if (args.rows == 0) return;
  LATRO_CHECK(args.rows * plan.slices < (int64_t{1} << 31),
              "rows x slices exceeds the CUDA grid (", args.rows, " rows)");
  SampleKernelArgs a;
  a.logits = args.logits;
  a.rows = args.rows;
  a.vocab = args.vocab;
  a.row_stride = stride;
  a.seeds = args.seeds;
  a.per_row_seeds = args.per_row_seeds;
  a.offset = args.offset;
  a.temperature = args.temperature;
  a.top_k = args.top_k;
  a.top_p = args.top_p;
  a.min_p = args.min_p;
  // Exactly the CPU's expression, so both compare s - m against the same float.
  a.log_min_p = args.min_p > 0.0f ? static_cast<float>(std::log(static_cast<double>(args.min_p)))
                                  : -INFINITY;
  a.ids = args.ids;
  a.logprobs = args.logprobs;
  a.status = status;
  const bool top_k_on = args.top_k > 0 && args.top_k < args.vocab;
  const bool top_p_only = args.temperature > 0.0f && !top_k_on && args.top_p < 1.0f &&
                          !(args.min_p > 0.0f);
  // All read (and so checked) for any sampling, as LATRO_CUDA_SAMPLE_SLICES.
  const int64_t plain_ahead = plain_prefetch(), filtered_ahead = filtered_prefetch();
  a.warm_start = plain_warm_start();
  a.prefetch_ahead = plain ? plain_ahead : filtered_ahead;
  const bool unit = args.temperature == 1.0f;
  auto* partials = static_cast<FirstPass*>(workspace);
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    // The plain kernels for a temperature of 1 or not.
    const auto launch_plain = [&](auto unit_flag) {
      constexpr bool kUnit = decltype(unit_flag)::value;
      if (plan.slices > 1) {
        const auto blocks = static_cast<unsigned int>(args.rows * plan.slices);  // < 2^31
        const auto slices = static_cast<uint32_t>(plan.slices);
        const int64_t length = slice_length(args.vocab, plan.slices);
        detail::launch(plain_sample_slices_kernel<T, kUnit>, blocks, kThreads, stream, a, slices,
                       length, partials);
        detail::launch(plain_sample_combine_kernel, detail::row_blocks(args.rows),
                       kCombineThreads, stream, a, plan.slices,
                       static_cast<const FirstPass*>(partials));
      } else {
        detail::launch(plain_sample_kernel<T, kUnit>, detail::row_blocks(args.rows), kThreads,
                       stream, a);
      }
    };
    if (plain) {
      unit ? launch_plain(std::true_type{}) : launch_plain(std::false_type{});
    } else if (top_p_only) {
      detail::launch(sample_kernel<T, true>, filtered_grid(args.rows), kThreads, stream, a);
    } else {
      detail::launch(sample_kernel<T, false>, filtered_grid(args.rows), kThreads, stream, a);
    }
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

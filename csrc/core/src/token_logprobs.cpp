// Row log-sum-exp, token log-probabilities and their backward on the CPU.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_common.h"
#include "latro/latro.h"

namespace latro {
namespace {

using detail::exp_nonpositive;
using detail::kNegInf;

// Rows are processed in blocks that stay in L1: a block is read once from memory, its max and
// its exp-sum are taken from cache, and the float64 running total is rescaled when the max
// grows.
constexpr int64_t kBlock = 1024;

#if LATRO_HAVE_VECTOR_EXT
using detail::kVecWidth;
using detail::vbroadcast;
using detail::vexp_nonpositive;
using detail::vfloat;
using detail::vload;
using detail::vload_partial;
using detail::vmax_keep_nan;

LATRO_INLINE float horizontal_sum(vfloat v) {
  float total = 0.0f;
  for (int i = 0; i < kVecWidth; ++i) total += v[i];
  return total;
}

// Max of the block; a NaN anywhere wins.
LATRO_CPU_CLONES float block_max(const float* x, int64_t n) {
  vfloat a = vbroadcast(kNegInf), b = a;
  int64_t i = 0;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    a = vmax_keep_nan(vload(x + i), a);
    b = vmax_keep_nan(vload(x + i + kVecWidth), b);
  }
  for (; i < n; i += kVecWidth) a = vmax_keep_nan(vload_partial(x + i, std::min<int64_t>(kVecWidth, n - i), kNegInf), a);
  a = vmax_keep_nan(b, a);
  return detail::hmax_keep_nan(a, kNegInf);
}

// sum exp(x - shift) over the block, shift >= every x and finite, no NaN in x (the caller
// has checked the block max).
LATRO_CPU_CLONES float block_sum_exp(const float* x, int64_t n, float shift) {
  using detail::vexp_nonpositive_unflushed;
  vfloat a = vbroadcast(0.0f), b = a;
  int64_t i = 0;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    a += vexp_nonpositive_unflushed(vload(x + i) - shift);
    b += vexp_nonpositive_unflushed(vload(x + i + kVecWidth) - shift);
  }
  for (; i < n; i += kVecWidth) {
    a += vexp_nonpositive(vload_partial(x + i, std::min<int64_t>(kVecWidth, n - i), kNegInf) - shift);
  }
  return horizontal_sum(a + b);
}

// grad[i] = -scale * exp((x[i] - shift) - log_sum). log_sum is 0 unless the row's lse had to
// be recomputed (shift is then the row max); the common loop skips the second subtraction.
LATRO_CPU_CLONES void block_neg_softmax(const float* x, int64_t n, float shift, float log_sum,
                                        float scale, float* grad) {
  int64_t i = 0;
  if (log_sum == 0.0f) {
    for (; i + kVecWidth <= n; i += kVecWidth) {
      detail::vstore(grad + i, -scale * vexp_nonpositive(vload(x + i) - shift));
    }
  } else {
    for (; i + kVecWidth <= n; i += kVecWidth) {
      detail::vstore(grad + i, -scale * vexp_nonpositive((vload(x + i) - shift) - log_sum));
    }
  }
  for (; i < n; ++i) grad[i] = -scale * exp_nonpositive((x[i] - shift) - log_sum);
}
#else
LATRO_CPU_CLONES float block_max(const float* x, int64_t n) {
  float best = kNegInf;
  for (int64_t i = 0; i < n; ++i) best = detail::max_keep_nan(x[i], best);
  return best;
}

LATRO_CPU_CLONES float block_sum_exp(const float* x, int64_t n, float shift) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += exp_nonpositive(x[i] - shift);
  return total;
}

LATRO_CPU_CLONES void block_neg_softmax(const float* x, int64_t n, float shift, float log_sum,
                                        float scale, float* grad) {
  for (int64_t i = 0; i < n; ++i) grad[i] = -scale * exp_nonpositive((x[i] - shift) - log_sum);
}
#endif

LATRO_CPU_CLONES void block_to_float(const uint16_t* bits, int64_t n, bool is_bfloat16,
                                     float* out) {
  if (is_bfloat16) {
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(bfloat16{bits[i]});
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(float16{bits[i]});
  }
}

// A block of a row as float32: float rows are used in place, 16-bit rows converted into `buffer`.
inline const float* load_block(const float* row, int64_t n, float* buffer) {
  (void)n;
  (void)buffer;
  return row;
}
inline const float* load_block(const bfloat16* row, int64_t n, float* buffer) {
  block_to_float(reinterpret_cast<const uint16_t*>(row), n, true, buffer);
  return buffer;
}
inline const float* load_block(const float16* row, int64_t n, float* buffer) {
  block_to_float(reinterpret_cast<const uint16_t*>(row), n, false, buffer);
  return buffer;
}

// A row's log-sum-exp as its two parts, lse = max + log_sum. Callers subtract them from a
// logit one at a time, (x - max) - log_sum: near the float32 maximum max + log_sum rounds back
// to max, even in float64 (ulp(3e38) is 4e22 there), and x - lse would lose log_sum entirely.
// log_sum is in float64: rounding it to float32 would cost up to half its ulp.
struct RowLse {
  float max;        // NaN if the row holds one, -inf if the row is all -inf
  double log_sum;   // log(sum exp(x - max)), in [0, log(vocab)] for a finite max
  double lse() const { return static_cast<double>(max) + log_sum; }
};

template <typename T>
RowLse row_logsumexp(const T* row, int64_t vocab) {
  float buffer[kBlock];
  float running_max = kNegInf;
  double total = 0.0;
  for (int64_t begin = 0; begin < vocab; begin += kBlock) {
    const int64_t n = std::min(kBlock, vocab - begin);
    const float* x = load_block(row + begin, n, buffer);
    const float block_best = block_max(x, n);
    if (block_best != block_best) return {block_best, 0.0};  // NaN in the row: NaN, as torch
    if (block_best > running_max) {
      total *= std::exp(static_cast<double>(running_max) - static_cast<double>(block_best));
      running_max = block_best;
    }
    // Until a finite logit is seen every term is exp(-inf) = 0; skipping avoids -inf - -inf.
    if (running_max == kNegInf) continue;
    total += static_cast<double>(block_sum_exp(x, n, running_max));
  }
  // All -inf: lse -inf, so every log-prob is -inf - -inf = NaN, as torch's log_softmax gives.
  if (running_max == kNegInf) return {kNegInf, 0.0};
  return {running_max, std::log(total)};
}

void check_targets(const int64_t* targets, int64_t vocab, int64_t ignore_index, int64_t row_begin,
                   int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t t = targets[r];
    LATRO_CHECK(t == ignore_index || (t >= 0 && t < vocab), "targets[", r, "] = ", t,
                " is out of range for vocab size ", vocab, " (ignore_index is ", ignore_index,
                ")");
  }
}

template <typename T>
void token_logprobs_rows(const TokenLogprobsArgs& args, int64_t stride, int64_t row_begin,
                         int64_t row_end) {
  const T* logits = static_cast<const T*>(args.logits);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t target = args.targets[r];
    if (target == args.ignore_index) {
      args.logprobs[r] = 0.0f;
      if (args.lse) args.lse[r] = 0.0f;
      continue;
    }
    const T* row = logits + r * stride;
    const RowLse lse = row_logsumexp(row, args.vocab);
    // Never above 0: x <= max and log_sum >= 0 (the max contributes exp(0) = 1 to the sum).
    const double shifted =
        static_cast<double>(to_float(row[target])) - static_cast<double>(lse.max);
    args.logprobs[r] = static_cast<float>(shifted - lse.log_sum);
    if (args.lse) args.lse[r] = static_cast<float>(lse.lse());
  }
}

template <typename T>
void token_logprobs_backward_rows(const TokenLogprobsBackwardArgs& args, int64_t stride,
                                  int64_t grad_stride, int64_t row_begin, int64_t row_end) {
  const T* logits = static_cast<const T*>(args.logits);
  T* grad_logits = static_cast<T*>(args.grad_logits);
  float in_buffer[kBlock];
  float out_buffer[kBlock];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = logits + r * stride;
    T* grad_row = grad_logits + r * grad_stride;
    const int64_t target = args.targets[r];
    if (target == args.ignore_index) {
      for (int64_t v = 0; v < args.vocab; ++v) grad_row[v] = from_float<T>(0.0f);
      continue;
    }
    const float upstream = args.grad_logprobs[r];
    // softmax = exp((x - shift) - log_sum): the stored lse and 0, or where the float32 lse is
    // too coarse (see kRecomputeLseFrom in latro.h) the row's max and log-sum, recomputed.
    float shift = args.lse[r];
    double log_sum = 0.0;
    const float magnitude = std::fabs(shift);
    if (magnitude >= kRecomputeLseFrom && magnitude <= std::numeric_limits<float>::max()) {
      const RowLse lse = row_logsumexp(row, args.vocab);
      shift = lse.max;
      log_sum = lse.log_sum;
    }
    // Read before the row is overwritten (grad_logits may alias logits).
    const double p_target =
        std::exp((static_cast<double>(to_float(row[target])) - shift) - log_sum);
    const float grad_target = static_cast<float>(upstream * (1.0 - p_target));
    const float log_sum_f = static_cast<float>(log_sum);
    for (int64_t begin = 0; begin < args.vocab; begin += kBlock) {
      const int64_t n = std::min(kBlock, args.vocab - begin);
      const float* x = load_block(row + begin, n, in_buffer);
      if constexpr (std::is_same_v<T, float>) {
        block_neg_softmax(x, n, shift, log_sum_f, upstream, grad_row + begin);
      } else {
        block_neg_softmax(x, n, shift, log_sum_f, upstream, out_buffer);
        for (int64_t i = 0; i < n; ++i) grad_row[begin + i] = from_float<T>(out_buffer[i]);
      }
    }
    grad_row[target] = from_float<T>(grad_target);
  }
}

}  // namespace

const char* version() { return "0.1.0"; }

void token_logprobs(const TokenLogprobsArgs& args, int64_t row_begin, int64_t row_end) {
  const int64_t stride = detail::check_token_logprobs_args(args);
  detail::resolve_row_range(args.rows, row_begin, row_end);
  check_targets(args.targets, args.vocab, args.ignore_index, row_begin, row_end);
  LATRO_DISPATCH_DTYPE(args.dtype, T,
                       [&] { token_logprobs_rows<T>(args, stride, row_begin, row_end); });
}

void token_logprobs(const float* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out) {
  TokenLogprobsArgs args;
  args.logits = logits;
  args.dtype = DType::Float32;
  args.rows = rows;
  args.vocab = vocab;
  args.targets = targets;
  args.logprobs = out;
  token_logprobs(args);
}

void token_logprobs(const bfloat16* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out) {
  TokenLogprobsArgs args;
  args.logits = logits;
  args.dtype = DType::BFloat16;
  args.rows = rows;
  args.vocab = vocab;
  args.targets = targets;
  args.logprobs = out;
  token_logprobs(args);
}

void token_logprobs(const float16* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out) {
  TokenLogprobsArgs args;
  args.logits = logits;
  args.dtype = DType::Float16;
  args.rows = rows;
  args.vocab = vocab;
  args.targets = targets;
  args.logprobs = out;
  token_logprobs(args);
}

void token_logprobs_backward(const TokenLogprobsBackwardArgs& args, int64_t row_begin,
                             int64_t row_end) {
  const detail::BackwardStrides strides = detail::check_token_logprobs_backward_args(args);
  const int64_t stride = strides.logits, grad_stride = strides.grad;
  detail::resolve_row_range(args.rows, row_begin, row_end);
  LATRO_CHECK(args.grad_logits != args.logits || grad_stride == stride,
              "grad_logits aliases logits with a different row stride");
  check_targets(args.targets, args.vocab, args.ignore_index, row_begin, row_end);
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    token_logprobs_backward_rows<T>(args, stride, grad_stride, row_begin, row_end);
  });
}

}  // namespace latro

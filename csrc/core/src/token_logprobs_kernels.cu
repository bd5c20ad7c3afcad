// Token log-probabilities and their backward on CUDA (semantics in latro.h, launchers in
// cuda.h), plus the device status helpers every CUDA launcher shares.
#include <cfloat>

#include "cuda_common.cuh"

namespace latro::cuda {

// ---------------------------------------------------------------- status
void reset_status(uint64_t* status, cudaStream_t stream) {
  LATRO_CHECK(status != nullptr, "status is a null pointer");
  // All ones is kStatusOk, the neutral element of the kernels' atomicMin.
  LATRO_CUDA_CHECK(cudaMemsetAsync(status, 0xFF, sizeof(uint64_t), stream));
}

StatusRecord read_status(const uint64_t* status, cudaStream_t stream) {
  LATRO_CHECK(status != nullptr, "status is a null pointer");
  uint64_t word = kStatusOk;
  LATRO_CUDA_CHECK(
      cudaMemcpyAsync(&word, status, sizeof(word), cudaMemcpyDeviceToHost, stream));
  LATRO_CUDA_CHECK(cudaStreamSynchronize(stream));
  return decode_status(word);
}

const char* describe(StatusKind kind) {
  switch (kind) {
    case StatusKind::Ok: return "ok";
    case StatusKind::BadStopTable:
      return "stop_sequences offsets must start at 0, increase strictly and end at the number "
             "of stop tokens";
    case StatusKind::NegativeOffset: return "offset must be >= 0";
    case StatusKind::StepOutOfRange: return "step is outside [0, len)";
    case StatusKind::TargetOutOfRange: return "target is out of range for the vocabulary";
    case StatusKind::RowHasNaN: return "logits row contains NaN";
    case StatusKind::RowHasNoFinite: return "logits row has no finite value";
    case StatusKind::RowHasPosInf:
      return "logits row contains +inf (after dividing by the temperature)";
    case StatusKind::PositionOutOfRange: return "position is outside [0, len]";
    case StatusKind::LengthOutOfRange: return "length is outside [1, slots]";
  }
  return "unknown status";
}

void throw_on_status(const StatusRecord& record) {
  if (record.ok()) return;
  if (record.row < 0) LATRO_FAIL(describe(record.kind));
  LATRO_FAIL(describe(record.kind), " (row ", record.row, ")");
}

namespace {

using detail::for_each_in_row;
using detail::kMaxWarps;
using detail::kVec;
using detail::load_float;
using detail::neg_inf;
using detail::row_start;
using detail::tuning_variable;

// Threads per row (one block per row): the largest power of two, 64 to 512, that gives every
// thread at least `vectors` 16-byte vectors (so between that and twice as many). The LM-head
// scorer runs these kernels on vocabulary blocks of all N rows: short rows (16,448 bf16
// columns at the default chunk: a block and its -inf column, rounded up to 64), where a row's
// time is mostly fixed costs: a load latency per vector round, the block's reduction, thread
// 0's finish. The old mapping, at least two vectors a thread rounded up to the power of two,
// gave such rows 512 threads, four rows per SM, and the H100 run of 2026-11-27 measured
// 0.3-0.4 ms per block of 16,384 rows beyond its matmul (8,256-column rows: about 0.9 TB/s).
// Eight give 256 threads to those rows (eight per SM: the kernels hold 30-32 registers), and
// rows of 128k logits keep 512. LATRO_CUDA_LOGPROBS_VECTORS sets the vectors a thread (1 to
// 64; unset or 0: 8; bench_gpu.py's scorer_vectors table sweeps it).
int threads_for(int64_t vocab, int vec) {
  const int64_t per_thread = tuning_variable("LATRO_CUDA_LOGPROBS_VECTORS", 64, 8);
  const int64_t vectors = per_thread > 0 ? per_thread : 8;
  const int64_t fit = vocab / (vectors * vec);  // threads that each get `vectors` vectors
  int threads = 64;
  while (threads < 512 && 2 * threads <= fit) threads *= 2;
  return threads;
}

// A running log-sum-exp: max and sum of exp(x - max). The sum is float64 once threads combine.
struct Lse {
  float max;
  float unused;
  double sum;
};

struct CombineLse {
  __device__ Lse operator()(const Lse& a, const Lse& b) const {
    const detail::ScaledSum m = detail::merge_scaled_sums(a.max, a.sum, b.max, b.sum);
    return Lse{m.max, 0.0f, m.sum};
  }
};

// The row's max and sum of exp(x - max), reduced over the block: every thread gets them.
template <typename T>
__device__ __forceinline__ Lse row_lse(const T* x, int64_t vocab, Lse* scratch) {
  // Online log-sum-exp per thread: one rescale per vector when the max grows.
  float max = neg_inf(), sum = 0.0f;
  for_each_in_row(x, vocab, [&](int64_t, const auto& values) {
    constexpr int n = detail::count_of<decltype(values)>;
    float vmax = values[0];
#pragma unroll
    for (int i = 1; i < n; ++i) vmax = fmaxf(vmax, values[i]);  // NaN: caught by the sum
    if (vmax > max) {
      sum *= max == neg_inf() ? 0.0f : expf(max - vmax);
      max = vmax;
    }
    // Until a finite value is seen every term is exp(-inf) = 0; shifting by 0 avoids
    // -inf - -inf. A +inf max makes exp(inf - inf) = NaN, as torch's log_softmax gives.
    const float shift = max == neg_inf() ? 0.0f : max;
#pragma unroll
    for (int i = 0; i < n; ++i) sum += expf(values[i] - shift);
  });
  return detail::block_all_reduce(Lse{max, 0.0f, static_cast<double>(sum)}, CombineLse{},
                                  scratch);
}

template <typename T>
__global__ void __launch_bounds__(512)
    token_logprobs_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab,
                          int64_t row_stride, RowGroups groups, const int64_t* __restrict__ targets,
                          int64_t ignore_index, float* __restrict__ logprobs,
                          float* __restrict__ lse_out, uint64_t* status) {
  __shared__ Lse scratch[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t target = targets[row];
    if (target == ignore_index || target < 0 || target >= vocab) {
      if (threadIdx.x == 0) {
        const bool ignored = target == ignore_index;
        if (!ignored) detail::record(status, row, StatusKind::TargetOutOfRange);
        logprobs[row] = ignored ? 0.0f : NAN;
        if (lse_out) lse_out[row] = ignored ? 0.0f : NAN;
      }
      continue;
    }
    const T* x = logits + row_start(row, row_stride, groups);
    // Thread 0's target logit is loaded before the row, so its latency overlaps the row's.
    const float target_logit = threadIdx.x == 0 ? load_float(x[target]) : 0.0f;
    const Lse total = row_lse(x, vocab, scratch);
    if (threadIdx.x == 0) {
      // In float64, as on the CPU, and as (x - max) - log(sum), never x - lse: rounding the
      // lse to float32 would cost up to half an ulp of it, and near the float32 maximum
      // max + log(sum) rounds back to max even in float64. The max contributes exactly 1 to
      // the sum, so log(sum) >= 0 and the result is never above 0.
      const double log_sum = log(total.sum);
      const double shifted = static_cast<double>(target_logit) - static_cast<double>(total.max);
      logprobs[row] = static_cast<float>(shifted - log_sum);
      if (lse_out) lse_out[row] = static_cast<float>(static_cast<double>(total.max) + log_sum);
    }
  }
}

// grad[v] = upstream * ([v == target] - exp(x[v] - lse)), in place when grad == logits. Where
// the float32 lse is too coarse (kRecomputeLseFrom in latro.h) the row's max and log-sum are
// recomputed and the softmax is exp((x[v] - max) - log_sum).
template <typename T>
__global__ void __launch_bounds__(512)
    token_logprobs_backward_kernel(const T* logits, int64_t rows, int64_t vocab,
                                   int64_t row_stride, RowGroups groups,
                                   const int64_t* __restrict__ targets, int64_t ignore_index,
                                   const float* __restrict__ lse,
                                   const float* __restrict__ grad_logprobs, T* grad_logits,
                                   int64_t grad_row_stride, RowGroups grad_groups,
                                   uint64_t* status) {
  constexpr int V = kVec<T>;
  __shared__ Lse scratch[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = logits + row_start(row, row_stride, groups);
    T* g = grad_logits + row_start(row, grad_row_stride, grad_groups);
    const int64_t target = targets[row];
    const bool ignored = target == ignore_index;
    const bool bad = !ignored && (target < 0 || target >= vocab);
    if (bad && threadIdx.x == 0) detail::record(status, row, StatusKind::TargetOutOfRange);
    const float upstream = ignored || bad ? 0.0f : grad_logprobs[row];
    // softmax = exp((x - shift) - log_sum): the stored lse and 0, or the recomputed row max
    // and log-sum. The branch is uniform over the block (one row per block), and the row is
    // read before any thread overwrites it.
    float shift = ignored || bad ? 0.0f : lse[row];
    double log_sum = 0.0;
    if (fabsf(shift) >= kRecomputeLseFrom && fabsf(shift) <= FLT_MAX) {
      const Lse total = row_lse(x, vocab, scratch);
      shift = total.max;
      log_sum = log(total.sum);
    }
    const float log_sum_f = static_cast<float>(log_sum);
    // The target's gradient in float64 (1 - p loses everything in float32 when p ~ 1), from
    // the target logit read by every thread before any thread overwrites the row.
    float grad_target = 0.0f;
    if (!ignored && !bad) {
      const double p = exp((static_cast<double>(load_float(x[target])) - shift) - log_sum);
      grad_target = static_cast<float>(upstream * (1.0 - p));
    }
    __syncthreads();
    const float fill = bad ? NAN : 0.0f;  // constant rows: ignored (0) or invalid (NaN)
    const bool constant = ignored || bad;
    auto value = [&](int64_t v, float xv) {
      if (constant) return fill;
      return v == target ? grad_target : -upstream * expf((xv - shift) - log_sum_f);
    };
    // Vectors only when input and output rows share their alignment (always true in place).
    const bool same_phase =
        ((reinterpret_cast<uint64_t>(x) - reinterpret_cast<uint64_t>(g)) & 15) == 0;
    const int64_t head = same_phase ? detail::misaligned_head(x, vocab) : vocab;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
      g[i] = detail::store_float<T>(value(i, load_float(x[i])));
    }
    if (!same_phase) continue;
    const int64_t vectors = (vocab - head) / V;
    const uint4* in = reinterpret_cast<const uint4*>(x + head);
    uint4* out = reinterpret_cast<uint4*>(g + head);
    for (int64_t j = threadIdx.x; j < vectors; j += blockDim.x) {
      float values[V];
      detail::unpack<T>(in[j], values);
#pragma unroll
      for (int i = 0; i < V; ++i) values[i] = value(head + j * V + i, values[i]);
      out[j] = detail::pack<T>(values);
    }
    for (int64_t i = head + vectors * V + threadIdx.x; i < vocab; i += blockDim.x) {
      g[i] = detail::store_float<T>(value(i, load_float(x[i])));
    }
  }
}

}  // namespace

void token_logprobs(const TokenLogprobsArgs& args, cudaStream_t stream, uint64_t* status,
                    RowGroups groups) {
  const int64_t stride = detail::check_token_logprobs_args(args);
  detail::check_groups(groups, "groups");
  if (args.rows == 0) return;
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const int threads = threads_for(args.vocab, kVec<T>);
    detail::launch(token_logprobs_kernel<T>, detail::row_blocks(args.rows), threads, stream,
        static_cast<const T*>(args.logits), args.rows, args.vocab, stride, groups, args.targets,
        args.ignore_index, args.logprobs, args.lse, status);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

void token_logprobs_backward(const TokenLogprobsBackwardArgs& args, cudaStream_t stream,
                             uint64_t* status, RowGroups groups, RowGroups grad_groups) {
  const detail::BackwardStrides strides = detail::check_token_logprobs_backward_args(args);
  const int64_t stride = strides.logits, grad_stride = strides.grad;
  detail::check_groups(groups, "groups");
  detail::check_groups(grad_groups, "grad_groups");
  LATRO_CHECK(args.grad_logits != args.logits ||
                  (grad_stride == stride && grad_groups.rows_per_group == groups.rows_per_group &&
                   grad_groups.group_stride == groups.group_stride),
              "grad_logits aliases logits with a different row layout");
  if (args.rows == 0) return;
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const int threads = threads_for(args.vocab, kVec<T>);
    detail::launch(token_logprobs_backward_kernel<T>, detail::row_blocks(args.rows), threads, stream,
        static_cast<const T*>(args.logits), args.rows, args.vocab, stride, groups, args.targets,
        args.ignore_index, args.lse, args.grad_logprobs, static_cast<T*>(args.grad_logits),
        grad_stride, grad_groups, status);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

// Decode attention on CUDA: one query token per row against a static KV cache.
//
// The torch way (rotary embedding, cache writes, q @ K^T, mask, softmax, @ V over the whole
// cache) costs about nineteen kernels per layer and reads every slot of the cache at every
// step, filled or not. Here one block handles one (row, KV head) and a split of the slots
// [0, length), for all the query heads that share the KV head (grouped-query attention reads
// each key and value once for them):
//
//   rotary  with rotary tables, the query tile and the newest key are rotated through shared
//           memory first (element i pairs with i +- D/2, held by another lane);
//   pass 1  each warp takes `32 / lanes` slots at a time (twice, so that two loads per lane
//           are in flight), each slot `lanes` lanes of 8 head-dim elements (one 16-byte load
//           of bf16/fp16, two of float32); the partial dot products with the (scaled) queries
//           in registers are summed by shuffles, and the scores go to shared memory (at most
//           kMaxChunk slots per block);
//   softmax the block's max and sum of exp(score - max) per query head;
//   pass 2  the same lanes read the values and accumulate weight x value in registers,
//           summed over the warp's slots by shuffles and over the warps in shared memory.
//
// With one split the block writes the output; with several, a partial (max, sum, weighted
// values) per split that decode_attention_combine_kernel merges. The newest key and value
// (new_k / new_v) are read from the caller's tensors and written into the caches by the
// block whose split holds slot length - 1, so no block ever reads a slot being written.
#include <algorithm>

#include "cuda_common.cuh"
#include "decode_elements.h"

namespace latro::cuda {
namespace {

using detail::kVec;
using detail::kWarp;
using detail::load_float;
using detail::store_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kLaneElements = 8;  // head-dim elements per lane; 32 lanes cover kMaxDecodeHeadDim
constexpr int kQueryTile = 4;     // query heads per pass over the slots (registers: 2 x 4 x 8)
constexpr int64_t kMaxChunk = 1024;  // slots per block: the scores fill 16 KiB of shared memory
constexpr int64_t kMinChunk = 64;    // splits stop where a block would get fewer slots
// Slots each lane group loads before using any: two 16-byte loads in flight per lane instead
// of one, for a loop that is otherwise bound by the latency of its loads.
constexpr int kInFlight = 2;
static_assert(kWarp * kLaneElements == kMaxDecodeHeadDim, "one warp covers the largest head");
static_assert(kWarps * kQueryTile * kMaxDecodeHeadDim <= kQueryTile * kMaxChunk,
              "the per-warp output sums reuse the scores' shared memory");

struct AttentionParams {
  DecodeAttentionArgs args;
  detail::DecodeAttentionStrides strides;
  int64_t splits;
  int lanes;        // lanes per slot: a power of two >= head_dim / kLaneElements
  float* partial;   // [rows, heads, splits, head_dim + 2] when splits > 1: max, sum, values
  uint64_t* status;
};

// Elements [d0, d0 + 8) of a head-dim vector as floats, zeros beyond head_dim. kVector: rows
// are 16-byte aligned and head_dim a multiple of kVec<T>, so each kVec<T> run is one load.
template <typename T, bool kVector>
__device__ __forceinline__ void load_lane(const T* p, int d0, int head_dim,
                                          float (&v)[kLaneElements]) {
  if constexpr (kVector) {
    constexpr int kRuns = kLaneElements / kVec<T>;
#pragma unroll
    for (int run = 0; run < kRuns; ++run) {
      const int start = d0 + run * kVec<T>;
      float part[kVec<T>];
      if (start < head_dim) {
        detail::unpack<T>(*reinterpret_cast<const uint4*>(p + start), part);
      } else {
#pragma unroll
        for (int i = 0; i < kVec<T>; ++i) part[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kVec<T>; ++i) v[run * kVec<T> + i] = part[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kLaneElements; ++i) {
      v[i] = d0 + i < head_dim ? load_float(p[d0 + i]) : 0.0f;
    }
  }
}

// The rotation's rounding of its products and sum (rotary_element): to T where `in_t`
// (rotary_dtype = dtype), else none. The device's conversion instructions round as the core's
// rounded_to does, in fewer registers (the software float16 rounding spills here).
template <typename T>
struct RotaryRound {
  bool in_t;
  __device__ __forceinline__ float operator()(float x) const {
    return in_t ? load_float(store_float<T>(x)) : x;
  }
};

// Element i of a rotary table stored as float32, or in T (a half model's own tables).
template <typename T>
__device__ __forceinline__ float table_value(const void* table, int64_t i, bool in_t) {
  return in_t ? load_float(static_cast<const T*>(table)[i]) : static_cast<const float*>(table)[i];
}

// Element e of the rotary embedding of head vector `raw`, rounded to T as the rotated tensor
// is stored.
template <typename T>
__device__ __forceinline__ float rotated_element(const float* raw, int e, int head_dim,
                                                 const float* cos, const float* sin,
                                                 bool round_in_t) {
  return load_float(store_float<T>(::latro::detail::rotary_element(
      raw, e, head_dim, cos[e], sin[e], RotaryRound<T>{round_in_t})));
}

// The rotary embedding of head vector `raw` (floats in shared memory) at elements [d0, d0 + 8),
// as stored; zeros beyond head_dim.
template <typename T>
__device__ __forceinline__ void rotate_lane(const float* raw, const float* cos, const float* sin,
                                            bool round_in_t, int d0, int head_dim,
                                            float (&v)[kLaneElements]) {
#pragma unroll
  for (int i = 0; i < kLaneElements; ++i) {
    const int e = d0 + i;
    v[i] = e < head_dim ? rotated_element<T>(raw, e, head_dim, cos, sin, round_in_t) : 0.0f;
  }
}

// Block-wide max (kMax) or sum of kQueryTile values per thread; every thread gets the result.
// Fixed combination order, so the result does not change from run to run.
template <bool kMax>
__device__ __forceinline__ void block_reduce_tile(float (&v)[kQueryTile],
                                                  float (&scratch)[kWarps][kQueryTile]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < kQueryTile; ++j) {
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask /= 2) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, v[j], mask);
      v[j] = kMax ? fmaxf(v[j], other) : v[j] + other;
    }
  }
  __syncthreads();  // the scratch may still be read by the previous reduction
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kQueryTile; ++j) scratch[warp][j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kQueryTile; ++j) {
    float total = scratch[0][j];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      total = kMax ? fmaxf(total, scratch[w][j]) : total + scratch[w][j];
    }
    v[j] = total;
  }
}

// a[j] for a runtime j without putting `a` in local memory (a dynamic index would).
__device__ __forceinline__ float pick(const float (&a)[kQueryTile], int j) {
  float value = a[0];
#pragma unroll
  for (int i = 1; i < kQueryTile; ++i) value = j == i ? a[i] : value;
  return value;
}

// Five blocks per SM (at most 102 registers; 96 without spills): left alone the compiler takes
// 128 for the rotary staging, and four blocks of four warps keep fewer loads in flight.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads, 5) decode_attention_kernel(const AttentionParams p) {
  const DecodeAttentionArgs& a = p.args;
  // Scores [kQueryTile][kMaxChunk]; after pass 2 the per-warp output sums
  // [kWarps][kQueryTile][kMaxDecodeHeadDim].
  __shared__ float scores[kQueryTile * kMaxChunk];
  __shared__ float scratch[kWarps][kQueryTile];
  // With a rotary embedding: the query tile and the newest key before rotation, and that key
  // rotated (as stored in the cache).
  __shared__ float raw_query[kQueryTile][kMaxDecodeHeadDim];
  __shared__ float raw_key[kMaxDecodeHeadDim];
  __shared__ float rotated_key[kMaxDecodeHeadDim];
  // The row's rotary tables as floats, read once from their own dtype (see rotary_dtype).
  __shared__ float cos_row[kMaxDecodeHeadDim];
  __shared__ float sin_row[kMaxDecodeHeadDim];

  const int64_t block = blockIdx.x;
  const int64_t split = block % p.splits;
  const int64_t g = (block / p.splits) % a.kv_heads;
  const int64_t r = block / (p.splits * a.kv_heads);
  const int64_t groups = a.heads / a.kv_heads;
  const int d = static_cast<int>(a.head_dim);
  T* out = static_cast<T*>(a.out);
  const int64_t length = *a.length;
  if (length < 1 || length > a.slots) {
    if (block == 0 && threadIdx.x == 0) detail::record(p.status, -1, StatusKind::LengthOutOfRange);
    if (p.splits == 1) {  // with splits, the combine kernel writes the NaN
      for (int64_t i = threadIdx.x; i < groups * d; i += kThreads) {
        out[(r * a.heads + g * groups) * d + i] = store_float<T>(NAN);
      }
    }
    return;
  }
  const int64_t chunk = (length + p.splits - 1) / p.splits;
  const int64_t begin = split * chunk < length ? split * chunk : length;
  const int64_t end = begin + chunk < length ? begin + chunk : length;
  const int64_t newest = length - 1;

  const int64_t head_offset = r * p.strides.cache_row + g * a.slots * d;
  T* keys = static_cast<T*>(a.cache_k) + head_offset;
  T* values = static_cast<T*>(a.cache_v) + head_offset;
  const T* fresh_k = a.new_k ? static_cast<const T*>(a.new_k) + (r * a.kv_heads + g) * d : nullptr;
  const T* fresh_v = a.new_v ? static_cast<const T*>(a.new_v) + (r * a.kv_heads + g) * d : nullptr;
  const bool owns_newest = begin <= newest && newest < end;
  const bool round_in_t = a.rotary_dtype != DType::Float32;  // then it is dtype (checked)
  const float* cos = nullptr;
  const float* sin = nullptr;
  if (a.rotary_cos != nullptr) {  // stored in T where not in float32
    for (int i = threadIdx.x; i < d; i += kThreads) {
      cos_row[i] = table_value<T>(a.rotary_cos, r * d + i, round_in_t);
      sin_row[i] = table_value<T>(a.rotary_sin, r * d + i, round_in_t);
    }
    __syncthreads();
    cos = cos_row;
    sin = sin_row;
  }
  const bool rotate_key = fresh_k != nullptr && cos != nullptr;
  if (rotate_key) {
    for (int i = threadIdx.x; i < d; i += kThreads) raw_key[i] = load_float(fresh_k[i]);
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += kThreads) {
      rotated_key[i] = rotated_element<T>(raw_key, i, d, cos, sin, round_in_t);
    }
    __syncthreads();
  }
  if (fresh_k != nullptr && owns_newest) {
    for (int i = threadIdx.x; i < d; i += kThreads) {
      keys[newest * d + i] = rotate_key ? store_float<T>(rotated_key[i]) : fresh_k[i];
      values[newest * d + i] = fresh_v[i];
    }
  }
  // Slot `newest` is read from fresh_k / rotated_key / fresh_v: no thread reads what another
  // writes.
  const T* newest_k = fresh_k ? fresh_k : keys + newest * d;
  const T* newest_v = fresh_v ? fresh_v : values + newest * d;
  const bool* allowed = a.slot_mask ? a.slot_mask + r * p.strides.mask_row : nullptr;

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int lanes = p.lanes;
  const int per_warp = kWarp / lanes;
  const int sub = lane / lanes;  // which of the warp's slots
  const int d0 = (lane % lanes) * kLaneElements;
  const int64_t step = static_cast<int64_t>(kWarps) * per_warp;
  const int64_t n = end - begin;

  for (int64_t q0 = 0; q0 < groups; q0 += kQueryTile) {
    const int tile = groups - q0 < kQueryTile ? static_cast<int>(groups - q0) : kQueryTile;
    const int64_t h0 = g * groups + q0;
    float q[kQueryTile][kLaneElements];
    if (cos != nullptr) {  // the rotation pairs element i with i +- D/2, held by another lane
      for (int i = threadIdx.x; i < tile * d; i += kThreads) {
        raw_query[i / d][i % d] =
            load_float(static_cast<const T*>(a.query)[(r * a.heads + h0) * d + i]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kQueryTile; ++j) {
      if (j < tile && cos != nullptr) {
        rotate_lane<T>(raw_query[j], cos, sin, round_in_t, d0, d, q[j]);
      } else if (j < tile) {
        load_lane<T, kVector>(static_cast<const T*>(a.query) + (r * a.heads + h0 + j) * d, d0, d,
                              q[j]);
      } else {
#pragma unroll
        for (int i = 0; i < kLaneElements; ++i) q[j][i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kLaneElements; ++i) q[j][i] *= a.scale;
    }

    // Pass 1: scores. Every lane of a warp runs the same iterations (the shuffles need them).
    for (int64_t base = begin + warp * per_warp; base < end; base += kInFlight * step) {
      int64_t slot[kInFlight];
      bool live[kInFlight];
      float k[kInFlight][kLaneElements];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t s = slot[u] = base + u * step + sub;
        live[u] = s < end && (allowed == nullptr || allowed[s]);
        if (live[u] && s == newest && rotate_key) {
#pragma unroll
          for (int i = 0; i < kLaneElements; ++i) {
            k[u][i] = d0 + i < d ? rotated_key[d0 + i] : 0.0f;
          }
        } else if (live[u]) {
          load_lane<T, kVector>(s == newest ? newest_k : keys + s * d, d0, d, k[u]);
        } else {
#pragma unroll
          for (int i = 0; i < kLaneElements; ++i) k[u][i] = 0.0f;
        }
      }
      float dot[kInFlight][kQueryTile];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
        for (int j = 0; j < kQueryTile; ++j) {
          dot[u][j] = 0.0f;
#pragma unroll
          for (int i = 0; i < kLaneElements; ++i) dot[u][j] = fmaf(q[j][i], k[u][i], dot[u][j]);
        }
      }
      for (int mask = lanes / 2; mask > 0; mask /= 2) {
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
          for (int j = 0; j < kQueryTile; ++j) {
            dot[u][j] += __shfl_xor_sync(0xFFFFFFFFu, dot[u][j], mask);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (d0 == 0 && slot[u] < end) {
#pragma unroll
          for (int j = 0; j < kQueryTile; ++j) {
            scores[j * kMaxChunk + (slot[u] - begin)] = live[u] ? dot[u][j] : detail::neg_inf();
          }
        }
      }
    }
    __syncthreads();

    // Softmax over the block's slots: max, then exp(score - max) in place and its sum.
    float top[kQueryTile], total[kQueryTile];
#pragma unroll
    for (int j = 0; j < kQueryTile; ++j) {
      top[j] = detail::neg_inf();
      for (int64_t i = threadIdx.x; i < n; i += kThreads) top[j] = fmaxf(top[j], scores[j * kMaxChunk + i]);
    }
    block_reduce_tile<true>(top, scratch);
#pragma unroll
    for (int j = 0; j < kQueryTile; ++j) {
      // No allowed slot: every score is -inf, and exp(-inf - 0) = 0 keeps the sum at 0. A NaN
      // score (fmaxf passes it over) gives a NaN weight and sum: the head's output is NaN.
      const float shift = top[j] == detail::neg_inf() ? 0.0f : top[j];
      total[j] = 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const float w = expf(scores[j * kMaxChunk + i] - shift);
        scores[j * kMaxChunk + i] = w;
        total[j] += w;
      }
    }
    block_reduce_tile<false>(total, scratch);  // its barriers publish the weights too

    // Pass 2: weighted values. A weight of 0 (masked slot) contributes nothing, not even a
    // stale NaN of the cache.
    float acc[kQueryTile][kLaneElements];
#pragma unroll
    for (int j = 0; j < kQueryTile; ++j) {
#pragma unroll
      for (int i = 0; i < kLaneElements; ++i) acc[j][i] = 0.0f;
    }
    // Each lane adds its slots in increasing order, kInFlight loaded at a time.
    for (int64_t first = begin + warp * per_warp + sub; first < end; first += kInFlight * step) {
      float w[kInFlight][kQueryTile];
      float v[kInFlight][kLaneElements];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t s = first + u * step;
        bool any = false;
#pragma unroll
        for (int j = 0; j < kQueryTile; ++j) {
          w[u][j] = s < end ? scores[j * kMaxChunk + (s - begin)] : 0.0f;
          any = any || w[u][j] != 0.0f;
        }
        if (any) {
          load_lane<T, kVector>(s == newest ? newest_v : values + s * d, d0, d, v[u]);
        } else {
#pragma unroll
          for (int i = 0; i < kLaneElements; ++i) v[u][i] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
        for (int j = 0; j < kQueryTile; ++j) {
#pragma unroll
          for (int i = 0; i < kLaneElements; ++i) {
            acc[j][i] += w[u][j] == 0.0f ? 0.0f : w[u][j] * v[u][i];
          }
        }
      }
    }
    for (int mask = lanes; mask < kWarp; mask *= 2) {
#pragma unroll
      for (int j = 0; j < kQueryTile; ++j) {
#pragma unroll
        for (int i = 0; i < kLaneElements; ++i) {
          acc[j][i] += __shfl_xor_sync(0xFFFFFFFFu, acc[j][i], mask);
        }
      }
    }
    __syncthreads();  // every warp is done with the weights: their memory takes the sums
    float* sums = scores;
    if (sub == 0) {
#pragma unroll
      for (int j = 0; j < kQueryTile; ++j) {
#pragma unroll
        for (int i = 0; i < kLaneElements; ++i) {
          sums[(warp * kQueryTile + j) * kMaxDecodeHeadDim + d0 + i] = acc[j][i];
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tile * d; i += kThreads) {
      const int j = i / d, e = i % d;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sums[(w * kQueryTile + j) * kMaxDecodeHeadDim + e];
      const int64_t head = r * a.heads + h0 + j;
      const float weight = pick(total, j);
      if (p.splits == 1) {
        out[head * d + e] = store_float<T>(weight == 0.0f ? 0.0f : sum * (1.0f / weight));
      } else {
        float* partial = p.partial + (head * p.splits + split) * (d + 2);
        if (e == 0) {
          partial[0] = pick(top, j);
          partial[1] = weight;
        }
        partial[2 + e] = sum;
      }
    }
    __syncthreads();  // the next tile's scores overwrite the sums
  }
}

// Merges the splits' partials of one (row, query head): weights exp(max_s - max) per split.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_attention_combine_kernel(const AttentionParams p) {
  const DecodeAttentionArgs& a = p.args;
  const int64_t head = blockIdx.x;  // r * heads + h
  const int d = static_cast<int>(a.head_dim);
  T* out = static_cast<T*>(a.out) + head * d;
  const int64_t length = *a.length;
  if (length < 1 || length > a.slots) {
    for (int e = threadIdx.x; e < d; e += kThreads) out[e] = store_float<T>(NAN);
    return;
  }
  const float* partial = p.partial + head * p.splits * (d + 2);
  float top = detail::neg_inf();
  for (int64_t s = 0; s < p.splits; ++s) top = fmaxf(top, partial[s * (d + 2)]);
  // A split with no allowed slot has weight 0 and is skipped; one with a NaN score has a NaN
  // weight (whatever its max) and makes the head NaN, as on the CPU.
  float total = 0.0f;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float weight = partial[s * (d + 2) + 1];
    if (weight != 0.0f) total += expf(partial[s * (d + 2)] - top) * weight;
  }
  const float inverse = total == 0.0f ? 0.0f : 1.0f / total;
  for (int e = threadIdx.x; e < d; e += kThreads) {
    float sum = 0.0f;
    for (int64_t s = 0; s < p.splits; ++s) {
      if (partial[s * (d + 2) + 1] != 0.0f) {
        sum += expf(partial[s * (d + 2)] - top) * partial[s * (d + 2) + 2 + e];
      }
    }
    out[e] = store_float<T>(sum * inverse);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int lanes_for(int64_t head_dim) {
  int lanes = 1;
  while (lanes * kLaneElements < head_dim) lanes *= 2;
  return lanes;
}

int64_t min_splits(const DecodeAttentionArgs& args) {
  return (args.slots + kMaxChunk - 1) / kMaxChunk;
}

template <typename T>
void launch_attention(const AttentionParams& params, cudaStream_t stream) {
  const DecodeAttentionArgs& a = params.args;
  const int64_t vec = kVec<T>;
  const bool vector = a.head_dim % vec == 0 && params.strides.cache_row % vec == 0 &&
                      aligned16(a.query) && aligned16(a.cache_k) && aligned16(a.cache_v) &&
                      aligned16(a.new_k) && aligned16(a.new_v);
  const dim3 grid(static_cast<unsigned int>(a.rows * a.kv_heads * params.splits));
  if (vector) {
    detail::launch(decode_attention_kernel<T, true>, grid, dim3(kThreads), stream, params);
  } else {
    detail::launch(decode_attention_kernel<T, false>, grid, dim3(kThreads), stream, params);
  }
  if (params.splits > 1) {
    detail::launch(decode_attention_combine_kernel<T>, dim3(static_cast<unsigned int>(a.rows * a.heads)),
                   dim3(kThreads), stream, params);
  }
}

}  // namespace

DecodeAttentionPlan plan_decode_attention(const DecodeAttentionArgs& args, int multiprocessors) {
  detail::check_decode_attention_args(args);
  LATRO_CHECK(multiprocessors >= 1, "multiprocessors must be >= 1, got ", multiprocessors);
  const int64_t blocks = args.rows * args.kv_heads;
  const int64_t wanted = blocks > 0 ? (2 * int64_t{multiprocessors} + blocks - 1) / blocks : 1;
  const int64_t most = (args.slots + kMinChunk - 1) / kMinChunk;
  DecodeAttentionPlan plan;
  plan.splits = std::max(min_splits(args), std::min(wanted, most));
  plan.workspace_floats =
      plan.splits > 1 ? args.rows * args.heads * plan.splits * (args.head_dim + 2) : 0;
  return plan;
}

void decode_attention(const DecodeAttentionArgs& args, const DecodeAttentionPlan& plan,
                      float* workspace, cudaStream_t stream, uint64_t* status) {
  const detail::DecodeAttentionStrides strides = detail::check_decode_attention_args(args);
  LATRO_CHECK(plan.splits >= min_splits(args), "plan.splits = ", plan.splits,
              " is below the ", min_splits(args), " that ", args.slots,
              " slots need (use plan_decode_attention)");
  const int64_t needed =
      plan.splits > 1 ? args.rows * args.heads * plan.splits * (args.head_dim + 2) : 0;
  LATRO_CHECK(plan.workspace_floats >= needed, "plan.workspace_floats = ", plan.workspace_floats,
              " is below the ", needed, " floats the splits need");
  LATRO_CHECK(workspace != nullptr || needed == 0 || args.rows == 0,
              "workspace is a null pointer");
  if (args.rows == 0) return;
  LATRO_CHECK(args.rows * args.kv_heads * plan.splits < (int64_t{1} << 31) &&
                  args.rows * args.heads < (int64_t{1} << 31),
              "rows x heads x splits exceeds the CUDA grid (", args.rows, " rows)");
  const AttentionParams params{args, strides, plan.splits, lanes_for(args.head_dim), workspace,
                               status};
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] { launch_attention<T>(params, stream); });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

// Internal device helpers of the CUDA kernels: element loads with 16-byte vectors, block-wide
// reductions and scans that always combine in the same order (so results do not change from
// run to run), row addressing and the device status word. Not installed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "latro/cuda.h"
#include "latro/latro.h"
#include "launch_checks.h"

// A device function the compiler must not inline (code kept out of a kernel's register
// budget); the CPU emulation, which has no such budget, lets the host compiler decide.
#if defined(LATRO_CUDA_EMULATION)
#define LATRO_DEVICE_NOINLINE
#else
#define LATRO_DEVICE_NOINLINE __noinline__
#endif

namespace latro::cuda::detail {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // 1024 threads

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

// ---------------------------------------------------------------- host-side argument checks
// Those shared with the CPU entry points (launch_checks.h), then the CUDA-only ones.
using ::latro::detail::BackwardStrides;
using ::latro::detail::check_latro_rewards_args;
using ::latro::detail::check_decode_attention_args;
using ::latro::detail::check_matrix;
using ::latro::detail::check_rms_norm_args;
using ::latro::detail::check_silu_mul_args;
using ::latro::detail::DecodeAttentionStrides;
using ::latro::detail::check_rloo_args;
using ::latro::detail::check_sample_args;
using ::latro::detail::check_token_logprobs_args;
using ::latro::detail::check_token_logprobs_backward_args;
using ::latro::detail::resolve_row_stride;

inline void check_groups(const RowGroups& groups, const char* name) {
  LATRO_CHECK(groups.rows_per_group >= 0 && groups.group_stride >= 0, name,
              " must have non-negative rows_per_group and group_stride");
}

// ---------------------------------------------------------------- tuning variables
// A tuning variable's value: unset or empty gives `unset`; anything but an integer in [0, max]
// is an error naming the variable (not a silent default, which would hide a typo in a sweep).
// Host code: read at launch, so benchmarks/bench_gpu.py can sweep a kernel's shape in one process.
inline int64_t tuning_variable(const char* name, int64_t max, int64_t unset = 0) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return unset;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  LATRO_CHECK(errno == 0 && *end == '\0' && value >= 0 && value <= max, name,
              " must be an integer in [0, ", max, "], got '", text, "'");
  return value;
}

// Blocks for a grid that gives each row one block (rows beyond the cap loop inside the kernel).
inline unsigned int row_blocks(int64_t rows) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 30;
  return static_cast<unsigned int>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

// kernel<<<grid, block, 0, stream>>>(args...), the one spelling of a launch: a C++ compiler
// cannot parse <<< >>>, and cpp_tests/cuda_emulator runs the kernels on the CPU through here.
// No kernel uses dynamic shared memory.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
            Args&&... args) {
#if defined(LATRO_CUDA_EMULATION)
  (void)stream;
  ::latro_emu::launch(grid, block, 0, reinterpret_cast<::latro_emu::KernelKey>(kernel),
                      [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// ---------------------------------------------------------------- rows
__device__ __forceinline__ int64_t row_start(int64_t row, int64_t row_stride, RowGroups groups) {
  if (groups.rows_per_group <= 0) return row * row_stride;
  return (row / groups.rows_per_group) * groups.group_stride +
         (row % groups.rows_per_group) * row_stride;
}

// ---------------------------------------------------------------- status
__device__ __forceinline__ void record(uint64_t* status, int64_t row, StatusKind kind) {
  if (status == nullptr) return;
  const uint64_t code = (static_cast<uint64_t>(row + 1) << 4) | static_cast<uint64_t>(kind);
  atomicMin(reinterpret_cast<unsigned long long*>(status), static_cast<unsigned long long>(code));
}

// ---------------------------------------------------------------- element loads
// Storage type -> float32, exact for every input (the core's bit-level types carry no
// arithmetic; these are the device's conversion instructions).
__device__ __forceinline__ float load_float(float x) { return x; }
__device__ __forceinline__ float load_float(bfloat16 x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float load_float(float16 x) {
  return __half2float(__ushort_as_half(x.bits));
}

// float32 -> storage type, round to nearest even (as the CPU's from_float).
template <typename T>
__device__ __forceinline__ T store_float(float x);
template <>
__device__ __forceinline__ float store_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bfloat16 store_float<bfloat16>(float x) {
  return bfloat16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
}
template <>
__device__ __forceinline__ float16 store_float<float16>(float x) {
  return float16{__half_as_ushort(__float2half_rn(x))};
}

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// `raw` by value: the caller's body[j] is then one 16-byte load (LDG.128). Through a reference
// the compiler read the elements straight from global memory, four scalar loads per vector.
template <typename T>
__device__ __forceinline__ void unpack(const uint4 raw, float (&out)[kVec<T>]) {
  const T* items = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = load_float(items[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[kVec<T>]) {
  uint4 raw;
  T* items = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) items[i] = store_float<T>(in[i]);
  return raw;
}

// kVec<T> elements as one 16-byte unit: through a pointer to it, a thread loads or stores a
// whole vector at once (LDG.128 / STG.128). For arrays whose every pointer is 16-byte aligned
// (is_aligned16) and whose length is a multiple of kVec<T>.
template <typename T>
struct alignas(16) Vec16 {
  T items[kVec<T>];
};
static_assert(sizeof(Vec16<float>) == 16 && sizeof(Vec16<bfloat16>) == 16 &&
                  sizeof(Vec16<float16>) == 16,
              "a Vec16 is one 16-byte load");

inline bool is_aligned16(const void* p) {  // nullptr (an absent array) counts as aligned
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Elements before `p` reaches 16-byte alignment (p is always element-aligned).
template <typename T>
__device__ __forceinline__ int64_t misaligned_head(const T* p, int64_t n) {
  const uint64_t address = reinterpret_cast<uint64_t>(p);
  const int64_t head = static_cast<int64_t>(((16 - (address & 15)) & 15) / sizeof(T));
  return head < n ? head : n;
}

// Asks L2 for the 128-byte line holding p, without waiting and without a destination register
// (prefetch.L2 on a generic address: a hint the hardware may drop). The CPU emulation reads the
// byte instead, so AddressSanitizer sees a prefetch outside the buffer.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(LATRO_CUDA_EMULATION)
  (void)*static_cast<const volatile unsigned char*>(p);
#else
  asm volatile("prefetch.L2 [%0];" ::"l"(p));
#endif
}

// Calls f(index, values) over row[0, n) split across the block's threads: a scalar head until
// 16-byte alignment, then kVectors consecutive 16-byte vectors per call (coalesced for one),
// then a scalar tail. `values` is a float array of 1 or kVectors * kVec<T> elements; each
// thread sees its indices in increasing order. kVectors > 1 hands a thread more consecutive
// tokens per call (the plain sampler's float32 rows: eight, one coarse Philox block): a warp's
// load then covers every other 16 bytes of a span and its next load the rest, from L1.
//
// One 16-byte load in flight per thread: four loads issued before processing any, held to 64
// registers, made the plain sampler slower on the H100 run of 2026-11-27 (0.263 ms against
// 0.151), and loading each thread's next vector before processing the current one changed
// nothing on the run after (0.155-0.163 ms for 256 rows, flat or peaked).
// prefetch_ahead > 0: with each call, the thread also asks L2 for its vectors that many
// iterations ahead (prefetch_l2), which keeps more of the row in flight without registers (for
// kernels already at their register budget); 0 leaves it out. Results never depend on it.
template <int kVectors = 1, typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t n, F&& f,
                                                int64_t prefetch_ahead = 0) {
  constexpr int kTokens = kVectors * kVec<T>;
  const int64_t head = misaligned_head(row, n);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const float one[1] = {load_float(row[i])};
    f(i, one);
  }
  const int64_t calls = (n - head) / kTokens;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  const int64_t stride = blockDim.x;
  const int64_t ahead = prefetch_ahead * stride;
  for (int64_t j = threadIdx.x; j < calls; j += stride) {
    uint4 current[kVectors];
#pragma unroll
    for (int q = 0; q < kVectors; ++q) current[q] = body[j * kVectors + q];
    if (ahead > 0 && j + ahead < calls) prefetch_l2(body + (j + ahead) * kVectors);
    float values[kTokens];
#pragma unroll
    for (int q = 0; q < kVectors; ++q) {
      float one[kVec<T>];
      unpack<T>(current[q], one);
#pragma unroll
      for (int i = 0; i < kVec<T>; ++i) values[q * kVec<T> + i] = one[i];
    }
    f(head + j * kTokens, values);
  }
  for (int64_t i = head + calls * kTokens + threadIdx.x; i < n; i += blockDim.x) {
    const float one[1] = {load_float(row[i])};
    f(i, one);
  }
}

// The length of the float array a for_each_in_row callback receives (1 or kVectors * kVec<T>).
template <typename A>
constexpr int count_of = static_cast<int>(std::extent_v<std::remove_cv_t<std::remove_reference_t<A>>>);

// ---------------------------------------------------------------- running log-sum-exp
// Two partial sums of exp(x - max), each with its own max, merged onto the larger max. A side
// whose max is -inf holds only exp(-inf) = 0 terms (or NaN, which must survive: NaN * 0 is
// NaN), so it is scaled by 0 instead of exp(-inf - -inf).
struct ScaledSum {
  float max;
  double sum;
};
__device__ __forceinline__ ScaledSum merge_scaled_sums(float a_max, double a_sum, float b_max,
                                                       double b_sum) {
  const float top = fmaxf(a_max, b_max);
  const double scale_a = a_max == neg_inf() ? 0.0 : static_cast<double>(expf(a_max - top));
  const double scale_b = b_max == neg_inf() ? 0.0 : static_cast<double>(expf(b_max - top));
  return ScaledSum{top, a_sum * scale_a + b_sum * scale_b};
}

// ---------------------------------------------------------------- shuffles and reductions
template <typename T>
__device__ __forceinline__ T shfl_xor(const T& value, int mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are made of 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t words[kWords];
  memcpy(words, &value, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xFFFFFFFFu, words[i], mask);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// Block-wide all-reduce with a fixed combination tree (butterfly within warps, then warp 0
// over the warp results): every thread gets the same, run-to-run reproducible result.
// `scratch` holds kMaxWarps values of T; blockDim.x is a power of two >= 32. Op must be
// commutative (a op b == b op a exactly), so both lanes of a butterfly pair agree.
template <typename T, typename Op>
__device__ __forceinline__ T block_all_reduce(T value, Op op, T* scratch) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) value = op(value, shfl_xor(value, mask));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    // The warp count is a power of two (block sizes are), so the butterfly over the first
    // `warps` lanes never mixes in the lanes beyond them.
    T v = scratch[lane < warps ? lane : 0];
    for (int mask = warps / 2; mask > 0; mask /= 2) v = op(v, shfl_xor(v, mask));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Exclusive prefix of per-thread totals in thread order, plus the block total.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T value, T* scratch, T* total) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  T inclusive = value;
#pragma unroll
  for (int delta = 1; delta < kWarp; delta *= 2) {
    const T up = __shfl_up_sync(0xFFFFFFFFu, inclusive, delta);
    if (lane >= delta) inclusive += up;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    T running = T(0);
    for (int w = 0; w < warps; ++w) {
      const T here = scratch[w];
      scratch[w] = running;
      running += here;
    }
    scratch[kMaxWarps] = running;
  }
  __syncthreads();
  const T result = scratch[warp] + inclusive - value;
  *total = scratch[kMaxWarps];
  __syncthreads();
  return result;
}

}  // namespace latro::cuda::detail
